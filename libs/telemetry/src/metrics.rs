//! Prometheus metrics: a registry per service, the metrics every service shares (NATS request handling, dependency
//! errors), and a small admin HTTP server (`/metrics`, `/healthz`, `/readyz`) for services without an HTTP port.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A shareable registry.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Label of [`dependency_error`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabel {
    /// `nats` or `mongodb`.
    pub dependency: &'static str,
}

fn dependency_errors() -> &'static Family<DependencyLabel, Counter> {
    static ERRORS: OnceLock<Family<DependencyLabel, Counter>> = OnceLock::new();
    ERRORS.get_or_init(Family::default)
}

/// Counts a failure to reach a dependency (`nats`, `mongodb`); every service's registry exports the count as
/// `<prefix>_dependency_errors_total`.
pub fn dependency_error(dependency: &'static str) {
    dependency_errors().get_or_create(&DependencyLabel { dependency }).inc();
}

/// Labels of NATS request handling.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The subject.
    pub subject: &'static str,
    /// `ok`, or the error code of the reply.
    pub outcome: String,
}

/// Label of a per-subject histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabel {
    /// The subject.
    pub subject: &'static str,
}

/// Request counts and durations of a NATS request-reply service.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    /// Requests answered, by subject and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Handling time by subject.
    pub duration: Family<SubjectLabel, Histogram>,
}

/// Buckets from 0.5 ms to ~16 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// Why a service is not ready, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub &'static str);

/// The readiness check of an admin server: `Ok` when ready, else why not.
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send>> + Send + Sync>;

/// A readiness check that passes while `client` is connected to NATS.
pub fn nats_ready(client: async_nats::Client) -> Readiness {
    Arc::new(move || {
        let state = client.connection_state();
        Box::pin(async move {
            if state == async_nats::connection::State::Connected {
                Ok(())
            } else {
                Err(NotReady("NATS is not connected"))
            }
        })
    })
}

impl Metrics {
    /// A registry whose metric names start with `prefix_`, with the dependency error counter registered.
    pub fn new(prefix: &str) -> Self {
        let m = Self { registry: Arc::new(Mutex::new(Registry::with_prefix(prefix))) };
        m.register("dependency_errors", "Failures to reach NATS or MongoDB", dependency_errors().clone());
        m
    }

    /// Registers a metric.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner).register(name, help, metric);
    }

    /// Registers and returns the NATS request metrics (`nats_requests_total`, `nats_request_duration_seconds`).
    pub fn requests(&self) -> RequestMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<SubjectLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        self.register("nats_requests", "NATS requests answered, by subject and outcome", requests.clone());
        self.register("nats_request_duration_seconds", "NATS request handling time", duration.clone());
        RequestMetrics { requests, duration }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    /// An axum route serving `/metrics`.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let m = self.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
                        .into_response()
                }
            }),
        )
    }

    /// Serves `/metrics`, `/healthz` (liveness: the process answers) and `/readyz` (`ready`) on `addr` until the
    /// process ends; returns the bound address.
    pub async fn serve_admin(&self, addr: SocketAddr, ready: Readiness) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let app: Router = self.router().route("/healthz", get(|| async { "ok" })).route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (StatusCode::OK, "ready".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(bound)
    }
}
