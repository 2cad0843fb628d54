//! The workers: run one rotation job (drain holders, call the rotate URL through the provider's adapter, check the
//! public IP through the proxy, store the result, have the lease service reset the leases), driven by the one
//! work-queue runner.

use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::endpoints::LeaseCtlRotated;
use proxypool_contracts::rotation::{LockReply, LockRequest, RotatedRequest, RotationJob};
use proxypool_contracts::ErrorCode;
use proxypool_rpc::jetstream::JetStreamError;
use proxypool_rpc::workqueue::{self, Outcome, RunnerOptions};
use proxypool_rpc::CallError;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::model::{ProxyDoc, ProxyStatus};

use crate::check;
use crate::metrics::ResultLabel;
use crate::providers::{Adapter, Address};
use crate::rotator::{millis_from_now, truncate, JobError, Rotator};

/// How often a draining job polls the proxy.
const DRAIN_POLL: Duration = Duration::from_millis(250);

impl Rotator {
    /// Runs one delivery of a job. `Ok` means acknowledge (done, or nothing to do); `Err` means redeliver. On the
    /// last delivery a failure releases the lock, since nothing will come back for it.
    pub async fn process(&self, job: &RotationJob, last_delivery: bool) -> Result<(), JobError> {
        let Ok(id) = ObjectId::parse_str(&job.proxy_id) else { return Ok(()) };
        let result = self.run_job(id, job).await;
        if result.is_err() && last_delivery {
            self.abandon(job, "given up after ROTATE_MAX_DELIVER deliveries").await;
        }
        result
    }

