//! Acquire and release: the only code that writes `in_use`, `used_count`, `proxy_used` and `lease_rev`.
//!
//! A grant is one guarded `update_one` by `_id`: its filter re-checks every condition of the original lease query, so
//! it either applies the whole lease (counters, record, timestamps) or nothing. Candidates come from the
//! in-memory [`PoolIndex`]; no request scans the collection. Any number of replicas can run side by side: the
//! database arbitrates, no mutex is shared.

use std::sync::{Arc, Mutex, MutexGuard};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use proxypool_contracts::callback::{CallbackNotice, TakenReason};
use proxypool_contracts::events::{ChangeReason, LeaseSnapshot, ProxyChanged};
use proxypool_contracts::lease::{Acquire, LeaseGrant, Release, ReleaseOutcome};
use proxypool_contracts::rotation::{ClearReply, ClearRequest, RotatedReply, RotatedRequest};
use proxypool_contracts::{ApiError, Area, ErrorCode};
use proxypool_store::model::ProxyDoc;
use proxypool_store::{Store, StoreError};
use serde::Deserialize;

use crate::index::{Entry, PoolIndex, ROTATE_GRACE_MS};

/// How many candidates one acquire tries before giving up; each miss refreshes the index entry it hit.
const MAX_ATTEMPTS: usize = 8;

/// The lease logic, shared by all request handlers of one replica.
#[derive(Debug, Clone)]
pub struct LeaseService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    max: u32,
    webhook_base: String,
    instance_id: String,
    index: Mutex<PoolIndex>,
    loaded: std::sync::atomic::AtomicBool,
    allow_private_callbacks: bool,
    lease_ttl: Option<std::time::Duration>,
    metrics: crate::metrics::LeaseMetrics,
    /// Active proxies in error per area, as of the last full load (the index does not track `is_error`).
    errors: Mutex<std::collections::HashMap<Area, usize>>,
    /// How far this replica has followed the catalogue (set once serving starts).
    catalog: std::sync::OnceLock<crate::catalog::Cursor>,
}

