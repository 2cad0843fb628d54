//! Where the database is: `MONGODB_URI` (+ `MONGODB_DATABASE`), or the original design's `DB_MONGO_*` variables (docs/design.md).
//!
//! The database is the first of: `MONGODB_DATABASE`; the one named in `MONGODB_URI`'s path
//! (`mongodb://host:port/mydb`); `DB_MONGO_DATABASE`; [`DEFAULT_DATABASE`]. A URI that names its database is thus
//! used as written, as every MongoDB tool reads it, and `MONGODB_DATABASE` stays the explicit override.

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
    /// `DB_MONGO_USERNAME`, `DB_MONGO_PASSWORD`, `DB_MONGO_DATABASE`; the database as in the module doc.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
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
        let database = env
            .get("MONGODB_DATABASE")
            .or_else(|| database_in_uri(&uri))
            .or_else(|| env.get("DB_MONGO_DATABASE"))
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        Ok(Self { uri: Secret::new(uri), database, timeout })
    }

    /// A config for a local server (tests, benchmarks).
    pub fn local(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self { uri: Secret::new(uri.into()), database: database.into(), timeout: Duration::from_secs(3) }
    }
}

/// The database a connection string names: the path after the hosts, `mongodb://u:p@h1,h2:27018/mydb?opts` →
/// `mydb` (percent-decoded), or `None` for `mongodb://h/` and `mongodb://h/?opts`. Per the connection string spec,
/// the userinfo cannot hold a raw `/`, so the first `/` after the scheme ends the hosts.
fn database_in_uri(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("mongodb://").or_else(|| uri.strip_prefix("mongodb+srv://"))?;
    let (_, path) = rest.split_once('/')?;
    let name = path.split('?').next().unwrap_or_default();
    Some(percent_decode(name)).filter(|n| !n.is_empty())
}

/// `%XX` sequences decoded; anything else (including a malformed `%`) kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

    fn database_of(pairs: &[(&str, &str)]) -> Option<String> {
        StoreConfig::from_env(&Env::from_pairs(pairs.iter().copied())).ok().map(|c| c.database)
    }

    #[test]
    fn the_uri_names_the_database_unless_mongodb_database_is_set() {
        let uri = ("MONGODB_URI", "mongodb://db:27017/mydb");
        assert_eq!(database_of(&[uri]).as_deref(), Some("mydb"));
        // The explicit variable overrides; the original design's part does not (it belongs to the DB_MONGO_* form).
        assert_eq!(database_of(&[uri, ("MONGODB_DATABASE", "other")]).as_deref(), Some("other"));
        assert_eq!(database_of(&[uri, ("DB_MONGO_DATABASE", "other")]).as_deref(), Some("mydb"));
        // An empty MONGODB_DATABASE counts as unset.
        assert_eq!(database_of(&[uri, ("MONGODB_DATABASE", "")]).as_deref(), Some("mydb"));
        // A URI without a database falls back as before.
        for bare in ["mongodb://db:27017", "mongodb://db:27017/", "mongodb://db:27017/?directConnection=true"] {
            assert_eq!(database_of(&[("MONGODB_URI", bare)]).as_deref(), Some(DEFAULT_DATABASE), "{bare}");
            let named = database_of(&[("MONGODB_URI", bare), ("DB_MONGO_DATABASE", "legacy")]);
            assert_eq!(named.as_deref(), Some("legacy"), "{bare}");
        }
        assert_eq!(database_of(&[("DB_MONGO_HOST", "db")]).as_deref(), Some(DEFAULT_DATABASE));
    }

    #[test]
    fn the_database_is_read_from_every_uri_form() {
        for (uri, db) in [
            ("mongodb://root:p%2Fss%40w@db:27017/pool?authSource=admin", Some("pool")),
            ("mongodb://h1:27017,h2:27018,h3/pool?replicaSet=rs0", Some("pool")),
            ("mongodb+srv://u:p@cluster.example.net/pool?retryWrites=true", Some("pool")),
            ("mongodb://db/my%20pool", Some("my pool")),
            ("mongodb://db/100%", Some("100%")),
            ("mongodb://db/?authSource=admin", None),
            ("mongodb://db", None),
            ("postgres://db/pool", None),
        ] {
            assert_eq!(database_in_uri(uri).as_deref(), db, "{uri}");
        }
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
