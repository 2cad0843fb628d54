//! The wire contract of proxypool: every NATS subject and every message that crosses a process boundary.
//!
//! Nothing outside this crate formats a subject string. Consumer-facing subjects (`lease.*`) are a public,
//! versioned contract: fields are only ever added (with `#[serde(default)]`), never renamed or removed.
//!
//! # Layout
//! - [`subjects`]: subject names and queue groups.
//! - [`endpoints`]: every request-reply endpoint (subject + request + reply) and event (subject + payload) as a type.
//! - [`domain`]: validated input types ([`Area`], [`ObjectIdHex`], [`Pagination`]) that inner code can trust.
//! - [`reply`]: the reply envelope and the typed error shared by NATS replies and HTTP bodies.
//! - [`lease`]: lease acquire/release requests and replies.
//! - [`health`]: outcomes consumers report with a return, and the site names bans are keyed by.
//! - [`auth`]: users and logins (gateway → auth service).
//! - [`callback`]: notices to consumers whose lease was taken, and the SSRF rules for their URLs.
//! - [`rotation`]: rotation jobs, the lease reset after a rotation, rotate-now.
//! - [`import`]: import requests and jobs (gateway → importer).

pub mod auth;
pub mod callback;
pub mod domain;
pub mod endpoints;
pub mod health;
pub mod import;
pub mod lease;
pub mod reply;
pub mod rotation;
pub mod subjects;

pub use domain::{Area, ObjectIdHex, Pagination};
pub use endpoints::Endpoint;
pub use reply::{ApiError, ErrorCode, Reply};