/// A lease key: 96 random bits as 24 hex characters, the shape of the ObjectId keys the original used, but not
/// guessable (an ObjectId is a timestamp, a per-process value and a counter), since the key alone returns a lease.
fn lease_key() -> String {
    let bytes: [u8; 12] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The original design's lease query: the conditions a proxy must meet to take one more lease at `now`.
pub fn lease_filter(area: Area, now: DateTime, max: u32) -> Document {
    let max = i64::from(max);
    let window = DateTime::from_millis(now.timestamp_millis() - ROTATE_GRACE_MS);
    doc! {
        "area": area.as_str(),
        "is_active": true,
        "is_rotating": false,
        "in_use": { "$lt": max },
        "used_count": { "$lt": max },
        "$or": [ { "next_rotate": { "$gt": window } }, { "used_count": 0 } ],
    }
}

/// The `lease_candidates` index of `proxies` (see [`LeaseService::ensure_indexes`]).
pub fn lease_candidates_index() -> mongodb::IndexModel {
    mongodb::IndexModel::builder()
        .keys(doc! { "area": 1, "is_active": 1, "is_rotating": 1 })
        .options(mongodb::options::IndexOptions::builder().name("lease_candidates".to_owned()).build())
        .build()
}

/// The original design's order of candidates (it ran this as a sorted `findOneAndUpdate`).
pub fn lease_sort() -> Document {
    doc! { "used_count": 1, "last_used_at": 1 }
}

/// The guard of a grant: the lease query pinned to one `_id`, so the database re-checks every condition at write
/// time and nothing rests on the in-memory index.
///
/// The query's `next_rotate > now-4min OR used_count = 0` is replaced by the one branch the index expects to hold
/// (`unused_this_cycle`). Either branch implies the disjunction, so the guard is never weaker than the query; if the
/// other branch is the one that holds, the write misses, the entry is re-read, and the next attempt uses it. The
/// reason is cost: a server may plan an `$or` as a scan even beside an `_id` equality (SecantusDB does: 98 updates/s
/// instead of ~900 at 1,000 documents), while equality and range conditions next to `_id` stay point lookups.
pub fn guard_filter(id: ObjectId, area: Area, now: DateTime, max: u32, unused_this_cycle: bool) -> Document {
    let max = i64::from(max);
    let mut filter = doc! {
        "_id": id,
        "area": area.as_str(),
        "is_active": true,
        "is_rotating": false,
        "in_use": { "$lt": max },
        // A proxy imported without an address (a KiotProxy key before its first rotation) is not leasable.
        "ip": { "$ne": "" },
    };
    if unused_this_cycle {
        filter.insert("used_count", 0);
    } else {
        let window = DateTime::from_millis(now.timestamp_millis() - ROTATE_GRACE_MS);
        filter.insert("used_count", doc! { "$lt": max });
        filter.insert("next_rotate", doc! { "$gt": window });
    }
    filter
}

/// The grant itself: counters, lease record, timestamps, return URL, revision — all in one update.
pub fn grant_update(
    consumer: &str,
    key: &str,
    now: DateTime,
    webhook_url: &str,
    callback_url: Option<&str>,
) -> Document {
    let mut record = doc! { "ip": consumer, "key": key, "time": now };
    if let Some(url) = callback_url {
        record.insert("callback_url", url);
    }
    doc! {
        "$inc": { "in_use": 1, "used_count": 1, "lease_rev": 1 },
        "$push": { "proxy_used": record },
        "$set": { "last_used_at": now, "webhook_url": webhook_url, "updatedAt": now },
    }
}

/// An optimistic pick not yet settled by a write; dropping it unsettled restores the index entry.
struct PendingPick<'a> {
    service: &'a LeaseService,
    id: ObjectId,
    before: Option<Entry>,
}

impl Drop for PendingPick<'_> {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            self.service.index().unpick(self.id, before);
        }
    }
}

/// Result of a write, with the event other replicas should see.
#[derive(Debug)]
pub struct Outcome<T> {
    /// Reply data.
    pub value: T,
    /// Event to publish on `proxy.changed`.
    pub event: ProxyChanged,
    /// Callback notices to queue for consumers whose leases the write took.
    pub notices: Vec<CallbackNotice>,
}

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

