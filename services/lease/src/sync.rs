//! Keeping the in-memory index in step with the database: the full load, the re-read of one proxy, and events from
//! other writers (snapshots, or an id to re-read).

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use proxypool_contracts::events::{ChangeReason, LeaseSnapshot, ProxyChanged};
use proxypool_contracts::Area;
use proxypool_store::model::ProxyDoc;
use proxypool_store::StoreError;
use serde::Deserialize;

use crate::index::Entry;
use crate::queries::lease_candidates_index;
use crate::service::LeaseService;

/// The projection used to load the index.
#[derive(Debug, Deserialize)]
struct LeaseView {
    #[serde(rename = "_id")]
    id: ObjectId,
    area: Area,
    #[serde(default)]
    ip: String,
    #[serde(default = "yes")]
    is_active: bool,
    #[serde(default)]
    is_rotating: bool,
    #[serde(default)]
    in_use: i32,
    #[serde(default)]
    used_count: i32,
    #[serde(default)]
    last_used_at: Option<DateTime>,
    #[serde(default)]
    next_rotate: Option<DateTime>,
    #[serde(default)]
    lease_rev: i64,
    #[serde(default)]
    is_error: bool,
}

fn yes() -> bool {
    true
}

pub(crate) fn count(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl From<&LeaseView> for Entry {
    fn from(v: &LeaseView) -> Self {
        Entry {
            area: v.area,
            is_active: v.is_active && !v.ip.is_empty(),
            is_rotating: v.is_rotating,
            in_use: count(v.in_use),
            used_count: count(v.used_count),
            last_used_ms: v.last_used_at.map(|d| d.timestamp_millis()),
            next_rotate_ms: v.next_rotate.map(|d| d.timestamp_millis()),
            rev: v.lease_rev,
        }
    }
}

impl From<&ProxyDoc> for Entry {
    fn from(d: &ProxyDoc) -> Self {
        Entry {
            area: d.area,
            is_active: d.is_active && !d.ip.is_empty(),
            is_rotating: d.is_rotating,
            in_use: count(d.in_use),
            used_count: count(d.used_count),
            last_used_ms: d.last_used_at.map(|t| t.timestamp_millis()),
            next_rotate_ms: d.next_rotate.map(|t| t.timestamp_millis()),
            rev: d.lease_rev,
        }
    }
}

pub(crate) fn chrono_of(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

pub(crate) fn snapshot(e: &Entry) -> LeaseSnapshot {
    let ts = |ms: Option<i64>| ms.and_then(|m| Utc.timestamp_millis_opt(m).single());
    LeaseSnapshot {
        area: e.area,
        is_active: e.is_active,
        is_rotating: e.is_rotating,
        in_use: e.in_use,
        used_count: e.used_count,
        last_used_at: ts(e.last_used_ms),
        next_rotate: ts(e.next_rotate_ms),
        lease_rev: e.rev,
    }
}

fn entry_of_snapshot(s: &LeaseSnapshot) -> Entry {
    Entry {
        area: s.area,
        is_active: s.is_active,
        is_rotating: s.is_rotating,
        in_use: s.in_use,
        used_count: s.used_count,
        last_used_ms: s.last_used_at.map(|t| t.timestamp_millis()),
        next_rotate_ms: s.next_rotate.map(|t| t.timestamp_millis()),
        rev: s.lease_rev,
    }
}

impl LeaseService {
    /// Creates the shared indexes and `lease_candidates`, which serves the original's lease query (and the index load
    /// per area) by its equality prefix: area, is_active, is_rotating. Idempotent.
    ///
    /// The sort keys (`used_count`, `last_used_at`) are left out on purpose: they change on every grant and return,
    /// so indexing them would add index maintenance to every lease write, while no hot path runs that query (the
    /// lease service picks from memory).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.inner.store.ensure_indexes().await?;
        self.inner.store.proxies().create_index(lease_candidates_index()).await?;
        Ok(())
    }

    /// Loads every proxy's lease state into the index (at start and periodically).
    pub async fn reload(&self) -> Result<usize, StoreError> {
        let token = self.index().begin_reload();
        let projection = doc! {
            "_id": 1, "area": 1, "ip": 1, "is_active": 1, "is_rotating": 1, "in_use": 1, "used_count": 1,
            "last_used_at": 1, "next_rotate": 1, "lease_rev": 1, "is_error": 1,
        };
        let mut cursor = self
            .inner
            .store
            .proxies()
            .clone_with_type::<Document>()
            .find(doc! {})
            .projection(projection)
            .batch_size(5_000)
            .await?;
        let mut loaded = Vec::new();
        let mut errors = std::collections::HashMap::new();
        while let Some(raw) = cursor.try_next().await? {
            match bson::from_document::<LeaseView>(raw) {
                Ok(v) => {
                    if v.is_error && v.is_active {
                        *errors.entry(v.area).or_insert(0) += 1;
                    }
                    loaded.push((v.id, Entry::from(&v)));
                }
                // One malformed document must not keep the pool from serving.
                Err(e) => tracing::warn!(error = %e, "skipping a proxy document the lease index cannot read"),
            }
        }
        let n = loaded.len();
        self.index().finish_reload(token, loaded);
        *self.inner.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = errors;
        self.inner.loaded.store(true, std::sync::atomic::Ordering::Release);
        Ok(n)
    }

    /// Re-reads one proxy and records its state (after a guard miss, or an event without a snapshot).
    pub async fn refresh_one(&self, id: ObjectId) -> Result<(), StoreError> {
        let doc = self.inner.store.proxies().find_one(doc! { "_id": id }).await?;
        let mut index = self.index();
        match doc {
            Some(d) => {
                index.apply(id, Entry::from(&d));
            }
            None => index.remove(id),
        }
        Ok(())
    }

    /// Applies an event from another writer. Returns the id to re-read when the event carries no snapshot.
    pub fn apply_event(&self, event: &ProxyChanged) -> Option<ObjectId> {
        if event.origin.as_deref() == Some(self.instance_id()) {
            return None;
        }
        let id = ObjectId::parse_str(&event.proxy_id).ok()?;
        match (&event.reason, &event.snapshot) {
            (ChangeReason::Deleted, _) => {
                self.index().remove(id);
                None
            }
            (_, Some(s)) => {
                self.index().apply(id, entry_of_snapshot(s));
                None
            }
            (_, None) => Some(id),
        }
    }
}
