//! The one publisher and subscriber of broadcast [`Event`]s.
//!
//! Events report writes that are already durable, so a failed publish is logged and never undoes the write; every
//! receiver of an event also has a periodic resynchronisation that heals a missed one. Events carry the trace
//! context like requests do, so the work they cause joins the writer's trace.

use async_nats::Client;
use futures::stream::BoxStream;
use futures::StreamExt;
use proxypool_contracts::Event;

/// Publishes `event` on its subject with the current trace context. A failure is logged and counted.
pub async fn publish<E: Event>(client: &Client, event: &E) {
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, subject = E::SUBJECT, "cannot encode an event");
            return;
        }
    };
    let headers = proxypool_telemetry::propagation::nats_headers();
    if let Err(e) = client.publish_with_headers(E::SUBJECT, headers, body.into()).await {
        proxypool_telemetry::metrics::dependency_error("nats");
        tracing::warn!(error = %e, subject = E::SUBJECT, "cannot publish an event");
    }
}

/// Subscribes to `E` (every subscriber sees every event) and yields each decoded event with the span that continues
/// its writer's trace; a malformed one is logged and skipped.
pub async fn subscribe<E: Event>(
    client: &Client,
) -> Result<BoxStream<'static, (E, tracing::Span)>, crate::SubscribeError> {
    let sub = client
        .subscribe(E::SUBJECT)
        .await
        .map_err(|source| crate::SubscribeError { subject: E::SUBJECT.to_owned(), source })?;
    Ok(sub
        .filter_map(|msg| async move {
            match serde_json::from_slice::<E>(&msg.payload) {
                Ok(event) => {
                    let span = tracing::info_span!("nats.event", subject = E::SUBJECT, otel.kind = "consumer");
                    proxypool_telemetry::propagation::continue_from_nats(&span, msg.headers.as_ref());
                    Some((event, span))
                }
                Err(e) => {
                    tracing::warn!(error = %e, subject = E::SUBJECT, "ignoring a malformed event");
                    None
                }
            }
        })
        .boxed())
}

/// Publishes a catalogue change durably (see [`proxypool_contracts::subjects::CATALOG_CHANGED`]), creating the stream
/// when missing. A failure is logged: the write it reports is stored, and the lease replicas' periodic reload heals a
/// lost event.
pub async fn publish_catalog(client: &Client, event: proxypool_contracts::events::ProxyChanged) {
    if client.connection_state() != async_nats::connection::State::Connected {
        // Waiting for the acknowledgement would hold the writer's answer for the JetStream timeout (twice) for
        // nothing; the lease replicas pick the change up at their next full reload (`LEASE_INDEX_REFRESH`).
        proxypool_telemetry::metrics::dependency_error("nats");
        tracing::warn!(proxy = %event.proxy_id, "NATS is unreachable; a catalogue change is not announced");
        return;
    }
    let js = async_nats::jetstream::new(client.clone());
    let event = proxypool_contracts::endpoints::CatalogChanged(event);
    let mut result = crate::jetstream::publish_event(&js, &event).await;
    if result.is_err() {
        // The stream may not exist yet (first start): create it and try once more.
        if crate::jetstream::ensure_catalog(&js).await.is_ok() {
            result = crate::jetstream::publish_event(&js, &event).await;
        }
    }
    if let Err(e) = result {
        proxypool_telemetry::metrics::dependency_error("nats");
        tracing::warn!(error = %e, proxy = %event.0.proxy_id, "cannot publish a catalogue change");
    }
}
