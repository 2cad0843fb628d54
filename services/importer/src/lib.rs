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
//! - [`upsert`]: finding, inserting and updating proxies.
//! - [`jobs`]: job documents in `import_jobs`.
//! - [`lock`]: the KV lock and schedule claim.
//! - [`service`]: the [`Importer`] that ties them together.

pub mod config;
pub mod excel;
pub mod jobs;
pub mod lock;
pub mod providers;
pub mod service;
pub mod upsert;

use std::time::Duration;

use proxypool_contracts::import::{ImportKind, JobStatusRequest, ProviderImportRequest};
use proxypool_contracts::subjects;
use proxypool_rpc::{encode, parse, ServeOptions};
use proxypool_settings::shutdown::Shutdown;

pub use config::ImporterConfig;
pub use service::Importer;

/// Key of the ZingProxy schedule in the locks bucket.
const ZING_SCHEDULE_KEY: &str = "zing-schedule";
/// How long shutdown waits for running jobs; a job cut short shows as failed and can be run again.
/// With the request drain before it (10 s + 10 s), shutdown stays within Kubernetes' 45 s grace period.
const JOB_DRAIN: Duration = Duration::from_secs(20);

/// Serves import requests until shutdown.
pub async fn serve(
    importer: Importer,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), proxypool_rpc::SubscribeError> {
    let options = ServeOptions {
        queue_group: subjects::IMPORTER_QUEUE_GROUP,
        max_in_flight: 64,
        // Above the longest wait a caller may ask for, so a waiting request is answered by the handler itself.
        deadline: Duration::from_secs(35),
        metrics: Some(importer.metrics().requests.clone()),
        caller_deadline: &[],
    };
    proxypool_rpc::serve(client, &subjects::IMPORT_ALL, options, shutdown, move |subject, msg| {
        let importer = importer.clone();
        async move {
            match subject {
                subjects::IMPORT_EXCEL => encode(match parse(&msg.payload) {
                    Ok(req) => importer.import_excel(req).await,
                    Err(e) => Err(e),
                }),
                subjects::IMPORT_KIOT | subjects::IMPORT_ZING => {
                    let kind = if subject == subjects::IMPORT_KIOT { ImportKind::Kiot } else { ImportKind::Zing };
                    encode(match parse::<ProviderImportRequest>(&msg.payload) {
                        Ok(req) => importer.import_provider(kind, req).await,
                        Err(e) => Err(e),
                    })
                }
                _ => encode(match parse::<JobStatusRequest>(&msg.payload) {
                    Ok(req) => importer.status(&req.id).await,
                    Err(e) => Err(e),
                }),
            }
        }
    })
    .await
}

/// Imports the ZingProxy list every interval, once per interval across replicas, until shutdown.
pub async fn run_zing_schedule(importer: Importer, mut shutdown: Shutdown) {
    let Some(interval) = importer.config().zing.as_ref().and_then(|z| z.interval) else { return };
    let js = async_nats::jetstream::new(importer.nats().clone());
    // Each replica looks often enough that the schedule is late by a fraction of the interval at most.
    let tick = (interval / 10).clamp(Duration::from_millis(200), Duration::from_secs(60));
    loop {
        match proxypool_rpc::buckets::import_locks(&js).await {
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

/// Serves requests and runs the schedule until shutdown, then waits (bounded) for running jobs.
pub async fn run(
    importer: Importer,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), proxypool_rpc::SubscribeError> {
    let ready = proxypool_telemetry::metrics::nats_ready(client.clone());
    match importer.metrics().registry.serve_admin(importer.config().admin_addr, ready).await {
        Ok(addr) => tracing::info!(%addr, "importer admin endpoint (/metrics, /healthz) listening"),
        Err(e) => tracing::warn!(error = %e, "cannot serve the admin endpoint"),
    }
    let schedule = tokio::spawn(run_zing_schedule(importer.clone(), shutdown.clone()));
    let served = serve(importer.clone(), client, shutdown).await;
    let _ = schedule.await;
    if !importer.wait_for_jobs(JOB_DRAIN).await {
        tracing::warn!("import jobs still running at shutdown; they will show as failed and can be run again");
    }
    served
}
