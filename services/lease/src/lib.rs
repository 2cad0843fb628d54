//! The lease service: grants and returns proxy leases over NATS request-reply.
//!
//! It is the only writer of the lease fields `in_use`, `used_count`, `proxy_used` (and our `lease_rev`). Replicas
//! share the request subjects through a queue group and need no coordination: every grant is a single guarded write
//! in MongoDB (see [`service`]).
//!
//! # Layout
//! - [`config`]: `LeaseConfig` from the environment.
//! - [`index`]: the in-memory index of leasable proxies per area.
//! - [`metrics`]: Prometheus metrics.
//! - [`service`]: acquire and release against MongoDB.
//! - [`server`]: subscriptions, handlers, index maintenance, graceful stop.

pub mod config;
pub mod index;
pub mod metrics;
pub mod server;
pub mod service;

use async_nats::Client;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

pub use config::LeaseConfig;
pub use service::LeaseService;

/// Runs the lease service on an existing NATS connection and store until `shutdown` fires.
pub async fn run(
    config: LeaseConfig,
    client: Client,
    store: Store,
    shutdown: Shutdown,
) -> Result<(), server::ServeError> {
    let service = LeaseService::new(store, config.proxy_use_max, config.webhook_return_proxy, config.instance_id)
        .allow_private_callbacks(config.callback_allow_private)
        .lease_ttl(config.lease_ttl);
    let admin = server::serve_admin(&service, &client, config.admin_addr).await.map_err(server::ServeError::Admin)?;
    tracing::info!(%admin, "lease admin endpoint (/metrics, /healthz, /readyz) listening");
    server::serve(service, client, config.index_refresh, config.max_in_flight, shutdown).await
}
