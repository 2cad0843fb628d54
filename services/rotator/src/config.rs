//! Rotator configuration.

use std::time::Duration;

use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_store::StoreConfig;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Scheduler and workers.
    All,
    /// Only the scheduler (scan, claim, queue) and the rotate-now handler.
    Scheduler,
    /// Only workers.
    Worker,
}

/// Everything the rotator needs, read once at start.
#[derive(Debug, Clone)]
pub struct RotatorConfig {
    /// `ROTATOR_ROLE`: `all` (default), `scheduler` or `worker`.
    pub role: Role,
    /// `ROTATE_SCAN_INTERVAL` (seconds, default 10).
    pub scan_interval: Duration,
    /// `ROTATE_SCAN_BATCH` (default 500): most proxies claimed per scan.
    pub scan_batch: i64,
    /// `ROTATE_DRAIN_MAX` (seconds, default 120): longest a rotation waits for active leases to be returned.
    pub drain_max: Duration,
    /// `ROTATE_LOCK_TTL` (seconds, default drain + 180): how long a rotation lock lives without its job renewing it.
    /// A working job renews it every third of this; the lease service takes back a lock whose job stopped (crashed,
    /// gave up) once it runs out, so this is how long a lost job can keep a proxy out of service.
    pub lock_ttl: Duration,
    /// `ROTATE_TIMEOUT` (seconds, default 10): timeout of each provider and IP-check call.
    pub http_timeout: Duration,
    /// `IP_CHECK_URLS`: public-IP echo services fetched through the proxy, in order.
    pub ip_check_urls: Vec<String>,
    /// `IP_CHECK_TRIES` (default 3).
    pub ip_check_tries: u32,
    /// `IP_CHECK_DELAY` (seconds, default 5): wait between tries.
    pub ip_check_delay: Duration,
    /// `IP_REGION_URL`: geo-IP lookup, `{ip}` replaced by the public IP; unset skips it.
    pub ip_region_url: Option<String>,
    /// `ROTATE_ERROR_BACKOFF` (seconds, default 60): how far `next_rotate` moves after a failed rotation.
    pub error_backoff: Duration,
    /// `ROTATOR_WORKERS` (default 16): jobs one process runs at once.
    pub workers: usize,
    /// `ROTATE_ACK_WAIT` (seconds, default 30): JetStream redelivers a job not acknowledged (or kept alive) in time.
    pub ack_wait: Duration,
    /// `ROTATE_MAX_DELIVER` (default 5): deliveries of one job before JetStream gives up on it.
    pub max_deliver: i64,
    /// `ROTATE_UNIQUE_TRIES` (default 3): rotations tried again when one gives a public IP another active proxy
    /// already exits on; 0 checks without rotating again.
    pub unique_tries: u32,
    /// `CALLBACK_TIMEOUT` (seconds, default 5): timeout of one callback POST.
    pub callback_timeout: Duration,
    /// `CALLBACK_MAX_ATTEMPTS` (default 5): deliveries of one notice before it is given up.
    pub callback_max_attempts: i64,
    /// `CALLBACK_RETRY_BASE` (seconds, default 2): first retry delay; each later one is 4× longer (max 10 min).
    pub callback_retry_base: Duration,
    /// `CALLBACK_ALLOW_PRIVATE` (default false): deliver to loopback, private and link-local addresses.
    pub callback_allow_private: bool,
    /// `ROTATOR_ADMIN_ADDR` (default `0.0.0.0:9102`): `/metrics` and `/healthz`.
    pub admin_addr: std::net::SocketAddr,
    /// NATS.
    pub nats: NatsConfig,
    /// MongoDB.
    pub store: StoreConfig,
}

