//! The importer: accepts import requests, runs each as a tracked job, one at a time across replicas.
//!
//! A request creates the job (`queued`), starts it in a task and answers with the job as it stands after at most
//! the request's `wait_ms`, so small imports answer finished and large ones answer at once. A job:
//! 1. reads its source (the uploaded spreadsheet from the object store; a provider's list API) and validates every
//!    row — a bad file or a provider that is down or garbled fails the job here, before anything is written;
//! 2. takes the import lock (waiting, `queued`, while another replica imports), resolves packages (creating the
//!    KiotProxy/ZingProxy provider and packages when missing) and writes through [`crate::upsert`];
//! 3. stores its counts and row errors, and tells the lease replicas (one `proxy.changed` per proxy for small
//!    imports, one `leasectl.reload` for large ones).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bson::oid::ObjectId;
use bson::{doc, DateTime};
use futures::TryStreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proxypool_contracts::events::{ChangeReason, ProxyChanged};
use proxypool_contracts::import::{
    ExcelImportRequest, ImportJob, ImportKind, JobStatus, ProviderImportRequest, RowError,
};
use proxypool_contracts::{subjects, ApiError, Area};
use proxypool_store::model::{PackageDoc, ProviderDoc};
use proxypool_store::{Store, StoreError};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::config::ImporterConfig;
use crate::excel::{self, SheetRow};
use crate::jobs::{keep_errors, JobDoc, Jobs, HEARTBEAT_EVERY};
use crate::lock::{Held, KvLock};
use crate::providers::{self, FetchError};
use crate::upsert::{self, Applied, Candidate, Identity};

/// Key of the import lock in the locks bucket.
const IMPORT_LOCK_KEY: &str = "import";
/// A lock whose holder stopped renewing is free after this.
const IMPORT_LOCK_TTL: Duration = Duration::from_secs(60);
/// Above this many changed proxies, lease replicas reload their index instead of re-reading each proxy.
const ANNOUNCE_ONE_BY_ONE_MAX: usize = 100;

/// Labels of the job counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct JobLabels {
    /// `excel`, `kiot`, `zing`.
    pub kind: String,
    /// `succeeded` or `failed`.
    pub status: String,
}

/// Labels of the row counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RowLabels {
    /// `excel`, `kiot`, `zing`.
    pub kind: String,
    /// `created`, `updated`, `skipped`, `failed`.
    pub outcome: String,
}

/// The importer's metrics.
#[derive(Debug, Clone)]
pub struct ImporterMetrics {
    /// Registry served on the admin port.
    pub registry: proxypool_telemetry::metrics::Metrics,
    /// Finished jobs.
    pub jobs: Family<JobLabels, Counter>,
    /// Rows by outcome.
    pub rows: Family<RowLabels, Counter>,
    /// Requests served.
    pub requests: proxypool_telemetry::metrics::RequestMetrics,
}

impl ImporterMetrics {
    fn new() -> Self {
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_importer");
        let jobs = Family::<JobLabels, Counter>::default();
        let rows = Family::<RowLabels, Counter>::default();
        registry.register("jobs", "Import jobs finished, by kind and status", jobs.clone());
        registry.register("rows", "Imported rows, by kind and outcome", rows.clone());
        let requests = registry.requests();
        Self { registry, jobs, rows, requests }
    }
}

fn kind_name(k: ImportKind) -> &'static str {
    match k {
        ImportKind::Excel => "excel",
        ImportKind::Kiot => "kiot",
        ImportKind::Zing => "zing",
    }
}

