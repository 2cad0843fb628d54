//! Broadcast events about proxies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::Area;

/// Published on [`crate::subjects::PROXY_CHANGED`] by every writer of a proxy document, after the write.
///
/// Lease replicas use it to refresh their index of leasable proxies. A writer that has the lease-relevant state at
/// hand (the lease service does, from its `find_one_and_update`) sends it in `snapshot`; others send only the id and
/// the receiver reads the document by `_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyChanged {
    /// The proxy's id.
    pub proxy_id: String,
    /// What happened.
    pub reason: ChangeReason,
    /// Instance that made the change, so a replica can skip its own events.
    #[serde(default)]
    pub origin: Option<String>,
    /// Lease-relevant state right after the write, when the writer has it.
    #[serde(default)]
    pub snapshot: Option<LeaseSnapshot>,
}

/// Why a proxy changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    /// Inserted.
    Created,
    /// Admin or importer edit.
    Updated,
    /// Deleted.
    Deleted,
    /// A lease was granted.
    Leased,
    /// A lease was returned.
    Released,
    /// Rotation finished (lease state reset).
    Rotated,
    /// Any other change.
    #[serde(other)]
    Other,
}

/// The fields the lease index needs, as they were right after a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseSnapshot {
    /// Area.
    pub area: Area,
    /// `is_active`.
    pub is_active: bool,
    /// `is_rotating`.
    pub is_rotating: bool,
    /// `in_use`.
    pub in_use: u32,
    /// `used_count`.
    pub used_count: u32,
    /// `last_used_at`.
    pub last_used_at: Option<DateTime<Utc>>,
    /// `next_rotate`.
    pub next_rotate: Option<DateTime<Utc>>,
    /// `lease_rev` after the write; a snapshot older than what a replica knows is ignored.
    pub lease_rev: i64,
}
