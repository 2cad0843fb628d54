//! One tracing initialisation for every service binary.
//!
//! `LOG_LEVEL` (`error|warn|info|debug|trace`, or a full `tracing` filter such as `proxypool_lease=debug,info`)
//! sets verbosity; `LOG_FORMAT=json` switches to one JSON object per line for log shippers.
//! [`metrics`] holds the Prometheus registry and admin endpoint.

pub mod metrics;

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber for `service`. Call once, first thing in `main`.
///
/// Returns an error description when the environment asks for something we cannot do, so `main` can fail fast.
pub fn init(service: &'static str) -> Result<(), String> {
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&level).map_err(|e| format!("LOG_LEVEL is invalid: {e}"))?;
    let json = match std::env::var("LOG_FORMAT").unwrap_or_default().to_ascii_lowercase().as_str() {
        "" | "text" | "pretty" => false,
        "json" => true,
        other => return Err(format!("LOG_FORMAT is invalid: {other:?} (expected text or json)")),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    let res = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    res.map_err(|e| format!("cannot install the tracing subscriber: {e}"))?;
    tracing::info!(service, "telemetry initialised");
    Ok(())
}
