//! Following the catalogue stream, so that a change acknowledged to an admin is seen by the next lease on any
//! replica.
//!
//! Every writer other than the lease service (the gateway's admin routes, the importer, the rotator's lock and
//! unlock) publishes its change to the `PROXYPOOL_CATALOG` stream and waits for the stream's acknowledgement before
//! it answers. Each replica follows the stream in order with an ordered consumer, applies each change to its index
//! (re-reading the proxy when the change carries no snapshot) and records the stream sequence it has applied.
//!
//! A lease that finds no candidate in the index asks the stream for its last sequence (one JetStream request, no
//! database work): when that is ahead of what this replica has applied, a change it has not seen yet may make a
//! proxy leasable, so it waits (bounded) until it has caught up; then it looks again. A lease that finds a candidate
//! needs no such check: a change that makes a proxy *unleasable* is enforced by the guarded write itself.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use proxypool_contracts::endpoints::CatalogChanged;
use proxypool_rpc::jetstream::JetStreamError;
use proxypool_settings::shutdown::Shutdown;
use tokio::sync::watch;

use crate::service::LeaseService;

/// Longest a lease waits for this replica to catch up with the catalogue before it answers.
const CATCH_UP_MAX: Duration = Duration::from_secs(1);

/// What this replica has applied of the catalogue stream.
#[derive(Debug, Clone)]
pub struct Cursor {
    js: jetstream::Context,
    applied: watch::Receiver<u64>,
}

impl Cursor {
    /// Waits until every catalogue change stored so far is applied here, at most [`CATCH_UP_MAX`]. The caller looks
    /// again afterwards in any case: the change it missed may have been applied between its look and this call.
    pub async fn catch_up(&self) {
        let last = match proxypool_rpc::jetstream::catalog_last_sequence(&self.js).await {
            Ok(last) => last,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the catalogue's last sequence");
                return;
            }
        };
        let mut applied = self.applied.clone();
        let now = *applied.borrow();
        tracing::debug!(last, applied = now, "catching up with the catalogue before refusing a lease");
        if now >= last {
            return;
        }
        let caught_up = tokio::time::timeout(CATCH_UP_MAX, applied.wait_for(|seq| *seq >= last)).await.is_ok();
        if !caught_up {
            tracing::warn!(last, applied = *self.applied.borrow(), "the catalogue follower is behind");
        }
    }
}

/// Subscribes to the catalogue from now on (call before the first index load, so that no change falls between the
/// load and the subscription) and returns the cursor and the follower to run.
pub async fn follow(
    service: &LeaseService,
    client: &async_nats::Client,
) -> Result<(Cursor, impl std::future::Future<Output = ()>), JetStreamError> {
    let js = jetstream::new(client.clone());
    let stream = proxypool_rpc::jetstream::ensure_catalog(&js).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| JetStreamError::Setup { what: "the catalogue follower", message: e.to_string() })?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| JetStreamError::Setup { what: "the catalogue follower", message: e.to_string() })?;
    // Everything up to now is covered by the first load, which starts after this.
    let start = proxypool_rpc::jetstream::catalog_last_sequence(&js).await.unwrap_or(0);
    let (tx, applied) = watch::channel(start);
    let service = service.clone();
    let run = async move {
        while let Some(next) = messages.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "catalogue follower: cannot read the next change");
                    continue;
                }
            };
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            match serde_json::from_slice::<CatalogChanged>(&msg.payload) {
                Ok(CatalogChanged(event)) => {
                    if let Some(id) = service.apply_event(&event) {
                        // In order and awaited: the sequence below is applied only once the proxy is re-read.
                        if let Err(e) = service.refresh_one(id).await {
                            tracing::warn!(error = %e, proxy = %id, "cannot refresh a changed proxy");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed catalogue change"),
            }
            tx.send_if_modified(|applied| {
                let newer = seq > *applied;
                if newer {
                    *applied = seq;
                }
                newer
            });
        }
    };
    Ok((Cursor { js, applied }, run))
}

/// Runs `follower` until `shutdown`.
pub async fn run_until(follower: impl std::future::Future<Output = ()>, mut shutdown: Shutdown) {
    tokio::select! {
        () = follower => tracing::warn!("the catalogue follower ended"),
        () = shutdown.wait() => {}
    }
}