/// Why a job stopped without importing.
#[derive(Debug, thiserror::Error)]
enum JobFailure {
    /// The upload is not an importable spreadsheet (answered 400 to a waiting caller).
    #[error("the file {0}")]
    BadFile(String),
    /// A provider is down or garbled.
    #[error(transparent)]
    Provider(#[from] FetchError),
    /// The integration is not configured.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// NATS or the database failed.
    #[error("{0}")]
    Dependency(String),
}

impl From<mongodb::error::Error> for JobFailure {
    fn from(e: mongodb::error::Error) -> Self {
        JobFailure::Dependency(StoreError::from(e).to_string())
    }
}

impl From<StoreError> for JobFailure {
    fn from(e: StoreError) -> Self {
        JobFailure::Dependency(e.to_string())
    }
}

/// What a job reads.
#[derive(Debug)]
enum Source {
    Excel,
    Kiot,
    Zing,
}

/// Rows ready to write, and those already refused.
struct Prepared {
    candidates: Vec<Candidate>,
    errors: Vec<RowError>,
    skipped: u64,
}

/// A job in this process: its state as it changes, and whether it failed on a bad file.
#[derive(Debug, Clone)]
struct Progress {
    job: JobDoc,
    bad_file: Option<String>,
}

/// The importer. Cheap to clone.
#[derive(Clone)]
pub struct Importer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ImporterConfig,
    store: Store,
    nats: async_nats::Client,
    js: jetstream::Context,
    http: reqwest::Client,
    jobs: Jobs,
    metrics: ImporterMetrics,
    instance: String,
    running: Mutex<HashMap<String, watch::Receiver<Progress>>>,
    tasks: tokio_util_like::Tasks,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer").field("instance", &self.inner.instance).finish_non_exhaustive()
    }
}

/// Counting in-flight job tasks, so shutdown can wait for them.
mod tokio_util_like {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    const MAX: u32 = 1 << 20;

    /// A count of running tasks.
    pub struct Tasks(Arc<Semaphore>);

    impl Default for Tasks {
        fn default() -> Self {
            Self(Arc::new(Semaphore::new(MAX as usize)))
        }
    }

    impl Tasks {
        /// Runs `f` as a counted task.
        pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, f: F) {
            let permit = self.0.clone().try_acquire_owned();
            tokio::spawn(async move {
                let _permit = permit;
                f.await;
            });
        }

        /// Waits until every task ended, at most `limit`; false on timeout.
        pub async fn wait(&self, limit: Duration) -> bool {
            tokio::time::timeout(limit, self.0.acquire_many(MAX)).await.is_ok()
        }
    }
}

