//! Test support: real dependencies started per test, and the services started in-process against them.
//!
//! - [`servers`]: a `nats-server -js` and a SecantusDB (MongoDB wire protocol) server on free ports with temporary
//!   storage, killed on drop; both can be stopped and restarted in place for fault tests.
//! - [`app`]: [`TestApp`], the lease service(s) and the gateway wired to those servers, with typed helpers.
//!
//! Logs are shown only with `TEST_LOG=1`.

pub mod app;
pub mod fakes;
pub mod process;
pub mod servers;

pub use app::{TestApp, TestAppBuilder};
pub use servers::{MongoServer, NatsServer};

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
