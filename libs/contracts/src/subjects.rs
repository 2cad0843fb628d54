//! NATS subject names, built in one place.
//!
//! Subjects are versioned (`proxypool.v1.…`) so that a v2 can run beside v1 during a migration; variable tokens,
//! when a subject has any, come last so that wildcards stay simple.

/// Prefix of every subject proxypool owns.
pub const PREFIX: &str = "proxypool.v1";

/// Consumers request a lease here (request-reply). Public contract.
pub const LEASE_ACQUIRE: &str = "proxypool.v1.lease.acquire";
/// Consumers return a lease here (request-reply). Public contract.
pub const LEASE_RELEASE: &str = "proxypool.v1.lease.release";
/// Wildcard covering every lease subject, for permissions (`deploy/nats/`).
pub const LEASE_ALL: &str = "proxypool.v1.lease.*";

/// Broadcast by every writer of a proxy document after the write is durable.
///
/// Lease replicas subscribe (without a queue group: every replica must see every change) to keep their in-memory
/// index of leasable proxies fresh.
pub const PROXY_CHANGED: &str = "proxypool.v1.proxy.changed";

/// Queue group shared by all lease-service replicas, so each request is handled once.
pub const LEASE_QUEUE_GROUP: &str = "proxypool-lease";
