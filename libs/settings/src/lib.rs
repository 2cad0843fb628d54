//! Typed configuration from the environment, shared by every service.
//!
//! Each service reads its config once at start into a struct; a missing or malformed variable fails start-up with an
//! error that names the variable. Secrets are wrapped in [`Secret`] so they never reach a log line.
//!
//! # Layout
//! - [`env`]: typed readers for environment variables.
//! - [`Secret`]: a value that prints as `[redacted]`.
//! - [`nats`]: NATS connection settings and a connect helper that reconnects forever.
//! - [`shutdown`]: a future that resolves on SIGTERM or Ctrl-C.
//! - [`service_main!`]: the one `main` of every service binary.

pub mod env;
pub mod nats;
pub mod shutdown;

mod secret;

pub use env::ConfigError;
pub use secret::Secret;

/// The `main` of a service binary, the same for every service: initialise telemetry, read the typed configuration
/// from the environment (failing fast, naming the variable), connect to NATS and MongoDB, then
/// `App::build(config, nats, store)` and `run` until SIGTERM, drain NATS (bounded) and flush the spans.
///
/// `service_main!("proxypool-lease", LeaseConfig, App)`: the config type must have `from_env(&Env)` and `nats` and
/// `store` fields; the app `build(config, client, store)` and `run(shutdown)`. The binary crate needs `anyhow`,
/// `tokio`, `proxypool-telemetry` and `proxypool-store`, which every service has.
#[macro_export]
macro_rules! service_main {
    ($name:literal, $config:ty, $app:ty) => {
        #[tokio::main]
        async fn main() -> anyhow::Result<()> {
            use anyhow::Context as _;
            let telemetry = proxypool_telemetry::init($name).context("invalid telemetry settings")?;
            let config = <$config>::from_env(&$crate::env::Env::process()).context("invalid configuration")?;
            let client = config.nats.connect($name).await.context("cannot connect to NATS")?;
            let store =
                proxypool_store::Store::connect(&config.store, $name).await.context("invalid MongoDB settings")?;
            let app = <$app>::build(config, client.clone(), store).await.context("cannot start")?;
            app.run($crate::shutdown::Shutdown::on_signal()).await.context("stopped on an error")?;
            $crate::nats::drain(&client, std::time::Duration::from_secs(5)).await;
            telemetry.shutdown();
            Ok(())
        }
    };
    // A service that needs NATS only (no MongoDB): `App::build(config, client)`.
    ($name:literal, $config:ty, $app:ty, nats_only) => {
        #[tokio::main]
        async fn main() -> anyhow::Result<()> {
            use anyhow::Context as _;
            let telemetry = proxypool_telemetry::init($name).context("invalid telemetry settings")?;
            let config = <$config>::from_env(&$crate::env::Env::process()).context("invalid configuration")?;
            let client = config.nats.connect($name).await.context("cannot connect to NATS")?;
            let app = <$app>::build(config, client.clone()).await.context("cannot start")?;
            app.run($crate::shutdown::Shutdown::on_signal()).await.context("stopped on an error")?;
            $crate::nats::drain(&client, std::time::Duration::from_secs(5)).await;
            telemetry.shutdown();
            Ok(())
        }
    };
}
