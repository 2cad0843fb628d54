//! `proxypool-gateway`: loads config, initialises telemetry, connects, serves HTTP until SIGTERM (see [`proxypool_settings::service_main`]).

proxypool_settings::service_main!("proxypool-gateway", proxypool_gateway::GatewayConfig, proxypool_gateway::App);
