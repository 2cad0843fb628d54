//! `proxypool-rotator`: loads config, initialises telemetry, connects, runs its roles until SIGTERM.

use anyhow::Context;
use proxypool_rotator::{Rotator, RotatorConfig};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::{self, Shutdown};
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-rotator").map_err(anyhow::Error::msg)?;
    let config = RotatorConfig::from_env(&Env::process()).context("invalid configuration")?;
    let client = config.nats.connect("proxypool-rotator").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-rotator").await.context("invalid MongoDB settings")?;
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.fire();
    });
    let rotator = Rotator::new(config, store, client.clone());
    // JetStream may not be reachable yet at start: retry the set-up until it is.
    loop {
        match rotator.ensure_queue().await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up the rotation queue yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
    proxypool_rotator::run(rotator, client.clone(), shutdown).await?;
    proxypool_settings::nats::drain(&client, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
