//! `proxypool-forward`: loads config, initialises telemetry, connects to NATS, serves both doors until SIGTERM (see
//! [`proxypool_settings::service_main`]).

proxypool_settings::service_main!(
    "proxypool-forward",
    proxypool_forward::ForwardConfig,
    proxypool_forward::App,
    nats_only
);