fn count(v: i32) -> u32 {
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

fn chrono_of(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

fn snapshot(e: &Entry) -> LeaseSnapshot {
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

/// Maps a database failure to the reply a consumer gets: unreachable → retryable 503, anything else → 500.
pub(crate) fn store_error(e: impl Into<StoreError>) -> ApiError {
    e.into().into_api("record")
}

impl LeaseService {
    /// A service over `store` with an empty index; call [`LeaseService::reload`] before serving.
    pub fn new(store: Store, max: u32, webhook_base: String, instance_id: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                max,
                webhook_base,
                instance_id,
                index: Mutex::new(PoolIndex::new(max)),
                loaded: std::sync::atomic::AtomicBool::new(false),
                allow_private_callbacks: false,
                lease_ttl: None,
                metrics: crate::metrics::LeaseMetrics::new(),
                errors: Mutex::new(std::collections::HashMap::new()),
                catalog: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Records the catalogue cursor (once, when serving starts).
    pub fn set_catalog(&self, cursor: crate::catalog::Cursor) {
        let _ = self.inner.catalog.set(cursor);
    }

    fn index(&self) -> MutexGuard<'_, PoolIndex> {
        // A panic while holding the lock cannot leave the index inconsistent in a way the guarded writes would not
        // catch, so a poisoned lock is recovered rather than propagated.
        self.inner.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::LeaseMetrics {
        &self.inner.metrics
    }

    /// Sets the pool gauges from the index (and the error counts of the last full load).
    pub fn update_pool_metrics(&self) {
        let errors = self.inner.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let index = self.index();
        for area in [Area::Vn, Area::Global] {
            let (total, leasable, held, rotating) = index.counts(area);
            let error = errors.get(&area).copied().unwrap_or(0);
            let pool = &self.inner.metrics.pool;
            let set = |state: &'static str, v: u64| {
                let labels = crate::metrics::PoolLabels { area: area.as_str(), state };
                pool.get_or_create(&labels).set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set("total", total as u64);
            set("leasable", leasable as u64);
            set("in_use", held);
            set("error", error as u64);
            set("rotating", rotating as u64);
        }
    }

    /// Allows callback URLs that point at private, loopback or link-local addresses (`CALLBACK_ALLOW_PRIVATE`).
    /// Call before the service is shared.
    pub fn allow_private_callbacks(mut self, yes: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.allow_private_callbacks = yes;
        }
        self
    }

    /// Takes back leases older than `ttl` (`LEASE_TTL`); `None` keeps them until returned or rotated. Call before
    /// the service is shared.
    pub fn lease_ttl(mut self, ttl: Option<std::time::Duration>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.lease_ttl = ttl;
        }
        self
    }

    /// The configured lease lifetime.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        self.inner.lease_ttl
    }

    /// Returns every lease older than the TTL, through the same guarded release a consumer uses, and builds
    /// callback notices (`expired`) for their holders. Several replicas may reap at once: a lease returned twice is
    /// simply `not_found` the second time.
    pub async fn reap_expired(&self) -> Result<Vec<Outcome<ReleaseOutcome>>, StoreError> {
        let Some(ttl) = self.inner.lease_ttl else { return Ok(Vec::new()) };
        let cutoff = DateTime::from_millis(
            DateTime::now().timestamp_millis() - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        );
        // Not indexed on purpose: a multikey index on proxy_used.time would be rewritten by every grant and return,
        // while this runs a few times a minute.
        let holders: Vec<ProxyDoc> =
            self.inner.store.proxies().find(doc! { "proxy_used.time": { "$lt": cutoff } }).await?.try_collect().await?;
        let mut out = Vec::new();
        for proxy in holders {
            for used in proxy.proxy_used.iter().filter(|u| u.time < cutoff) {
                let release = Release {
                    proxy_id: proxypool_contracts::ObjectIdHex::from_trusted(proxy.id.to_hex()),
                    key: proxypool_contracts::ObjectIdHex::from_trusted(used.key.clone()),
                };
                if let Ok(mut outcome) = self.release(&release).await {
                    if let Some(url) = used.callback_url.clone() {
                        outcome.notices.push(CallbackNotice {
                            callback_url: url,
                            proxy_id: proxy.id.to_hex(),
                            key: used.key.clone(),
                            reason: TakenReason::Expired,
                            at: Utc::now(),
                        });
                    }
                    tracing::info!(proxy = %proxy.id, consumer = %used.ip, "expired lease taken back");
                    out.push(outcome);
                }
            }
        }
        Ok(out)
    }

    /// Whether private callback URLs are allowed.
    pub fn private_callbacks_allowed(&self) -> bool {
        self.inner.allow_private_callbacks
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// This replica's id (the `origin` of its events).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Whether the index has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.inner.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

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

    /// Grants a lease in `req.area`, or `no_proxy_available`.
    pub async fn acquire(&self, req: &Acquire) -> Result<Outcome<LeaseGrant>, ApiError> {
        if !self.is_loaded() {
            return Err(ApiError::unavailable("the lease index is still loading; retry shortly"));
        }
        let mut caught_up = false;
        for _ in 0..MAX_ATTEMPTS {
            // Under a request deadline (see `proxypool_rpc::still_wanted`), stop before a write nobody will receive.
            if !proxypool_rpc::still_wanted() {
                return Err(ApiError::unavailable("the request did not finish in time; retry shortly"));
            }
            let now = DateTime::now();
            let picked = self.index().pick(req.area, now.timestamp_millis());
            let Some((id, before)) = picked else {
                // A change acknowledged to an admin (a proxy created or enabled) may not have reached this replica
                // yet: catch up with the catalogue once, then look again.
                if !caught_up {
                    caught_up = true;
                    if let Some(cursor) = self.inner.catalog.get() {
                        cursor.catch_up().await;
                        continue;
                    }
                }
                return Err(ApiError::new(
                    ErrorCode::NoProxyAvailable,
                    format!("no proxy in area {} can take another lease right now", req.area),
                ));
            };
            // Undoes the optimistic count if this attempt ends without a stored grant, including when the request
            // is cancelled by its deadline mid-write.
            let unused_this_cycle = before.used_count == 0;
            let mut pending = PendingPick { service: self, id, before: Some(before) };
            let key = lease_key();
            let webhook_url = format!("{}/{}?key={}", self.inner.webhook_base, id.to_hex(), key);
            let write = self
                .inner
                .store
                .proxies()
                .update_one(
                    guard_filter(id, req.area, now, self.inner.max, unused_this_cycle),
                    grant_update(&req.consumer, &key, now, &webhook_url, req.callback_url.as_deref()),
                )
                .await;
            // The grant is the guarded write alone. The reply is then read by `_id`: on some servers
            // `findAndModify` is planned as a scan even by `_id` (SecantusDB: 14/s at 10,000 documents against 630/s
            // for `update` + 2,000/s for `find`), so write-then-read is the cheaper exact way to learn the result.
            let res = match write {
                Ok(w) if w.matched_count == 1 => {
                    pending.before = None;
                    self.inner.store.proxies().find_one(doc! { "_id": id }).await
                }
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match res {
                Ok(Some(doc)) => {
                    let entry = Entry::from(&doc);
                    self.index().apply(id, entry.clone());
                    let grant = LeaseGrant {
                        id: id.to_hex(),
                        ip: doc.ip,
                        port: u16::try_from(doc.port).unwrap_or_default(),
                        username: doc.username,
                        password: doc.password,
                        auth_token: doc.auth_token,
                        webhook_url,
                        key,
                        area: doc.area,
                        ip_public: doc.ip_public,
                        region: doc.region,
                        expired_at: doc.expired_at.map(chrono_of),
                        next_rotate: doc.next_rotate.map(chrono_of),
                        leased_at: chrono_of(now),
                        expires_at: self
                            .inner
                            .lease_ttl
                            .and_then(|t| chrono::Duration::from_std(t).ok().map(|d| chrono_of(now) + d)),
                    };
                    let event = self.event(id, ChangeReason::Leased, &entry);
                    return Ok(Outcome { value: grant, event, notices: Vec::new() });
                }
                Ok(None) => {
                    pending.before = None;
                    // Guard miss: another replica, a rotation or an admin got there first. Learn the truth for this
                    // proxy and try the next candidate.
                    tracing::debug!(proxy = %id, "lease guard miss");
                    self.refresh_one(id).await.map_err(store_error)?;
                }
                Err(e) => {
                    // The write may have applied (a timeout after the commit): re-read in the background so the
                    // index does not drift, without making the consumer wait for a database that is failing.
                    // A lease applied but never replied holds one slot until the proxy's next rotation resets it.
                    drop(pending);
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _ = this.refresh_one(id).await;
                    });
                    return Err(store_error(e));
                }
            }
        }
        Err(ApiError::new(
            ErrorCode::NoProxyAvailable,
            format!("no proxy in area {} could be leased after {MAX_ATTEMPTS} attempts; retry shortly", req.area),
        ))
    }

    /// Returns a lease. The same key twice changes nothing the second time (`not_found`).
    pub async fn release(&self, req: &Release) -> Result<Outcome<ReleaseOutcome>, ApiError> {
        let id = ObjectId::parse_str(req.proxy_id.as_str())
            .map_err(|_| ApiError::invalid("proxy_id", "must be a 24-character hexadecimal ObjectId"))?;
        let key = req.key.as_str();
        let res = self.drop_lease(id, key, false).await?;
        match res {
            Some((doc, entry)) => {
                let value = ReleaseOutcome { proxy_id: id.to_hex(), key: key.to_owned(), in_use: count(doc.in_use) };
                Ok(Outcome { value, event: self.event(id, ChangeReason::Released, &entry), notices: Vec::new() })
            }
            None => {
                let exists = self
                    .inner
                    .store
                    .proxies()
                    .clone_with_type::<Document>()
                    .find_one(doc! { "_id": id })
                    .projection(doc! { "_id": 1 })
                    .await
                    .map_err(store_error)?
                    .is_some();
                Err(if exists {
                    ApiError::not_found(format!(
                        "no active lease with key {key} on proxy {id} (already returned, or never granted)"
                    ))
                } else {
                    ApiError::not_found(format!("proxy {id} not found"))
                })
            }
        }
    }

    /// Takes back a grant whose caller was answered `service_unavailable` before it was stored (the request
    /// overran its deadline), as if it had never been made: unlike a release it also gives back the use it counted
    /// in this rotation cycle. Changes nothing when the lease is already gone (rotated, reaped, returned).
    pub async fn withdraw(&self, grant: &LeaseGrant) -> Result<Option<ProxyChanged>, ApiError> {
        let id = ObjectId::parse_str(&grant.id).map_err(|_| ApiError::internal("a grant with a malformed proxy id"))?;
        Ok(self
            .drop_lease(id, &grant.key, true)
            .await?
            .map(|(_, entry)| self.event(id, ChangeReason::Released, &entry)))
    }

    /// Removes the lease `key` from proxy `id` (and, with `uncount`, the use it counted in this rotation cycle),
    /// then reads the proxy back for the index and the reply (see `acquire` for why not findAndModify). `None` when
    /// no such lease is held.
    async fn drop_lease(&self, id: ObjectId, key: &str, uncount: bool) -> Result<Option<(ProxyDoc, Entry)>, ApiError> {
        let mut filter = doc! { "_id": id, "proxy_used.key": key, "in_use": { "$gt": 0 } };
        let mut inc = doc! { "in_use": -1, "lease_rev": 1 };
        if uncount {
            filter.insert("used_count", doc! { "$gt": 0 });
            inc.insert("used_count", -1);
        }
        let update = doc! {
            "$pull": { "proxy_used": { "key": key } },
            "$inc": inc,
            "$set": { "updatedAt": DateTime::now() },
        };
        let proxies = self.inner.store.proxies();
        let write = proxies.update_one(filter, update).await.map_err(store_error)?;
        if write.matched_count == 0 {
            return Ok(None);
        }
        let Some(doc) = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)? else { return Ok(None) };
        let entry = Entry::from(&doc);
        self.index().apply(id, entry.clone());
        Ok(Some((doc, entry)))
    }

    /// After a stored, successful rotation: clears the lease state and releases the rotation lock, making the proxy
    /// leasable again. Applies only while the proxy is still locked by `job_id`; repeating it changes nothing.
    pub async fn reset_after_rotation(&self, req: &RotatedRequest) -> Result<Outcome<RotatedReply>, ApiError> {
        let id = ObjectId::parse_str(&req.proxy_id)
            .map_err(|_| ApiError::invalid("proxy_id", "must be a 24-character hexadecimal ObjectId"))?;
        let proxies = self.inner.store.proxies();
        // The reset is guarded by the revision it read, so the leases it reports (and calls back) are exactly the
        // ones it dropped, even if a holder returns one at the same moment.
        let mut matched = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(before) = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)? else {
                return Err(ApiError::not_found(format!("proxy {id} not found")));
            };
            let filter = doc! {
                "_id": id, "is_rotating": true, "rotation_job": &req.job_id, "lease_rev": before.lease_rev,
            };
            let update = doc! {
                "$set": {
                    "in_use": 0, "used_count": 0, "proxy_used": [], "is_rotating": false, "rotating_since": null,
                    "updatedAt": DateTime::now(),
                },
                "$inc": { "lease_rev": 1 },
            };
            if proxies.update_one(filter, update).await.map_err(store_error)?.matched_count == 1 {
                matched = Some(before);
                break;
            }
            if !(before.is_rotating && before.rotation_job.as_deref() == Some(req.job_id.as_str())) {
                break;
            }
        }
        let doc = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)?;
        let Some(doc) = doc else { return Err(ApiError::not_found(format!("proxy {id} not found"))) };
        if matched.is_none() && (doc.is_rotating || doc.rotation_job.as_deref() != Some(req.job_id.as_str())) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("proxy {id} is not locked by rotation job {}", req.job_id),
            ));
        }
        let entry = Entry::from(&doc);
        self.index().apply(id, entry.clone());
        let dropped_leases = matched.as_ref().map_or(0, |b| count(b.in_use));
        let notices = matched.as_ref().map_or_else(Vec::new, |b| b.callback_notices(TakenReason::Rotated));
        let event = self.event(id, ChangeReason::Rotated, &entry);
        Ok(Outcome { value: RotatedReply { dropped_leases }, event, notices })
    }

    /// Drops every lease held on a proxy an admin disabled (`used_count` is kept: the rotation cycle is not over)
    /// and returns callback notices for their holders. Guarded by `lease_rev`, so a lease granted or returned in
    /// between makes it retry with the newer state rather than drop the wrong records.
    pub async fn clear_leases(&self, req: &ClearRequest) -> Result<Outcome<ClearReply>, ApiError> {
        let id = ObjectId::parse_str(&req.proxy_id)
            .map_err(|_| ApiError::invalid("proxy_id", "must be a 24-character hexadecimal ObjectId"))?;
        let proxies = self.inner.store.proxies();
        for _ in 0..MAX_ATTEMPTS {
            let Some(before) = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)? else {
                return Err(ApiError::not_found(format!("proxy {id} not found")));
            };
            if before.proxy_used.is_empty() {
                let entry = Entry::from(&before);
                self.index().apply(id, entry.clone());
                let event = self.event(id, ChangeReason::Updated, &entry);
                return Ok(Outcome { value: ClearReply { dropped_leases: 0 }, event, notices: Vec::new() });
            }
            let filter = doc! { "_id": id, "lease_rev": before.lease_rev };
            let update = doc! {
                "$set": { "in_use": 0, "proxy_used": [], "updatedAt": DateTime::now() },
                "$inc": { "lease_rev": 1 },
            };
            if proxies.update_one(filter, update).await.map_err(store_error)?.matched_count == 0 {
                continue;
            }
            let notices = before.callback_notices(TakenReason::ProxyDisabled);
            self.refresh_one(id).await.map_err(store_error)?;
            let entry = self.index().get(&id).cloned();
            let Some(entry) = entry else { return Err(ApiError::not_found(format!("proxy {id} not found"))) };
            let dropped_leases = u32::try_from(before.proxy_used.len()).unwrap_or(u32::MAX);
            let event = self.event(id, ChangeReason::Updated, &entry);
            return Ok(Outcome { value: ClearReply { dropped_leases }, event, notices });
        }
        Err(ApiError::unavailable("the proxy kept changing; retry shortly"))
    }

    fn event(&self, id: ObjectId, reason: ChangeReason, entry: &Entry) -> ProxyChanged {
        ProxyChanged {
            proxy_id: id.to_hex(),
            reason,
            origin: Some(self.inner.instance_id.clone()),
            snapshot: Some(snapshot(entry)),
        }
    }

    /// Leasable/total counts per area from the index.
    pub fn stats(&self, area: Area) -> crate::index::AreaStats {
        self.index().stats(area)
    }
}
