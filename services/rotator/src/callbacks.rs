//! Delivery of callback notices to consumers whose lease was taken, with retries through JetStream.
//!
//! A notice is POSTed as JSON to the consumer's `callback_url`. A failure increments the proxy's
//! `call_webhook_count` and NAKs the message with a growing delay; after `CALLBACK_MAX_ATTEMPTS` deliveries it is
//! given up. Unless `CALLBACK_ALLOW_PRIVATE=true`, a URL whose host resolves to a loopback, private or link-local
//! address is refused (no SSRF through the pool), and redirects are not followed.

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, oid::ObjectId};
use prometheus_client::metrics::{counter::Counter, family::Family};
use proxypool_contracts::callback::{is_public, CallbackNotice};
use proxypool_rpc::jetstream::{Delivery, JetStreamError, CALLBACKS};
use proxypool_rpc::workqueue::{self, Outcome, RunnerOptions};
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

use crate::config::RotatorConfig;
use crate::metrics::ResultLabel;

/// Why a notice was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The URL can never be delivered to (malformed, not http(s), or a private address): not retried.
    #[error("refused: {0}")]
    Refused(&'static str),
    /// The host name does not resolve (it may later).
    #[error("cannot resolve the host")]
    Resolve(#[source] std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    /// No answer in time.
    #[error("timed out")]
    TimedOut,
    /// The connection failed.
    #[error("could not connect")]
    Connect,
    /// The consumer answered with an error status.
    #[error("answered HTTP {0}")]
    Status(u16),
}

impl DeliveryError {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DeliveryError::Refused(_))
    }
}

/// POSTs one notice.
pub async fn deliver(notice: &CallbackNotice, config: &RotatorConfig) -> Result<(), DeliveryError> {
    let url = reqwest::Url::parse(&notice.callback_url).map_err(|_| DeliveryError::Refused("not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(DeliveryError::Refused("not an http(s) URL"));
    }
    let host = url.host_str().ok_or(DeliveryError::Refused("the URL has no host"))?.to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let mut builder =
        reqwest::Client::builder().timeout(config.callback_timeout).redirect(reqwest::redirect::Policy::none());
    if !config.callback_allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let addrs: Vec<_> =
            tokio::net::lookup_host((bare.as_str(), port)).await.map_err(DeliveryError::Resolve)?.collect();
        if addrs.is_empty() || addrs.iter().any(|a| !is_public(a.ip())) {
            return Err(DeliveryError::Refused("the host resolves to a loopback, private or link-local address"));
        }
        // Connect to the addresses just checked, so that a second DNS answer cannot point elsewhere (rebinding).
        builder = builder.resolve_to_addrs(&bare, &addrs);
    }
    let client = builder.build().map_err(DeliveryError::Client)?;
    let body = CallbackNotice { callback_url: String::new(), ..notice.clone() };
    let res = client.post(url).json(&body).send().await.map_err(|e| {
        if e.is_timeout() {
            DeliveryError::TimedOut
        } else {
            DeliveryError::Connect
        }
    })?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status(res.status().as_u16()))
    }
}

/// Delivers one notice; a failure is counted on the proxy (`call_webhook_count`).
async fn handle(
    notice: CallbackNotice,
    attempt: i64,
    config: &RotatorConfig,
    store: &Store,
    counter: &Family<ResultLabel, Counter>,
) -> Outcome {
    match deliver(&notice, config).await {
        Ok(()) => {
            counter.get_or_create(&ResultLabel { result: "succeeded" }).inc();
            Outcome::Done
        }
        Err(e) => {
            counter.get_or_create(&ResultLabel { result: "failed" }).inc();
            tracing::warn!(proxy = %notice.proxy_id, attempt, reason = %e, "callback delivery failed");
            if let Ok(id) = ObjectId::parse_str(&notice.proxy_id) {
                let inc = doc! { "$inc": { "call_webhook_count": 1 } };
                if let Err(e) = store.proxies().update_one(doc! { "_id": id }, inc).await {
                    tracing::warn!(error = %e, "cannot count a failed callback");
                }
            }
            if e.is_retryable() {
                Outcome::Retry(e.to_string())
            } else {
                Outcome::Reject(e.to_string())
            }
        }
    }
}

/// Pulls and delivers notices until shutdown, then waits (bounded) for the deliveries in flight.
pub async fn run_senders(
    config: RotatorConfig,
    store: Store,
    nats: async_nats::Client,
    counter: Family<ResultLabel, Counter>,
    shutdown: Shutdown,
) -> Result<(), JetStreamError> {
    let js = async_nats::jetstream::new(nats);
    let ack_wait = config.callback_timeout + Duration::from_secs(10);
    let delivery = Delivery { ack_wait, max_deliver: config.callback_max_attempts, backoff: false };
    let consumer = CALLBACKS.ensure_consumer(&js, delivery, config.nats.replicas).await?;
    let options = RunnerOptions {
        name: "callback.deliver",
        concurrency: 16,
        ack_wait,
        max_deliver: config.callback_max_attempts,
        retry_base: config.callback_retry_base,
        retry_max: Duration::from_secs(600),
        // A delivery takes at most the callback timeout.
        drain: config.callback_timeout + Duration::from_secs(1),
    };
    let config = Arc::new(config);
    workqueue::run(consumer, options, shutdown, move |notice: CallbackNotice, attempt| {
        let (config, store, counter) = (config.clone(), store.clone(), counter.clone());
        async move { handle(notice, attempt, &config, &store, &counter).await }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_final_and_failures_retried() {
        assert!(!DeliveryError::Refused("x").is_retryable());
        assert!(DeliveryError::TimedOut.is_retryable());
        assert!(DeliveryError::Status(500).is_retryable());
    }
}
