//! The scheduler: claims due proxies (and expired locks) and queues their rotation jobs; admin "rotate now".

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
    /// Claims proxy `id` (taking over a lock older than `take_over_after`, for stale locks) and queues its job.
    /// `None` if it cannot be claimed now. Each claim starts a trace (one rotation is one trace: claim, job, rotate
    /// call, IP check, lease reset).
    #[tracing::instrument(name = "rotation.claim", skip(self), fields(proxy = %id))]
    async fn claim(
        &self,
        id: ObjectId,
        take_over_after: Option<std::time::Duration>,
    ) -> Result<Option<String>, JobError> {
        let now = DateTime::now();
        let job_id = format!("{}-{}", id.to_hex(), now.timestamp_millis());
        let req = LockRequest {
            proxy_id: id.to_hex(),
            job_id: job_id.clone(),
            take_over_after_ms: take_over_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            restart: false,
        };
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
                Err(e) => return Err(e),
            }
        };
        if locked.is_none() {
            return Ok(None);
        }
        let update = doc! { "$set": {
            "rotation_job": &job_id, "status": i32::from(ProxyStatus::Processing), "updatedAt": now,
        }};
        self.inner.store.proxies().update_one(doc! { "_id": id }, update).await?;
        let job = RotationJob { proxy_id: id.to_hex(), job_id: job_id.clone() };
        // Queued once however often it is published (the job id is the message id).
        let mut tries = 0;
        while let Err(e) = self.enqueue(&job).await {
            if tries >= CLAIM_TRIES {
                // The lock stays; the lock TTL hands the proxy to a later scan.
                tracing::warn!(error = %e, proxy = %id, "claimed but not queued; the lock will expire");
                return Ok(None);
            }
            tries += 1;
            tokio::time::sleep(CLAIM_RETRY).await;
        }
        Ok(Some(job_id))
    }

    /// Publishes a job with its id as the JetStream message id, and waits for the stream's ack.
    pub async fn enqueue(&self, job: &RotationJob) -> Result<(), JetStreamError> {
        ROTATIONS.publish(&self.inner.js, &job.job_id, job).await
    }
    async fn ids(&self, filter: Document, limit: i64) -> Result<Vec<(ObjectId, Option<DateTime>)>, JobError> {
        let docs: Vec<Document> = self
            .inner
            .store
            .proxies()
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "_id": 1, "rotating_since": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((d.get_object_id("_id").ok()?, d.get_datetime("rotating_since").ok().copied())))
            .collect())
    }

    /// One scheduler pass: claims and queues due proxies, and takes over locks older than the lock TTL. Returns how
    /// many jobs were queued.
    ///
    /// The original's rule is "active, not rotating, `next_rotate` passed, and (`is_error` or `used_count > 0` or
    /// `in_use = 0`)"; since `used_count >= in_use`, the parenthesis always holds, so due means active, unlocked and
    /// past `next_rotate`. Active leases are not a reason to skip: the job drains them first.
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
        for (id, _) in self.ids(due, c.scan_batch).await? {
            if self.claim(id, None).await?.is_some() {
                queued += 1;
            }
        }
        let cutoff = DateTime::from_millis(now.timestamp_millis() - i64::try_from(c.lock_ttl.as_millis()).unwrap_or(0));
        let stale = doc! { "is_rotating": true, "rotating_since": { "$lt": cutoff } };
        for (id, _) in self.ids(stale, c.scan_batch).await? {
            // The lease service decides with the lock's own time, so of several schedulers only one takes it over.
            if self.claim(id, Some(c.lock_ttl)).await?.is_some() {
                tracing::warn!(proxy = %id, "took over an expired rotation lock");
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
        let job_id = format!("{}-{}", id.to_hex(), now.timestamp_millis());
        let req =
            LockRequest { proxy_id: id.to_hex(), job_id: job_id.clone(), take_over_after_ms: None, restart: false };
        // Ask directly (not through `claim`) so the admin sees the lease service's reason.
        proxypool_rpc::call::<LeaseCtlLock>(&self.inner.nats, &req).await.map_err(ApiError::from)?;
        let update = doc! { "$set": {
            "rotation_job": &job_id, "status": i32::from(ProxyStatus::Processing), "updatedAt": now,
        }};
        self.inner.store.proxies().update_one(doc! { "_id": id }, update).await.map_err(|e| unavailable(e.into()))?;
        let job = RotationJob { proxy_id: id.to_hex(), job_id: job_id.clone() };
        self.enqueue(&job).await.map_err(|e| {
            tracing::warn!(error = %e, proxy = %id, "locked but not queued; the lock will expire");
            ApiError::unavailable("the rotation queue is unreachable; retry shortly")
        })?;
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
