//! The lease service's metrics: leases granted, refused and returned, grant latency, the pool by area and state, and
//! the outcomes consumers report.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use proxypool_telemetry::metrics::{latency_buckets, Metrics, RequestMetrics};

/// Label of the lease counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `granted`, `refused` (no proxy available), `returned`, `withdrawn` (made past the request's deadline, after
    /// the caller was answered `service_unavailable`, and undone), `expired` (taken back at `LEASE_TTL`), `renewed`,
    /// `lock_expired` (a rotation lock past its deadline, taken back), or
    /// `step_down` (an append refused or failed; the replica stopped leading).
    pub result: &'static str,
}

/// Label of the outcome counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `blocked`, `captcha`, `proxy_error` or `timeout`.
    pub outcome: &'static str,
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
    /// Time to grant a lease (queue, group commit, append), seconds.
    pub duration: Histogram,
    /// The pool as this replica sees it.
    pub pool: Family<PoolLabels, Gauge>,
    /// Requests served.
    pub requests: RequestMetrics,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// Time of one append to the lease log (one group commit), seconds.
    pub append_duration: Histogram,
    /// Operations per group commit.
    pub batch_ops: Histogram,
    /// From a change being durable to its projection being written to MongoDB, seconds (upper bound per write).
    pub projection_lag: Histogram,
    /// Proxies changed and not yet projected.
    pub projection_backlog: Gauge,
    /// Outcomes consumers reported with their returns, by kind.
    pub outcomes: Family<OutcomeLabel, Counter>,
    /// Proxies by health state (`healthy`, `quarantined`, `duplicate_ip`).
    pub health: Family<HealthLabel, Gauge>,
    /// (exit IP, site) pairs banned now.
    pub bans_active: Gauge,
    /// Quarantines `started` and `healed` (by a rotation or an admin).
    pub quarantines: Family<EventLabel, Counter>,
}

/// `state` label of the health gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct HealthLabel {
    /// `healthy`, `quarantined` or `duplicate_ip`.
    pub state: &'static str,
}

/// `event` label of the quarantine counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EventLabel {
    /// `started` or `healed`.
    pub event: &'static str,
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
        let leader = Gauge::default();
        let append_duration = Histogram::new(latency_buckets());
        let batch_ops = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13));
        let projection_lag = Histogram::new(latency_buckets());
        let projection_backlog = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        registry.register("log_append_seconds", "Time of one append to the lease log", append_duration.clone());
        registry.register("log_batch_ops", "Operations per group commit", batch_ops.clone());
        registry.register(
            "projection_lag_seconds",
            "From a change being durable to its projection in MongoDB",
            projection_lag.clone(),
        );
        registry.register("projection_backlog", "Proxies changed and not yet projected", projection_backlog.clone());
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register("outcomes", "Outcomes consumers reported with their returns, by kind", outcomes.clone());
        let health = Family::<HealthLabel, Gauge>::default();
        registry.register("health_proxies", "Proxies by health state, as this replica sees them", health.clone());
        let bans_active = Gauge::default();
        registry.register("bans_active", "(exit IP, site) pairs banned now", bans_active.clone());
        let quarantines = Family::<EventLabel, Counter>::default();
        registry.register("quarantines", "Quarantines started and healed", quarantines.clone());
        Self {
            registry,
            leases,
            duration,
            pool,
            requests,
            leader,
            append_duration,
            batch_ops,
            projection_lag,
            projection_backlog,
            outcomes,
            health,
            bans_active,
            quarantines,
        }
    }

    /// Counts a lease outcome.
    pub fn lease(&self, result: &'static str) {
        self.leases.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a quarantine `started` or `healed`.
    pub fn quarantine(&self, event: &'static str) {
        self.quarantines.get_or_create(&EventLabel { event }).inc();
    }

    /// Counts an outcome a consumer reported.
    pub fn outcome(&self, outcome: proxypool_contracts::health::Outcome) {
        self.outcomes.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
    }
}

impl Default for LeaseMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseMetrics {
    /// Sets the pool gauges from the state, and the projection backlog.
    pub fn pool_gauges(&self, state: &crate::engine::state::State, backlog: usize) {
        for area in [proxypool_contracts::Area::Vn, proxypool_contracts::Area::Global] {
            let (total, leasable, held, rotating) = state.counts(area);
            let set = |state: &'static str, v: u64| {
                let labels = PoolLabels { area: area.as_str(), state };
                self.pool.get_or_create(&labels).set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set("total", total as u64);
            set("leasable", leasable as u64);
            set("in_use", held);
            set("rotating", rotating as u64);
        }
        let (healthy, quarantined, duplicate) = state.health_counts();
        for (s, n) in [("healthy", healthy), ("quarantined", quarantined), ("duplicate_ip", duplicate)] {
            self.health.get_or_create(&HealthLabel { state: s }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.bans_active.set(i64::try_from(state.bans().active(crate::engine::now_ms())).unwrap_or(i64::MAX));
        self.projection_backlog.set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }
}