    async fn run_job(&self, id: ObjectId, job: &RotationJob) -> Result<(), JobError> {
        // Only the job that holds the lock works, and only a claim creates one: a stale or duplicate delivery (its
        // lock released by its own rotation, or taken back) stops here instead of locking the proxy again. The
        // restart also starts the drain's clock: a job may have waited in the queue behind a backlog.
        let start = LockRequest { restart: true, ..LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms()) };
        let Some(lock) = self.lock(&start).await? else {
            tracing::debug!(proxy = %id, job = %job.job_id, "stale job: it does not hold the proxy's lock");
            return Ok(());
        };
        let keeper = self.keep(job);
        if proxypool_faults::point_at("rotator.job.locked", id).await {
            return Err(JobError::Fault("rotator.job.locked"));
        }
        let Some(doc) = self.load(id).await? else {
            self.abandon(job, "the proxy is gone").await;
            return Ok(());
        };
        if doc.status != ProxyStatus::Completed {
            if !self.drain(id, job, lock).await? {
                return Ok(());
            }
            let Some(doc) = self.load(id).await? else {
                self.abandon(job, "the proxy is gone").await;
                return Ok(());
            };
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = self.rotate_unique(&doc, job) => outcome,
                () = keeper.lost() => {
                    tracing::warn!(proxy = %id, job = %job.job_id, "rotation abandoned: its lock was lost");
                    return Ok(());
                }
            };
            tracing::info!(proxy = %id, ok = outcome.is_ok(), took = ?started.elapsed(), "rotation finished");
            let m = &self.inner.metrics;
            m.duration.observe(started.elapsed().as_secs_f64());
            let result = if outcome.is_ok() { "succeeded" } else { "failed" };
            m.rotations.get_or_create(&ResultLabel { result }).inc();
            if keeper.is_lost() {
                return Ok(());
            }
            match outcome {
                Ok((addr, ip, region)) => {
                    if !self.store_success(&doc, &addr, &ip, region).await? {
                        self.abandon(job, "the proxy is no longer marked as rotating").await;
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

    /// Waits until no lease is held or `ROTATE_DRAIN_MAX` has passed since the job started, asking the lease service
    /// (which counts the holders and measures the wait on its own clock); each poll renews the lock. `false` if the
    /// lock was lost.
    async fn drain(&self, id: ObjectId, job: &RotationJob, mut lock: LockReply) -> Result<bool, JobError> {
        let max = self.inner.config.drain_max;
        let check = LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms());
        loop {
            if lock.in_use == 0 {
                return Ok(true);
            }
            if Duration::from_millis(lock.held_ms) >= max {
                tracing::warn!(proxy = %id, held = lock.in_use, "drain timed out; rotating with leases still held");
                return Ok(true);
            }
            tokio::time::sleep(DRAIN_POLL).await;
            match self.lock(&check).await? {
                Some(l) => lock = l,
                None => return Ok(false),
            }
        }
    }

    /// Rotates (see [`Rotator::rotate`]) until the public IP is one no other active proxy exits on, at most
    /// `ROTATE_UNIQUE_TRIES` times more (never for a proxy whose rotation is disabled: it cannot get another IP). The
    /// lease service, which knows every proxy's exit, judges; a duplicate that remains is marked when the rotation
    /// is reported ([`Rotator::reset_leases`]) and not leased until a later rotation gives it an IP of its own.
    async fn rotate_unique(
        &self,
        doc: &ProxyDoc,
        job: &RotationJob,
    ) -> Result<(Address, String, Option<String>), (i32, String)> {
        let (mut tries, mut doc) = (0, doc.clone());
        loop {
            let (addr, ip, region) = self.rotate(&doc).await?;
            let check = LockRequest {
                exit_ip: Some(ip.clone()),
                ..LockRequest::check(&job.proxy_id, &job.job_id, self.lock_ttl_ms())
            };
            let duplicate_of = match self.lock(&check).await {
                Ok(Some(reply)) => reply.duplicate_of,
                // The lock is gone or the lease service is away: the keeper and the report decide what follows.
                Ok(None) | Err(_) => None,
            };
            let Some(other) = duplicate_of else { return Ok((addr, ip, region)) };
            self.inner.metrics.duplicate_ips.inc();
            if doc.disable_auto_rotate || tries >= self.inner.config.unique_tries {
                tracing::warn!(proxy = %doc.id, %ip, %other, tries, "the new public IP is another proxy's; keeping it out of the pool");
                return Ok((addr, ip, region));
            }
            tries += 1;
            tracing::info!(proxy = %doc.id, %ip, %other, tries, "the new public IP is another proxy's; rotating again");
            // The next try starts from the address this one left (a provider may move the proxy).
            (doc.ip, doc.port, doc.username, doc.password) =
                (addr.ip, i32::from(addr.port), addr.username, addr.password);
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
            .map_err(|reason| (500, reason.0))?;
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
        // The lock (the lease service's, held by this job) makes this job the only writer of the rotation's result.
        let filter = doc! { "_id": doc.id, "status": i32::from(ProxyStatus::Processing) };
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
            "status": i32::from(ProxyStatus::Pending), "updatedAt": DateTime::now(),
        };
        let filter = doc! { "_id": doc.id, "status": i32::from(ProxyStatus::Processing) };
        self.inner.store.proxies().update_one(filter, doc! { "$set": set }).await?;
        // The lock goes, the leases stay (the old address still works).
        self.finish_with_lease_service(job, false).await
    }

    /// Asks the lease service (the only writer of lease state) to reset the leases and release the lock.
    async fn reset_leases(&self, job: &RotationJob) -> Result<(), JobError> {
        self.finish_with_lease_service(job, true).await
    }

    /// Releases the lock at the lease service, resetting the leases and the cycle when `reset` (success).
    async fn finish_with_lease_service(&self, job: &RotationJob, reset: bool) -> Result<(), JobError> {
        let req = RotatedRequest { proxy_id: job.proxy_id.clone(), job_id: job.job_id.clone(), reset };
        match proxypool_rpc::call::<LeaseCtlRotated>(&self.inner.nats, &req).await {
            Ok(r) => {
                if r.dropped_leases > 0 {
                    tracing::warn!(proxy = %job.proxy_id, dropped = r.dropped_leases, "leases dropped by the rotation");
                }
                if let Some(other) = r.duplicate_of {
                    tracing::warn!(proxy = %job.proxy_id, %other, "marked duplicate_ip: not leased until its next rotation");
                }
                Ok(())
            }
            // Not locked by this job any more: someone else finished or took over; nothing left to do.
            Err(CallError::Remote(e)) if e.code == ErrorCode::Conflict || e.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Pulls and runs jobs until shutdown, `ROTATOR_WORKERS` at a time. On shutdown it stops pulling and waits for the
/// jobs in hand; a job cut short is redelivered by JetStream after `ROTATE_ACK_WAIT`.
pub async fn run_workers(rotator: Rotator, shutdown: Shutdown) -> Result<(), JetStreamError> {
    let consumer = rotator.ensure_queue().await?;
    let c = rotator.config();
    let options = RunnerOptions {
        name: "rotation.job",
        concurrency: c.workers,
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        retry_base: Duration::from_secs(2),
        retry_max: Duration::from_secs(60),
        drain: Duration::from_secs(30),
    };
    let c_max_deliver = c.max_deliver;
    workqueue::run(consumer, options, shutdown, move |job: RotationJob, attempt| {
        let rotator = rotator.clone();
        let span = tracing::info_span!("rotation.process", proxy = %job.proxy_id, job = %job.job_id, attempt);
        tracing::Instrument::instrument(
            async move {
                match rotator.process(&job, attempt >= c_max_deliver).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::Retry(proxypool_rpc::error_chain(&e)),
                }
            },
            span,
        )
    })
    .await;
    Ok(())
}
