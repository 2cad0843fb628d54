//! Queuing callback notices on JetStream (delivered, with retries, by the rotator's callback senders).

use proxypool_contracts::callback::CallbackNotice;

use crate::jetstream::CALLBACKS;

/// Queues notices durably (one message each, de-duplicated by lease key and reason). Failures are logged: the
/// lease change they report is already stored and must not be undone for a notice.
pub async fn queue(client: &async_nats::Client, notices: &[CallbackNotice]) {
    if notices.is_empty() {
        return;
    }
    let js = async_nats::jetstream::new(client.clone());
    if let Err(e) = CALLBACKS.ensure_stream(&js).await {
        tracing::warn!(error = %e, "cannot set up the callback stream; notices lost");
        return;
    }
    for n in notices {
        // The trace context rides along, so the delivery joins the trace of the write that took the lease.
        let id = format!("{}-{:?}", n.key, n.reason);
        if let Err(e) = CALLBACKS.publish(&js, &id, n).await {
            tracing::warn!(error = %e, proxy = %n.proxy_id, "cannot queue a callback notice");
        }
    }
}
