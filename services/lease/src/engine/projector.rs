//! The projector: which proxies MongoDB's projection still lacks, the write in flight, the mark it reached, and
//! trimming the log up to that mark. The actor tells it what changed; it never decides anything about leases.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use proxypool_store::{Store, StoreError};
use tokio::sync::mpsc;

use super::handle::Shared;
use super::log::LeaseLog;
use super::projection::{self, Mark, Snapshot};
use super::state::State;
use crate::metrics::LeaseMetrics;

/// How often the log is trimmed up to the projection.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// A finished projection write: its result, the proxies it carried, and since when they waited.
pub type Written = (Result<u64, StoreError>, Vec<ObjectId>, Instant);

/// The projection's bookkeeping.
pub struct Projector {
    store: Store,
    shared: Arc<Shared>,
    /// The log the projection is made from (its creation time) and the sequence it covers.
    mark: Mark,
    /// Proxies changed by durable batches and not yet projected.
    dirty: HashSet<ObjectId>,
    dirty_since: Option<Instant>,
    /// Proxies a follower changed from the log since its load (the projection may not have them).
    touched: HashSet<ObjectId>,
    writing: bool,
    tx: mpsc::Sender<Written>,
    rx: mpsc::Receiver<Written>,
    trimmed: u64,
    last_trim: Instant,
}

impl Projector {
    /// A projector writing to `store`.
    pub(super) fn new(store: Store, shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::channel(1);
        Self {
            store,
            shared,
            mark: Mark::default(),
            dirty: HashSet::new(),
            dirty_since: None,
            touched: HashSet::new(),
            writing: false,
            tx,
            rx,
            trimmed: 0,
            last_trim: Instant::now(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the projection stands.
    pub fn mark(&self) -> Mark {
        self.mark
    }

    /// After a load from `mark`: nothing is owed.
    pub fn loaded(&mut self, mark: Mark) {
        self.mark = mark;
        self.dirty.clear();
        self.touched.clear();
        self.dirty_since = None;
    }

    /// The leader made these proxies' changes durable.
    pub fn changed(&mut self, ids: impl IntoIterator<Item = ObjectId>) {
        self.dirty.extend(ids);
        if !self.dirty.is_empty() {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// A follower applied these proxies' changes from the log.
    pub fn followed(&mut self, ids: impl IntoIterator<Item = ObjectId>) {
        self.touched.extend(ids);
    }

    /// On leading (or after catching up with another replica's batches): what was followed is owed to MongoDB too.
    pub fn adopt_followed(&mut self) {
        let followed: Vec<ObjectId> = self.touched.drain().collect();
        self.changed(followed);
    }

    /// Tells waiters where the projection stands (on leading).
    pub fn publish_mark(&self) {
        self.shared.projected.send_replace(self.mark.seq);
    }

    /// Proxies not yet projected.
    pub fn backlog(&self) -> usize {
        self.dirty.len()
    }

    /// Starts writing the proxies changed since the last write, unless a write is in flight.
    pub fn start(&mut self, state: &State, applied: u64) {
        if self.writing || self.dirty.is_empty() {
            return;
        }
        let ids: Vec<ObjectId> = self.dirty.drain().collect();
        let since = self.dirty_since.take().unwrap_or_else(Instant::now);
        let snap = Snapshot::of(state, ids.iter().copied(), applied);
        let (store, created, tx) = (self.store.clone(), self.mark.log_created_ms, self.tx.clone());
        self.writing = true;
        tokio::spawn(async move {
            let res = projection::write(&store, created, &snap).await.map(|()| snap.seq);
            let _ = tx.send((res, ids, since)).await;
        });
    }

    /// The next finished write (pending for ever while none is in flight).
    pub async fn written(&mut self) -> Option<Written> {
        self.rx.recv().await
    }

    /// Records a finished write; a failed one is owed again.
    pub fn finish(&mut self, (res, ids, since): Written, metrics: &LeaseMetrics) {
        self.writing = false;
        match res {
            Ok(seq) => {
                self.mark.seq = self.mark.seq.max(seq);
                self.shared.projected.send_replace(self.mark.seq);
                metrics.projection_lag.observe(since.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(error = %e, proxies = ids.len(), "cannot write the lease projection; will retry");
                self.dirty.extend(ids);
                self.dirty_since.get_or_insert(since);
            }
        }
    }

    /// Drops the log's batches below the mark (MongoDB holds their effect), every [`TRIM_EVERY`].
    pub async fn trim(&mut self, log: &LeaseLog) {
        if self.mark.seq <= self.trimmed + 1 || self.last_trim.elapsed() < TRIM_EVERY {
            return;
        }
        self.last_trim = Instant::now();
        // Keep the batch at the mark itself, so the stream is never empty and its last sequence stays visible.
        match log.trim_below(self.mark.seq).await {
            Ok(()) => self.trimmed = self.mark.seq,
            Err(e) => tracing::debug!(error = %e, "cannot trim the lease log"),
        }
    }
}
