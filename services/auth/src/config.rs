//! Auth service configuration.

use std::time::Duration;

use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_settings::Secret;
use proxypool_store::StoreConfig;

/// Everything the auth service needs, read once at start.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `API_KEY`: the JWT signing secret (at least 16 characters).
    pub jwt_secret: Secret<String>,
    /// `BCRYPT_COST` (default 12; the original's 4 is far too cheap to brute-force). Hashes of any cost still verify.
    pub bcrypt_cost: u32,
    /// `ALLOW_REGISTRATION` (default false): open self-registration after the first user.
    pub allow_registration: bool,
    /// `JWT_TTL` (seconds, default 14 days).
    pub jwt_ttl: Duration,
    /// `AUTH_ADMIN_ADDR` (default `0.0.0.0:9101`): `/metrics`, `/healthz`, `/readyz`.
    pub admin_addr: std::net::SocketAddr,
    /// NATS.
    pub nats: NatsConfig,
    /// MongoDB.
    pub store: StoreConfig,
}

impl AuthConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secret = env.required("API_KEY")?;
        if secret.len() < 16 {
            return Err(ConfigError::invalid("API_KEY", "must be at least 16 characters"));
        }
        let bcrypt_cost: u32 = env.parse_or("BCRYPT_COST", 12)?;
        if !(4..=31).contains(&bcrypt_cost) {
            return Err(ConfigError::invalid("BCRYPT_COST", "must be between 4 and 31"));
        }
        Ok(Self {
            jwt_secret: Secret::new(secret),
            bcrypt_cost,
            allow_registration: env.bool_or("ALLOW_REGISTRATION", false)?,
            jwt_ttl: env.seconds_or("JWT_TTL", proxypool_authn::DEFAULT_TTL)?,
            admin_addr: env.parse_or("AUTH_ADMIN_ADDR", std::net::SocketAddr::from(([0, 0, 0, 0], 9101)))?,
            nats: NatsConfig::from_env(env)?,
            store: StoreConfig::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = AuthConfig::from_env(&Env::from_pairs([("API_KEY", "0123456789abcdef0123")])).expect("valid");
        assert_eq!(c.bcrypt_cost, 12);
        assert!(!c.allow_registration);
        assert_eq!(c.jwt_ttl, proxypool_authn::DEFAULT_TTL);
        let bad = Env::from_pairs([("API_KEY", "0123456789abcdef0123"), ("BCRYPT_COST", "3")]);
        let e = AuthConfig::from_env(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("BCRYPT_COST"), "{e}");
        let e = AuthConfig::from_env(&Env::default()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("API_KEY"), "{e}");
    }
}
