//! The scheduler: claims due proxies and queues their rotation jobs; admin "rotate now".

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use proxypool_contracts::endpoints::LeaseCtlLock;
use proxypool_contracts::rotation::{LockRequest, RotateNowReply, RotationJob};
use proxypool_contracts::ApiError;
use proxypool_rpc::jetstream::{JetStreamError, ROTATIONS};
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::model::ProxyStatus;

use crate::rotator::{JobError, Rotator};

/// How often a claim asks again for a lock or a queue that did not answer, and how long it waits in between: long
/// enough to outlast a lease-leader failover or a NATS restart.
const CLAIM_TRIES: u32 = 20;
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

impl Rotator {
    /// Claims proxy `id` and queues its job. `None` if it cannot be claimed now. Each claim starts a trace (one
    /// rotation is one trace: claim, job, rotate call, IP check, lease reset).
    ///
    /// Whenever the claim stops after the lock may have been taken (the lock's answer never came, the document or
    /// the queue failed), it releases the lock; if even that cannot reach the lease service, the lock's deadline
    /// takes it back.
    #[tracing::instrument(name = "rotation.claim", skip(self), fields(proxy = %id))]
    async fn claim(&self, id: ObjectId) -> Result<Option<String>, JobError> {
        let now = DateTime::now();
        let job = RotationJob { proxy_id: id.to_hex(), job_id: format!("{}-{}", id.to_hex(), now.timestamp_millis()) };
        let req = LockRequest { claim: true, ..LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms()) };
        // The lock stops new leases the moment the lease service answers. Asking again with the same job is
        // idempotent, so a lock whose answer was lost (the lease leader died) is confirmed rather than stranded.
        let mut tries = 0;
        let locked = loop {
            match self.lock(&req).await {
                Ok(l) => break l,
                Err(e) if tries < CLAIM_TRIES => {
                    tries += 1;
                    tracing::debug!(error = %e, proxy = %id, "lock not confirmed yet; asking again");
                    tokio::time::sleep(CLAIM_RETRY).await;
                }
                Err(e) => {
                    self.abandon(&job, "the claim's lock was never confirmed").await;
                    return Err(e);
                }
            }
        };
        if locked.is_none() {
            return Ok(None);
        }
        let recorded = if proxypool_faults::point_at("rotator.claim.locked", id).await {
            Err(JobError::Fault("rotator.claim.locked"))
        } else {
            self.mark_processing(id, now).await
        };
        if let Err(e) = recorded {
            self.abandon(&job, "the claim could not be recorded").await;
            return Err(e);
        }
        // Queued once however often it is published (the job id is the message id).
        let mut tries = 0;
        while let Err(e) = self.enqueue(&job).await {
            if tries >= CLAIM_TRIES {
                tracing::warn!(error = %e, proxy = %id, "claimed but not queued");
                self.abandon(&job, "the job could not be queued").await;
                return Ok(None);
            }
            tries += 1;
            tokio::time::sleep(CLAIM_RETRY).await;
        }
        Ok(Some(job.job_id))
    }

    /// Records on the document that a rotation is under way (the worker reads it to tell a rotation to make from
    /// one already stored). The lock and its job are the lease service's, projected by it.
    async fn mark_processing(&self, id: ObjectId, now: DateTime) -> Result<(), JobError> {
        let update = doc! { "$set": { "status": i32::from(ProxyStatus::Processing), "updatedAt": now } };
        self.inner.store.proxies().update_one(doc! { "_id": id }, update).await?;
        Ok(())
    }

    /// Publishes a job with its id as the JetStream message id, and waits for the stream's ack.
    pub async fn enqueue(&self, job: &RotationJob) -> Result<(), JetStreamError> {
        ROTATIONS.publish(&self.inner.js, &job.job_id, job).await
    }
    async fn ids(&self, filter: Document, limit: i64) -> Result<Vec<ObjectId>, JobError> {
        let docs: Vec<Document> = self
            .inner
            .store
            .proxies()
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "_id": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs.iter().filter_map(|d| d.get_object_id("_id").ok()).collect())
    }

    /// One scheduler pass: claims and queues due proxies. Returns how many jobs were queued.
    ///
    /// The original's rule is "active, not rotating, `next_rotate` passed, and (`is_error` or `used_count > 0` or
    /// `in_use = 0`)"; since `used_count >= in_use`, the parenthesis always holds, so due means active, unlocked and
    /// past `next_rotate`. Active leases are not a reason to skip: the job drains them first. A lock whose job was
    /// lost is not the scheduler's business: the lease service takes it back at its deadline, and the proxy is
    /// due again at the next pass.
    pub async fn scan_once(&self) -> Result<usize, JobError> {
        let c = &self.inner.config;
        let now = DateTime::now();
        // `is_rotating` is the lease service's projection (it may trail by a moment: the lock call decides). A proxy
        // whose provider subscription has ended is not rotated.
        let due = doc! {
            "is_active": true, "is_rotating": false, "next_rotate": { "$lte": now },
            "$nor": [ { "expired_at": { "$lte": now } } ],
        };
        let mut queued = 0;
        for id in self.ids(due, c.scan_batch).await? {
            if self.claim(id).await?.is_some() {
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Admin "rotate now": claims one proxy whatever its schedule and queues its job.
    pub async fn rotate_now(&self, proxy_id: &str) -> Result<RotateNowReply, ApiError> {
        let id = ObjectId::parse_str(proxy_id)
            .map_err(|_| ApiError::invalid("id", "must be a 24-character hexadecimal ObjectId"))?;
        let unavailable = |e: JobError| {
            tracing::warn!(error = %e, "rotate-now failed");
            ApiError::unavailable("the database is unreachable; retry shortly")
        };
        let now = DateTime::now();
        let job = RotationJob { proxy_id: id.to_hex(), job_id: format!("{}-{}", id.to_hex(), now.timestamp_millis()) };
        let req = LockRequest { claim: true, ..LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms()) };
        // Ask directly (not through `claim`) so the admin sees the lease service's reason.
        if let Err(e) = proxypool_rpc::call::<LeaseCtlLock>(&self.inner.nats, &req).await {
            if e.is_retryable() {
                // The lock may have been taken without its answer reaching us.
                self.abandon(&job, "rotate-now's lock was not confirmed").await;
            }
            return Err(ApiError::from(e));
        }
        if let Err(e) = self.mark_processing(id, now).await {
            self.abandon(&job, "rotate-now could not be recorded").await;
            return Err(unavailable(e));
        }
        if let Err(e) = self.enqueue(&job).await {
            tracing::warn!(error = %e, proxy = %id, "locked but not queued");
            self.abandon(&job, "rotate-now's job could not be queued").await;
            return Err(ApiError::unavailable("the rotation queue is unreachable; retry shortly"));
        }
        let job_id = job.job_id;
        Ok(RotateNowReply { job_id })
    }
}

/// Scans on a timer until shutdown.
pub async fn run_scheduler(rotator: Rotator, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(rotator.config().scan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        rotator.update_queue_depth().await;
        match rotator.scan_once().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(queued = n, "rotation jobs queued"),
            Err(e) => tracing::warn!(error = %e, "rotation scan failed"),
        }
    }
}
