//! Coordination between importer replicas through the NATS key-value bucket `proxypool_importer_locks`, with
//! compare-and-set writes (create-if-absent, update-at-revision) so exactly one replica wins each race.
//!
//! - [`KvLock`]: one import at a time across replicas, so two imports of overlapping files cannot both insert the
//!   same proxy. The holder renews it; a holder that died loses it when its `until` passes.
//! - [`claim_schedule`]: the ZingProxy schedule runs once per interval however many replicas tick.

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The bucket could not be read or written (NATS down); a lost compare-and-set race is not an error.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Reading the key failed.
    #[error("cannot read the lock")]
    Read(#[from] kv::EntryError),
    /// A write at the held revision failed: the lock was lost or NATS is down.
    #[error("cannot write the lock")]
    Write(#[from] kv::UpdateError),
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Serialize, Deserialize)]
struct LockValue {
    owner: String,
    until_ms: i64,
}

/// A lock held by one replica at a time.
#[derive(Debug, Clone)]
pub struct KvLock {
    kv: kv::Store,
    key: String,
    owner: String,
    ttl: Duration,
}

/// A held lock; pass it to [`KvLock::renew`] and [`KvLock::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    revision: u64,
}

impl KvLock {
    /// A lock on `key`, held by `owner` for `ttl` past each renewal.
    pub fn new(kv: kv::Store, key: &str, owner: &str, ttl: Duration) -> Self {
        Self { kv, key: key.to_owned(), owner: owner.to_owned(), ttl }
    }

    /// The renewal period the holder should keep.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    fn value(&self, until_ms: i64) -> Bytes {
        serde_json::to_vec(&LockValue { owner: self.owner.clone(), until_ms }).map(Bytes::from).unwrap_or_default()
    }

    /// Takes the lock if it is free or its holder's time has passed; `Ok(None)` when another replica holds it.
    pub async fn try_acquire(&self) -> Result<Option<Held>, LockError> {
        let until = now_ms() + self.ttl.as_millis() as i64;
        let entry = self.kv.entry(&self.key).await?;
        let result = match entry {
            Some(e) if e.operation == Operation::Put => {
                let held = serde_json::from_slice::<LockValue>(&e.value).map(|v| v.until_ms).unwrap_or(0);
                if held > now_ms() {
                    return Ok(None);
                }
                self.kv.update(&self.key, self.value(until), e.revision).await.ok()
            }
            _ => self.kv.create(&self.key, self.value(until)).await.ok(),
        };
        // A failed compare-and-set means another replica won the race.
        Ok(result.map(|revision| Held { revision }))
    }

    /// Extends the lock; an error means it was lost (taken over after this holder stalled past the TTL).
    pub async fn renew(&self, held: Held) -> Result<Held, LockError> {
        let until = now_ms() + self.ttl.as_millis() as i64;
        let revision = self.kv.update(&self.key, self.value(until), held.revision).await?;
        Ok(Held { revision })
    }

    /// Frees the lock (if still held) so the next job need not wait for the TTL.
    pub async fn release(&self, held: Held) {
        if let Err(e) = self.kv.update(&self.key, self.value(0), held.revision).await {
            tracing::debug!(error = %e, key = %self.key, "lock already lost at release");
        }
    }
}

/// Claims the run of a schedule due every `interval`: true for exactly one caller per interval.
pub async fn claim_schedule(kv: &kv::Store, key: &str, interval: Duration) -> Result<bool, LockError> {
    let now = now_ms();
    let value = Bytes::from(now.to_string());
    let entry = kv.entry(key).await?;
    let won = match entry {
        Some(e) if e.operation == Operation::Put => {
            let last: i64 = std::str::from_utf8(&e.value).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            if now - last < interval.as_millis() as i64 {
                return Ok(false);
            }
            kv.update(key, value, e.revision).await.is_ok()
        }
        _ => kv.create(key, value).await.is_ok(),
    };
    Ok(won)
}
