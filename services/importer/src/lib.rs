//! The importer: brings proxies in from Excel spreadsheets and from provider APIs (KiotProxy, ZingProxy), each
//! import a tracked job.
//!
//! The gateway puts an uploaded spreadsheet in the JetStream object store and sends its name over NATS
//! (`importer.excel`); provider imports (`importer.kiot`, `importer.zing`) carry no payload. Jobs run one at a time
//! across replicas (a lock in NATS KV) and are idempotent: a proxy is found again by its address (or, for
//! KiotProxy, its key) and updated in place, never duplicated; the lease fields are never written. The ZingProxy
//! list is also imported every `ZING_IMPORT_INTERVAL`, once per interval however many replicas run.
//!
//! # Layout
//! - [`config`]: `ImporterConfig` from the environment.
//! - [`excel`]: reading and validating a spreadsheet.
//! - [`providers`]: the KiotProxy and ZingProxy list APIs.
//! - [`sources`]: each source read and validated into rows to write.
//! - [`catalogue`]: provider and package get-or-create.
//! - [`upsert`]: finding, inserting and updating proxies.
//! - [`jobs`]: job documents in `import_jobs`.
//! - [`lock`]: the KV lock and schedule claim.
//! - [`metrics`]: Prometheus metrics.
//! - [`service`]: the [`Importer`] and the job lifecycle (start, lock, run, store the result, announce).

pub mod catalogue;
pub mod config;
pub mod excel;
pub mod jobs;
pub mod lock;
pub mod metrics;
pub mod providers;
pub mod service;
pub mod sources;
pub mod upsert;

use std::net::SocketAddr;
use std::time::Duration;

use proxypool_contracts::endpoints::{ImportExcel, ImportKiot, ImportStatus, ImportZing};
use proxypool_contracts::import::{ImportKind, ProviderImportRequest};
use proxypool_contracts::subjects;
use proxypool_rpc::{Router, ServeOptions};
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

pub use config::ImporterConfig;
pub use service::{Importer, SetupError};

/// Key of the ZingProxy schedule in the locks bucket.
const ZING_SCHEDULE_KEY: &str = "zing-schedule";
/// How long shutdown waits for running jobs; a job cut short shows as failed and can be run again.
/// With the request drain before it (10 s + 10 s), shutdown stays within Kubernetes' 45 s grace period.
const JOB_DRAIN: Duration = Duration::from_secs(20);

/// Why the importer could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The HTTP client for the provider APIs could not be built.
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    /// The admin endpoint could not listen.
    #[error("cannot listen on IMPORTER_ADMIN_ADDR")]
    Admin(#[source] std::io::Error),
    /// A subscription failed.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
}

/// The importer, built from its configuration and connections, ready to [`run`](App::run). `main.rs` and the tests
/// both start it this way.
#[derive(Debug)]
pub struct App {
    importer: Importer,
    admin_addr: SocketAddr,
}

impl App {
    /// Builds the importer and starts its admin endpoint (`/metrics`, `/healthz`, `/readyz`) on
    /// `IMPORTER_ADMIN_ADDR`.
    pub async fn build(config: ImporterConfig, client: async_nats::Client, store: Store) -> Result<Self, AppError> {
        let admin = config.admin_addr;
        let importer = Importer::new(config, store, client.clone()).map_err(AppError::Http)?;
        let ready = proxypool_telemetry::metrics::nats_ready(client);
        let admin_addr = importer.metrics().registry.serve_admin(admin, ready).await.map_err(AppError::Admin)?;
        tracing::info!(%admin_addr, "importer admin endpoint (/metrics, /healthz, /readyz) listening");
        Ok(Self { importer, admin_addr })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The importer (its jobs and metrics).
    pub fn importer(&self) -> &Importer {
        &self.importer
    }

    /// Sets up the buckets and indexes (retrying while JetStream or MongoDB are unreachable), then serves requests
    /// and runs the schedule until shutdown, then waits (bounded) for running jobs.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), AppError> {
        let importer = self.importer;
        loop {
            match importer.setup().await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "cannot set up the importer yet; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = shutdown.wait() => return Ok(()),
            }
        }
        let schedule = tokio::spawn(run_zing_schedule(importer.clone(), shutdown.clone()));
        let options = ServeOptions {
            queue_group: subjects::IMPORTER_QUEUE_GROUP,
            max_in_flight: 64,
            // Above the longest wait a caller may ask for, so a waiting request is answered by the handler itself.
            deadline: Duration::from_secs(35),
            metrics: Some(importer.metrics().requests.clone()),
        };
        let served = router(&importer).serve(importer.nats().clone(), options, shutdown).await;
        let _ = schedule.await;
        if !importer.wait_for_jobs(JOB_DRAIN).await {
            tracing::warn!("import jobs still running at shutdown; they will show as failed and can be run again");
        }
        Ok(served?)
    }
}

/// The importer's endpoints.
fn router(importer: &Importer) -> Router<Importer> {
    Router::new(importer.clone())
        .on::<ImportExcel, _, _>(|i, req| async move { i.import_excel(req).await })
        .on::<ImportKiot, _, _>(|i, req| async move { i.import_provider(ImportKind::Kiot, req).await })
        .on::<ImportZing, _, _>(|i, req| async move { i.import_provider(ImportKind::Zing, req).await })
        .on::<ImportStatus, _, _>(|i, req| async move { i.status(&req.id).await })
}

/// Imports the ZingProxy list every interval, once per interval across replicas, until shutdown.
async fn run_zing_schedule(importer: Importer, mut shutdown: Shutdown) {
    let Some(interval) = importer.config().zing.as_ref().and_then(|z| z.interval) else { return };
    let js = async_nats::jetstream::new(importer.nats().clone());
    // Each replica looks often enough that the schedule is late by a fraction of the interval at most.
    let tick = (interval / 10).clamp(Duration::from_millis(200), Duration::from_secs(60));
    loop {
        match proxypool_rpc::jetstream::ensure_import_locks(&js, importer.config().nats.replicas).await {
            Ok(kv) => match lock::claim_schedule(&kv, ZING_SCHEDULE_KEY, interval).await {
                Ok(true) => {
                    tracing::info!("scheduled ZingProxy import");
                    let req = ProviderImportRequest { requested_by: None, wait_ms: 0 };
                    if let Err(e) = importer.import_provider(ImportKind::Zing, req).await {
                        tracing::warn!(error = %e, "cannot start the scheduled ZingProxy import");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the ZingProxy schedule"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot open the importer locks"),
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.wait() => return,
        }
    }
}
