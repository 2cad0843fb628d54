//! The rotator's Prometheus metrics, exported on its admin port.

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};

/// `result` label of the counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    /// `succeeded` or `failed`.
    pub result: &'static str,
}

/// The rotator's metrics, exported on its admin port.
#[derive(Debug, Clone)]
pub struct RotatorMetrics {
    /// The registry (rendered at `/metrics`).
    pub registry: proxypool_telemetry::metrics::Metrics,
    /// Rotations by result.
    pub rotations: Family<ResultLabel, Counter>,
    /// Duration of the rotation step (rotate call, IP check, region), seconds.
    pub duration: Histogram,
    /// Jobs waiting in the queue or in hand, as of the last scan.
    pub queue_depth: Gauge,
    /// Callback deliveries by result.
    pub callbacks: Family<ResultLabel, Counter>,
    /// Rotate-now requests served.
    pub requests: proxypool_telemetry::metrics::RequestMetrics,
    /// Rotations that gave a public IP another active proxy already exited on.
    pub duplicate_ips: Counter,
}

impl RotatorMetrics {
    pub(crate) fn new() -> Self {
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_rotator");
        let rotations = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        let queue_depth = Gauge::default();
        let callbacks = Family::<ResultLabel, Counter>::default();
        registry.register("rotations", "Rotations finished, by result", rotations.clone());
        registry.register("rotation_duration_seconds", "Rotate call + IP check + region lookup", duration.clone());
        registry.register("queue_depth", "Rotation jobs pending or in hand", queue_depth.clone());
        registry.register("callbacks", "Callback deliveries, by result", callbacks.clone());
        let duplicate_ips = Counter::default();
        registry.register(
            "duplicate_ips",
            "Rotations whose new public IP another active proxy already exited on",
            duplicate_ips.clone(),
        );
        let requests = registry.requests();
        Self { registry, rotations, duration, queue_depth, callbacks, requests, duplicate_ips }
    }
}
