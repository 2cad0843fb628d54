//! `proxypool-auth`: loads config, initialises telemetry, connects, serves until SIGTERM (see [`proxypool_settings::service_main`]).

proxypool_settings::service_main!("proxypool-auth", proxypool_auth::AuthConfig, proxypool_auth::App);
