//! The lease service's metrics: leases granted, refused and returned, grant latency, and the pool by area and state.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use proxypool_telemetry::metrics::{latency_buckets, Metrics, RequestMetrics};

/// Label of the lease counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `granted`, `refused` (no proxy available), `returned`, or `withdrawn` (stored past the request's deadline,
    /// after the caller was answered `service_unavailable`, and undone).
    pub result: &'static str,
}

/// Labels of the pool gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `vn` or `global`.
    pub area: &'static str,
    /// `total`, `leasable`, `in_use` (leases held), `error`, `rotating`.
    pub state: &'static str,
}

/// Registered metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaseMetrics {
    /// The registry (rendered at `/metrics`).
    pub registry: Metrics,
    /// Leases by result.
    pub leases: Family<ResultLabel, Counter>,
    /// Time to grant a lease (index pick, guarded write, read back), seconds.
    pub duration: Histogram,
    /// The pool as this replica sees it.
    pub pool: Family<PoolLabels, Gauge>,
    /// Requests served.
    pub requests: RequestMetrics,
}

impl LeaseMetrics {
    /// Registers the metrics in a new `proxypool_lease` registry.
    pub fn new() -> Self {
        let registry = Metrics::new("proxypool_lease");
        let leases = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new(latency_buckets());
        let pool = Family::<PoolLabels, Gauge>::default();
        registry.register("leases", "Leases granted, refused (no proxy available) and returned", leases.clone());
        registry.register("lease_duration_seconds", "Time to grant a lease", duration.clone());
        registry.register("pool_proxies", "Proxies by area and state, as this replica sees them", pool.clone());
        let requests = registry.requests();
        Self { registry, leases, duration, pool, requests }
    }

    /// Counts a lease outcome.
    pub fn lease(&self, result: &'static str) {
        self.leases.get_or_create(&ResultLabel { result }).inc();
    }
}

impl Default for LeaseMetrics {
    fn default() -> Self {
        Self::new()
    }
}
