//! The rotator: gives every proxy a fresh IP on its schedule, verified through the proxy itself.
//!
//! Two roles, in one process or apart (`ROTATOR_ROLE`):
//! - the **scheduler** scans every `ROTATE_SCAN_INTERVAL` for due proxies, claims each with the `is_rotating` lock
//!   and queues a job on the `PROXYPOOL_ROTATIONS` WorkQueue stream; it also answers admin "rotate now" requests;
//! - **workers** pull jobs from the durable `rotator-workers` consumer: drain active leases (no new ones are granted
//!   while the lock is held), call the rotate URL through the provider's adapter, check the public IP through the
//!   proxy, store the result, have the lease service reset the lease state, and only then acknowledge.
//!
//! # Layout
//! - [`config`]: `RotatorConfig` from the environment.
//! - [`providers`]: KiotProxy, ZingProxy and generic rotate-response adapters.
//! - [`check`]: public-IP check through the proxy, region lookup.
//! - [`rotator`]: the shared state, the queue, and the steps both roles use.
//! - [`scheduler`]: claiming due proxies and queuing their jobs; rotate-now.
//! - [`worker`]: running one job (drain, rotate, check, store, lease reset) through the work-queue runner.
//! - [`callbacks`]: delivering notices to consumers whose lease was taken.
//! - [`metrics`]: Prometheus metrics.

pub mod callbacks;
pub mod check;
pub mod config;
pub mod metrics;
pub mod providers;
pub mod rotator;
pub mod scheduler;
pub mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use proxypool_contracts::endpoints::RotateNow;
use proxypool_contracts::subjects;
use proxypool_rpc::jetstream::JetStreamError;
use proxypool_rpc::{Router, ServeOptions};
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

pub use config::{Role, RotatorConfig};
pub use rotator::Rotator;

/// Errors that stop the rotator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// JetStream set-up failed.
    #[error(transparent)]
    Queue(#[from] JetStreamError),
    /// A subscription failed.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
    /// The admin endpoint could not listen.
    #[error("cannot listen on ROTATOR_ADMIN_ADDR")]
    Admin(#[source] std::io::Error),
}

/// The rotator, built from its configuration and connections, ready to [`run`](App::run). `main.rs` and the tests
/// both start it this way.
#[derive(Debug)]
pub struct App {
    rotator: Rotator,
    client: async_nats::Client,
    admin_addr: SocketAddr,
}

impl App {
    /// Builds the rotator and starts its admin endpoint on `ROTATOR_ADMIN_ADDR`.
    pub async fn build(config: RotatorConfig, client: async_nats::Client, store: Store) -> Result<Self, RunError> {
        let admin = config.admin_addr;
        let rotator = Rotator::new(config, store, client.clone());
        let ready = proxypool_telemetry::metrics::nats_ready(client.clone());
        let admin_addr = rotator.metrics().registry.serve_admin(admin, ready).await.map_err(RunError::Admin)?;
        tracing::info!(%admin_addr, "rotator admin endpoint (/metrics, /healthz, /readyz) listening");
        Ok(Self { rotator, client, admin_addr })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The rotator.
    pub fn rotator(&self) -> &Rotator {
        &self.rotator
    }

    /// Ensures the queue (retrying while JetStream is unreachable), then runs the configured roles
    /// (`ROTATOR_ROLE`) until shutdown.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), RunError> {
        let (rotator, client) = (self.rotator, self.client);
        while let Err(e) = rotator.ensure_queue().await {
            tracing::warn!(error = %e, "cannot set up the rotation queue yet; retrying");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = shutdown.wait() => return Ok(()),
            }
        }
        let role = rotator.config().role;
        let mut tasks = Vec::new();
        if matches!(role, Role::All | Role::Scheduler) {
            tasks.push(tokio::spawn(scheduler::run_scheduler(rotator.clone(), shutdown.clone())));
            let options = ServeOptions {
                queue_group: subjects::ROTATOR_QUEUE_GROUP,
                max_in_flight: 64,
                deadline: Duration::from_secs(4),
                metrics: Some(rotator.metrics().requests.clone()),
            };
            let router = Router::new(rotator.clone())
                .on::<RotateNow, _, _>(|r, req| async move { r.rotate_now(&req.proxy_id).await });
            let (c, s) = (client.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = router.serve(c, options, s).await {
                    tracing::error!(error = %e, "rotate-now handler stopped");
                }
            }));
        }
        if matches!(role, Role::All | Role::Worker) {
            let (c, st, n, s) = (rotator.config().clone(), rotator.store().clone(), client.clone(), shutdown.clone());
            let counter = rotator.metrics().callbacks.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = callbacks::run_senders(c, st, n, counter, s).await {
                    tracing::error!(error = %e, "callback senders stopped");
                }
            }));
            let (r, s) = (rotator.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = worker::run_workers(r, s).await {
                    tracing::error!(error = %e, "workers stopped");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }
}
