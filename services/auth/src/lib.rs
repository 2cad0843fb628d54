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

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::Client;
use proxypool_contracts::subjects;
use proxypool_rpc::ServeOptions;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;

pub use config::AuthConfig;
pub use service::AuthService;

/// Why the auth service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// bcrypt rejected the configured cost.
    #[error("cannot initialise bcrypt")]
    Bcrypt(#[source] bcrypt::BcryptError),
    /// The admin endpoint could not listen.
    #[error("cannot listen on AUTH_ADMIN_ADDR")]
    Admin(#[source] std::io::Error),
    /// A subscription failed.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
}

/// The auth service, built from its configuration and connections, ready to [`run`](App::run). `main.rs` and the
/// tests both start it this way.
#[derive(Debug)]
pub struct App {
    service: AuthService,
    client: Client,
    store: Store,
    requests: proxypool_telemetry::metrics::RequestMetrics,
    admin_addr: SocketAddr,
}

impl App {
    /// Builds the service and starts its admin endpoint (`/metrics`, `/healthz`, `/readyz`) on `AUTH_ADMIN_ADDR`.
    pub async fn build(config: AuthConfig, client: Client, store: Store) -> Result<Self, AppError> {
        let service = AuthService::new(
            store.clone(),
            config.jwt_secret.clone(),
            config.bcrypt_cost,
            config.allow_registration,
            config.jwt_ttl,
        )
        .map_err(AppError::Bcrypt)?;
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_auth");
        let requests = registry.requests();
        let ready = proxypool_telemetry::metrics::nats_ready(client.clone());
        let admin_addr = registry.serve_admin(config.admin_addr, ready).await.map_err(AppError::Admin)?;
        tracing::info!(%admin_addr, "auth admin endpoint (/metrics, /healthz, /readyz) listening");
        Ok(Self { service, client, store, requests, admin_addr })
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves the auth endpoints until `shutdown` fires.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AppError> {
        // Indexes (unique email/username) are created by whichever service starts first; retry in the background.
        let store = self.store.clone();
        let indexes = tokio::spawn(async move {
            while let Err(e) = store.ensure_indexes().await {
                tracing::warn!(error = %e, "cannot create indexes yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let options = ServeOptions {
            queue_group: subjects::AUTH_QUEUE_GROUP,
            max_in_flight: 64,
            // bcrypt at cost 12 takes ~0.25 s per hash on one core; leave room under the callers' 5 s timeout.
            deadline: Duration::from_secs(4),
            metrics: Some(self.requests),
        };
        let served = server::router(&self.service).serve(self.client, options, shutdown).await;
        indexes.abort();
        Ok(served?)
    }
}
