//! The NATS side: request-reply handlers in a queue group, the `proxy.changed` listener and index maintenance.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use proxypool_contracts::events::ProxyChanged;
use proxypool_contracts::lease::{AcquireRequest, ReleaseRequest};
use proxypool_contracts::{subjects, ApiError, Reply};
use proxypool_settings::shutdown::Shutdown;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::service::{LeaseService, Outcome};

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a request may take before it is answered `service_unavailable`. It stays below the callers' NATS request
/// timeout (5 s by default) so that a consumer gets this answer rather than a bare timeout.
const REQUEST_DEADLINE: Duration = Duration::from_secs(4);

async fn within_deadline<T>(fut: impl std::future::Future<Output = Result<T, ApiError>>) -> Result<T, ApiError> {
    tokio::time::timeout(REQUEST_DEADLINE, fut)
        .await
        .unwrap_or_else(|_| Err(ApiError::unavailable("the database did not answer in time; retry shortly")))
}

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A subscription could not be made.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: &'static str,
        /// Why.
        #[source]
        source: async_nats::SubscribeError,
    },
}

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(payload).map_err(|e| ApiError::invalid("body", format!("is not a valid request: {e}")))
}

async fn reply<T: Serialize>(client: &Client, msg: &Message, reply: Reply<T>) {
    let Some(to) = msg.reply.clone() else {
        tracing::debug!(subject = %msg.subject, "request without a reply subject; nothing to answer");
        return;
    };
    let body = match serde_json::to_vec(&reply) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            return;
        }
    };
    if let Err(e) = client.publish(to, Bytes::from(body)).await {
        tracing::warn!(error = %e, "cannot publish a reply");
    }
}

async fn publish_event(client: &Client, event: &ProxyChanged) {
    match serde_json::to_vec(event) {
        Ok(body) => {
            if let Err(e) = client.publish(subjects::PROXY_CHANGED, Bytes::from(body)).await {
                tracing::warn!(error = %e, "cannot publish proxy.changed");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode proxy.changed"),
    }
}

async fn finish<T: Serialize>(client: &Client, msg: &Message, result: Result<Outcome<T>, ApiError>) {
    match result {
        Ok(outcome) => {
            reply(client, msg, Reply::Ok(outcome.value)).await;
            publish_event(client, &outcome.event).await;
        }
        Err(e) => reply::<T>(client, msg, Reply::Err(e)).await,
    }
}

#[tracing::instrument(skip_all, fields(area))]
async fn handle_acquire(service: LeaseService, client: Client, msg: Message) {
    let result = match parse::<AcquireRequest>(&msg.payload).and_then(|r| r.validate()) {
        Ok(req) => {
            tracing::Span::current().record("area", req.area.as_str());
            within_deadline(service.acquire(&req)).await
        }
        Err(e) => Err(e),
    };
    finish(&client, &msg, result).await;
}

#[tracing::instrument(skip_all)]
async fn handle_release(service: LeaseService, client: Client, msg: Message) {
    let result = match parse::<ReleaseRequest>(&msg.payload).and_then(|r| r.validate()) {
        Ok(req) => within_deadline(service.release(&req)).await,
        Err(e) => Err(e),
    };
    finish(&client, &msg, result).await;
}

async fn subscribe(client: &Client, subject: &'static str, queue: bool) -> Result<Subscriber, ServeError> {
    let res = if queue {
        client.queue_subscribe(subject, subjects::LEASE_QUEUE_GROUP.to_owned()).await
    } else {
        client.subscribe(subject).await
    };
    res.map_err(|source| ServeError::Subscribe { subject, source })
}

/// Loads the index (retrying while the database is down), then reloads it every `period`.
async fn maintain_index(service: LeaseService, period: Duration, mut shutdown: Shutdown, ensure: bool) {
    let mut backoff = Duration::from_millis(200);
    let mut indexes_done = !ensure;
    loop {
        if !indexes_done {
            match service.ensure_indexes().await {
                Ok(()) => indexes_done = true,
                Err(e) => tracing::warn!(error = %e, "cannot create indexes yet; retrying"),
            }
        }
        let wait = match service.reload().await {
            Ok(n) => {
                tracing::info!(proxies = n, "lease index loaded");
                backoff = Duration::from_millis(200);
                period
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot load the lease index; retrying");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                w
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Serves lease requests until `shutdown` fires, then stops taking requests, finishes those in flight (bounded by
/// [`DRAIN_TIMEOUT`]) and flushes its replies.
pub async fn serve(
    service: LeaseService,
    client: Client,
    index_refresh: Duration,
    max_in_flight: usize,
    mut shutdown: Shutdown,
) -> Result<(), ServeError> {
    // Subscribe to changes before the first load, so that no change falls between the load and the subscription.
    let mut events = subscribe(&client, subjects::PROXY_CHANGED, false).await?;
    let mut acquires = subscribe(&client, subjects::LEASE_ACQUIRE, true).await?;
    let mut releases = subscribe(&client, subjects::LEASE_RELEASE, true).await?;
    // Make sure the server has our subscriptions before we report being loaded.
    let _ = client.flush().await;
    let maintenance = tokio::spawn(maintain_index(service.clone(), index_refresh, shutdown.clone(), true));

    let permits = Arc::new(Semaphore::new(max_in_flight));
    tracing::info!(instance = service.instance_id(), "lease service serving");
    loop {
        tokio::select! {
            () = shutdown.wait() => break,
            Some(msg) = acquires.next() => {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let (s, c) = (service.clone(), client.clone());
                tokio::spawn(async move { handle_acquire(s, c, msg).await; drop(permit); });
            }
            Some(msg) = releases.next() => {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let (s, c) = (service.clone(), client.clone());
                tokio::spawn(async move { handle_release(s, c, msg).await; drop(permit); });
            }
            Some(msg) = events.next() => {
                match serde_json::from_slice::<ProxyChanged>(&msg.payload) {
                    Ok(event) => {
                        if let Some(id) = service.apply_event(&event) {
                            let s = service.clone();
                            tokio::spawn(async move {
                                if let Err(e) = s.refresh_one(id).await {
                                    tracing::warn!(error = %e, proxy = %id, "cannot refresh a changed proxy");
                                }
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed proxy.changed event"),
                }
            }
            else => break,
        }
    }

    tracing::info!("lease service stopping: no new requests, finishing those in flight");
    let _ = acquires.unsubscribe().await;
    let _ = releases.unsubscribe().await;
    let _ = events.unsubscribe().await;
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all)).await.is_err() {
        tracing::warn!("in-flight lease requests did not finish within {DRAIN_TIMEOUT:?}");
    }
    maintenance.abort();
    let _ = client.flush().await;
    tracing::info!("lease service stopped");
    Ok(())
}
