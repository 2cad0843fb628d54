//! Forward door configuration.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use proxypool_contracts::Area;
use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_settings::Secret;

use crate::username::Grammar;

/// Everything the forward door needs, read once at start.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// `FORWARD_HTTP_ADDR` (default `0.0.0.0:33080`): the HTTP proxy door.
    pub http_addr: SocketAddr,
    /// `FORWARD_SOCKS_ADDR` (default `0.0.0.0:33081`): the SOCKS5 door.
    pub socks_addr: SocketAddr,
    /// `FORWARD_ADMIN_ADDR` (default `0.0.0.0:9104`): `/metrics`, `/healthz`, `/readyz`.
    pub admin_addr: SocketAddr,
    /// `ALLOWED_API_KEY`: the consumer key, given as the proxy password.
    pub allowed_api_key: Secret<String>,
    /// `IP_ALLOWED`: client addresses or ranges allowed through the door. Empty allows nobody.
    pub ip_allowed: Vec<IpNet>,
    /// `TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed (HTTP door only). Empty believes nobody.
    pub trusted_proxies: Vec<IpNet>,
    /// `FORWARD_DEFAULT_AREA` (default `vn`): the area when the username names none.
    pub default_area: Area,
    /// `FORWARD_RETRIES` (default 2): other proxies tried after an upstream fails before the client got a byte.
    pub retries: u32,
    /// `FORWARD_SESSION_DEFAULT` (minutes, default 10; fractions allowed): how long an idle sticky session keeps its
    /// lease when its username names no `sesstime`.
    pub session_default: Duration,
    /// `FORWARD_SESSION_MAX` (minutes, default 60): the largest `sesstime` a username may ask for.
    pub session_max_minutes: u32,
    /// `FORWARD_CONNECT_TIMEOUT` (seconds, default 10): reaching an upstream and getting its tunnel.
    pub connect_timeout: Duration,
    /// `FORWARD_HANDSHAKE_TIMEOUT` (seconds, default 10): a client's request head, or its SOCKS5 handshake.
    pub handshake_timeout: Duration,
    /// `FORWARD_IDLE_TIMEOUT` (seconds, default 300): a connection or tunnel with no byte either way is closed.
    pub idle_timeout: Duration,
    /// `FORWARD_HEADER_MAX` (bytes, default 16384, at least 8192): the largest request head.
    pub header_max: usize,
    /// `FORWARD_MAX_CONNS_PER_CONSUMER` (default 512): open connections per consumer name.
    pub max_conns_per_consumer: usize,
    /// `FORWARD_MAX_CONNS_PER_IP` (default 1024): open connections per client IP (before authentication too, so
    /// that one host cannot fill the door with handshakes). A trusted load balancer's address is not limited.
    pub max_conns_per_ip: usize,
    /// `FORWARD_MAX_CONNS` (default 20000): open client connections in all.
    pub max_conns: usize,
    /// NATS.
    pub nats: NatsConfig,
}

