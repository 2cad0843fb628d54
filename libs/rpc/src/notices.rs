//! Telling holders that their lease was taken: a broadcast of every taken lease on core NATS (the forward door
//! closes the tunnels that use them), and durable callback notices on JetStream for the holders that gave a
//! callback URL (delivered, with retries, by the rotator's callback senders).

use futures::StreamExt;
use proxypool_contracts::callback::CallbackNotice;
use proxypool_contracts::lease::{LeasesTaken, TakenLease};
use proxypool_contracts::subjects::LEASE_TAKEN;

use crate::jetstream::CALLBACKS;

/// Broadcasts every notice and queues the ones with a callback URL durably (one message each, de-duplicated by
/// lease key and reason). Failures are logged: the lease change they report is already stored and must not be
/// undone for a notice.
pub async fn queue(client: &async_nats::Client, notices: &[CallbackNotice]) {
    if notices.is_empty() {
        return;
    }
    let taken = LeasesTaken {
        leases: notices
            .iter()
            .map(|n| TakenLease { proxy_id: n.proxy_id.clone(), key: n.key.clone(), reason: n.reason })
            .collect(),
    };
    match serde_json::to_vec(&taken) {
        Ok(body) => {
            if let Err(e) = client.publish(LEASE_TAKEN, body.into()).await {
                tracing::warn!(error = %e, "cannot broadcast taken leases");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode taken leases"),
    }
    let callbacks: Vec<&CallbackNotice> = notices.iter().filter(|n| !n.callback_url.is_empty()).collect();
    if callbacks.is_empty() {
        return;
    }
    let js = async_nats::jetstream::new(client.clone());
    if let Err(e) = CALLBACKS.ensure_stream(&js).await {
        tracing::warn!(error = %e, "cannot set up the callback stream; notices lost");
        return;
    }
    for n in callbacks {
        // The trace context rides along, so the delivery joins the trace of the write that took the lease.
        let id = format!("{}-{:?}", n.key, n.reason);
        if let Err(e) = CALLBACKS.publish(&js, &id, n).await {
            tracing::warn!(error = %e, proxy = %n.proxy_id, "cannot queue a callback notice");
        }
    }
}

/// The taken-lease broadcast, as a stream of leases (undecodable messages are skipped and logged).
pub async fn taken(
    client: &async_nats::Client,
) -> Result<impl futures::Stream<Item = TakenLease> + Send + 'static, crate::SubscribeError> {
    let sub = client
        .subscribe(LEASE_TAKEN)
        .await
        .map_err(|source| crate::SubscribeError { subject: LEASE_TAKEN.to_owned(), source })?;
    Ok(sub.flat_map(|m| {
        let leases = match serde_json::from_slice::<LeasesTaken>(&m.payload) {
            Ok(t) => t.leases,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable taken-lease broadcast");
                Vec::new()
            }
        };
        futures::stream::iter(leases)
    }))
}
