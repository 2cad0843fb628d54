//! `proxypool-importer`: loads config, initialises telemetry, connects, serves imports until SIGTERM.

use anyhow::Context;
use proxypool_importer::{Importer, ImporterConfig};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::{self, Shutdown};
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-importer").map_err(anyhow::Error::msg)?;
    let config = ImporterConfig::from_env(&Env::process()).context("invalid configuration")?;
    let client = config.nats.connect("proxypool-importer").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-importer").await.context("invalid MongoDB settings")?;
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.fire();
    });
    let importer = Importer::new(config, store, client.clone()).context("cannot build the HTTP client")?;
    // JetStream or MongoDB may not be reachable yet at start: retry the set-up until they are.
    loop {
        match importer.setup().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up the importer yet; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
    proxypool_importer::run(importer, client.clone(), shutdown).await?;
    proxypool_settings::nats::drain(&client, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
