//! The importer's Prometheus metrics: jobs by kind and result, rows by outcome.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proxypool_contracts::import::ImportKind;

/// Labels of the job counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct JobLabels {
    /// `excel`, `kiot`, `zing`.
    pub kind: String,
    /// `succeeded` or `failed`.
    pub status: String,
}

/// Labels of the row counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RowLabels {
    /// `excel`, `kiot`, `zing`.
    pub kind: String,
    /// `created`, `updated`, `skipped`, `failed`.
    pub outcome: String,
}

/// The importer's metrics.
#[derive(Debug, Clone)]
pub struct ImporterMetrics {
    /// Registry served on the admin port.
    pub registry: proxypool_telemetry::metrics::Metrics,
    /// Finished jobs.
    pub jobs: Family<JobLabels, Counter>,
    /// Rows by outcome.
    pub rows: Family<RowLabels, Counter>,
    /// Requests served.
    pub requests: proxypool_telemetry::metrics::RequestMetrics,
}

impl ImporterMetrics {
    pub(crate) fn new() -> Self {
        let registry = proxypool_telemetry::metrics::Metrics::new("proxypool_importer");
        let jobs = Family::<JobLabels, Counter>::default();
        let rows = Family::<RowLabels, Counter>::default();
        registry.register("jobs", "Import jobs finished, by kind and status", jobs.clone());
        registry.register("rows", "Imported rows, by kind and outcome", rows.clone());
        let requests = registry.requests();
        Self { registry, jobs, rows, requests }
    }
}

pub(crate) fn kind_name(k: ImportKind) -> &'static str {
    match k {
        ImportKind::Excel => "excel",
        ImportKind::Kiot => "kiot",
        ImportKind::Zing => "zing",
    }
}
