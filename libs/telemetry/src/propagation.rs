//! W3C trace context (`traceparent`, `tracestate`) carried in NATS message headers and read from HTTP headers, so
//! that one lease or one rotation is one trace across the gateway and the services.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

const KEYS: [&str; 2] = ["traceparent", "tracestate"];

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        KEYS.iter().copied().filter(|k| self.0.get(*k).is_some()).collect()
    }
}

struct HttpExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// NATS headers carrying the current span's trace context (empty when tracing is off).
pub fn nats_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut NatsInjector(&mut headers)));
    headers
}

/// Makes `span` a child of the trace context in a received message's headers, if it carries one.
pub fn continue_from_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get("traceparent").is_none() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the trace context of an incoming HTTP request, if it carries one.
pub fn continue_from_http(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpExtractor(headers)));
    let _ = span.set_parent(cx);
}
