//! The rotation itself: claiming due proxies, queuing jobs on JetStream, and running a job.
//!
//! A proxy is claimed with one guarded write that sets the `is_rotating` lock together with `rotating_since` and the
//! job id; the job is then published with that id as its JetStream message id, so it is queued once however many
//! schedulers run. A job is acknowledged only after its result is stored (and, on success, after the lease service
//! has reset the lease state), so a worker that dies mid-job leaves the job to be redelivered to another. Every
//! step checks that the proxy is still locked by this job, so a stale or duplicate delivery changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, context::Publish};
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
use proxypool_contracts::events::{ChangeReason, ProxyChanged};
use proxypool_contracts::rotation::{RotateNowReply, RotatedReply, RotatedRequest, RotationJob};
use proxypool_contracts::{subjects, ApiError, ErrorCode, Reply};
use proxypool_store::model::{ProxyDoc, ProxyStatus};
use proxypool_store::{Store, StoreError};

use crate::check;
use crate::config::RotatorConfig;
use crate::providers::{Adapter, Address};

/// Longest `response` stored on a proxy.
const RESPONSE_MAX: usize = 500;
/// How often a draining job polls the proxy.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// Why a job did not finish; it is redelivered.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The lease service did not confirm the reset.
    #[error("lease reset: {0}")]
    Reset(String),
}

impl From<mongodb::error::Error> for JobError {
    fn from(e: mongodb::error::Error) -> Self {
        JobError::Store(e.into())
    }
}

/// Errors setting up JetStream or publishing a job.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Stream or consumer set-up.
    #[error("jetstream set-up: {0}")]
    Setup(String),
    /// Publishing a job.
    #[error("cannot queue a rotation job: {0}")]
    Publish(String),
}

/// Shared rotator state.
#[derive(Debug, Clone)]
pub struct Rotator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RotatorConfig,
    store: Store,
    nats: async_nats::Client,
    js: jetstream::Context,
    metrics: RotatorMetrics,
}

/// `result` label of the counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    /// `succeeded` or `failed`.
    pub result: &'static str,
}

/// The rotator's metrics, exported on its admin port.
#[derive(Debug, Clone)]
pub struct RotatorMetrics {
    /// The registry (rendered at `/metrics`).
    pub registry: proxypool_telemetry::metrics::Metrics,
    /// Rotations by result.
    pub rotations: Family<ResultLabel, Counter>,
    /// Duration of the rotation step (rotate call, IP check, region), seconds.
    pub duration: Histogram,
    /// Jobs waiting in the queue or in hand, as of the last scan.
    pub queue_depth: Gauge,
    /// Callback deliveries by result.
    pub callbacks: Family<ResultLabel, Counter>,
    /// Rotate-now requests served.
    pub requests: proxypool_telemetry::metrics::RequestMetrics,
}

impl RotatorMetrics {
    fn new() -> Self {
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_rotator");
        let rotations = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        let queue_depth = Gauge::default();
        let callbacks = Family::<ResultLabel, Counter>::default();
        registry.register("rotations", "Rotations finished, by result", rotations.clone());
        registry.register("rotation_duration_seconds", "Rotate call + IP check + region lookup", duration.clone());
        registry.register("queue_depth", "Rotation jobs pending or in hand", queue_depth.clone());
        registry.register("callbacks", "Callback deliveries, by result", callbacks.clone());
        let requests = registry.requests();
        Self { registry, rotations, duration, queue_depth, callbacks, requests }
    }
}

fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(RESPONSE_MAX).collect();
    if s.chars().count() > RESPONSE_MAX {
        out.push('…');
    }
    out
}

/// Delay before redelivering a job (or a notice) that failed on delivery `attempt`: `base`, then 4× longer each
/// time, at most 10 minutes.
pub fn retry_delay(base: Duration, attempt: i64) -> Duration {
    let factor = 4u32.saturating_pow(u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(10));
    base.saturating_mul(factor).min(Duration::from_secs(600))
}

