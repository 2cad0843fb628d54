//! NATS glue, once for every service: typed request-reply calls and serving, and the JetStream layer (streams, consumers, buckets, the work-queue runner).
//!
//! # Layout
//! - [`call`]: [`call::<E>`](call()) and [`call_within`], the one client of an [`Endpoint`](proxypool_contracts::Endpoint).
//! - [`serve`]: [`Router`], the one server: `Router::new().on::<E>(handler)`, served in a queue group.
//! - [`jetstream`]: every stream, consumer, key-value bucket and object store, declared and ensured in one place.
//! - [`workqueue`]: the one work-queue runner with an ack guard.
//! - [`notices`]: the taken-lease broadcast and durable callback notices.

pub mod call;
pub mod jetstream;
pub mod notices;
pub mod serve;
pub mod workqueue;

pub use call::{call, call_within, error_chain, CallError};
pub use serve::{commit_reply, encode, parse, still_wanted, Router, ServeOptions, Subscribed, DRAIN_TIMEOUT};

/// A subscription failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to {subject}")]
pub struct SubscribeError {
    /// The subject.
    pub subject: String,
    /// Why.
    #[source]
    pub source: async_nats::SubscribeError,
}

/// Wall-clock now in Unix milliseconds (deadlines cross hosts, so they are wall-clock times).
pub(crate) fn unix_millis() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
