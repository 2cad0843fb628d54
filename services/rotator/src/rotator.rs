//! The [`Rotator`]: the state shared by the scheduler and the workers, and the steps both use (the queue, reading
//! a proxy, the rotation lock).
//!
//! A proxy is claimed by taking its rotation lock from the lease service (the owner of everything that gates
//! leasing: no new lease from the moment it answers), then recording the job id on the document; the job is
//! published with that id as its JetStream message id, so it is queued once however many schedulers run
//! ([`crate::scheduler`]). A job is acknowledged only after its result is stored and the lease service has released
//! the lock (resetting the leases on success), so a worker that dies mid-job leaves the job to be redelivered to
//! another ([`crate::worker`]). Every step checks that the proxy is still locked by this job, so a stale or
//! duplicate delivery changes nothing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::endpoints::LeaseCtlLock;
use proxypool_contracts::rotation::RotationJob;
use proxypool_contracts::rotation::{LockReply, LockRequest};
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
        ROTATIONS.ensure_consumer(&self.inner.js, delivery).await
    }

    /// Takes, checks or takes over the rotation lock at the lease service. `None` when another job holds it, the
    /// proxy cannot rotate (disabled, subscription ended) or is gone.
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

    /// Whether the document records `job` as the current rotation (the lock itself is the lease service's).
    pub(crate) fn holds_lock(doc: &ProxyDoc, job: &RotationJob) -> bool {
        doc.rotation_job.as_deref() == Some(job.job_id.as_str())
    }
}