impl Importer {
    /// An importer; call [`Importer::setup`] before serving.
    pub fn new(config: ImporterConfig, store: Store, nats: async_nats::Client) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.http_timeout)
            .connect_timeout(config.http_timeout.min(Duration::from_secs(5)))
            .build()?;
        let js = jetstream::new(nats.clone());
        let jobs = Jobs::new(&store);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                nats,
                js,
                http,
                jobs,
                metrics: ImporterMetrics::new(),
                instance: format!("importer-{}", ObjectId::new().to_hex()),
                running: Mutex::new(HashMap::new()),
                tasks: tokio_util_like::Tasks::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ImporterConfig {
        &self.inner.config
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// The metrics.
    pub fn metrics(&self) -> &ImporterMetrics {
        &self.inner.metrics
    }

    /// Opens the buckets and creates the indexes; retried by the caller while NATS or MongoDB are down.
    pub async fn setup(&self) -> Result<(), String> {
        proxypool_rpc::buckets::uploads(&self.inner.js).await?;
        proxypool_rpc::buckets::import_locks(&self.inner.js).await?;
        self.inner.store.ensure_indexes().await.map_err(|e| e.to_string())
    }

    /// Waits (bounded) for running jobs at shutdown.
    pub async fn wait_for_jobs(&self, limit: Duration) -> bool {
        self.inner.tasks.wait(limit).await
    }

    /// `importer.excel`: starts importing an uploaded spreadsheet.
    pub async fn import_excel(&self, req: ExcelImportRequest) -> Result<ImportJob, ApiError> {
        if ObjectId::parse_str(&req.job_id).is_err() {
            return Err(ApiError::invalid("job_id", "is not an ObjectId"));
        }
        let job = JobDoc::queued(req.job_id, ImportKind::Excel, Some(req.file_name), req.requested_by);
        self.start(job, Source::Excel, req.wait_ms).await
    }

    /// `importer.kiot` / `importer.zing`: starts importing a provider's list.
    pub async fn import_provider(&self, kind: ImportKind, req: ProviderImportRequest) -> Result<ImportJob, ApiError> {
        let source = match kind {
            ImportKind::Kiot if self.inner.config.kiot.is_some() => Source::Kiot,
            ImportKind::Zing if self.inner.config.zing.is_some() => Source::Zing,
            ImportKind::Kiot => {
                return Err(ApiError::not_configured("the KiotProxy import is not configured (KIOT_API_KEY)"))
            }
            ImportKind::Zing => {
                return Err(ApiError::not_configured("the ZingProxy import is not configured (ZING_PROXY_TOKEN)"))
            }
            ImportKind::Excel => return Err(ApiError::invalid("kind", "is not a provider")),
        };
        let job = JobDoc::queued(ObjectId::new().to_hex(), kind, None, req.requested_by);
        self.start(job, source, req.wait_ms).await
    }

    /// `importer.status`.
    pub async fn status(&self, id: &str) -> Result<ImportJob, ApiError> {
        let running = self.inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(id).cloned();
        if let Some(rx) = running {
            return Ok(rx.borrow().job.view());
        }
        match self.inner.jobs.get(id).await {
            Ok(Some(job)) => Ok(job.view()),
            Ok(None) => Err(ApiError::not_found(format!("no import job {id}"))),
            Err(e) => Err(e.into_api("the import job")),
        }
    }

    async fn start(&self, job: JobDoc, source: Source, wait_ms: u64) -> Result<ImportJob, ApiError> {
        self.inner.jobs.insert(&job).await.map_err(|e| e.into_api("this import job"))?;
        let id = job.id.clone();
        let (tx, mut rx) = watch::channel(Progress { job, bad_file: None });
        self.inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.clone(), rx.clone());
        let me = self.clone();
        // The job outlives the request; its span is a child of the request's, so the import is one trace.
        let span = tracing::info_span!("import.job", job = %id);
        self.inner.tasks.spawn(tracing::Instrument::instrument(
            async move {
                me.run(source, tx).await;
                me.inner.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            },
            span,
        ));
        let wait = Duration::from_millis(wait_ms.min(30_000));
        let _ = tokio::time::timeout(wait, rx.wait_for(|p| p.job.status.is_finished())).await;
        let progress = rx.borrow().clone();
        match progress.bad_file {
            Some(reason) => Err(ApiError::invalid("file", reason)),
            None => Ok(progress.job.view()),
        }
    }

    /// Runs a job to its end, keeping its heartbeat.
    async fn run(&self, source: Source, tx: watch::Sender<Progress>) {
        let kind = tx.borrow().job.kind;
        // The heartbeat runs beside the work and writes only `heartbeat_at`: it never delays the lock renewals in
        // the work, and never overwrites the status the work stores.
        let heartbeat = {
            let (jobs, id) = (self.inner.jobs.clone(), tx.borrow().job.id.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT_EVERY).await;
                    if let Err(e) = jobs.touch(&id).await {
                        tracing::warn!(error = %e, job = %id, "cannot store an import heartbeat");
                    }
                }
            })
        };
        let result = self.execute(&source, &tx).await;
        heartbeat.abort();
        let mut progress = tx.borrow().clone();
        let job = &mut progress.job;
        job.finished_at = Some(DateTime::now());
        match result {
            Ok(()) => job.status = JobStatus::Succeeded,
            Err(e) => {
                tracing::warn!(job = %job.id, kind = kind_name(kind), reason = %e, "import failed");
                job.status = JobStatus::Failed;
                job.reason = Some(e.to_string());
                if let JobFailure::BadFile(reason) = &e {
                    progress.bad_file = Some(reason.clone());
                }
            }
        }
        let job = &progress.job;
        let status = if job.status == JobStatus::Succeeded { "succeeded" } else { "failed" };
        self.inner.metrics.jobs.get_or_create(&JobLabels { kind: kind_name(kind).into(), status: status.into() }).inc();
        for (outcome, n) in [
            ("created", job.counts.created),
            ("updated", job.counts.updated),
            ("skipped", job.counts.skipped),
            ("failed", job.counts.failed),
        ] {
            let labels = RowLabels { kind: kind_name(kind).into(), outcome: outcome.into() };
            self.inner.metrics.rows.get_or_create(&labels).inc_by(n);
        }
        tracing::info!(job = %job.id, kind = kind_name(kind), status, counts = ?job.counts, "import finished");
        // Stored before the watchers hear of it, so a status read after a finished answer agrees.
        for attempt in 0..5u32 {
            match self.inner.jobs.save(job).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, job = %job.id, attempt, "cannot store the finished import job");
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
            }
        }
        tx.send_replace(progress);
    }

    /// Reads, validates, locks, writes.
    async fn execute(&self, source: &Source, tx: &watch::Sender<Progress>) -> Result<(), JobFailure> {
        let requested_by = tx.borrow().job.requested_by.as_deref().and_then(|s| ObjectId::parse_str(s).ok());
        // A spreadsheet is read and checked before waiting for the lock, so a bad file is refused at once.
        let id = tx.borrow().job.id.clone();
        let rows = match source {
            Source::Excel => Some(self.read_upload(&id).await?),
            Source::Kiot | Source::Zing => None,
        };
        let lock = KvLock::new(
            proxypool_rpc::buckets::import_locks(&self.inner.js).await.map_err(JobFailure::Dependency)?,
            IMPORT_LOCK_KEY,
            &self.inner.instance,
            IMPORT_LOCK_TTL,
        );
        let held = loop {
            match lock.try_acquire().await {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot reach the import lock; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut held = held;
        let work = async {
            let mut job = tx.borrow().job.clone();
            job.status = JobStatus::Running;
            job.started_at = Some(DateTime::now());
            job.heartbeat_at = Some(DateTime::now());
            self.inner.jobs.save(&job).await?;
            tx.send_modify(|p| p.job = job.clone());
            let prepared = match (source, rows) {
                (Source::Excel, Some(rows)) => self.prepare_excel(rows).await?,
                (Source::Kiot, _) => self.prepare_kiot(requested_by).await?,
                (Source::Zing, _) => self.prepare_zing(requested_by).await?,
                (Source::Excel, None) => return Err(JobFailure::Dependency("no rows were read".into())),
            };
            let Prepared { candidates, errors, skipped } = prepared;
            let applied = upsert::apply(&self.inner.store, candidates, requested_by, self.inner.config.batch).await;
            Ok::<_, JobFailure>((applied, errors, skipped))
        };
        // Released on every path, with the revision of the last renewal.
        let result = self.holding(&lock, &mut held, work).await;
        lock.release(held).await;
        let (applied, mut errors, skipped) = result?;
        let (applied, write_failure) = match applied {
            Ok(a) => (a, None),
            Err((a, e)) => (a, Some(e)),
        };
        let Applied { counts, errors: write_errors, changed } = applied;
        // `counts.failed` covers the rows refused while writing (duplicates within the import); rows refused while
        // reading are added here.
        let read_failed = errors.len() as u64;
        errors.extend(write_errors);
        errors.sort_by_key(|e| e.row);
        tx.send_modify(|p| {
            p.job.counts = counts;
            p.job.counts.failed += read_failed;
            p.job.counts.skipped += skipped;
            keep_errors(&mut p.job.errors, errors);
        });
        // What was written is announced even when the database failed part-way.
        self.announce(&changed).await;
        match write_failure {
            None => Ok(()),
            Some(e) => Err(JobFailure::Dependency(format!(
                "the database failed after {} proxies were written ({e}); run the import again to complete it",
                changed.len()
            ))),
        }
    }

    /// Runs `work` while renewing the lock. Two renewals in a row that fail (40 s of a 60 s lock) stop the work
    /// before the lock can expire and pass to another replica: two importers never write at once.
    async fn holding<T>(
        &self,
        lock: &KvLock,
        held: &mut Held,
        work: impl std::future::Future<Output = Result<T, JobFailure>>,
    ) -> Result<T, JobFailure> {
        tokio::pin!(work);
        let mut failures = 0;
        loop {
            tokio::select! {
                r = &mut work => return r,
                () = tokio::time::sleep(lock.renew_every()) => match lock.renew(*held).await {
                    Ok(h) => {
                        *held = h;
                        failures = 0;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, failures, "the import lock could not be renewed");
                        if failures >= 2 {
                            return Err(JobFailure::Dependency(
                                "the import lock could not be renewed; stopped before another importer could take \
                                 over (run the import again)"
                                    .into(),
                            ));
                        }
                    }
                },
            }
        }
    }

    async fn read_upload(&self, id: &str) -> Result<Vec<Result<SheetRow, RowError>>, JobFailure> {
        let bucket = proxypool_rpc::buckets::uploads(&self.inner.js).await.map_err(JobFailure::Dependency)?;
        let mut object = bucket
            .get(id)
            .await
            .map_err(|e| JobFailure::Dependency(format!("cannot read the upload from the object store: {e}")))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| JobFailure::Dependency(format!("cannot read the upload from the object store: {e}")))?;
        if let Err(e) = bucket.delete(id).await {
            tracing::warn!(error = %e, upload = id, "cannot delete a read upload; it expires by itself");
        }
        let limits =
            excel::Limits { max_rows: self.inner.config.max_rows, max_unpacked_bytes: excel::MAX_UNPACKED_BYTES };
        let parsed = tokio::task::spawn_blocking(move || excel::read(bytes, limits))
            .await
            .map_err(|e| JobFailure::Dependency(format!("the spreadsheet reader failed: {e}")))?;
        parsed.map_err(|e| JobFailure::BadFile(e.to_string()))
    }

    async fn prepare_excel(&self, rows: Vec<Result<SheetRow, RowError>>) -> Result<Prepared, JobFailure> {
        let providers: Vec<ProviderDoc> = self.inner.store.providers().find(doc! {}).await?.try_collect().await?;
        let by_name: HashMap<String, ObjectId> = providers.iter().map(|p| (p.name.to_lowercase(), p.id)).collect();
        let mut codes: Vec<&str> =
            rows.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.package_code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        let mut packages: HashMap<(ObjectId, String), (ObjectId, String)> = HashMap::new();
        for chunk in codes.chunks(self.inner.config.batch) {
            let mut cursor = self.inner.store.packages().find(doc! { "code": { "$in": chunk } }).await?;
            while let Some(p) = cursor.try_next().await? {
                packages.insert((p.proxy_provider_id, p.code.clone()), (p.id, p.name.clone()));
            }
        }
        let mut out = Prepared { candidates: Vec::with_capacity(rows.len()), errors: Vec::new(), skipped: 0 };
        for row in rows {
            let r = match row {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let Some(provider_id) = by_name.get(&r.provider.to_lowercase()) else {
                out.errors.push(RowError {
                    row: r.row,
                    field: Some("provider".into()),
                    reason: format!("no provider named {:?}", r.provider),
                });
                continue;
            };
            let Some((package_id, package_name)) = packages.get(&(*provider_id, r.package_code.clone())) else {
                out.errors.push(RowError {
                    row: r.row,
                    field: Some("package_code".into()),
                    reason: format!("provider {:?} has no package {:?}", r.provider, r.package_code),
                });
                continue;
            };
            out.candidates.push(Candidate {
                row: r.row,
                identity: Identity::Address {
                    ip: r.host.clone(),
                    port: i32::from(r.port),
                    username: r.username.clone(),
                },
                ip: r.host,
                port: i32::from(r.port),
                username: r.username,
                password: r.password,
                area: r.area,
                rotate_url: r.rotate_url,
                rotate_time: r.rotate_time,
                expired_at: r.expired_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: *package_id,
                package_name: package_name.clone(),
                rotate_first: false,
            });
        }
        Ok(out)
    }

    async fn prepare_kiot(&self, by: Option<ObjectId>) -> Result<Prepared, JobFailure> {
        let kiot = self.inner.config.kiot.as_ref().ok_or(JobFailure::NotConfigured("KiotProxy is not configured"))?;
        let headers = [("Api-token", kiot.api_key.expose().as_str())];
        let http = &self.inner.http;
        let packages_json = providers::fetch_json(http, "KiotProxy package list", &kiot.package_url, &headers).await?;
        let keys_json = providers::fetch_json(http, "KiotProxy key list", &kiot.key_url, &headers).await?;
        let (packages, mut errors) = providers::kiot_packages(&packages_json)?;
        let (keys, key_errors) = providers::kiot_keys(&keys_json)?;
        // Package errors are about the package list, key errors about keys; both are numbered by item, so they are
        // reported under the key list's numbering only when they are key errors.
        for e in &mut errors {
            e.reason = format!("package list: {}", e.reason);
        }
        errors.extend(key_errors);

        let provider = self.provider("KiotProxy", "kiotproxy", "https://kiotproxy.com", by).await?;
        let mut package_ids: HashMap<String, (ObjectId, String)> = HashMap::new();
        let now = chrono::Utc::now();
        let mut out = Prepared { candidates: Vec::new(), errors, skipped: 0 };
        for k in keys {
            if k.expires_at.is_some_and(|t| t < now) {
                out.skipped += 1;
                continue;
            }
            let package = match package_ids.get(&k.package_code) {
                Some(p) => p.clone(),
                None => {
                    let listed = packages.iter().find(|p| p.code == k.package_code);
                    let (name, price) = match listed {
                        Some(p) => (p.name.clone(), p.price),
                        None => (format!("KiotProxy {}", k.package_code), 0.0),
                    };
                    let code = format!("KiotProxy_{}", k.package_code);
                    let p = self.package(&code, &name, price, provider, by).await?;
                    package_ids.insert(k.package_code.clone(), (p.id, p.name.clone()));
                    (p.id, p.name)
                }
            };
            let rotate_url = format!("{}{}", kiot.rotate_url_base, k.key);
            // An address only when the list gives both parts; otherwise the first rotation provides it.
            let (ip, port) = match (k.host, k.port) {
                (Some(h), Some(p)) => (h, i32::from(p)),
                _ => (String::new(), 0),
            };
            out.candidates.push(Candidate {
                row: k.item,
                identity: Identity::RotateUrl(rotate_url.clone()),
                ip,
                port,
                username: None,
                password: None,
                area: Area::Vn,
                rotate_url,
                rotate_time: None,
                expired_at: k.expires_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: package.0,
                package_name: package.1,
                rotate_first: true,
            });
        }
        Ok(out)
    }

    async fn prepare_zing(&self, by: Option<ObjectId>) -> Result<Prepared, JobFailure> {
        let zing = self.inner.config.zing.as_ref().ok_or(JobFailure::NotConfigured("ZingProxy is not configured"))?;
        let auth = format!("Bearer {}", zing.token.expose());
        let json =
            providers::fetch_json(&self.inner.http, "ZingProxy proxy list", &zing.url, &[("Authorization", &auth)])
                .await?;
        let (proxies, errors) = providers::zing_proxies(&json)?;
        let provider = self.provider("ZingProxy", "zingproxy", "https://zingproxy.com", by).await?;
        let package = self.package("ZingProxy_Pack", "ZingProxy Pack", 0.0, provider, by).await?;
        let now = chrono::Utc::now();
        let mut out = Prepared { candidates: Vec::new(), errors, skipped: 0 };
        for p in proxies {
            if p.expires_at.is_some_and(|t| t < now) {
                out.skipped += 1;
                continue;
            }
            out.candidates.push(Candidate {
                row: p.item,
                identity: Identity::Address {
                    ip: p.host.clone(),
                    port: i32::from(p.port),
                    username: p.username.clone(),
                },
                ip: p.host,
                port: i32::from(p.port),
                username: p.username,
                password: p.password,
                area: Area::Vn,
                rotate_url: p.rotate_url,
                rotate_time: None,
                expired_at: p.expires_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: package.id,
                package_name: package.name.clone(),
                rotate_first: false,
            });
        }
        Ok(out)
    }

    /// The provider named `name`, created when missing (an insert race is settled by the unique index).
    async fn provider(
        &self,
        name: &str,
        account: &str,
        domain: &str,
        by: Option<ObjectId>,
    ) -> Result<ObjectId, JobFailure> {
        let providers = self.inner.store.providers();
        if let Some(p) = providers.find_one(doc! { "name": name }).await? {
            return Ok(p.id);
        }
        let now = DateTime::now();
        let doc = ProviderDoc {
            id: ObjectId::new(),
            name: name.to_owned(),
            account: account.to_owned(),
            domain: domain.to_owned(),
            rotate_fields: None,
            is_active: true,
            created_by: by,
            updated_by: by,
            created_at: now,
            updated_at: now,
        };
        match providers.insert_one(&doc).await.map_err(StoreError::from) {
            Ok(_) => Ok(doc.id),
            Err(StoreError::Duplicate(_)) => match providers.find_one(doc! { "name": name }).await? {
                Some(p) => Ok(p.id),
                None => Err(JobFailure::Dependency(format!(
                    "cannot create the {name} provider: another provider already uses account {account:?} or \
                     domain {domain:?}"
                ))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The package with `code`, created under `provider` when missing.
    async fn package(
        &self,
        code: &str,
        name: &str,
        price: f64,
        provider: ObjectId,
        by: Option<ObjectId>,
    ) -> Result<PackageDoc, JobFailure> {
        let packages = self.inner.store.packages();
        if let Some(p) = packages.find_one(doc! { "code": code }).await? {
            return Ok(p);
        }
        let now = DateTime::now();
        let doc = PackageDoc {
            id: ObjectId::new(),
            code: code.to_owned(),
            name: name.to_owned(),
            price,
            note: "created by the importer".to_owned(),
            proxy_provider_id: provider,
            is_active: true,
            created_by: by,
            updated_by: by,
            created_at: now,
            updated_at: now,
        };
        match packages.insert_one(&doc).await.map_err(StoreError::from) {
            Ok(_) => Ok(doc),
            Err(StoreError::Duplicate(_)) => packages
                .find_one(doc! { "code": code })
                .await?
                .ok_or_else(|| JobFailure::Dependency(format!("package {code} vanished while being created"))),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells the lease replicas what changed.
    async fn announce(&self, changed: &[ObjectId]) {
        let nats = &self.inner.nats;
        if changed.is_empty() {
            return;
        }
        if changed.len() > ANNOUNCE_ONE_BY_ONE_MAX {
            if let Err(e) = nats.publish(subjects::LEASECTL_RELOAD, bytes::Bytes::new()).await {
                tracing::warn!(error = %e, "cannot ask the lease replicas to reload; they will at their next refresh");
            }
        } else {
            for id in changed {
                let event =
                    ProxyChanged { proxy_id: id.to_hex(), reason: ChangeReason::Updated, origin: None, snapshot: None };
                let Ok(body) = serde_json::to_vec(&event) else { continue };
                if let Err(e) = nats.publish(subjects::PROXY_CHANGED, body.into()).await {
                    tracing::warn!(error = %e, "cannot publish proxy.changed");
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    }
}
