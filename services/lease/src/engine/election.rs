//! Who leads: one key in a JetStream key-value bucket whose entries expire `LEASE_LEADER_TTL` after they were
//! written. The leader renews the key (compare-and-set on its revision) several times per TTL; a standby creates it
//! once it has expired. The election only decides who *tries* to lead: safety comes from the fenced log
//! ([`super::log`]), so a leader that lost the key without noticing cannot grant anything.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use proxypool_settings::shutdown::Shutdown;
use tokio::sync::watch;

const KEY: &str = "leader";

/// Runs the election until `shutdown`, publishing whether this replica leads on `leading`. Setting `resign` (the
/// engine was fenced) gives the lead up at once.
pub async fn run(
    client: async_nats::Client,
    me: String,
    ttl: Duration,
    leading: watch::Sender<bool>,
    mut resign: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) {
    let js = jetstream::new(client);
    let renew_every = ttl / 4;
    let try_every = (ttl / 8).max(Duration::from_millis(50));
    let mut bucket = None;
    let mut revision: Option<u64> = None;
    let mut renewed = Instant::now();
    let mut resigned = *resign.borrow();
    loop {
        let wait = if revision.is_some() { renew_every } else { try_every };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = resign.changed() => {}
            () = shutdown.wait() => break,
        }
        if *resign.borrow() != resigned {
            resigned = *resign.borrow();
            if revision.take().is_some() {
                tracing::warn!("giving up the lease leadership (fenced)");
                leading.send_replace(false);
            }
            // Let another replica take it; try again only after a full TTL.
            tokio::select! {
                () = tokio::time::sleep(ttl) => {}
                () = shutdown.wait() => break,
            }
            continue;
        }
        if bucket.is_none() {
            match proxypool_rpc::jetstream::ensure_lease_leader(&js, ttl).await {
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
                    tracing::warn!(error = %e, "cannot renew the lease leadership");
                    // The key may be gone with the bucket (a memory bucket after a NATS restart): recreate it.
                    bucket = None;
                    lose(&mut revision, &leading, renewed, ttl);
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

/// After a failed renewal: keep leading until the entry we last wrote would have expired, then give up, so that a
/// short NATS hiccup does not cost a failover (the log fence keeps this safe either way).
fn lose(revision: &mut Option<u64>, leading: &watch::Sender<bool>, renewed: Instant, ttl: Duration) {
    if revision.is_some() && renewed.elapsed() >= ttl {
        *revision = None;
        tracing::warn!("lease leadership expired");
        leading.send_replace(false);
    }
}
