//! `proxypool-rotator`: loads config, initialises telemetry, connects, runs its roles until SIGTERM (see [`proxypool_settings::service_main`]).

proxypool_settings::service_main!("proxypool-rotator", proxypool_rotator::RotatorConfig, proxypool_rotator::App);
