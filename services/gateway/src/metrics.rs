//! The gateway's metrics and its HTTP span: requests by route and status, latency by route, and one server span per
//! request that continues the caller's trace (`traceparent`).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use proxypool_telemetry::metrics::{latency_buckets, Metrics};
use tracing::Instrument;

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route template (`/api/proxies/{id}`), never the raw path, so the label set stays small.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Label of the latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route template.
    pub route: String,
}

/// Registered metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// The registry (rendered at `/metrics`).
    pub registry: Metrics,
    /// Requests by method, route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Latency by route.
    pub duration: Family<RouteLabel, Histogram>,
}

impl GatewayMetrics {
    /// Registers the metrics in a new `proxypool_gateway` registry.
    pub fn new() -> Self {
        let registry = Metrics::new("proxypool_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabel, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register("http_requests", "HTTP requests by method, route and status", requests.clone());
        registry.register("http_request_duration_seconds", "HTTP request latency by route", duration.clone());
        Self { registry, requests, duration }
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware: a server span per request (child of an incoming `traceparent`), then the counters.
pub async fn track(State(metrics): State<GatewayMetrics>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let span = tracing::info_span!("http", otel.kind = "server", http.method = %method, http.route = %route,
        http.status = tracing::field::Empty);
    proxypool_telemetry::propagation::continue_from_http(&span, req.headers());
    let started = Instant::now();
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    span.record("http.status", status);
    metrics.requests.get_or_create(&RequestLabels { method, route: route.clone(), status }).inc();
    metrics.duration.get_or_create(&RouteLabel { route }).observe(started.elapsed().as_secs_f64());
    res
}
