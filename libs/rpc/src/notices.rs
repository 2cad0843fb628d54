//! Queuing callback notices on JetStream (delivered, with retries, by the rotator's callback senders).

use std::time::Duration;

use async_nats::jetstream::{self, context::Publish};
use proxypool_contracts::callback::CallbackNotice;
use proxypool_contracts::subjects;

/// Creates (idempotently) the WorkQueue stream of callback notices.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream, String> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: subjects::CALLBACK_STREAM.to_owned(),
        subjects: vec![subjects::CALLBACKS.to_owned()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())
}

/// Queues notices durably (one message each, de-duplicated by lease key and reason). Failures are logged: the
/// lease change they report is already stored and must not be undone for a notice.
pub async fn queue(client: &async_nats::Client, notices: &[CallbackNotice]) {
    if notices.is_empty() {
        return;
    }
    let js = jetstream::new(client.clone());
    if let Err(e) = ensure_stream(&js).await {
        tracing::warn!(error = %e, "cannot set up the callback stream; notices lost");
        return;
    }
    for n in notices {
        let Ok(body) = serde_json::to_vec(n) else { continue };
        let id = format!("{}-{:?}", n.key, n.reason);
        // The trace context rides along, so the delivery joins the trace of the write that took the lease.
        let publish = Publish::build()
            .payload(body.into())
            .headers(proxypool_telemetry::propagation::nats_headers())
            .message_id(id);
        let res = match js.send_publish(subjects::CALLBACKS, publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, proxy = %n.proxy_id, "cannot queue a callback notice");
        }
    }
}
