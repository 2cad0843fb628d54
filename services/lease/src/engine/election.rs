//! Who leads: one key in a JetStream key-value bucket whose entries expire `LEASE_LEADER_TTL` after they were
//! written. The leader renews the key (compare-and-set on its revision) several times per TTL; a standby creates it
//! once it has expired. The election only decides who *tries* to lead: safety comes from the fenced log
//! ([`super::log`]), so a leader that lost the key without noticing cannot grant anything.
//!
//! Two signals come back from the engine: a replica deposed by a newer term in the log gives up its claim at once
//! (`deposed`), so two replicas never fence each other in turn; and a leader whose renewal fails because its entry is
//! gone (the bucket was recreated, the entry aged out during a NATS restart) takes it again at once if nobody else
//! has, instead of stepping down for nothing.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use proxypool_settings::shutdown::Shutdown;
use tokio::sync::watch;

const KEY: &str = "leader";

/// Runs the election until `shutdown`, publishing whether this replica leads on `leading`. Setting `hand_over`
/// (a graceful stop) removes the key so a standby takes over, and keeps this replica leading until another has
/// taken the key (and had a moment to start serving), so that no request finds nobody listening.
pub async fn run(
    client: async_nats::Client,
    me: String,
    (ttl, replicas): (Duration, usize),
    leading: watch::Sender<bool>,
    mut hand_over: watch::Receiver<bool>,
    mut deposed: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) {
    let js = jetstream::new(client);
    let renew_every = ttl / 4;
    let try_every = (ttl / 8).max(Duration::from_millis(50));
    let mut bucket = None;
    let mut revision: Option<u64> = None;
    let mut renewed = Instant::now();
    loop {
        let wait = if revision.is_some() { renew_every } else { try_every };
        let mut was_deposed = false;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = hand_over.changed() => {}
            r = deposed.changed() => was_deposed = r.is_ok(),
            () = shutdown.wait() => break,
        }
        if was_deposed && revision.take().is_some() {
            // The log holds a newer term: whatever our entry says, another replica leads. Stop renewing (the entry
            // expires on its own if it is still ours) and stand again like any standby.
            tracing::warn!("deposed by a newer term in the lease log");
            leading.send_replace(false);
            continue;
        }
        if *hand_over.borrow() {
            if let (Some(kv), Some(_)) = (bucket.as_ref(), revision.take()) {
                hand_over_lead(kv, &me, ttl).await;
            }
            leading.send_replace(false);
            // A replica that is stopping does not stand again.
            shutdown.wait().await;
            break;
        }
        if bucket.is_none() {
            match proxypool_rpc::jetstream::ensure_lease_leader(&js, ttl, replicas).await {
                Ok(b) => bucket = Some(b),
                Err(e) => {
                    tracing::debug!(error = %e, "lease leader bucket not reachable");
                    lose(&mut revision, &leading, renewed, ttl);
                    continue;
                }
            }
        }
        let Some(kv) = bucket.as_ref() else { continue };
        match revision {
            Some(rev) => match kv.update(KEY, me.clone().into(), rev).await {
                Ok(r) => {
                    revision = Some(r);
                    renewed = Instant::now();
                }
                Err(e) => {
                    // Our entry may simply be gone (aged out while NATS restarted): if nobody took the key, take it
                    // again and lead on; the fence in the log keeps this safe whatever happened meanwhile.
                    match kv.create(KEY, me.clone().into()).await {
                        Ok(r) => {
                            tracing::info!(error = %e, "lease leadership entry was gone; taken again");
                            revision = Some(r);
                            renewed = Instant::now();
                        }
                        Err(c) if c.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                            // Only a holder we can read is believed: the bucket may be between leaders itself.
                            match kv.entry(KEY).await {
                                Ok(Some(entry)) if entry.value.as_ref() == me.as_bytes() => {
                                    revision = Some(entry.revision);
                                    renewed = Instant::now();
                                }
                                Ok(Some(entry)) if entry.operation == jetstream::kv::Operation::Put => {
                                    tracing::warn!(
                                        holder = %String::from_utf8_lossy(&entry.value),
                                        "another replica holds the lease leadership"
                                    );
                                    revision = None;
                                    leading.send_replace(false);
                                }
                                _ => {
                                    tracing::warn!(error = %e, "cannot renew the lease leadership");
                                    lose(&mut revision, &leading, renewed, ttl);
                                }
                            }
                        }
                        Err(_) => {
                            tracing::warn!(error = %e, "cannot renew the lease leadership");
                            bucket = None;
                            lose(&mut revision, &leading, renewed, ttl);
                        }
                    }
                }
            },
            None => match kv.create(KEY, me.clone().into()).await {
                Ok(r) => {
                    revision = Some(r);
                    renewed = Instant::now();
                    tracing::info!(instance = %me, "leading the lease service");
                    leading.send_replace(true);
                }
                Err(e) => {
                    if e.kind() != jetstream::kv::CreateErrorKind::AlreadyExists {
                        tracing::debug!(error = %e, "cannot take the lease leadership");
                        bucket = None;
                    }
                }
            },
        }
    }
    if let (Some(kv), Some(rev)) = (bucket, revision) {
        // Hand over at once instead of after the TTL. Only our own entry is removed.
        if let Ok(Some(entry)) = kv.entry(KEY).await {
            if entry.revision == rev {
                let _ = kv.delete(KEY).await;
            }
        }
    }
    leading.send_replace(false);
}

/// Removes our key, then waits (at most two TTLs) until another replica holds it.
async fn hand_over_lead(kv: &jetstream::kv::Store, me: &str, ttl: Duration) {
    tracing::info!("handing the lease leadership over");
    let _ = kv.delete(KEY).await;
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        if let Ok(Some(entry)) = kv.entry(KEY).await {
            if entry.operation == jetstream::kv::Operation::Put && entry.value.as_ref() != me.as_bytes() {
                // Stop appending now: the new leader catches up and opens its term, which our next append would only
                // fence. (Our subscriptions stay a moment longer: see the server's term end.)
                tracing::info!(to = %String::from_utf8_lossy(&entry.value), "lease leadership taken over");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("no standby took the lease leadership over");
}

/// After a failed renewal: keep leading until the entry we last wrote would have expired, then give up, so that a
/// short NATS hiccup does not cost a failover (the log fence keeps this safe either way).
fn lose(revision: &mut Option<u64>, leading: &watch::Sender<bool>, renewed: Instant, ttl: Duration) {
    if revision.is_some() && renewed.elapsed() >= ttl {
        *revision = None;
        tracing::warn!("lease leadership expired");
        leading.send_replace(false);
    }
}
