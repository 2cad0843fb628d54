//! Typed configuration from the environment, shared by every service.
//!
//! Each service reads its config once at start into a struct; a missing or malformed variable fails start-up with an
//! error that names the variable. Secrets are wrapped in [`Secret`] so they never reach a log line.
//!
//! # Layout
//! - [`env`]: typed readers for environment variables.
//! - [`Secret`]: a value that prints as `[redacted]`.
//! - [`nats`]: NATS connection settings and a connect helper that reconnects forever.
//! - [`shutdown`]: a future that resolves on SIGTERM or Ctrl-C.

pub mod env;
pub mod nats;
pub mod shutdown;

mod secret;

pub use env::ConfigError;
pub use secret::Secret;