impl ForwardConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let key = env.required("ALLOWED_API_KEY")?;
        if key.len() < 16 {
            return Err(ConfigError::invalid("ALLOWED_API_KEY", "must be at least 16 characters"));
        }
        let default_area = match env.get("FORWARD_DEFAULT_AREA") {
            None => Area::Vn,
            Some(v) => {
                v.trim().parse().map_err(|()| ConfigError::invalid("FORWARD_DEFAULT_AREA", "expected vn or global"))?
            }
        };
        let session_default_minutes: f64 = env.parse_or("FORWARD_SESSION_DEFAULT", 10.0)?;
        let session_max_minutes: u32 = env.parse_or("FORWARD_SESSION_MAX", 60)?;
        if session_max_minutes == 0 || session_max_minutes > 7 * 24 * 60 {
            return Err(ConfigError::invalid("FORWARD_SESSION_MAX", "must be 1 to 10080 minutes"));
        }
        if !(session_default_minutes > 0.0 && session_default_minutes <= f64::from(session_max_minutes)) {
            return Err(ConfigError::invalid(
                "FORWARD_SESSION_DEFAULT",
                "must be above 0 and at most FORWARD_SESSION_MAX",
            ));
        }
        let session_default = Duration::from_secs_f64(session_default_minutes * 60.0);
        let header_max: usize = env.parse_or("FORWARD_HEADER_MAX", 16 * 1024)?;
        if !(8192..=1024 * 1024).contains(&header_max) {
            return Err(ConfigError::invalid("FORWARD_HEADER_MAX", "must be 8192 to 1048576 bytes"));
        }
        let retries: u32 = env.parse_or("FORWARD_RETRIES", 2)?;
        if retries > 10 {
            return Err(ConfigError::invalid("FORWARD_RETRIES", "must be 0 to 10"));
        }
        let max_conns: usize = env.parse_or("FORWARD_MAX_CONNS", 20_000)?;
        let max_conns_per_consumer: usize = env.parse_or("FORWARD_MAX_CONNS_PER_CONSUMER", 512)?;
        let max_conns_per_ip: usize = env.parse_or("FORWARD_MAX_CONNS_PER_IP", 1024)?;
        for (name, v) in [
            ("FORWARD_MAX_CONNS", max_conns),
            ("FORWARD_MAX_CONNS_PER_CONSUMER", max_conns_per_consumer),
            ("FORWARD_MAX_CONNS_PER_IP", max_conns_per_ip),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        Ok(Self {
            http_addr: env.parse_or("FORWARD_HTTP_ADDR", SocketAddr::from(([0, 0, 0, 0], 33080)))?,
            socks_addr: env.parse_or("FORWARD_SOCKS_ADDR", SocketAddr::from(([0, 0, 0, 0], 33081)))?,
            admin_addr: env.parse_or("FORWARD_ADMIN_ADDR", SocketAddr::from(([0, 0, 0, 0], 9104)))?,
            allowed_api_key: Secret::new(key),
            ip_allowed: env.nets("IP_ALLOWED")?,
            trusted_proxies: env.nets("TRUSTED_PROXIES")?,
            default_area,
            retries,
            session_default,
            session_max_minutes,
            connect_timeout: env.seconds_or("FORWARD_CONNECT_TIMEOUT", Duration::from_secs(10))?,
            handshake_timeout: env.seconds_or("FORWARD_HANDSHAKE_TIMEOUT", Duration::from_secs(10))?,
            idle_timeout: env.seconds_or("FORWARD_IDLE_TIMEOUT", Duration::from_secs(300))?,
            header_max,
            max_conns_per_consumer,
            max_conns_per_ip,
            max_conns,
            nats: NatsConfig::from_env(env)?,
        })
    }

    /// The username grammar with these limits.
    pub fn grammar(&self) -> Grammar {
        Grammar { default_area: self.default_area, session_max_minutes: self.session_max_minutes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(pairs: &[(&str, &str)]) -> String {
        let mut all = vec![("ALLOWED_API_KEY", "0123456789abcdef0123")];
        all.extend_from_slice(pairs);
        ForwardConfig::from_env(&Env::from_pairs(all)).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn validates_and_names_variables() {
        assert_eq!(err(&[]), "");
        assert!(ForwardConfig::from_env(&Env::default()).is_err());
        assert!(err(&[("FORWARD_HTTP_ADDR", "nope")]).contains("FORWARD_HTTP_ADDR"));
        assert!(err(&[("FORWARD_SESSION_DEFAULT", "90")]).contains("FORWARD_SESSION_DEFAULT"));
        assert!(err(&[("FORWARD_HEADER_MAX", "100")]).contains("FORWARD_HEADER_MAX"));
        assert!(err(&[("FORWARD_DEFAULT_AREA", "mars")]).contains("FORWARD_DEFAULT_AREA"));
        assert!(err(&[("IP_ALLOWED", "lan")]).contains("IP_ALLOWED"));
        assert!(err(&[("FORWARD_RETRIES", "11")]).contains("FORWARD_RETRIES"));
    }
}
