//! The [`Rotator`]: the state shared by the scheduler and the workers, and the steps both use (the queue, reading
//! a proxy, the rotation lock).
//!
//! A proxy is claimed by taking its rotation lock from the lease service (the owner of everything that gates
//! leasing: no new lease from the moment it answers); the job is published with its id as its JetStream message
//! id, so it is queued once however many schedulers run ([`crate::scheduler`]). The lock is a lease in the lease
//! engine: it has a deadline, the job renews it while it works ([`LockKeeper`]), and the lease service takes it
//! back when the deadline passes, so a job that died or gave up never strands its proxy. A job is acknowledged only
//! after its result is stored and the lease service has released the lock (resetting the leases on success), so a
//! worker that dies mid-job leaves the job to be redelivered to another ([`crate::worker`]). Only a claim creates a
//! lock: every later step asks the lease service whether this job still holds it, so a stale or duplicate delivery
//! changes nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::endpoints::{LeaseCtlLock, LeaseCtlRotated};
use proxypool_contracts::rotation::RotationJob;
use proxypool_contracts::rotation::{LockReply, LockRequest, RotatedRequest};
use proxypool_rpc::jetstream::{Delivery, JetStreamError, ROTATIONS};
use proxypool_store::model::ProxyDoc;
use proxypool_store::{Store, StoreError};

use crate::config::RotatorConfig;
use crate::metrics::RotatorMetrics;

/// Longest `response` stored on a proxy.
const RESPONSE_MAX: usize = 500;

/// Why a job did not finish; it is redelivered.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The database failed.
    #[error("database")]
    Store(#[from] StoreError),
    /// The lease service did not answer (lock, drain, reset).
    #[error("lease service")]
    Lease(#[from] proxypool_rpc::CallError),
    /// A test's fault point failed this step.
    #[error("fault injected at {0}")]
    Fault(&'static str),
}

impl From<mongodb::error::Error> for JobError {
    fn from(e: mongodb::error::Error) -> Self {
        JobError::Store(e.into())
    }
}

/// Shared rotator state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Rotator {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: RotatorConfig,
    pub(crate) store: Store,
    pub(crate) nats: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) metrics: RotatorMetrics,
}

pub(crate) fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(RESPONSE_MAX).collect();
    if s.chars().count() > RESPONSE_MAX {
        out.push('…');
    }
    out
}

pub(crate) fn millis_from_now(d: Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
}

impl Rotator {
    /// A rotator over these connections.
    pub fn new(config: RotatorConfig, store: Store, nats: async_nats::Client) -> Self {
        let js = jetstream::new(nats.clone());
        Self { inner: Arc::new(Inner { config, store, nats, js, metrics: RotatorMetrics::new() }) }
    }

    /// The metrics.
    pub fn metrics(&self) -> &RotatorMetrics {
        &self.inner.metrics
    }

    /// Refreshes the queue-depth gauge from the consumer's state.
    pub async fn update_queue_depth(&self) {
        if let Some(depth) = ROTATIONS.depth(&self.inner.js).await {
            self.inner.metrics.queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &RotatorConfig {
        &self.inner.config
    }

    /// Creates (idempotently) the rotation work queue and its durable consumer.
    pub async fn ensure_queue(&self) -> Result<PullConsumer, JetStreamError> {
        let c = &self.inner.config;
        let delivery = Delivery { ack_wait: c.ack_wait, max_deliver: c.max_deliver, backoff: true };
        ROTATIONS.ensure_consumer(&self.inner.js, delivery, c.nats.replicas).await
    }

    /// Claims, restarts or checks (and so renews) the rotation lock at the lease service. `None` when this job does
    /// not hold it (another does, it was released or taken back), the proxy cannot rotate (disabled, subscription
    /// ended) or is gone.
    pub(crate) async fn lock(&self, req: &LockRequest) -> Result<Option<LockReply>, JobError> {
        match proxypool_rpc::call::<LeaseCtlLock>(&self.inner.nats, req).await {
            Ok(reply) => Ok(Some(reply)),
            Err(proxypool_rpc::CallError::Remote(e))
                if e.code == proxypool_contracts::ErrorCode::Conflict
                    || e.code == proxypool_contracts::ErrorCode::NotFound =>
            {
                tracing::debug!(proxy = %req.proxy_id, reason = %e.message, "rotation lock not taken");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn load(&self, id: ObjectId) -> Result<Option<ProxyDoc>, JobError> {
        Ok(self.inner.store.proxies().find_one(doc! { "_id": id }).await?)
    }

    /// The lock's lifetime without a renewal, as the lease service takes it.
    pub(crate) fn lock_ttl_ms(&self) -> Option<u64> {
        Some(u64::try_from(self.inner.config.lock_ttl.as_millis()).unwrap_or(u64::MAX))
    }

    /// Releases `job`'s lock without resetting the leases (the proxy keeps its address), when a job or a claim stops
    /// while it may hold it. Best effort: if the lease service cannot be reached, the lock's deadline takes it back.
    pub(crate) async fn abandon(&self, job: &RotationJob, why: &str) {
        let req = RotatedRequest { proxy_id: job.proxy_id.clone(), job_id: job.job_id.clone(), reset: false };
        match proxypool_rpc::call::<LeaseCtlRotated>(&self.inner.nats, &req).await {
            Ok(_) => tracing::info!(proxy = %job.proxy_id, job = %job.job_id, why, "rotation lock released"),
            Err(proxypool_rpc::CallError::Remote(e)) if e.code == proxypool_contracts::ErrorCode::Conflict => {}
            Err(e) => tracing::warn!(
                proxy = %job.proxy_id, job = %job.job_id, why, error = %e,
                "cannot release the rotation lock; its deadline will"
            ),
        }
    }

    /// Starts renewing `job`'s lock every third of its lifetime until the keeper is dropped.
    pub(crate) fn keep(&self, job: &RotationJob) -> LockKeeper {
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (rotator, check) = (self.clone(), LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms()));
        let every = self.inner.config.lock_ttl / 3;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match rotator.lock(&check).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!(proxy = %check.proxy_id, job = %check.job_id, "the rotation lock was lost");
                        lost_tx.send_replace(true);
                        return;
                    }
                    // Not answered (a failover): ask again at the next turn; the deadline leaves two more.
                    Err(e) => tracing::debug!(error = %e, "cannot renew the rotation lock yet"),
                }
            }
        });
        LockKeeper { task, lost }
    }
}

/// Renews a job's rotation lock while the job works (drain, provider call, IP check); stops when dropped.
#[derive(Debug)]
pub(crate) struct LockKeeper {
    task: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<bool>,
}

impl LockKeeper {
    /// Resolves when the lease service said the job no longer holds the lock.
    pub(crate) async fn lost(&self) {
        let mut lost = self.lost.clone();
        if lost.wait_for(|l| *l).await.is_err() {
            // The keeper's task ended without losing the lock (only by being dropped): never lost.
            std::future::pending::<()>().await;
        }
    }

    /// Whether it was lost.
    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