fn millis_from_now(d: Duration) -> DateTime {
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
        let consumer: Result<PullConsumer, _> =
            self.inner.js.get_consumer_from_stream(subjects::ROTATION_CONSUMER, subjects::ROTATION_STREAM).await;
        if let Ok(mut c) = consumer {
            if let Ok(info) = c.info().await {
                let depth = info.num_pending.saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(0));
                self.inner.metrics.queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
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

    /// Creates (idempotently) the WorkQueue stream and the durable pull consumer.
    pub async fn ensure_queue(&self) -> Result<PullConsumer, QueueError> {
        let c = &self.inner.config;
        let stream = self
            .inner
            .js
            .get_or_create_stream(jetstream::stream::Config {
                name: subjects::ROTATION_STREAM.to_owned(),
                subjects: vec![subjects::ROTATION_JOBS.to_owned()],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                // Long enough that a scheduler re-publishing a claim (after a lost ack) is de-duplicated.
                duplicate_window: Duration::from_secs(300),
                ..Default::default()
            })
            .await
            .map_err(|e| QueueError::Setup(e.to_string()))?;
        stream
            .get_or_create_consumer(
                subjects::ROTATION_CONSUMER,
                jetstream::consumer::pull::Config {
                    durable_name: Some(subjects::ROTATION_CONSUMER.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: c.ack_wait,
                    max_deliver: c.max_deliver,
                    // Redelivery after a missed ack backs off: a job that keeps killing its worker is retried more
                    // and more slowly. (The server requires fewer steps than deliveries.)
                    backoff: (0..c.max_deliver.saturating_sub(1).min(3))
                        .map(|i| c.ack_wait.saturating_mul(1 << i))
                        .collect(),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| QueueError::Setup(e.to_string()))
    }

    async fn announce(&self, id: ObjectId) {
        let event = ProxyChanged { proxy_id: id.to_hex(), reason: ChangeReason::Updated, origin: None, snapshot: None };
        if let Ok(body) = serde_json::to_vec(&event) {
            if let Err(e) = self.inner.nats.publish(subjects::PROXY_CHANGED, body.into()).await {
                tracing::warn!(error = %e, "cannot publish proxy.changed");
            }
        }
    }

    /// Claims the proxy matching `filter` (which must pin `_id`) and queues its job. `None` if another claimed it.
    /// Each claim starts a trace (one rotation is one trace: claim, job, rotate call, IP check, lease reset).
    #[tracing::instrument(name = "rotation.claim", skip(self, filter), fields(proxy = %id))]
    async fn claim(&self, id: ObjectId, mut filter: Document) -> Result<Option<String>, JobError> {
        let now = DateTime::now();
        let job_id = format!("{}-{}", id.to_hex(), now.timestamp_millis());
        filter.insert("_id", id);
        let update = doc! { "$set": {
            "is_rotating": true, "rotating_since": now, "rotation_job": &job_id,
            "status": i32::from(ProxyStatus::Processing), "updatedAt": now,
        }};
        let res = self.inner.store.proxies().update_one(filter, update).await?;
        if res.matched_count == 0 {
            return Ok(None);
        }
        // The lock stops new leases at once (the lease guard requires is_rotating=false); tell the lease index.
        self.announce(id).await;
        let job = RotationJob { proxy_id: id.to_hex(), job_id: job_id.clone() };
        if let Err(e) = self.enqueue(&job).await {
            // The lock stays; the lock TTL hands the proxy to a later scan.
            tracing::warn!(error = %e, proxy = %id, "claimed but not queued; the lock will expire");
            return Ok(None);
        }
        Ok(Some(job_id))
    }

    /// Publishes a job with its id as the JetStream message id, and waits for the stream's ack.
    pub async fn enqueue(&self, job: &RotationJob) -> Result<(), QueueError> {
        let body = serde_json::to_vec(job).map_err(|e| QueueError::Publish(e.to_string()))?;
        self.inner
            .js
            .send_publish(
                subjects::ROTATION_JOBS,
                // The trace context first: `headers` replaces the map, `message_id` adds to it.
                Publish::build()
                    .payload(body.into())
                    .headers(proxypool_telemetry::propagation::nats_headers())
                    .message_id(&job.job_id),
            )
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?
            .await
            .map_err(|e| QueueError::Publish(e.to_string()))?;
        Ok(())
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
    /// SPEC.md's rule is "active, not rotating, `next_rotate` passed, and (`is_error` or `used_count > 0` or
    /// `in_use = 0`)"; since `used_count >= in_use`, the parenthesis always holds, so due means active, unlocked and
    /// past `next_rotate`. Active leases are not a reason to skip: the job drains them first.
    pub async fn scan_once(&self) -> Result<usize, JobError> {
        let c = &self.inner.config;
        let now = DateTime::now();
        let due = doc! { "is_active": true, "is_rotating": false, "next_rotate": { "$lte": now } };
        let mut queued = 0;
        for (id, _) in self.ids(due.clone(), c.scan_batch).await? {
            if self.claim(id, due.clone()).await?.is_some() {
                queued += 1;
            }
        }
        let cutoff = DateTime::from_millis(now.timestamp_millis() - i64::try_from(c.lock_ttl.as_millis()).unwrap_or(0));
        let stale = doc! { "is_rotating": true, "rotating_since": { "$lt": cutoff } };
        for (id, since) in self.ids(stale, c.scan_batch).await? {
            // Pin the old lock time, so that of several schedulers only one takes it over.
            if self.claim(id, doc! { "is_rotating": true, "rotating_since": since }).await?.is_some() {
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
        match self.claim(id, doc! { "is_rotating": false, "is_active": true }).await.map_err(unavailable)? {
            Some(job_id) => Ok(RotateNowReply { job_id }),
            None => {
                let doc =
                    self.inner.store.proxies().find_one(doc! { "_id": id }).await.map_err(|e| unavailable(e.into()))?;
                Err(match doc {
                    None => ApiError::not_found(format!("proxy {id} not found")),
                    Some(d) if !d.is_active => ApiError::new(ErrorCode::Conflict, "the proxy is disabled"),
                    Some(_) => ApiError::new(ErrorCode::Conflict, "the proxy is already rotating"),
                })
            }
        }
    }

    async fn load(&self, id: ObjectId) -> Result<Option<ProxyDoc>, JobError> {
        Ok(self.inner.store.proxies().find_one(doc! { "_id": id }).await?)
    }

    fn holds_lock(doc: &ProxyDoc, job: &RotationJob) -> bool {
        doc.is_rotating && doc.rotation_job.as_deref() == Some(job.job_id.as_str())
    }

    /// Runs one job. `Ok` means acknowledge (done, or nothing to do); `Err` means redeliver.
    pub async fn process(&self, job: &RotationJob) -> Result<(), JobError> {
        let Ok(id) = ObjectId::parse_str(&job.proxy_id) else { return Ok(()) };
        let Some(mut doc) = self.load(id).await? else { return Ok(()) };
        if !Self::holds_lock(&doc, job) {
            tracing::debug!(proxy = %id, job = %job.job_id, "stale job: the proxy is not locked by it");
            return Ok(());
        }
        if doc.status != ProxyStatus::Completed {
            // The lock's age (for take-over) and the drain limit count from when a worker starts the job, not from
            // the claim: a job may wait in the queue behind a backlog.
            let started = doc! { "_id": id, "is_rotating": true, "rotation_job": &job.job_id };
            let since = doc! { "$set": { "rotating_since": DateTime::now() } };
            if self.inner.store.proxies().update_one(started, since).await?.matched_count == 0 {
                return Ok(());
            }
            match self.drain(id, job).await? {
                Some(d) => doc = d,
                None => return Ok(()),
            }
            let started = Instant::now();
            let outcome = self.rotate(&doc).await;
            tracing::info!(proxy = %id, ok = outcome.is_ok(), took = ?started.elapsed(), "rotation finished");
            let m = &self.inner.metrics;
            m.duration.observe(started.elapsed().as_secs_f64());
            let result = if outcome.is_ok() { "succeeded" } else { "failed" };
            m.rotations.get_or_create(&ResultLabel { result }).inc();
            match outcome {
                Ok((addr, ip, region)) => {
                    if !self.store_success(&doc, job, &addr, &ip, region).await? {
                        return Ok(());
                    }
                }
                Err((status_code, reason)) => {
                    self.store_failure(&doc, job, status_code, &reason).await?;
                    return Ok(());
                }
            }
        }
        self.reset_leases(job).await
    }

    /// Waits until no lease is held or `ROTATE_DRAIN_MAX` has passed since the claim. `None` if the lock was lost.
    async fn drain(&self, id: ObjectId, job: &RotationJob) -> Result<Option<ProxyDoc>, JobError> {
        let max = self.inner.config.drain_max;
        loop {
            let Some(doc) = self.load(id).await? else { return Ok(None) };
            if !Self::holds_lock(&doc, job) {
                return Ok(None);
            }
            let since = doc.rotating_since.map_or(0, |d| d.timestamp_millis());
            let waited = Duration::from_millis(u64::try_from(DateTime::now().timestamp_millis() - since).unwrap_or(0));
            if doc.in_use <= 0 {
                return Ok(Some(doc));
            }
            if waited >= max {
                tracing::warn!(proxy = %id, held = doc.in_use, "drain timed out; rotating with leases still held");
                return Ok(Some(doc));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Calls the rotate URL (unless disabled), reads the new address, checks the public IP through the proxy and
    /// looks up its region. `Err((status_code, reason))` on failure.
    async fn rotate(&self, doc: &ProxyDoc) -> Result<(Address, String, Option<String>), (i32, String)> {
        let c = &self.inner.config;
        let current = Address {
            ip: doc.ip.clone(),
            port: u16::try_from(doc.port).unwrap_or(0),
            username: doc.username.clone(),
            password: doc.password.clone(),
        };
        let addr = if doc.disable_auto_rotate {
            current
        } else {
            let adapter = self.adapter_for(doc).await.map_err(|e| (500, format!("cannot read the provider: {e}")))?;
            let client = reqwest::Client::builder()
                .timeout(c.http_timeout)
                .build()
                .map_err(|e| (500, format!("cannot build the HTTP client: {e}")))?;
            let mut req = client.get(&doc.rotate_url);
            if let Some(token) = doc.auth_token.as_deref().filter(|t| !t.is_empty()) {
                req = req.bearer_auth(token);
            }
            let res = req.send().await.map_err(|e| {
                let why = if e.is_timeout() { "timed out" } else { "could not be reached" };
                (502, format!("rotate URL {why}"))
            })?;
            let status = res.status().as_u16();
            let body = res.text().await.unwrap_or_default();
            adapter.parse(status, &body, &current).map_err(|reason| {
                let detail =
                    if (200..300).contains(&status) { String::new() } else { format!(": {}", truncate(&body)) };
                (i32::from(status.max(500)), format!("{reason}{detail}"))
            })?
        };
        let ip = check::public_ip(&addr, &c.ip_check_urls, c.ip_check_tries, c.ip_check_delay, c.http_timeout)
            .await
            .map_err(|reason| (500, reason))?;
        let region = match &c.ip_region_url {
            Some(url) => check::region(url, ip, c.http_timeout).await,
            None => None,
        };
        Ok((addr, ip.to_string(), region))
    }

    async fn adapter_for(&self, doc: &ProxyDoc) -> Result<Adapter, JobError> {
        let store = &self.inner.store;
        let package = store.packages().find_one(doc! { "_id": doc.proxy_package_id }).await?;
        let provider = match package {
            Some(p) => store.providers().find_one(doc! { "_id": p.proxy_provider_id }).await?,
            None => None,
        };
        Ok(match provider {
            Some(p) => Adapter::for_provider(&p.name, p.rotate_fields),
            None => Adapter::Generic(None),
        })
    }

    /// Stores a successful rotation; the lock stays until the lease service resets the lease state.
    async fn store_success(
        &self,
        doc: &ProxyDoc,
        job: &RotationJob,
        addr: &Address,
        ip_public: &str,
        region: Option<String>,
    ) -> Result<bool, JobError> {
        let next = millis_from_now(Duration::from_secs(u64::try_from(doc.rotate_time.max(1)).unwrap_or(60)));
        let mut set = doc! {
            "ip": &addr.ip, "port": i32::from(addr.port), "username": &addr.username, "password": &addr.password,
            "ip_public": ip_public, "next_rotate": next, "is_error": false, "status_code": 200,
            "status": i32::from(ProxyStatus::Completed), "response": "OK", "updatedAt": DateTime::now(),
        };
        if let Some(r) = region {
            set.insert("region", r);
        }
        let filter = doc! {
            "_id": doc.id, "is_rotating": true, "rotation_job": &job.job_id,
            "status": i32::from(ProxyStatus::Processing),
        };
        let res = self.inner.store.proxies().update_one(filter, doc! { "$set": set }).await?;
        Ok(res.matched_count == 1)
    }

    /// Stores a failed rotation and releases the lock: the proxy keeps its address and leases, is marked in error,
    /// and is due again after `ROTATE_ERROR_BACKOFF`.
    async fn store_failure(
        &self,
        doc: &ProxyDoc,
        job: &RotationJob,
        status_code: i32,
        reason: &str,
    ) -> Result<(), JobError> {
        tracing::warn!(proxy = %doc.id, status_code, reason, "rotation failed");
        let set = doc! {
            "is_error": true, "status_code": status_code, "response": truncate(reason),
            "next_rotate": millis_from_now(self.inner.config.error_backoff),
            "status": i32::from(ProxyStatus::Pending), "is_rotating": false, "rotating_since": null,
            "updatedAt": DateTime::now(),
        };
        let filter = doc! {
            "_id": doc.id, "is_rotating": true, "rotation_job": &job.job_id,
            "status": i32::from(ProxyStatus::Processing),
        };
        self.inner.store.proxies().update_one(filter, doc! { "$set": set }).await?;
        self.announce(doc.id).await;
        Ok(())
    }

    /// Asks the lease service (the only writer of lease state) to reset the leases and release the lock.
    async fn reset_leases(&self, job: &RotationJob) -> Result<(), JobError> {
        let req = RotatedRequest { proxy_id: job.proxy_id.clone(), job_id: job.job_id.clone() };
        let body = serde_json::to_vec(&req).map_err(|e| JobError::Reset(e.to_string()))?;
        let msg = proxypool_rpc::request(&self.inner.nats, subjects::LEASECTL_ROTATED, body.into(), None)
            .await
            .map_err(|e| JobError::Reset(e.to_string()))?;
        match serde_json::from_slice::<Reply<RotatedReply>>(&msg.payload) {
            Ok(Reply::Ok(r)) => {
                if r.dropped_leases > 0 {
                    tracing::warn!(proxy = %job.proxy_id, dropped = r.dropped_leases, "leases dropped by the rotation");
                }
                Ok(())
            }
            // Not locked by this job any more: someone else finished or took over; nothing left to do.
            Ok(Reply::Err(e)) if e.code == ErrorCode::Conflict || e.code == ErrorCode::NotFound => Ok(()),
            Ok(Reply::Err(e)) => Err(JobError::Reset(e.to_string())),
            Err(e) => Err(JobError::Reset(e.to_string())),
        }
    }
}
