//! Lease service configuration.

use std::time::Duration;

use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_store::StoreConfig;

/// Everything the lease service needs, read once at start.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// `PROXY_USE_MAX` (default 3): leases one proxy may hold at once, and per rotation cycle.
    pub proxy_use_max: u32,
    /// `WEBHOOK_RETURN_PROXY`: base of the return URL handed to consumers.
    pub webhook_return_proxy: String,
    /// `LEASE_INDEX_REFRESH` (seconds, default 60): period of the leader's full re-read of the catalogue, a safety
    /// net for changes written to MongoDB without telling the lease service.
    pub index_refresh: Duration,
    /// `LEASE_LEADER_TTL` (seconds, default 1.5): how long the leader's election entry outlives its last renewal,
    /// which is how long a standby waits before it takes over from a leader that died.
    pub leader_ttl: Duration,
    /// `LEASE_LOG_REPLICAS` (default `JETSTREAM_REPLICAS`, itself 1 by default): copies of the lease log stream and
    /// of the election bucket; 3 on a three-server NATS cluster so an acknowledged lease also survives the loss of a
    /// server.
    pub log_replicas: usize,
    /// `LEASE_MAX_IN_FLIGHT` (default 512): requests handled concurrently by one replica.
    pub max_in_flight: usize,
    /// `LEASE_TTL` (seconds, default 3600; 0 disables): a lease not returned within this time is taken back (its
    /// holder called back with reason `expired`). The original's leases never expired, so a consumer that crashed held
    /// its slot until the next rotation.
    pub lease_ttl: Option<Duration>,
    /// `CALLBACK_ALLOW_PRIVATE` (default false): accept consumer callback URLs on private, loopback or link-local
    /// addresses. Leave off unless every consumer is trusted: otherwise the pool can be used to reach internal
    /// services (SSRF).
    pub callback_allow_private: bool,
    /// `BAN_BASE` (seconds, default 600) and `BAN_MAX` (seconds, default 86400): how long a site's ban of an exit
    /// IP lasts the first time, doubling on each repeat up to the max.
    pub bans: crate::engine::bans::BanPolicy,
    /// `HEALTH_FAIL_THRESHOLD` (default 3): failures in a row (`proxy_error`, `timeout`, the forward door's upstream
    /// failures) after which a proxy is quarantined: out of the pool, rotated at once, back when the rotation
    /// succeeds.
    pub health_fail_threshold: u32,
    /// `ROTATE_MIN_INTERVAL` (seconds, default 30): how often a holder may ask for a new IP for one proxy.
    pub rotate_min_interval: Duration,
    /// Identifies this replica: its election value and the `leader` of its log batches (`HOSTNAME` in Kubernetes,
    /// else random).
    pub instance_id: String,
    /// `LEASE_ADMIN_ADDR` (default `0.0.0.0:9100`): `/metrics`, `/healthz`, `/readyz`.
    pub admin_addr: std::net::SocketAddr,
    /// NATS.
    pub nats: NatsConfig,
    /// MongoDB.
    pub store: StoreConfig,
}

impl LeaseConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let proxy_use_max: u32 = env.parse_or("PROXY_USE_MAX", 3)?;
        if proxy_use_max == 0 || proxy_use_max > 10_000 {
            return Err(ConfigError::invalid("PROXY_USE_MAX", "must be between 1 and 10000"));
        }
        let webhook_return_proxy =
            env.get("WEBHOOK_RETURN_PROXY").unwrap_or_else(|| "http://127.0.0.1:33033/webhook/return-proxy".to_owned());
        if !(webhook_return_proxy.starts_with("http://") || webhook_return_proxy.starts_with("https://")) {
            return Err(ConfigError::invalid("WEBHOOK_RETURN_PROXY", "must be an http(s) URL"));
        }
        let max_in_flight: usize = env.parse_or("LEASE_MAX_IN_FLIGHT", 512)?;
        if max_in_flight == 0 {
            return Err(ConfigError::invalid("LEASE_MAX_IN_FLIGHT", "must be at least 1"));
        }
        let leader_ttl = env.seconds_or("LEASE_LEADER_TTL", Duration::from_millis(1500))?;
        if leader_ttl < Duration::from_millis(500) || leader_ttl > Duration::from_secs(60) {
            return Err(ConfigError::invalid("LEASE_LEADER_TTL", "must be between 0.5 and 60 seconds"));
        }
        // The log and the election follow the deployment's JETSTREAM_REPLICAS unless set on their own.
        let nats_replicas: usize = env.parse_or("JETSTREAM_REPLICAS", 1)?;
        let log_replicas: usize = env.parse_or("LEASE_LOG_REPLICAS", nats_replicas)?;
        if !(1..=5).contains(&log_replicas) {
            return Err(ConfigError::invalid("LEASE_LOG_REPLICAS", "must be between 1 and 5"));
        }
        let ban_base = env.seconds_or("BAN_BASE", Duration::from_secs(600))?;
        let ban_max = env.seconds_or("BAN_MAX", Duration::from_secs(86_400))?;
        if ban_base.is_zero() {
            return Err(ConfigError::invalid("BAN_BASE", "must be positive"));
        }
        if ban_max < ban_base {
            return Err(ConfigError::invalid("BAN_MAX", "must be at least BAN_BASE"));
        }
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let health_fail_threshold: u32 = env.parse_or("HEALTH_FAIL_THRESHOLD", 3)?;
        if !(1..=1000).contains(&health_fail_threshold) {
            return Err(ConfigError::invalid("HEALTH_FAIL_THRESHOLD", "must be between 1 and 1000"));
        }
        Ok(Self {
            bans: crate::engine::bans::BanPolicy { base_ms: ms(ban_base), max_ms: ms(ban_max) },
            health_fail_threshold,
            rotate_min_interval: env.seconds_or("ROTATE_MIN_INTERVAL", Duration::from_secs(30))?,
            proxy_use_max,
            webhook_return_proxy: webhook_return_proxy.trim_end_matches('/').to_owned(),
            index_refresh: env.seconds_or("LEASE_INDEX_REFRESH", Duration::from_secs(60))?,
            leader_ttl,
            log_replicas,
            max_in_flight,
            callback_allow_private: env.bool_or("CALLBACK_ALLOW_PRIVATE", false)?,
            lease_ttl: match env.parse_or::<f64>("LEASE_TTL", 3600.0)? {
                0.0 => None,
                t if t > 0.0 && t.is_finite() => Some(Duration::from_secs_f64(t)),
                _ => return Err(ConfigError::invalid("LEASE_TTL", "must be 0 (off) or a positive number of seconds")),
            },
            instance_id: env.get("HOSTNAME").unwrap_or_else(|| format!("lease-{}", bson::oid::ObjectId::new())),
            admin_addr: env.parse_or("LEASE_ADMIN_ADDR", std::net::SocketAddr::from(([0, 0, 0, 0], 9100)))?,
            nats: NatsConfig::from_env(env)?,
            store: StoreConfig::from_env(env)?,
        })
    }

    /// The engine's part of the configuration.
    pub fn engine(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            max: self.proxy_use_max,
            instance_id: self.instance_id.clone(),
            leader_ttl: self.leader_ttl,
            log_replicas: self.log_replicas,
            append_timeout: Duration::from_secs(2),
            lease_ttl: self.lease_ttl,
        }
    }
}
