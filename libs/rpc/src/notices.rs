//! Telling holders that their lease was taken: a broadcast of every taken lease on core NATS (the forward door
//! closes the tunnels that use them), and durable callback notices on JetStream for the holders that gave a
//! callback URL (delivered, with retries, by the rotator's callback senders).

use futures::StreamExt;
use proxypool_contracts::callback::CallbackNotice;
use proxypool_contracts::lease::{LeasesTaken, TakenLease};
use proxypool_contracts::subjects::{subject, LEASE_BANNED, LEASE_TAKEN};

use crate::jetstream::CALLBACKS;

/// Broadcasts every notice and queues the ones with a callback URL durably (one message each, de-duplicated by the
/// notice's id). Returns the ids now stored on the callback stream (or with nothing to store): the lease service
/// marks those sent in its log, and delivers the others again.
pub async fn queue(client: &async_nats::Client, notices: &[CallbackNotice], replicas: usize) -> Vec<String> {
    if notices.is_empty() {
        return Vec::new();
    }
    let taken = LeasesTaken {
        leases: notices
            .iter()
            .map(|n| TakenLease { proxy_id: n.proxy_id.clone(), key: n.key.clone(), reason: n.reason })
            .collect(),
    };
    match serde_json::to_vec(&taken) {
        Ok(body) => {
            if let Err(e) = client.publish(subject(LEASE_TAKEN).into_owned(), body.into()).await {
                tracing::warn!(error = %e, "cannot broadcast taken leases");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode taken leases"),
    }
    let mut done: Vec<String> = notices.iter().filter(|n| n.callback_url.is_empty()).map(|n| n.id.clone()).collect();
    let callbacks: Vec<&CallbackNotice> = notices.iter().filter(|n| !n.callback_url.is_empty()).collect();
    if callbacks.is_empty() {
        return done;
    }
    let js = async_nats::jetstream::new(client.clone());
    if let Err(e) = CALLBACKS.ensure_stream(&js, replicas).await {
        tracing::warn!(error = %e, "cannot set up the callback stream; notices will be queued again");
        return done;
    }
    for n in callbacks {
        // The trace context rides along, so the delivery joins the trace of the write that took the lease.
        match CALLBACKS.publish(&js, &n.id, n).await {
            Ok(()) => done.push(n.id.clone()),
            Err(e) => tracing::warn!(error = %e, proxy = %n.proxy_id, "cannot queue a callback notice yet"),
        }
    }
    done
}

/// Broadcasts a new ban of an exit IP for a site (best effort: a door that misses it keeps a session on that IP
/// until the session's next lease).
pub async fn banned(client: &async_nats::Client, event: &proxypool_contracts::health::BanEvent) {
    match serde_json::to_vec(event) {
        Ok(body) => {
            if let Err(e) = client.publish(subject(LEASE_BANNED).into_owned(), body.into()).await {
                tracing::warn!(error = %e, "cannot broadcast a ban");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode a ban"),
    }
}

/// The ban broadcast, as a stream of bans (undecodable messages are skipped and logged).
pub async fn bans(
    client: &async_nats::Client,
) -> Result<impl futures::Stream<Item = proxypool_contracts::health::BanEvent> + Send + 'static, crate::SubscribeError>
{
    let sub = client
        .subscribe(subject(LEASE_BANNED).into_owned())
        .await
        .map_err(|source| crate::SubscribeError { subject: LEASE_BANNED.to_owned(), source })?;
    Ok(sub.filter_map(|m| async move {
        serde_json::from_slice(&m.payload).inspect_err(|e| tracing::warn!(error = %e, "undecodable ban broadcast")).ok()
    }))
}

/// The taken-lease broadcast, as a stream of leases (undecodable messages are skipped and logged).
pub async fn taken(
    client: &async_nats::Client,
) -> Result<impl futures::Stream<Item = TakenLease> + Send + 'static, crate::SubscribeError> {
    let sub = client
        .subscribe(subject(LEASE_TAKEN).into_owned())
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
