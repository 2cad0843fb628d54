//! `proxypool-lease`: loads config, initialises telemetry, connects, runs until SIGTERM (see [`proxypool_settings::service_main`]).

proxypool_settings::service_main!("proxypool-lease", proxypool_lease::LeaseConfig, proxypool_lease::App);
