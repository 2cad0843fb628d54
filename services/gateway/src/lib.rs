//! The HTTP gateway: consumer routes (lease, return), admin routes, health.
//!
//! The gateway holds no lease state. Lease requests go to the lease service over NATS; admin routes read and write
//! MongoDB directly (never the lease fields) and announce proxy changes on `proxy.changed`.
//!
//! # Layout
//! - [`config`]: `GatewayConfig` from the environment.
//! - [`auth`]: static key (constant time), client IP and `TRUSTED_PROXIES`.
//! - [`error`]: the one HTTP error type.
//! - [`state`]: handler state and the NATS request helper.
//! - [`routes`]: handlers.

pub mod auth;
pub mod config;
pub mod error;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use config::GatewayConfig;
pub use state::AppState;

/// Upper bound on any request, behind the NATS and MongoDB timeouts, so that nothing hangs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The router with every route.
pub fn router(state: AppState) -> Router {
    use routes::{admin, consumer, health};
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/get-proxy", get(consumer::get_proxy))
        .route("/webhook/return-proxy/{id}", post(consumer::return_proxy))
        .route("/api/proxies", get(admin::list_proxies).post(admin::create_proxy))
        .route("/api/proxy_providers", get(admin::list_providers).post(admin::create_provider))
        .route("/api/proxy_packages", get(admin::list_packages).post(admin::create_package))
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves on `listener` until `shutdown` fires, then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    nats: async_nats::Client,
    store: Store,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    if config.ip_allowed.is_empty() {
        tracing::warn!("IP_ALLOWED is empty: every consumer request will be refused");
    }
    let state = AppState { config: Arc::new(config), nats, store };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(addr = ?listener.local_addr().ok(), "gateway listening");
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await
}
