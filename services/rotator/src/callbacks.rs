//! Delivery of callback notices to consumers whose lease was taken, with retries through JetStream.
//!
//! A notice is POSTed as JSON to the consumer's `callback_url`. A failure increments the proxy's
//! `call_webhook_count` and NAKs the message with a growing delay; after `CALLBACK_MAX_ATTEMPTS` deliveries it is
//! given up. Unless `CALLBACK_ALLOW_PRIVATE=true`, a URL whose host resolves to a loopback, private or link-local
//! address is refused (no SSRF through the pool), and redirects are not followed.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bson::{doc, oid::ObjectId};
use proxypool_contracts::callback::{is_public, CallbackNotice};
use proxypool_contracts::subjects;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;
use tokio::sync::Semaphore;

use crate::config::RotatorConfig;
use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::rotation::{retry_delay, QueueError, ResultLabel};

/// POSTs one notice. `Err` holds the reason.
pub async fn deliver(notice: &CallbackNotice, config: &RotatorConfig) -> Result<(), String> {
    let url = reqwest::Url::parse(&notice.callback_url).map_err(|e| format!("bad URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("not an http(s) URL".into());
    }
    let host = url.host_str().ok_or("no host")?.to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let mut builder =
        reqwest::Client::builder().timeout(config.callback_timeout).redirect(reqwest::redirect::Policy::none());
    if !config.callback_allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let addrs: Vec<_> =
            tokio::net::lookup_host((bare.as_str(), port)).await.map_err(|e| format!("cannot resolve: {e}"))?.collect();
        if addrs.is_empty() || addrs.iter().any(|a| !is_public(a.ip())) {
            return Err("refused: the host resolves to a loopback, private or link-local address".into());
        }
        // Connect to the addresses just checked, so that a second DNS answer cannot point elsewhere (rebinding).
        builder = builder.resolve_to_addrs(&bare, &addrs);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let body = CallbackNotice { callback_url: String::new(), ..notice.clone() };
    let res = client.post(url).json(&body).send().await.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_owned()
        } else {
            "could not connect".to_owned()
        }
    })?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered HTTP {}", res.status().as_u16()))
    }
}

/// Pulls and delivers notices until shutdown.
pub async fn run_senders(
    config: RotatorConfig,
    store: Store,
    nats: async_nats::Client,
    counter: Family<ResultLabel, Counter>,
    mut shutdown: Shutdown,
) -> Result<(), QueueError> {
    let js = jetstream::new(nats);
    let stream = proxypool_rpc::notices::ensure_stream(&js).await.map_err(QueueError::Setup)?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            subjects::CALLBACK_CONSUMER,
            jetstream::consumer::pull::Config {
                durable_name: Some(subjects::CALLBACK_CONSUMER.to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.callback_timeout + Duration::from_secs(10),
                max_deliver: config.callback_max_attempts,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| QueueError::Setup(e.to_string()))?;
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(16));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let msg = tokio::select! {
            () = shutdown.wait() => break,
            next = crate::pull_one(&consumer) => match next { Some(m) => m, None => continue },
        };
        let (config, store, counter) = (config.clone(), store.clone(), counter.clone());
        let span = tracing::info_span!("callback.deliver", otel.kind = "consumer");
        proxypool_telemetry::propagation::continue_from_nats(&span, msg.headers.as_ref());
        let task = async move {
            let Ok(notice) = serde_json::from_slice::<CallbackNotice>(&msg.payload) else {
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            };
            let attempt = msg.info().map(|i| i.delivered).unwrap_or(1);
            match deliver(&notice, &config).await {
                Ok(()) => {
                    counter.get_or_create(&ResultLabel { result: "succeeded" }).inc();
                    let _ = msg.ack().await;
                }
                Err(reason) => {
                    counter.get_or_create(&ResultLabel { result: "failed" }).inc();
                    tracing::warn!(proxy = %notice.proxy_id, attempt, reason, "callback delivery failed");
                    if let Ok(id) = ObjectId::parse_str(&notice.proxy_id) {
                        let inc = doc! { "$inc": { "call_webhook_count": 1 } };
                        if let Err(e) = store.proxies().update_one(doc! { "_id": id }, inc).await {
                            tracing::warn!(error = %e, "cannot count a failed callback");
                        }
                    }
                    let refused = reason.starts_with("refused");
                    if refused || attempt >= config.callback_max_attempts {
                        let _ = msg.ack_with(AckKind::Term).await;
                    } else {
                        let _ =
                            msg.ack_with(AckKind::Nak(Some(retry_delay(config.callback_retry_base, attempt)))).await;
                    }
                }
            }
            drop(permit);
        };
        tokio::spawn(tracing::Instrument::instrument(task, span));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let base = Duration::from_secs(2);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 2), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 3), Duration::from_secs(32));
        assert_eq!(retry_delay(base, 30), Duration::from_secs(600));
    }
}
