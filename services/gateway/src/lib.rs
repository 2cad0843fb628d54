//! The HTTP gateway: consumer routes (lease, return), admin routes, health.
//!
//! The gateway holds no lease state. Lease requests go to the lease service and user/login requests to the auth
//! service over NATS; admin routes for providers, packages and proxies read and write MongoDB directly (never the
//! lease fields) and then sync each proxy change to the lease service (`leasectl.sync`). Admins authenticate with a JWT or the static key.
//!
//! # Layout
//! - [`config`]: `GatewayConfig` from the environment.
//! - [`auth`]: static key (constant time), client IP and `TRUSTED_PROXIES`.
//! - [`error`]: the one HTTP error type.
//! - [`extract`]: `Query`, `Path` and `Multipart` extractors whose rejection is that error type.
//! - [`metrics`]: Prometheus metrics and the HTTP span.
//! - [`state`]: handler state and the typed NATS calls.
//! - [`routes`]: the handlers, one module per resource.
//! - [`openapi`]: the OpenAPI document and Swagger UI.

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;
use tokio::net::TcpListener;

pub use config::GatewayConfig;
pub use state::AppState;

/// Upper bound on any request, behind the NATS and MongoDB timeouts, so that nothing hangs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The spreadsheet upload reads up to `IMPORT_MAX_BYTES` from the client first, so it gets longer.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Answers 503 when a request outlives its route's bound.
async fn bounded(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let upload =
        req.extensions().get::<axum::extract::MatchedPath>().is_some_and(|p| p.as_str() == "/api/proxies/import");
    let limit = if upload { UPLOAD_TIMEOUT } else { REQUEST_TIMEOUT };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => error::HttpError::from(proxypool_contracts::ApiError::unavailable(
            "the request took too long; retry shortly",
        ))
        .into_response(),
    }
}

/// The JSON `not_found` of a path no route serves (axum's default is an empty body).
async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> error::HttpError {
    proxypool_contracts::ApiError::not_found(format!("no route {method} {}", uri.path())).into()
}

/// The JSON `method_not_allowed` of a route called with a method it does not serve.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> error::HttpError {
    let code = proxypool_contracts::ErrorCode::MethodNotAllowed;
    proxypool_contracts::ApiError::new(code, format!("{} does not take {method}", uri.path())).into()
}

/// The router with every route, and the OpenAPI document built from the same handler annotations.
///
/// `upload_limit` bounds the body of the spreadsheet upload route (every other route keeps axum's 2 MB default).
pub fn router_and_doc(upload_limit: usize) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use routes::{consumer, health, imports, packages, providers, proxies, users};
    use utoipa::{Modify, OpenApi};
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let (router, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(consumer::get_proxy))
        .routes(routes!(consumer::return_proxy))
        .routes(routes!(consumer::renew_proxy))
        .routes(routes!(consumer::rotate_proxy))
        .routes(routes!(consumer::report_outcome))
        .routes(routes!(users::register))
        .routes(routes!(users::login))
        .routes(routes!(users::me))
        .routes(routes!(users::list_users, users::create_user))
        .routes(routes!(users::update_user, users::delete_user))
        .routes(routes!(providers::list_providers, providers::create_provider))
        .routes(routes!(providers::update_provider, providers::delete_provider))
        .routes(routes!(providers::bulk_delete_providers))
        .routes(routes!(packages::list_packages, packages::create_package))
        .routes(routes!(packages::update_package, packages::delete_package))
        .routes(routes!(packages::bulk_delete_packages))
        .routes(routes!(proxies::list_proxies, proxies::create_proxy))
        .routes(routes!(proxies::get_proxy_detail, proxies::update_proxy, proxies::delete_proxy))
        .routes(routes!(proxies::bulk_delete_proxies))
        .routes(routes!(proxies::unban_proxy))
        .routes(routes!(proxies::unquarantine_proxy))
        .routes(routes!(proxies::drop_proxies))
        .routes(routes!(proxies::rotate_proxy))
        .routes({
            // The multipart framing adds a little to the file; the handler enforces the exact limit with a 413.
            let (schemas, paths, method) = routes!(imports::import_excel);
            (schemas, paths, method.layer(DefaultBodyLimit::max(upload_limit.saturating_add(64 * 1024))))
        })
        .routes(routes!(imports::import_kiot))
        .routes(routes!(imports::import_zing))
        .routes(routes!(imports::get_import))
        .split_for_parts();
    openapi::InternalError.modify(&mut doc);
    (router, doc)
}

/// The router with every route, `/openapi.json` and the Swagger UI at `/swagger`.
pub fn router(state: AppState) -> Router {
    let (api, doc) = router_and_doc(state.config.import_max_bytes);
    let doc = Arc::new(doc);
    let swagger = swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: "/swagger",
        api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
        title: Some("proxypool API"),
    });
    let metrics = state.metrics.clone();
    api.route("/openapi.json", get(move || async move { axum::Json(doc.as_ref().clone()) }))
        .route_layer(axum::middleware::from_fn(bounded))
        .route_layer(axum::middleware::from_fn_with_state(metrics.clone(), metrics::track))
        .with_state(state)
        .merge(metrics.registry.router())
        .merge(swagger)
        // Last, so that they cover every route merged above.
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
}

/// The gateway could not listen on `PORT`.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on port {port} (PORT)")]
pub struct ListenError {
    /// The port.
    pub port: u16,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The gateway, built from its configuration and connections with its listener bound, ready to
/// [`run`](App::run). `main.rs` and the tests both start it this way.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    state: AppState,
}

impl App {
    /// Binds `0.0.0.0:PORT` (port 0 picks a free one: see [`App::local_addr`]) and builds the handler state.
    pub async fn build(config: GatewayConfig, nats: async_nats::Client, store: Store) -> Result<Self, ListenError> {
        let port = config.port;
        let listener = TcpListener::bind(("0.0.0.0", port)).await.map_err(|source| ListenError { port, source })?;
        if config.ip_allowed.is_empty() {
            tracing::warn!("IP_ALLOWED is empty: every consumer request will be refused");
        }
        let state = AppState { config: Arc::new(config), nats, store, metrics: metrics::GatewayMetrics::new() };
        Ok(Self { listener, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then finishes in-flight requests.
    pub async fn run(self, mut shutdown: Shutdown) -> std::io::Result<()> {
        let app = router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        tracing::info!(addr = ?self.listener.local_addr().ok(), "gateway listening");
        axum::serve(self.listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await
    }
}
