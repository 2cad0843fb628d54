//! `proxypool-importer`: loads config, initialises telemetry, connects, serves imports until SIGTERM (see [`proxypool_settings::service_main`]).

proxypool_settings::service_main!("proxypool-importer", proxypool_importer::ImporterConfig, proxypool_importer::App);
