//! Gateway configuration.

use ipnet::IpNet;
use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_settings::Secret;
use proxypool_store::StoreConfig;

/// Everything the gateway needs, read once at start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `PORT` (default 33033).
    pub port: u16,
    /// `ALLOWED_API_KEY`: the static key of consumers and machine admin clients.
    pub allowed_api_key: Secret<String>,
    /// `API_KEY`: the JWT signing secret shared with the auth service.
    pub jwt_secret: Secret<String>,
    /// `IP_ALLOWED`: addresses or CIDR ranges allowed to lease and return proxies. Empty allows nobody.
    pub ip_allowed: Vec<IpNet>,
    /// `TRUSTED_PROXIES`: addresses or ranges of reverse proxies whose `X-Forwarded-For` is believed. Empty (the
    /// default) believes nobody, so the header cannot be used to spoof an allowed IP.
    pub trusted_proxies: Vec<IpNet>,
    /// `IMPORT_MAX_BYTES` (default 20 MiB): largest spreadsheet `POST /api/proxies/import` accepts (413 above).
    pub import_max_bytes: usize,
    /// NATS.
    pub nats: NatsConfig,
    /// MongoDB.
    pub store: StoreConfig,
}

impl GatewayConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let key = env.required("ALLOWED_API_KEY")?;
        if key.len() < 16 {
            return Err(ConfigError::invalid("ALLOWED_API_KEY", "must be at least 16 characters"));
        }
        let jwt_secret = env.required("API_KEY")?;
        if jwt_secret.len() < 16 {
            return Err(ConfigError::invalid("API_KEY", "must be at least 16 characters"));
        }
        if jwt_secret == key {
            return Err(ConfigError::invalid("API_KEY", "must differ from ALLOWED_API_KEY"));
        }
        Ok(Self {
            port: env.parse_or("PORT", 33033)?,
            allowed_api_key: Secret::new(key),
            jwt_secret: Secret::new(jwt_secret),
            ip_allowed: env.nets("IP_ALLOWED")?,
            trusted_proxies: env.nets("TRUSTED_PROXIES")?,
            import_max_bytes: env.parse_or("IMPORT_MAX_BYTES", 20 * 1024 * 1024)?,
            nats: NatsConfig::from_env(env)?,
            store: StoreConfig::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_and_names_variables() {
        let base = [
            ("ALLOWED_API_KEY", "0123456789abcdef0123"),
            ("API_KEY", "jwt-secret-0123456789"),
            ("IP_ALLOWED", "127.0.0.1, 10.0.0.0/8,::1"),
        ];
        let c = GatewayConfig::from_env(&Env::from_pairs(base)).ok();
        assert_eq!(c.map(|c| c.ip_allowed.len()), Some(3));
        let bad = Env::from_pairs([
            ("ALLOWED_API_KEY", "0123456789abcdef0123"),
            ("API_KEY", "jwt-secret-0123456789"),
            ("TRUSTED_PROXIES", "lb"),
        ]);
        let e = GatewayConfig::from_env(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("TRUSTED_PROXIES"), "{e}");
        let e = GatewayConfig::from_env(&Env::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("ALLOWED_API_KEY"), "{e}");
    }
}
