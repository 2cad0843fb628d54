//! `proxypool-importer`: loads config, initialises telemetry, connects, serves imports until SIGTERM.

use anyhow::Context;
use proxypool_importer::{App, ImporterConfig};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-importer").context("invalid telemetry settings")?;
    let config = ImporterConfig::from_env(&Env::process()).context("invalid configuration")?;
    let client = config.nats.connect("proxypool-importer").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-importer").await.context("invalid MongoDB settings")?;
    App::build(config, client.clone(), store).await?.run(Shutdown::on_signal()).await?;
    proxypool_settings::nats::drain(&client, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
