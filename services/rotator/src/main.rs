//! `proxypool-rotator`: loads config, initialises telemetry, connects, runs its roles until SIGTERM.

use anyhow::Context;
use proxypool_rotator::{App, RotatorConfig};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-rotator").context("invalid telemetry settings")?;
    let config = RotatorConfig::from_env(&Env::process()).context("invalid configuration")?;
    let client = config.nats.connect("proxypool-rotator").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-rotator").await.context("invalid MongoDB settings")?;
    App::build(config, client.clone(), store).await?.run(Shutdown::on_signal()).await?;
    proxypool_settings::nats::drain(&client, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
