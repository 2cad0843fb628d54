//! Where the database is: `MONGODB_URI` (+ `MONGODB_DATABASE`), or the original design's `DB_MONGO_*` variables.

use std::time::Duration;

use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::Secret;

/// Database connection settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Connection string; may hold a password, hence secret.
    pub uri: Secret<String>,
    /// Database name.
    pub database: String,
    /// `MONGODB_TIMEOUT` (seconds, default 3): server selection and connect timeout, the longest a request waits
    /// for an unreachable database before it is answered with 503.
    pub timeout: Duration,
}

/// The original design's default database name.
pub const DEFAULT_DATABASE: &str = "proxy-tool-mongodb";

impl StoreConfig {
    /// Reads `MONGODB_URI`/`MONGODB_DATABASE`, falling back to `DB_MONGO_HOST`, `DB_MONGO_PORT`,
    /// `DB_MONGO_USERNAME`, `DB_MONGO_PASSWORD`, `DB_MONGO_DATABASE`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let database = env
            .get("MONGODB_DATABASE")
            .or_else(|| env.get("DB_MONGO_DATABASE"))
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let timeout = env.seconds_or("MONGODB_TIMEOUT", Duration::from_secs(3))?;
        let uri = match env.get("MONGODB_URI") {
            Some(uri) => {
                if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                    return Err(ConfigError::invalid("MONGODB_URI", "must start with mongodb:// or mongodb+srv://"));
                }
                uri
            }
            None => {
                let host = env.get("DB_MONGO_HOST").unwrap_or_else(|| "localhost".to_owned());
                let port: u16 = env.parse_or("DB_MONGO_PORT", 27017)?;
                match (env.get("DB_MONGO_USERNAME"), env.get("DB_MONGO_PASSWORD")) {
                    (Some(u), Some(p)) => format!(
                        "mongodb://{}:{}@{host}:{port}/?authSource=admin",
                        percent_encode(&u),
                        percent_encode(&p)
                    ),
                    (None, None) => format!("mongodb://{host}:{port}/"),
                    (Some(_), None) => return Err(ConfigError::Missing("DB_MONGO_PASSWORD")),
                    (None, Some(_)) => return Err(ConfigError::Missing("DB_MONGO_USERNAME")),
                }
            }
        };
        Ok(Self { uri: Secret::new(uri), database, timeout })
    }

    /// A config for a local server (tests, benchmarks).
    pub fn local(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self { uri: Secret::new(uri.into()), database: database.into(), timeout: Duration::from_secs(3) }
    }
}

/// RFC 3986 userinfo encoding, so passwords with `@`, `:` or `/` work.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_uri_from_spec_variables() {
        let env = Env::from_pairs([
            ("DB_MONGO_HOST", "db"),
            ("DB_MONGO_PORT", "33027"),
            ("DB_MONGO_USERNAME", "root"),
            ("DB_MONGO_PASSWORD", "p@ss:w/rd"),
        ]);
        let c = StoreConfig::from_env(&env).ok();
        let c = c.as_ref();
        assert_eq!(
            c.map(|c| c.uri.expose().as_str()),
            Some("mongodb://root:p%40ss%3Aw%2Frd@db:33027/?authSource=admin")
        );
        assert_eq!(c.map(|c| c.database.as_str()), Some(DEFAULT_DATABASE));
        assert!(!format!("{c:?}").contains("p@ss"), "the password must not be printable");
    }

    #[test]
    fn uri_wins_and_is_checked() {
        let env = Env::from_pairs([("MONGODB_URI", "http://x"), ("DB_MONGO_HOST", "db")]);
        let e = StoreConfig::from_env(&env).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("MONGODB_URI"), "{e}");
        let env = Env::from_pairs([("DB_MONGO_USERNAME", "root")]);
        let e = StoreConfig::from_env(&env).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("DB_MONGO_PASSWORD"), "{e}");
    }
}
