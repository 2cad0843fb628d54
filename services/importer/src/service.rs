//! The importer: accepts import requests, runs each as a tracked job, one at a time across replicas.
//!
//! A request creates the job (`queued`), starts it in a task and answers with the job as it stands after at most
//! the request's `wait_ms`, so small imports answer finished and large ones answer at once. A job:
//! 1. reads its source (the uploaded spreadsheet from the object store; a provider's list API) and validates every
//!    row — a bad file or a provider that is down or garbled fails the job here, before anything is written;
//! 2. takes the import lock (waiting, `queued`, while another replica imports), resolves packages (creating the
//!    KiotProxy/ZingProxy provider and packages when missing) and writes through [`crate::upsert`];
//! 3. stores its counts and row errors, and syncs the lease service (`leasectl.sync`: the ids for small imports, a
//!    full re-read for large ones), finishing only once it has applied them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bson::oid::ObjectId;
use bson::DateTime;
use proxypool_contracts::endpoints::LeaseCtlSync;
use proxypool_contracts::import::{ExcelImportRequest, ImportJob, ImportKind, JobStatus, ProviderImportRequest};
use proxypool_contracts::rotation::SyncRequest;
use proxypool_contracts::ApiError;
use proxypool_store::{Store, StoreError};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::ImporterConfig;
use crate::jobs::{keep_errors, JobDoc, Jobs, HEARTBEAT_EVERY};
use crate::lock::{Held, KvLock};
use crate::metrics::{kind_name, ImporterMetrics, JobLabels, RowLabels};
use crate::providers::FetchError;
use crate::sources::Prepared;
use crate::upsert::{self, Applied};

/// Key of the import lock in the locks bucket.
const IMPORT_LOCK_KEY: &str = "import";
/// A lock whose holder stopped renewing is free after this.
const IMPORT_LOCK_TTL: Duration = Duration::from_secs(60);
/// Above this many changed proxies, lease replicas reload their index instead of re-reading each proxy.
const ANNOUNCE_ONE_BY_ONE_MAX: usize = 100;
/// How long the lease service may take to apply an import (a full re-read of a large catalogue).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a job stopped without importing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobFailure {
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
    /// A JetStream bucket failed.
    #[error(transparent)]
    JetStream(#[from] proxypool_rpc::jetstream::JetStreamError),
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

/// Why the importer could not set up its buckets and indexes (retried while NATS or MongoDB are down).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A JetStream bucket.
    #[error(transparent)]
    JetStream(#[from] proxypool_rpc::jetstream::JetStreamError),
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a job reads.
#[derive(Debug)]
pub(crate) enum Source {
    Excel,
    Kiot,
    Zing,
}

/// A job in this process: its state as it changes, and whether it failed on a bad file.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    job: JobDoc,
    bad_file: Option<String>,
}

/// The importer. Cheap to clone.
#[derive(Clone)]
pub struct Importer {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ImporterConfig,
    pub(crate) store: Store,
    pub(crate) nats: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) http: reqwest::Client,
    pub(crate) jobs: Jobs,
    pub(crate) metrics: ImporterMetrics,
    pub(crate) instance: String,
    pub(crate) running: Mutex<HashMap<String, watch::Receiver<Progress>>>,
    pub(crate) tasks: TaskTracker,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer").field("instance", &self.inner.instance).finish_non_exhaustive()
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
                tasks: TaskTracker::new(),
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
    pub async fn setup(&self) -> Result<(), SetupError> {
        proxypool_rpc::jetstream::ensure_import_uploads(&self.inner.js, self.inner.config.nats.replicas).await?;
        proxypool_rpc::jetstream::ensure_import_locks(&self.inner.js, self.inner.config.nats.replicas).await?;
        Ok(self.inner.store.ensure_indexes().await?)
    }

    /// Waits (bounded) for running jobs at shutdown.
    pub async fn wait_for_jobs(&self, limit: Duration) -> bool {
        self.inner.tasks.close();
        tokio::time::timeout(limit, self.inner.tasks.wait()).await.is_ok()
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
            proxypool_rpc::jetstream::ensure_import_locks(&self.inner.js, self.inner.config.nats.replicas).await?,
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
        if let Err(e) = self.announce(&changed).await {
            return Err(JobFailure::Dependency(format!(
                "{} proxies were written but the lease service did not confirm them ({e}); they become leasable at \
                 its next catalogue re-read (LEASE_INDEX_REFRESH), or run the import again",
                changed.len()
            )));
        }
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

    /// Tells the lease service what changed, and waits until the next lease sees it: one proxy at a time for small
    /// imports, one full re-read of the catalogue for large ones.
    async fn announce(&self, changed: &[ObjectId]) -> Result<(), proxypool_rpc::CallError> {
        if changed.is_empty() {
            return Ok(());
        }
        let req = if changed.len() > ANNOUNCE_ONE_BY_ONE_MAX {
            SyncRequest { proxy_ids: Vec::new(), full: true }
        } else {
            SyncRequest { proxy_ids: changed.iter().map(|id| id.to_hex()).collect(), full: false }
        };
        proxypool_rpc::call_within::<LeaseCtlSync>(&self.inner.nats, &req, Some(SYNC_TIMEOUT)).await.map(|_| ())
    }
}
