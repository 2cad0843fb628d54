//! Test support: real dependencies started per test, and local stand-ins for the outside world. It depends on no
//! service: the system as a whole is started by `proxypool-system-tests` (`tests/system`).
//!
//! - [`servers`]: a `nats-server -js` and a SecantusDB (MongoDB wire protocol) server on free ports with temporary
//!   storage, killed on drop; both can be stopped and restarted in place for fault tests.
//! - [`fakes`]: a provider (rotate URLs), an IP echo, a geo-IP lookup, a callback receiver and a forward proxy.
//! - [`process`]: running a service binary against real servers and stopping it with SIGTERM.
//!
//! Logs are shown only with `TEST_LOG=1`.

pub mod fakes;
pub mod process;
pub mod servers;

pub use servers::{MongoServer, NatsServer};

/// The static key every test system uses.
pub const API_KEY: &str = "test-allowed-api-key-0123456789";
/// The JWT secret every test system uses.
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";

/// The environment a service needs to join a test system on these servers (NATS, MongoDB, keys), as an operator
/// would set it. Every service of a test system is configured from it, through its own `from_env`.
pub fn service_env(nats_url: &str, mongo_uri: &str, database: &str) -> Vec<(String, String)> {
    [
        ("NATS_URL", nats_url),
        ("MONGODB_URI", mongo_uri),
        ("MONGODB_DATABASE", database),
        ("ALLOWED_API_KEY", API_KEY),
        ("API_KEY", JWT_SECRET),
        ("BCRYPT_COST", "4"),
        ("IP_CHECK_URLS", "http://127.0.0.1:9/"),
        ("LOG_WRITE_TO_FILE", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Installs a test log subscriber when `TEST_LOG=1`. Idempotent.
pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_owned()),
            ))
            .with_test_writer()
            .try_init();
    }
}
