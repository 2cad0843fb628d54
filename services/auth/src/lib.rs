//! The auth service: users, the registration policy and logins, over NATS request-reply.
//!
//! The gateway authenticates callers (JWT or static key) and forwards `/api/register`, `/api/login`, `/api/me` and
//! `/api/users/users*` here with the caller attached. Passwords are bcrypt-hashed at `BCRYPT_COST` (default 12) and
//! never leave this service.
//!
//! # Layout
//! - [`config`]: `AuthConfig` from the environment.
//! - [`service`]: users and logins against MongoDB.
//! - [`server`]: subject dispatch.

pub mod config;
pub mod server;
pub mod service;

use std::time::Duration;

use async_nats::Client;
use proxypool_contracts::subjects;
use proxypool_rpc::ServeOptions;
use proxypool_settings::shutdown::Shutdown;

pub use config::AuthConfig;
pub use service::AuthService;

/// Serves `/metrics`, `/healthz` and `/readyz` (NATS connected) on `addr`; returns the bound address and the
/// request metrics to pass to [`serve`].
pub async fn serve_admin(
    client: &Client,
    addr: std::net::SocketAddr,
) -> std::io::Result<(std::net::SocketAddr, proxypool_telemetry::metrics::RequestMetrics)> {
    let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_auth");
    let requests = registry.requests();
    let bound = registry.serve_admin(addr, proxypool_telemetry::metrics::nats_ready(client.clone())).await?;
    Ok((bound, requests))
}

/// Serves the auth subjects until `shutdown` fires.
pub async fn serve(
    service: AuthService,
    client: Client,
    metrics: Option<proxypool_telemetry::metrics::RequestMetrics>,
    shutdown: Shutdown,
) -> Result<(), proxypool_rpc::SubscribeError> {
    let options = ServeOptions {
        queue_group: subjects::AUTH_QUEUE_GROUP,
        max_in_flight: 64,
        // bcrypt at cost 12 takes ~0.25 s per hash on one core; leave room under the callers' 5 s timeout.
        deadline: Duration::from_secs(4),
        metrics,
        caller_deadline: &[],
    };
    proxypool_rpc::serve(client, &subjects::AUTH_ALL, options, shutdown, move |subject, msg| {
        let service = service.clone();
        async move { server::handle(&service, subject, &msg.payload).await }
    })
    .await
}
