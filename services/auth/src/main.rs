//! `proxypool-auth`: loads config, initialises telemetry, connects, serves until SIGTERM.

use anyhow::Context;
use proxypool_auth::{AuthConfig, AuthService};
use proxypool_settings::env::Env;
use proxypool_settings::shutdown::{self, Shutdown};
use proxypool_store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = proxypool_telemetry::init("proxypool-auth").map_err(anyhow::Error::msg)?;
    let config = AuthConfig::from_env(&Env::process()).context("invalid configuration")?;
    let client = config.nats.connect("proxypool-auth").await.context("cannot connect to NATS")?;
    let store = Store::connect(&config.store, "proxypool-auth").await.context("invalid MongoDB settings")?;
    // Indexes (unique email/username) are created by whichever service starts first; retry in the background.
    let s = store.clone();
    tokio::spawn(async move {
        while let Err(e) = s.ensure_indexes().await {
            tracing::warn!(error = %e, "cannot create indexes yet; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    });
    let service = AuthService::new(
        store,
        config.jwt_secret.clone(),
        config.bcrypt_cost,
        config.allow_registration,
        config.jwt_ttl,
    )
    .context("cannot initialise bcrypt")?;
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(async move {
        shutdown::signal().await;
        trigger.fire();
    });
    let (admin, requests) = proxypool_auth::serve_admin(&client, config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on {} (AUTH_ADMIN_ADDR)", config.admin_addr))?;
    tracing::info!(%admin, "auth admin endpoint (/metrics, /healthz, /readyz) listening");
    proxypool_auth::serve(service, client.clone(), Some(requests), shutdown).await?;
    proxypool_settings::nats::drain(&client, std::time::Duration::from_secs(5)).await;
    telemetry.shutdown();
    Ok(())
}
