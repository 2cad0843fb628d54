//! MongoDB access for proxypool: connection, collections, document types and indexes.
//!
//! Field and collection names follow docs/design.md exactly so that an existing database keeps working.
//!
//! # Layout
//! - [`config`]: `MONGODB_URI` or the original design's `DB_MONGO_*` variables.
//! - [`model`]: the four collections' document types with the original design's defaults.
//! - [`Store`]: a connected handle with typed collections, index creation and a readiness ping.
//! - [`StoreError`]: driver errors classified into what callers act on (unavailable, duplicate, other).
//!
//! Lease state (`in_use`, `used_count`, `proxy_used`) is written only by the lease service; this crate gives it no
//! special helpers so that the rule is easy to check (see `tests/lease_fields_guard.rs`).

pub mod config;
pub mod model;

mod error;
mod store;

pub use config::StoreConfig;
pub use error::StoreError;
pub use store::Store;

pub use bson;
pub use mongodb;
