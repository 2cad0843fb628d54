//! `proxypool-gateway`: loads config, initialises telemetry, connects, serves HTTP until SIGTERM.

use anyhow::Context;
use proxypool_gateway::GatewayConfig;
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::{self, Shutdown};
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-gateway").map_err(anyhow::Error::msg)?;
    let config = GatewayConfig::from_env(&Env::process()).context("invalid configuration")?;
    let nats = config.nats.connect("proxypool-gateway").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-gateway").await.context("invalid MongoDB settings")?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.port))
        .await
        .with_context(|| format!("cannot listen on port {} (PORT)", config.port))?;
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.fire();
    });
    proxypool_gateway::run(listener, config, nats.clone(), store, shutdown).await.context("server error")?;
    proxypool_settings::nats::drain(&nats, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
