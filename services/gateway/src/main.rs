//! `proxypool-gateway`: loads config, initialises telemetry, connects, serves HTTP until SIGTERM.

use anyhow::Context;
use proxypool_gateway::{App, GatewayConfig};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-gateway").context("invalid telemetry settings")?;
    let config = GatewayConfig::from_env(&Env::process()).context("invalid configuration")?;
    let port = config.port;
    let nats = config.nats.connect("proxypool-gateway").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-gateway").await.context("invalid MongoDB settings")?;
    let app = App::build(config, nats.clone(), store)
        .await
        .with_context(|| format!("cannot listen on port {port} (PORT)"))?;
    app.run(Shutdown::on_signal()).await.context("server error")?;
    proxypool_settings::nats::drain(&nats, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
