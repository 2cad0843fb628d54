//! Example consumer: lease a proxy over NATS, use it, return it.
//!
//! ```text
//! NATS_URL=nats://nats:4222 NATS_USER=consumer NATS_PASSWORD=… cargo run -p lease-client -- vn
//! ```
//!
//! It uses the typed endpoints of `proxypool-contracts` and the one client of `proxypool-rpc`
//! (`call::<LeaseAcquire>`); a consumer in another language sends the same JSON (see the README and
//! `examples/python/lease_client.py`).

use std::time::Duration;

use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, LeaseGrant, ReleaseRequest};
use proxypool_contracts::Area;
use proxypool_rpc::{call, CallError};

/// Leases a proxy, retrying the retryable refusals (`no_proxy_available`, `service_unavailable`) with back-off.
pub async fn acquire(nc: &async_nats::Client, area: Area, consumer: &str) -> anyhow::Result<LeaseGrant> {
    let req = AcquireRequest {
        area: Some(area.to_string()),
        consumer: Some(consumer.to_owned()),
        callback_url: None,
        ..Default::default()
    };
    let mut delay = Duration::from_millis(500);
    for _ in 0..5 {
        match call::<LeaseAcquire>(nc, &req).await {
            Ok(grant) => return Ok(grant),
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => anyhow::bail!("lease refused: {e}"),
        }
    }
    anyhow::bail!("no proxy after 5 attempts")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let area: Area = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "vn".into())
        .parse()
        .map_err(|()| anyhow::anyhow!("the area is vn or global"))?;
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut options = async_nats::ConnectOptions::new().name("lease-client-example");
    if let Ok(user) = std::env::var("NATS_USER") {
        options = options.user_and_password(user, std::env::var("NATS_PASSWORD").unwrap_or_default());
    }
    let nc = options.connect(url).await?;

    let lease = acquire(&nc, area, "rust-example").await?;
    println!("leased {} ({}:{}), expires {:?}", lease.id, lease.ip, lease.port, lease.expires_at);
    // … use http://{username}:{password}@{ip}:{port} for outbound requests here …
    let release = ReleaseRequest {
        proxy_id: Some(lease.id.clone()),
        key: Some(lease.key.clone()),
        failure: None,
        ..Default::default()
    };
    match call::<LeaseRelease>(&nc, &release).await {
        Ok(outcome) => println!("returned: {outcome:?}"),
        Err(CallError::Remote(e)) => anyhow::bail!("return refused: {e}"),
        Err(e) => return Err(e.into()),
    }
    nc.drain().await?;
    Ok(())
}
