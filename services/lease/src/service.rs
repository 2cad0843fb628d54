//! Acquire and release: with [`crate::handoff`], the only code that writes `in_use`, `used_count`, `proxy_used` and
//! `lease_rev`. The queries they run are in [`crate::queries`]; keeping the index in step with the database is in
//! [`crate::sync`].
//!
//! A grant is one guarded `update_one` by `_id`: its filter re-checks every condition of the original lease query, so
//! it either applies the whole lease (counters, record, timestamps) or nothing. Candidates come from the
//! in-memory [`PoolIndex`]; no request scans the collection. Any number of replicas can run side by side: the
//! database arbitrates, no mutex is shared.

use std::sync::{Arc, Mutex, MutexGuard};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::Utc;
use futures::TryStreamExt;
use proxypool_contracts::callback::{CallbackNotice, TakenReason};
use proxypool_contracts::events::{ChangeReason, ProxyChanged};
use proxypool_contracts::lease::{Acquire, LeaseGrant, Release, ReleaseOutcome};
use proxypool_contracts::{ApiError, Area, ErrorCode};
use proxypool_store::model::ProxyDoc;
use proxypool_store::{Store, StoreError};

use crate::index::{Entry, PoolIndex};
use crate::queries::{grant_update, guard_filter, lease_key};
use crate::sync::{chrono_of, count, snapshot};

/// How many candidates one acquire tries before giving up; each miss refreshes the index entry it hit.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The lease logic, shared by all request handlers of one replica.
#[derive(Debug, Clone)]
pub struct LeaseService {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) max: u32,
    pub(crate) webhook_base: String,
    pub(crate) instance_id: String,
    pub(crate) index: Mutex<PoolIndex>,
    pub(crate) loaded: std::sync::atomic::AtomicBool,
    pub(crate) allow_private_callbacks: bool,
    pub(crate) lease_ttl: Option<std::time::Duration>,
    pub(crate) metrics: crate::metrics::LeaseMetrics,
    /// Active proxies in error per area, as of the last full load (the index does not track `is_error`).
    pub(crate) errors: Mutex<std::collections::HashMap<Area, usize>>,
    /// How far this replica has followed the catalogue (set once serving starts).
    pub(crate) catalog: std::sync::OnceLock<crate::catalog::Cursor>,
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

    pub(crate) fn index(&self) -> MutexGuard<'_, PoolIndex> {
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
    pub(crate) async fn drop_lease(
        &self,
        id: ObjectId,
        key: &str,
        uncount: bool,
    ) -> Result<Option<(ProxyDoc, Entry)>, ApiError> {
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

    pub(crate) fn event(&self, id: ObjectId, reason: ChangeReason, entry: &Entry) -> ProxyChanged {
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
