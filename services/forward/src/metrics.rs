//! The forward door's Prometheus metrics, exported on its admin port.
//!
//! Per-proxy and per-consumer byte counters have one series per proxy and per consumer name; consumer names come
//! only from authenticated connections, so an unauthenticated client cannot grow them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};

/// `door` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DoorLabel {
    /// `http` or `socks5`.
    pub door: &'static str,
}

/// `door` and `result` labels of finished connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `http` or `socks5`.
    pub door: &'static str,
    /// How it ended: `ok`, `auth_failed`, `bad_request`, `no_proxy`, `upstream_failed`, `limited`, `timeout`, …
    pub result: String,
}

/// Bytes by direction and proxy.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyBytes {
    /// `up` (client → target) or `down`.
    pub direction: &'static str,
    /// The upstream proxy's id.
    pub proxy: String,
}

/// Bytes by direction and consumer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerBytes {
    /// `up` (client → target) or `down`.
    pub direction: &'static str,
    /// The consumer name from the username.
    pub consumer: String,
}

/// `kind` of an upstream failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `refused`, `auth`, `timeout`, `reset`, `bad_answer`.
    pub kind: &'static str,
}

/// The forward door's metrics.
#[derive(Debug, Clone)]
pub struct ForwardMetrics {
    /// The registry (rendered at `/metrics`).
    pub registry: proxypool_telemetry::metrics::Metrics,
    /// Open client connections by door.
    pub open: Family<DoorLabel, Gauge>,
    /// Finished client connections by door and result.
    pub connections: Family<ResultLabels, Counter>,
    /// Bytes relayed per proxy.
    pub proxy_bytes: Family<ProxyBytes, Counter>,
    /// Bytes relayed per consumer.
    pub consumer_bytes: Family<ConsumerBytes, Counter>,
    /// Upstream failures by kind.
    pub upstream_errors: Family<KindLabel, Counter>,
    /// How long tunnels (CONNECT, SOCKS5) stay open, seconds.
    pub tunnel_duration: Family<DoorLabel, Histogram>,
    /// Sticky sessions holding a lease.
    pub sessions: Gauge,
}

impl ForwardMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_forward");
        let open = Family::<DoorLabel, Gauge>::default();
        let connections = Family::<ResultLabels, Counter>::default();
        let proxy_bytes = Family::<ProxyBytes, Counter>::default();
        let consumer_bytes = Family::<ConsumerBytes, Counter>::default();
        let upstream_errors = Family::<KindLabel, Counter>::default();
        let tunnel_duration = Family::<DoorLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0])
        });
        let sessions = Gauge::default();
        registry.register("open_connections", "Client connections open, by door", open.clone());
        registry.register("connections", "Client connections finished, by door and result", connections.clone());
        registry.register("proxy_bytes", "Bytes relayed, by direction and upstream proxy", proxy_bytes.clone());
        registry.register("consumer_bytes", "Bytes relayed, by direction and consumer", consumer_bytes.clone());
        registry.register(
            "upstream_errors",
            "Upstream failures before the first byte, by kind",
            upstream_errors.clone(),
        );
        registry.register("tunnel_duration_seconds", "Tunnel lifetime, by door", tunnel_duration.clone());
        registry.register("sessions", "Sticky sessions holding a lease", sessions.clone());
        Self { registry, open, connections, proxy_bytes, consumer_bytes, upstream_errors, tunnel_duration, sessions }
    }

    /// Counts relayed bytes for a proxy and a consumer.
    pub fn bytes(&self, proxy: &str, consumer: &str, up: u64, down: u64) {
        for (direction, n) in [("up", up), ("down", down)] {
            if n == 0 {
                continue;
            }
            self.proxy_bytes.get_or_create(&ProxyBytes { direction, proxy: proxy.to_owned() }).inc_by(n);
            self.consumer_bytes.get_or_create(&ConsumerBytes { direction, consumer: consumer.to_owned() }).inc_by(n);
        }
    }

    /// Counts a finished connection.
    pub fn finished(&self, door: &'static str, result: &str) {
        self.connections.get_or_create(&ResultLabels { door, result: result.to_owned() }).inc();
    }
}

impl Default for ForwardMetrics {
    fn default() -> Self {
        Self::new()
    }
}
