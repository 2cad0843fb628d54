//! The lease service: grants and returns proxy leases over NATS request-reply.
//!
//! It is the only writer of the lease fields `in_use`, `used_count`, `proxy_used` (and our `lease_rev`). Replicas
//! share the request subjects through a queue group and need no coordination: every grant is a single guarded write
//! in MongoDB (see [`service`]).
//!
//! # Layout
//! - [`catalog`]: following the catalogue stream; catching up before refusing a lease.
//! - [`config`]: `LeaseConfig` from the environment.
//! - [`index`]: the in-memory index of leasable proxies per area.
//! - [`metrics`]: Prometheus metrics.
//! - [`service`]: acquire and release against MongoDB.
//! - [`queries`]: the grant and release queries and their index.
//! - [`sync`]: keeping the index in step (full load, re-reads, events).
//! - [`handoff`]: the reset after a rotation, and the clear of a disabled proxy.
//! - [`server`]: subscriptions, handlers, index maintenance, graceful stop.

pub mod catalog;
pub mod config;
pub mod handoff;
pub mod index;
pub mod metrics;
pub mod queries;
pub mod server;
pub mod service;
pub mod sync;

use std::net::SocketAddr;

use async_nats::Client;
use proxypool_settings::shutdown::Shutdown;
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
}

impl App {
    /// Builds the service and starts its admin endpoint (`/metrics`, `/healthz`, `/readyz`) on `LEASE_ADMIN_ADDR`.
    pub async fn build(config: LeaseConfig, client: Client, store: Store) -> Result<Self, ServeError> {
        let service = LeaseService::new(
            store,
            config.proxy_use_max,
            config.webhook_return_proxy.clone(),
            config.instance_id.clone(),
        )
        .allow_private_callbacks(config.callback_allow_private)
        .lease_ttl(config.lease_ttl);
        let admin_addr = server::serve_admin(&service, &client, config.admin_addr).await.map_err(ServeError::Admin)?;
        tracing::info!(%admin_addr, "lease admin endpoint (/metrics, /healthz, /readyz) listening");
        Ok(Self { service, client, config, admin_addr })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The service (its state: whether the index is loaded, metrics).
    pub fn service(&self) -> &LeaseService {
        &self.service
    }

    /// Serves until `shutdown` fires, then stops taking requests and finishes those in flight.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), ServeError> {
        server::serve(self.service, self.client, self.config.index_refresh, self.config.max_in_flight, shutdown).await
    }
}
