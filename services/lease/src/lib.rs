//! The lease service: grants and returns proxy leases over NATS request-reply.
//!
//! It owns the lease state: `in_use`, `used_count`, `proxy_used`, `last_used_at`, `webhook_url` and the rotation
//! lock of every proxy live in the memory of the leading replica, which decides every grant alone. A decision is
//! answered once it is in the lease log on JetStream (one append per group commit); standbys follow the log and
//! take over when the leader goes; MongoDB receives a projection of the state in bulk (see [`engine`]).
//!
//! # Layout
//! - [`config`]: `LeaseConfig` from the environment.
//! - [`engine`]: the state, the fenced log, the election, the projection.
//! - [`index`]: the candidate index per area (`O(log n)` per lease).
//! - [`metrics`]: Prometheus metrics.
//! - [`service`]: acquire, release, the rotation lock and reset, catalogue sync, on the engine.
//! - [`queries`]: the lease key, and the original design's lease query (kept as the benchmark's baseline).
//! - [`server`]: subscriptions while leading, handlers, graceful stop.

pub mod config;
pub mod engine;
pub mod index;
pub mod metrics;
pub mod queries;
pub mod server;
pub mod service;

use std::net::SocketAddr;

use async_nats::Client;
use proxypool_settings::shutdown::{Shutdown, ShutdownTrigger};
use proxypool_store::Store;

pub use config::LeaseConfig;
pub use server::ServeError;
pub use service::LeaseService;

/// The lease service, built from its configuration and connections, ready to [`run`](App::run). `main.rs` and the
/// tests both start it this way.
#[derive(Debug)]
pub struct App {
    service: LeaseService,
    client: Client,
    config: LeaseConfig,
    admin_addr: SocketAddr,
    engine_task: tokio::task::JoinHandle<()>,
    engine_stop: ShutdownTrigger,
}

impl App {
    /// Starts the engine (loading the state, joining the election) and the admin endpoint (`/metrics`, `/healthz`,
    /// `/readyz`) on `LEASE_ADMIN_ADDR`.
    pub async fn build(config: LeaseConfig, client: Client, store: Store) -> Result<Self, ServeError> {
        // A lease log of another deployment on this NATS is refused before anything is read from it. (With NATS not
        // reachable yet, the engine checks again as it loads.)
        let engine_config = config.engine();
        let database = store.db().name().to_owned();
        let check =
            engine::log::LeaseLog::open(&client, engine_config.log_replicas, engine_config.append_timeout, &database);
        if let Ok(Err(e @ proxypool_rpc::jetstream::JetStreamError::ForeignLog { .. })) =
            tokio::time::timeout(std::time::Duration::from_secs(3), check).await
        {
            return Err(ServeError::ForeignLog(e));
        }
        let metrics = metrics::LeaseMetrics::new();
        let (engine_stop, engine_shutdown) = Shutdown::new();
        let (engine, engine_task) =
            engine::start(config.engine(), client.clone(), store.clone(), metrics.clone(), engine_shutdown);
        let service =
            LeaseService::new(engine, store, config.webhook_return_proxy.clone(), config.instance_id.clone(), metrics)
                .allow_private_callbacks(config.callback_allow_private)
                .lease_ttl(config.lease_ttl)
                .bans(config.bans)
                .fail_threshold(config.health_fail_threshold)
                .rotate_min_interval(config.rotate_min_interval)
                .nats(client.clone());
        let admin_addr = server::serve_admin(&service, &client, config.admin_addr).await.map_err(ServeError::Admin)?;
        tracing::info!(%admin_addr, "lease admin endpoint (/metrics, /healthz, /readyz) listening");
        Ok(Self { service, client, config, admin_addr, engine_task, engine_stop })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The service (its state: whether it is loaded, whether it leads, metrics).
    pub fn service(&self) -> &LeaseService {
        &self.service
    }

    /// Serves until `shutdown` fires, then stops taking requests, finishes those in flight, and hands the
    /// leadership over.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), ServeError> {
        // The server stops only once a standby leads (or none came within two TTLs).
        let (stop_serving, serving_shutdown) = Shutdown::new();
        let engine = self.service.engine().clone();
        let handover = tokio::spawn(async move {
            shutdown.wait().await;
            engine.hand_over().await;
            stop_serving.fire();
        });
        let (refresh, in_flight) = (self.config.index_refresh, self.config.max_in_flight);
        let res = server::serve(self.service, self.client, refresh, in_flight, serving_shutdown).await;
        handover.abort();
        self.engine_stop.fire();
        let _ = self.engine_task.await;
        res
    }
}