impl RotatorConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let role = match env.get("ROTATOR_ROLE").as_deref().map(str::trim) {
            None | Some("all") => Role::All,
            Some("scheduler") => Role::Scheduler,
            Some("worker") => Role::Worker,
            Some(_) => return Err(ConfigError::invalid("ROTATOR_ROLE", "expected all, scheduler or worker")),
        };
        let drain_max = env.seconds_or("ROTATE_DRAIN_MAX", Duration::from_secs(120))?;
        let lock_ttl = env.seconds_or("ROTATE_LOCK_TTL", drain_max + Duration::from_secs(180))?;
        // Renewed every third of itself: shorter than a few seconds, a slow lease-leader failover would lose it.
        if lock_ttl < Duration::from_secs(3) {
            return Err(ConfigError::invalid("ROTATE_LOCK_TTL", "must be at least 3 seconds"));
        }
        let http_timeout = env.seconds_or("ROTATE_TIMEOUT", Duration::from_secs(10))?;
        let ip_check_urls: Vec<String> = env.list("IP_CHECK_URLS")?;
        let ip_check_urls = if ip_check_urls.is_empty() {
            vec!["https://api.ipify.org".to_owned(), "https://api.myip.com".to_owned()]
        } else {
            ip_check_urls
        };
        for u in &ip_check_urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConfigError::invalid("IP_CHECK_URLS", format!("{u:?} is not an http(s) URL")));
            }
        }
        let ip_check_tries: u32 = env.parse_or("IP_CHECK_TRIES", 3)?;
        if ip_check_tries == 0 {
            return Err(ConfigError::invalid("IP_CHECK_TRIES", "must be at least 1"));
        }
        let workers: usize = env.parse_or("ROTATOR_WORKERS", 16)?;
        if workers == 0 {
            return Err(ConfigError::invalid("ROTATOR_WORKERS", "must be at least 1"));
        }
        let max_deliver: i64 = env.parse_or("ROTATE_MAX_DELIVER", 5)?;
        if max_deliver < 1 {
            return Err(ConfigError::invalid("ROTATE_MAX_DELIVER", "must be at least 1"));
        }
        Ok(Self {
            role,
            scan_interval: env.seconds_or("ROTATE_SCAN_INTERVAL", Duration::from_secs(10))?,
            scan_batch: env.parse_or("ROTATE_SCAN_BATCH", 500)?,
            drain_max,
            lock_ttl,
            http_timeout,
            ip_check_urls,
            ip_check_tries,
            ip_check_delay: env.seconds_or("IP_CHECK_DELAY", Duration::from_secs(5))?,
            ip_region_url: env.get("IP_REGION_URL"),
            error_backoff: env.seconds_or("ROTATE_ERROR_BACKOFF", Duration::from_secs(60))?,
            workers,
            ack_wait: env.seconds_or("ROTATE_ACK_WAIT", Duration::from_secs(30))?,
            max_deliver,
            unique_tries: env.parse_or("ROTATE_UNIQUE_TRIES", 3)?,
            callback_timeout: env.seconds_or("CALLBACK_TIMEOUT", Duration::from_secs(5))?,
            callback_max_attempts: env.parse_or("CALLBACK_MAX_ATTEMPTS", 5)?,
            callback_retry_base: env.seconds_or("CALLBACK_RETRY_BASE", Duration::from_secs(2))?,
            callback_allow_private: env.bool_or("CALLBACK_ALLOW_PRIVATE", false)?,
            admin_addr: env.parse_or("ROTATOR_ADMIN_ADDR", std::net::SocketAddr::from(([0, 0, 0, 0], 9102)))?,
            nats: NatsConfig::from_env(env)?,
            store: StoreConfig::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = RotatorConfig::from_env(&Env::default()).expect("defaults are valid");
        assert_eq!(c.scan_interval, Duration::from_secs(10));
        assert_eq!(c.drain_max, Duration::from_secs(120));
        assert_eq!(c.ip_check_urls.len(), 2);
        let e = RotatorConfig::from_env(&Env::from_pairs([("ROTATOR_ROLE", "boss")])).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("ROTATOR_ROLE"));
        let e = RotatorConfig::from_env(&Env::from_pairs([("IP_CHECK_URLS", "ftp://x")])).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("IP_CHECK_URLS"));
        let short = Env::from_pairs([("ROTATE_LOCK_TTL", "2")]);
        let e = RotatorConfig::from_env(&short).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("ROTATE_LOCK_TTL"), "a lock TTL too short to renew is refused");
        // Renewed while the job works, the lock may be shorter than the drain.
        let renewed = Env::from_pairs([("ROTATE_DRAIN_MAX", "60"), ("ROTATE_LOCK_TTL", "10")]);
        assert!(RotatorConfig::from_env(&renewed).is_ok());
    }
}
