//! One telemetry initialisation for every service binary: logs, traces, and the W3C trace context that crosses
//! NATS.
//!
//! - `LOG_LEVEL` (`error|warn|info|debug|trace`, or a full `tracing` filter such as `proxypool_lease=debug,info`)
//!   sets verbosity; `LOG_FORMAT=json` switches to one JSON object per line for log shippers;
//!   `LOG_WRITE_TO_FILE=true` also writes daily files under `storage/log/` (the original's behaviour; docs/design.md).
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` set: spans are exported over OTLP/HTTP (the exporter reads the standard `OTEL_*`
//!   variables); unset, no exporter is built and spans cost only what `tracing` costs.
//!
//! # Layout
//! - [`metrics`]: the Prometheus registry and admin endpoint.
//! - [`propagation`]: W3C `traceparent` into and out of NATS and HTTP headers.

pub mod metrics;
pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Keeps telemetry alive; [`Telemetry::shutdown`] flushes the spans still buffered. Hold it in `main`.
#[must_use = "dropping it stops file logging; call shutdown() before exiting to flush spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("exporting", &self.provider.is_some()).finish()
    }
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: cannot flush spans: {e}");
            }
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A variable is malformed or asks for what cannot be done; it is named.
    #[error("{variable} is invalid: {reason}")]
    Invalid {
        /// The environment variable.
        variable: &'static str,
        /// Why.
        reason: String,
    },
    /// A global subscriber was already installed in this process.
    #[error("cannot install the tracing subscriber: {0}")]
    Install(String),
}

fn invalid(variable: &'static str) -> impl FnOnce(String) -> InitError {
    move |reason| InitError::Invalid { variable, reason }
}

fn filter() -> Result<EnvFilter, InitError> {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
    EnvFilter::try_new(&level).map_err(|e| invalid("LOG_LEVEL")(e.to_string()))
}

fn flag(name: &'static str, default: bool) -> Result<bool, InitError> {
    match std::env::var(name).unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" => Ok(default),
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(invalid(name)(format!("{other:?} (expected true or false)"))),
    }
}

/// A log formatting layer (text or JSON) writing to `writer`.
fn fmt_layer<S, W>(json: bool, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = fmt::layer().with_target(true).with_ansi(ansi).with_writer(writer);
    if json {
        layer.json().flatten_event(true).boxed()
    } else {
        layer.boxed()
    }
}

/// Installs the global subscriber and propagator for `service`. Call once, first thing in `main`.
///
/// Returns an error description when the environment asks for something we cannot do, so `main` can fail fast.
pub fn init(service: &'static str) -> Result<Telemetry, InitError> {
    let json = match std::env::var("LOG_FORMAT").unwrap_or_default().to_ascii_lowercase().as_str() {
        "" | "text" | "pretty" => false,
        "json" => true,
        other => return Err(invalid("LOG_FORMAT")(format!("{other:?} (expected text or json)"))),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (file_layer, file_guard) = if flag("LOG_WRITE_TO_FILE", true)? {
        let appender = tracing_appender::rolling::Builder::new()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix(service)
            .filename_suffix("log")
            .build("storage/log")
            .map_err(|e| invalid("LOG_WRITE_TO_FILE")(format!("cannot write to storage/log/: {e}")))?;
        let (writer, guard) = tracing_appender::non_blocking(appender);
        (Some(fmt_layer(json, false, writer)), Some(guard))
    } else {
        (None, None)
    };
    let exporting = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_ok_and(|v| !v.trim().is_empty());
    let provider = if exporting {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| invalid("OTEL_EXPORTER_OTLP_ENDPOINT")(format!("cannot build the OTLP exporter: {e}")))?;
        Some(provider_with(service, |b| b.with_batch_exporter(exporter)))
    } else {
        None
    };
    install(service, provider.as_ref(), vec![fmt_layer(json, ansi, std::io::stdout)], file_layer)?;
    tracing::info!(service, exporting, "telemetry initialised");
    Ok(Telemetry { provider, _file: file_guard })
}

fn provider_with(
    service: &'static str,
    f: impl FnOnce(opentelemetry_sdk::trace::TracerProviderBuilder) -> opentelemetry_sdk::trace::TracerProviderBuilder,
) -> SdkTracerProvider {
    let name =
        std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    f(SdkTracerProvider::builder().with_resource(resource)).build()
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

fn install(
    service: &'static str,
    provider: Option<&SdkTracerProvider>,
    outputs: Vec<BoxedLayer>,
    file: Option<BoxedLayer>,
) -> Result<(), InitError> {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let otel = provider.map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer(service)).boxed()
    });
    let mut layers: Vec<BoxedLayer> = outputs;
    layers.extend(file);
    layers.extend(otel);
    tracing_subscriber::registry()
        .with(layers.with_filter(filter()?))
        .try_init()
        .map_err(|e| InitError::Install(e.to_string()))
}

/// For tests: exports every span, as it ends, to an in-memory exporter the test reads. Logs go to the test writer
/// when `TEST_LOG=1`. Returns `None` if a subscriber is already installed in this process.
pub fn init_for_tests() -> Option<opentelemetry_sdk::trace::InMemorySpanExporter> {
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = provider_with("proxypool-test", |b| b.with_simple_exporter(exporter.clone()));
    let outputs: Vec<BoxedLayer> = if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
        vec![fmt::layer().with_test_writer().boxed()]
    } else {
        Vec::new()
    };
    install("proxypool-test", Some(&provider), outputs, None).ok()?;
    Some(exporter)
}
