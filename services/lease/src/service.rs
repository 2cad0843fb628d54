//! What the lease service does, on the [`engine`](crate::engine): grants and returns, the rotation lock and its
//! reset, and catalogue changes. Every method decides inside one group commit and answers once it is durable.
//!
//! The lease service is the only writer of the lease fields and of the rotation lock; other services change the
//! catalogue in MongoDB and then tell it ([`LeaseService::sync`]), and it answers only once the next lease sees
//! the change.

use std::collections::HashMap;

use bson::doc;
use bson::oid::ObjectId;
use chrono::TimeZone;
use futures::TryStreamExt;
use proxypool_contracts::health::{HealReply, HealRequest};
use proxypool_contracts::lease::{
    Acquire, LeaseGrant, Release, ReleaseOutcome, Renew, RenewOutcome, RotateOutcome, UpstreamFailure,
};
use proxypool_contracts::rotation::{LockReply, LockRequest, RotatedReply, RotatedRequest, SyncReply, SyncRequest};
use proxypool_contracts::{ApiError, ErrorCode};
use proxypool_store::model::ProxyDoc;
use proxypool_store::{Store, StoreError};

use crate::engine::state::{Catalog, Failure, Lease, Lock, Op};
use crate::engine::{now_ms, Engine};
use crate::queries::lease_key;

/// What a consumer reported with its return.
#[derive(Debug, Clone)]
struct Report {
    outcome: proxypool_contracts::health::Outcome,
    domain: Option<String>,
}

/// The lease logic of one replica. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaseService {
    engine: Engine,
    store: Store,
    webhook_base: String,
    instance_id: String,
    allow_private_callbacks: bool,
    lease_ttl: Option<std::time::Duration>,
    bans: crate::engine::bans::BanPolicy,
    fail_threshold: u32,
    rotate_min_interval_ms: i64,
    nats: Option<async_nats::Client>,
    metrics: crate::metrics::LeaseMetrics,
    packages: PackageCache,
    providers: ProviderCache,
}

/// How long a package code's id (or its absence) is believed.
const PACKAGE_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Package codes resolved to ids, so that a lease from one package costs no database read per lease.
type PackageCache = std::sync::Arc<std::sync::Mutex<HashMap<String, (Option<ObjectId>, std::time::Instant)>>>;

/// Provider names resolved to their packages' ids, for the same reason.
type ProviderCache = std::sync::Arc<std::sync::Mutex<HashMap<String, (Option<Vec<ObjectId>>, std::time::Instant)>>>;

/// Proxies applied per log batch by a sync.
const SYNC_CHUNK: usize = 500;

/// The rotation lock's lifetime without a renewal when the rotator does not say (`ROTATE_LOCK_TTL`'s default).
const DEFAULT_LOCK_TTL_MS: i64 = 300_000;
/// Bounds of a requested lock lifetime.
const LOCK_TTL_RANGE_MS: (i64, i64) = (1_000, 24 * 3_600_000);

/// `no_proxy_available` for `req`, after `found` of its proxies were found: saying whether bans, not load, are why
/// (a proxy would be free for another site).
fn no_proxy(
    txn: &mut crate::engine::Txn<'_>,
    req: &Acquire,
    filter: crate::index::Filter<'_>,
    found: usize,
) -> ApiError {
    let mut within = Vec::new();
    if let Some(p) = &req.package {
        within.push(format!("package {p}"));
    }
    if let Some(p) = &req.provider {
        within.push(format!("provider {p}"));
    }
    if let Some(r) = &req.region {
        within.push(format!("region {r}"));
    }
    let within = if within.is_empty() { String::new() } else { format!(" ({})", within.join(", ")) };
    let short = if req.count > 1 {
        format!(": {found} of the {} distinct proxies asked for are free, and none was leased", req.count)
    } else {
        String::new()
    };
    if let Some(domain) = req.domain.as_deref() {
        if txn.candidate_within(req.area, filter, None).is_some() {
            return ApiError::new(
                ErrorCode::NoProxyAvailable,
                format!(
                    "no proxy in area {}{within} can take a lease for {domain} right now{short}: every free one \
                     exits on an IP that {domain} has banned (bans, not load)",
                    req.area
                ),
            );
        }
    }
    ApiError::new(
        ErrorCode::NoProxyAvailable,
        format!("no proxy in area {}{within} can take another lease right now{short}", req.area),
    )
}

/// How a reported outcome is judged: the ban it earns the exit IP, whether it quarantines the proxy, and the
/// proxies exiting on that IP (told of the ban).
#[derive(Debug, Clone, Default)]
struct Judged {
    ban: Option<crate::engine::bans::Ban>,
    quarantine: bool,
    exiting: Vec<ObjectId>,
}

/// Judges an outcome for proxy `id` (and a door's upstream failure). Reports are evidence: enough failures in a row
/// take the proxy out of the pool, and a rotation (checked through the proxy) is the judge that brings it back. A
/// site that refused the exit IP bans that pair (the IP as it is now, before any rotation moves the proxy).
fn judge(
    txn: &crate::engine::Txn<'_>,
    id: ObjectId,
    door_failure: bool,
    report: Option<&Report>,
    policy: crate::engine::bans::BanPolicy,
    threshold: u32,
) -> Judged {
    let now = txn.now_ms();
    let reported = report.map(|r| r.outcome);
    let (fails, already) = txn.state().get(&id).map_or((0, false), |p| (p.fails, p.quarantined));
    let quarantine = !already && crate::engine::state::fails_after(fails, door_failure, reported) >= threshold;
    let mut judged = Judged { quarantine, ..Judged::default() };
    if let Some(Report { outcome, domain: Some(domain) }) = report {
        if outcome.is_ban() {
            let ip = txn.state().get(&id).map(|p| p.exit_ip().to_owned()).unwrap_or_default();
            let previous = txn.state().bans().latest(&ip, domain);
            judged.exiting = txn.state().exiting_on(&ip);
            judged.ban = Some(policy.next(&ip, domain, *outcome, previous, now));
        }
    }
    judged
}

/// What a grant hands out: the proxy as the state holds it, and the lease `key` granted at `at_ms`.
fn grant_of(
    txn: &crate::engine::Txn<'_>,
    id: ObjectId,
    lease: &Lease,
    base: &str,
    ttl: Option<std::time::Duration>,
) -> Result<LeaseGrant, ApiError> {
    let c = txn.state().get(&id).map(|p| &p.catalog).ok_or_else(|| ApiError::internal("lost"))?;
    Ok(LeaseGrant {
        id: id.to_hex(),
        ip: c.ip.clone(),
        port: c.port,
        username: c.username.clone(),
        password: c.password.clone(),
        auth_token: c.auth_token.clone(),
        webhook_url: format!("{base}/{}?key={}", id.to_hex(), lease.key),
        key: lease.key.clone(),
        area: c.area,
        ip_public: c.ip_public.clone(),
        region: c.region.clone(),
        expired_at: c.expired_at_ms.map(utc),
        next_rotate: c.next_rotate_ms.map(utc),
        leased_at: utc(lease.at_ms),
        expires_at: expires_at(lease.base_ms(), ttl),
    })
}

/// `not_found` unless lease `key` is held on proxy `id`, telling an unknown proxy from a lease that is gone (the
/// answer of a release and of a renew alike).
fn held(txn: &crate::engine::Txn<'_>, id: ObjectId, key: &str) -> Result<(), ApiError> {
    let Some(p) = txn.state().get(&id) else {
        return Err(ApiError::not_found(format!("proxy {id} not found")));
    };
    if !p.leases.iter().any(|l| l.key == key) {
        return Err(ApiError::not_found(format!(
            "no active lease with key {key} on proxy {id} (returned, taken back, or never granted)"
        )));
    }
    Ok(())
}

/// When a lease whose `LEASE_TTL` counts from `base_ms` is taken back.
fn expires_at(base_ms: i64, ttl: Option<std::time::Duration>) -> Option<chrono::DateTime<chrono::Utc>> {
    ttl.and_then(|t| chrono::Duration::from_std(t).ok()).map(|d| utc(base_ms) + d)
}

/// Applies re-read documents (`None`: deleted) to the state.
fn apply_docs(txn: &mut crate::engine::Txn<'_>, docs: Vec<(ObjectId, Option<ProxyDoc>)>) -> SyncReply {
    let mut reply = SyncReply::default();
    for (id, doc) in docs {
        let held = txn.state().get(&id);
        match doc {
            Some(d) => {
                let catalog = Catalog::from(&d);
                match held {
                    Some(p) if p.catalog == catalog => continue,
                    // A re-read older than what a concurrent sync applied.
                    Some(p) if p.catalog.updated_ms > catalog.updated_ms => continue,
                    Some(p) => {
                        let clear = !catalog.active && p.in_use() > 0;
                        if clear {
                            reply.dropped_leases += p.in_use();
                        }
                        txn.apply(Op::Upsert { proxy: id, catalog, clear });
                    }
                    None => txn.apply(Op::Upsert { proxy: id, catalog, clear: false }),
                }
                reply.changed += 1;
            }
            None => {
                if let Some(p) = held {
                    reply.dropped_leases += p.in_use();
                    txn.apply(Op::Remove { proxy: id });
                    reply.changed += 1;
                }
            }
        }
    }
    reply
}

/// Maps a database failure to the reply a caller gets: unreachable → retryable 503, anything else → 500.
fn store_error(e: impl Into<StoreError>) -> ApiError {
    e.into().into_api("record")
}

fn parse_id(field: &str, s: &str) -> Result<ObjectId, ApiError> {
    ObjectId::parse_str(s).map_err(|_| ApiError::invalid(field, "must be a 24-character hexadecimal ObjectId"))
}

fn utc(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl LeaseService {
    /// A service on `engine`.
    pub fn new(
        engine: Engine,
        store: Store,
        webhook_base: String,
        instance_id: String,
        metrics: crate::metrics::LeaseMetrics,
    ) -> Self {
        Self {
            engine,
            store,
            webhook_base,
            instance_id,
            allow_private_callbacks: false,
            lease_ttl: None,
            bans: crate::engine::bans::BanPolicy::default(),
            fail_threshold: 3,
            rotate_min_interval_ms: 30_000,
            nats: None,
            metrics,
            packages: PackageCache::default(),
            providers: ProviderCache::default(),
        }
    }

    /// Allows callback URLs on private addresses (`CALLBACK_ALLOW_PRIVATE`).
    pub fn allow_private_callbacks(mut self, yes: bool) -> Self {
        self.allow_private_callbacks = yes;
        self
    }

    /// The lease lifetime (`LEASE_TTL`), shown to consumers as `expires_at`.
    pub fn lease_ttl(mut self, ttl: Option<std::time::Duration>) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long bans of exit IPs last (`BAN_BASE`, `BAN_MAX`).
    pub fn bans(mut self, policy: crate::engine::bans::BanPolicy) -> Self {
        self.bans = policy;
        self
    }

    /// Failures in a row that quarantine a proxy (`HEALTH_FAIL_THRESHOLD`).
    pub fn fail_threshold(mut self, n: u32) -> Self {
        self.fail_threshold = n.max(1);
        self
    }

    /// How often a holder may ask for a new IP per proxy (`ROTATE_MIN_INTERVAL`).
    pub fn rotate_min_interval(mut self, every: std::time::Duration) -> Self {
        self.rotate_min_interval_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        self
    }

    /// The NATS client through which a quarantine asks the rotator for a rotation.
    pub fn nats(mut self, client: async_nats::Client) -> Self {
        self.nats = Some(client);
        self
    }

    /// Whether private callback URLs are allowed.
    pub fn private_callbacks_allowed(&self) -> bool {
        self.allow_private_callbacks
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The metrics.
    pub fn metrics(&self) -> &crate::metrics::LeaseMetrics {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This replica's id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Whether the state is loaded.
    pub fn is_loaded(&self) -> bool {
        self.engine.is_loaded()
    }

    /// The id of the package with `code`; `not_found` if there is none.
    async fn package_id(&self, code: &str) -> Result<ObjectId, ApiError> {
        let cached = self.packages.lock().ok().and_then(|c| c.get(code).copied());
        let id = match cached {
            Some((id, at)) if at.elapsed() < PACKAGE_CACHE_TTL => id,
            _ => {
                let found = self.store.packages().find_one(doc! { "code": code }).await.map_err(store_error)?;
                let id = found.map(|p| p.id);
                if let Ok(mut c) = self.packages.lock() {
                    c.insert(code.to_owned(), (id, std::time::Instant::now()));
                }
                id
            }
        };
        id.ok_or_else(|| ApiError::not_found(format!("package {code:?} not found")))
    }

    /// The ids of the packages of the provider named `name`; `not_found` if there is none.
    async fn provider_packages(&self, name: &str) -> Result<Vec<ObjectId>, ApiError> {
        let cached = self.providers.lock().ok().and_then(|c| c.get(name).cloned());
        let ids = match cached {
            Some((ids, at)) if at.elapsed() < PACKAGE_CACHE_TTL => ids,
            _ => {
                let found = self.store.providers().find_one(doc! { "name": name }).await.map_err(store_error)?;
                let ids = match found {
                    Some(p) => Some(
                        self.store
                            .packages()
                            .find(doc! { "proxy_provider_id": p.id })
                            .await
                            .map_err(store_error)?
                            .map_ok(|pkg| pkg.id)
                            .try_collect::<Vec<_>>()
                            .await
                            .map_err(store_error)?,
                    ),
                    None => None,
                };
                if let Ok(mut c) = self.providers.lock() {
                    c.insert(name.to_owned(), (ids.clone(), std::time::Instant::now()));
                }
                ids
            }
        };
        ids.ok_or_else(|| ApiError::not_found(format!("provider {name:?} not found")))
    }

    /// Grants `req.count` leases on distinct proxies in `req.area` in one commit (within the package, provider and
    /// region asked for, never one of `req.exclude`, none exiting on an IP banned for `req.domain`), or none and
    /// `no_proxy_available`.
    pub async fn acquire(&self, req: &Acquire) -> Result<Vec<LeaseGrant>, ApiError> {
        let package = match &req.package {
            Some(code) => Some(self.package_id(code).await?),
            None => None,
        };
        let packages = match (&req.provider, package) {
            (Some(name), package) => {
                let mut ids = self.provider_packages(name).await?;
                // Both: the package, if it is the provider's (else nothing matches).
                if let Some(p) = package {
                    ids.retain(|id| *id == p);
                }
                Some(ids)
            }
            (None, package) => package.map(|p| vec![p]),
        };
        let (req, base, ttl) = (req.clone(), self.webhook_base.clone(), self.lease_ttl);
        self.engine
            .submit(move |txn| {
                // A region no proxy of the area has is a wrong name (404), not a pool that is full for now (503).
                if let Some(region) = req.region.as_deref().filter(|r| !txn.state().has_region(req.area, r)) {
                    return Err(ApiError::not_found(format!(
                        "no proxy in area {} has the region {region:?}",
                        req.area
                    )));
                }
                // One request id per lease of the request: `<id>` for a single lease, `<id>.<i>` for each of many.
                let request_of = |i: u32| {
                    req.request_id.as_ref().map(|r| if req.count == 1 { r.clone() } else { format!("{r}.{i}") })
                };
                let mut picked: Vec<(ObjectId, Option<Lease>)> = Vec::new();
                let mut exclude: Vec<ObjectId> =
                    req.exclude.iter().filter_map(|id| ObjectId::parse_str(id.as_str()).ok()).collect();
                for i in 0..req.count {
                    // A repeated request (its caller lost the answer) gets the lease it was granted, if still held.
                    let recalled = request_of(i).and_then(|r| txn.state().recall(&r)).and_then(|(id, key)| {
                        let lease = txn.state().get(&id)?.leases.iter().find(|l| l.key == key).cloned()?;
                        Some((id, lease))
                    });
                    if let Some((id, lease)) = recalled {
                        exclude.push(id);
                        picked.push((id, Some(lease)));
                        continue;
                    }
                    let filter = crate::index::Filter {
                        packages: packages.as_deref(),
                        region: req.region.as_deref(),
                        exclude: &exclude,
                    };
                    match txn.candidate_within(req.area, filter, req.domain.as_deref()) {
                        Some(id) => {
                            exclude.push(id);
                            picked.push((id, None));
                        }
                        // All or none: nothing is applied until every proxy is found.
                        None => return Err(no_proxy(txn, &req, filter, picked.len())),
                    }
                }
                let mut grants = Vec::with_capacity(picked.len());
                for (i, (id, held)) in (0u32..).zip(picked) {
                    let lease = match held {
                        Some(lease) => lease,
                        None => {
                            let key = lease_key();
                            let webhook_url = format!("{base}/{}?key={key}", id.to_hex());
                            let lease = Lease {
                                key,
                                consumer: req.consumer.clone(),
                                at_ms: txn.now_ms(),
                                callback_url: req.callback_url.clone(),
                                door: req.door,
                                session: req.session.clone(),
                                request: request_of(i),
                                renewed_ms: None,
                            };
                            txn.apply(Op::Grant { proxy: id, lease: lease.clone(), webhook_url });
                            lease
                        }
                    };
                    grants.push(grant_of(txn, id, &lease, &base, ttl)?);
                }
                Ok(grants)
            })
            .await
    }

    /// Extends a lease by `LEASE_TTL` from now (engine clock). `not_found` when the key is not held (returned, taken
    /// or expired).
    pub async fn renew(&self, req: &Renew) -> Result<RenewOutcome, ApiError> {
        let id = parse_id("proxy_id", req.proxy_id.as_str())?;
        let (key, ttl) = (req.key.as_str().to_owned(), self.lease_ttl);
        self.engine
            .submit(move |txn| {
                held(txn, id, &key)?;
                let now = txn.now_ms();
                // Without LEASE_TTL nothing expires: nothing to log.
                if ttl.is_some() {
                    txn.apply(Op::Renew { proxy: id, key: key.clone(), at_ms: now });
                }
                let next_rotate = txn.state().get(&id).and_then(|p| p.catalog.next_rotate_ms).map(utc);
                Ok(RenewOutcome { proxy_id: id.to_hex(), key, expires_at: expires_at(now, ttl), next_rotate })
            })
            .await
    }

    /// Returns a lease. The same key twice changes nothing the second time (`not_found`).
    pub async fn release(&self, req: &Release) -> Result<ReleaseOutcome, ApiError> {
        let id = parse_id("proxy_id", req.proxy_id.as_str())?;
        let report = match (req.outcome, req.domain.clone()) {
            (Some(outcome), domain) => Some(Report { outcome, domain }),
            (None, _) => None,
        };
        self.drop_lease(id, req.key.as_str().to_owned(), false, req.failure, report).await
    }

    /// Takes back a grant whose caller was answered `service_unavailable` (its request overran its deadline), as if
    /// it had never been made: it also gives back the use it counted in this rotation cycle. `false` when the lease
    /// was already gone.
    pub async fn withdraw(&self, grant: &LeaseGrant) -> Result<bool, ApiError> {
        let id = parse_id("id", &grant.id)?;
        match self.drop_lease(id, grant.key.clone(), true, None, None).await {
            Ok(_) => Ok(true),
            Err(e) if e.code == ErrorCode::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn drop_lease(
        &self,
        id: ObjectId,
        key: String,
        uncount: bool,
        failure: Option<UpstreamFailure>,
        report: Option<Report>,
    ) -> Result<ReleaseOutcome, ApiError> {
        let (policy, threshold) = (self.bans, self.fail_threshold);
        if let Some(r) = &report {
            self.metrics.outcome(r.outcome);
        }
        let (outcome, judged) = self
            .engine
            .submit(move |txn| {
                held(txn, id, &key)?;
                let now = txn.now_ms();
                let failure = failure.map(|kind| Failure { kind, at_ms: now });
                let judged = judge(txn, id, failure.is_some(), report.as_ref(), policy, threshold);
                txn.apply(Op::Release {
                    proxy: id,
                    key: key.clone(),
                    uncount,
                    taken: None,
                    failure,
                    ban: judged.ban.clone(),
                    outcome: report.as_ref().map(|r| r.outcome),
                    quarantine: judged.quarantine,
                    rotate_asked_ms: None,
                });
                let in_use = txn.state().get(&id).map_or(0, |p| p.in_use());
                Ok((ReleaseOutcome { proxy_id: id.to_hex(), key, in_use }, judged))
            })
            .await?;
        self.after_judgement(id, judged).await;
        Ok(outcome)
    }

    /// A consumer reports how a proxy it holds, or held lately, did for a site, without returning it (the forward
    /// door's clients report this way). Judged as a return's outcome is: a ban of the exit IP for the site, a
    /// failure in a row. `not_found` when the proxy is unknown or the consumer neither holds it nor held it within
    /// twice `LEASE_TTL` (10 minutes when leases do not expire).
    pub async fn report(
        &self,
        req: &proxypool_contracts::health::Report,
    ) -> Result<proxypool_contracts::health::ReportOutcome, ApiError> {
        let id = parse_id("proxy_id", req.proxy_id.as_str())?;
        let (policy, threshold) = (self.bans, self.fail_threshold);
        let window_ms = self.lease_ttl.map_or(600_000, |t| 2 * i64::try_from(t.as_millis()).unwrap_or(i64::MAX / 4));
        let report = Report { outcome: req.outcome, domain: req.domain.clone() };
        let consumer = req.consumer.clone();
        self.metrics.outcome(req.outcome);
        let (outcome, judged) = self
            .engine
            .submit(move |txn| {
                let now = txn.now_ms();
                let Some(p) = txn.state().get(&id) else {
                    return Err(ApiError::not_found(format!("proxy {id} not found")));
                };
                if !p.held_by(&consumer, now - window_ms) {
                    return Err(ApiError::not_found(format!(
                        "{consumer} does not hold proxy {id} and has not held it lately: report with a lease you \
                         hold (or held within twice LEASE_TTL)"
                    )));
                }
                let judged = judge(txn, id, false, Some(&report), policy, threshold);
                txn.apply(Op::Report {
                    proxy: id,
                    ban: judged.ban.clone(),
                    outcome: report.outcome,
                    quarantine: judged.quarantine,
                });
                let outcome = proxypool_contracts::health::ReportOutcome {
                    proxy_id: id.to_hex(),
                    banned_ip: judged.ban.as_ref().map(|b| b.ip.clone()),
                    banned_until: judged.ban.as_ref().map(|b| utc(b.until_ms)),
                    quarantined: judged.quarantine,
                };
                Ok((outcome, judged))
            })
            .await?;
        self.after_judgement(id, judged).await;
        Ok(outcome)
    }

    /// What follows a judged outcome once it is durable: a quarantine asks for a rotation, a ban is broadcast (so
    /// that the forward door moves its sessions on that exit IP off it for the site).
    async fn after_judgement(&self, id: ObjectId, judged: Judged) {
        if judged.quarantine {
            self.metrics.quarantine("started");
            tracing::warn!(proxy = %id, "proxy quarantined after failures in a row; rotating it now");
            self.rotate_now(id);
        }
        if let (Some(ban), Some(client)) = (judged.ban, &self.nats) {
            let event = proxypool_contracts::health::BanEvent {
                ip: ban.ip,
                domain: ban.domain,
                until_ms: ban.until_ms,
                proxies: judged.exiting.into_iter().map(ObjectId::to_hex).collect(),
            };
            proxypool_rpc::notices::banned(client, &event).await;
        }
    }

    /// A holder asks for a new IP: its lease ends and the proxy is rotated now (the rotation drains the other
    /// holders as usual). At most one such request per proxy per `ROTATE_MIN_INTERVAL`; a later one is
    /// `rate_limited` with the wait, and its lease stays held.
    pub async fn rotate_request(&self, req: &Renew) -> Result<RotateOutcome, ApiError> {
        let id = parse_id("proxy_id", req.proxy_id.as_str())?;
        let (key, min_ms) = (req.key.as_str().to_owned(), self.rotate_min_interval_ms);
        let outcome = self
            .engine
            .submit(move |txn| {
                held(txn, id, &key)?;
                let now = txn.now_ms();
                let last = txn.state().get(&id).and_then(|p| p.rotate_asked_ms);
                if let Some(wait) = last.map(|t| t.saturating_add(min_ms) - now).filter(|w| *w > 0) {
                    return Err(ApiError {
                        code: ErrorCode::RateLimited,
                        message: format!(
                            "a new IP for proxy {} was asked for less than ROTATE_MIN_INTERVAL ago",
                            id.to_hex()
                        ),
                        field: None,
                        retry_after_secs: Some(u64::try_from((wait + 999) / 1000).unwrap_or(1)),
                    });
                }
                txn.apply(Op::Release {
                    proxy: id,
                    key: key.clone(),
                    uncount: false,
                    taken: None,
                    failure: None,
                    ban: None,
                    outcome: None,
                    quarantine: false,
                    rotate_asked_ms: Some(now),
                });
                let in_use = txn.state().get(&id).map_or(0, |p| p.in_use());
                Ok(RotateOutcome { proxy_id: id.to_hex(), key, in_use })
            })
            .await?;
        self.metrics.lease("rotate_asked");
        self.rotate_now(id);
        Ok(outcome)
    }

    /// Asks the rotator to rotate `id` now (a quarantined proxy's way back), in the background: a few tries, then
    /// its next scheduled rotation does it.
    fn rotate_now(&self, id: ObjectId) {
        let Some(client) = self.nats.clone() else { return };
        tokio::spawn(async move {
            let req = proxypool_contracts::rotation::RotateNowRequest { proxy_id: id.to_hex() };
            for pause in [1u64, 2, 4] {
                match proxypool_rpc::call::<proxypool_contracts::endpoints::RotateNow>(&client, &req).await {
                    Ok(reply) => {
                        tracing::info!(proxy = %id, job = %reply.job_id, "quarantined proxy queued for rotation");
                        return;
                    }
                    // Already rotating: that rotation ends the quarantine.
                    Err(proxypool_rpc::CallError::Remote(e)) if e.code == ErrorCode::Conflict => return,
                    Err(e) => tracing::warn!(error = %e, proxy = %id, "cannot queue the quarantined proxy's rotation"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(pause)).await;
            }
        });
    }

    /// An admin lifts the ban of a proxy's current exit IP for one site (through every proxy it was reported
    /// through), or the proxy's quarantine. `not_found` when there is no such ban or quarantine.
    pub async fn heal(&self, req: &HealRequest) -> Result<HealReply, ApiError> {
        let id = parse_id("proxy_id", &req.proxy_id)?;
        let domain = match req.unban_domain.as_deref() {
            Some(d) => Some(proxypool_contracts::health::normalize_domain("domain", d)?),
            None => None,
        };
        if domain.is_none() && !req.unquarantine {
            return Err(ApiError::invalid("unban_domain", "name a site to unban, or ask to lift the quarantine"));
        }
        let unquarantine = req.unquarantine;
        self.engine
            .submit(move |txn| {
                let Some(p) = txn.state().get(&id) else {
                    return Err(ApiError::new(ErrorCode::NotFound, format!("no proxy {}", id.to_hex())));
                };
                let (ip, quarantined) = (p.exit_ip().to_owned(), p.quarantined);
                let mut reply = HealReply { proxy_id: id.to_hex(), ..Default::default() };
                if let Some(domain) = domain {
                    let reporters = txn.state().bans().reporters(&ip, &domain);
                    if reporters.is_empty() {
                        return Err(ApiError::new(
                            ErrorCode::NotFound,
                            format!("the exit IP {ip} of proxy {} is not banned for {domain}", id.to_hex()),
                        ));
                    }
                    for proxy in &reporters {
                        txn.apply(Op::Unban { proxy: *proxy, ip: ip.clone(), domain: domain.clone() });
                    }
                    reply.bans_lifted = u32::try_from(reporters.len()).unwrap_or(u32::MAX);
                    reply.ip = Some(ip);
                }
                if unquarantine {
                    if !quarantined {
                        return Err(ApiError::new(
                            ErrorCode::NotFound,
                            format!("proxy {} is not quarantined", id.to_hex()),
                        ));
                    }
                    txn.apply(Op::Heal { proxy: id });
                    reply.quarantine_lifted = true;
                }
                Ok(reply)
            })
            .await
            .inspect(|reply| {
                if reply.quarantine_lifted {
                    self.metrics.quarantine("healed");
                }
            })
    }

    /// One proxy's lease state as the leader holds it now: leases, lock, health. Read inside a commit, so a replica
    /// that no longer leads cannot answer with a stale view.
    pub async fn inspect(
        &self,
        req: &proxypool_contracts::health::InspectRequest,
    ) -> Result<proxypool_contracts::health::LiveState, ApiError> {
        use proxypool_contracts::health::{LiveBan, LiveHealth, LiveLease, LiveRotation, LiveState};
        let id = parse_id("proxy_id", &req.proxy_id)?;
        let ttl = self.lease_ttl;
        self.engine
            .submit(move |txn| {
                let now = txn.now_ms();
                let max = txn.state().max();
                let Some(p) = txn.state().get(&id) else {
                    return Err(ApiError::not_found(format!("proxy {id} not found")));
                };
                let entry = p.entry();
                Ok(LiveState {
                    in_use: p.in_use(),
                    max,
                    used_count: p.used_count,
                    exit_ip: p.exit_ip().to_owned(),
                    leasable: entry.is_active
                        && !entry.is_rotating
                        && entry.in_use < max
                        && entry.used_count < max
                        && !entry.expired(now),
                    rotation: p.lock.as_ref().map(|l| LiveRotation {
                        job: l.job.clone(),
                        since: utc(l.since_ms),
                        deadline: utc(l.deadline()),
                    }),
                    leases: p
                        .leases
                        .iter()
                        .map(|l| LiveLease {
                            consumer: l.consumer.clone(),
                            door: l.door.map(|d| d.as_str().to_owned()),
                            session: l.session.clone(),
                            since: utc(l.at_ms),
                            expires_at: expires_at(l.base_ms(), ttl),
                        })
                        .collect(),
                    health: LiveHealth {
                        state: p.health_state().to_owned(),
                        fails: p.fails,
                        success_rate: p.success_rate(),
                        duplicate_of: p.duplicate_of.map(|o| o.to_hex()),
                        bans: p
                            .bans
                            .iter()
                            .map(|b| LiveBan {
                                ip: b.ip.clone(),
                                domain: b.domain.clone(),
                                until: utc(b.until_ms),
                                count: b.count,
                                reason: b.reason.as_str().to_owned(),
                                active: b.until_ms > now,
                            })
                            .collect(),
                    },
                    seq: p.seq,
                })
            })
            .await
    }

    /// Claims, restarts, checks or renews the rotation lock (see [`LockRequest`]). Only a claim creates one.
    pub async fn lock(&self, req: &LockRequest) -> Result<LockReply, ApiError> {
        let id = parse_id("proxy_id", &req.proxy_id)?;
        let req = req.clone();
        let ttl = req
            .ttl_ms
            .map_or(DEFAULT_LOCK_TTL_MS, |t| i64::try_from(t).unwrap_or(i64::MAX))
            .clamp(LOCK_TTL_RANGE_MS.0, LOCK_TTL_RANGE_MS.1);
        self.engine
            .submit(move |txn| {
                let now = txn.now_ms();
                let Some(p) = txn.state().get(&id) else {
                    return Err(ApiError::not_found(format!("proxy {id} not found")));
                };
                let in_use = p.in_use();
                let duplicate_of =
                    req.exit_ip.as_deref().and_then(|ip| txn.state().exit_taken(ip, id)).map(|o| o.to_hex());
                let reply = |lock: &Lock| LockReply {
                    in_use,
                    since_ms: lock.since_ms,
                    held_ms: u64::try_from(now - lock.since_ms).unwrap_or(0),
                    deadline_ms: lock.deadline(),
                    duplicate_of: duplicate_of.clone(),
                };
                match &p.lock {
                    Some(l) if l.job == req.job_id => {
                        // A restart starts the clock of the drain; any call renews the deadline, logged only once
                        // half of the lifetime is gone so that a drain's polls do not log an operation each.
                        if req.restart || l.deadline() - now < ttl / 2 {
                            let since_ms = if req.restart { now } else { l.since_ms };
                            let lock = Lock { job: req.job_id.clone(), since_ms, deadline_ms: now + ttl };
                            txn.apply(Op::Lock { proxy: id, lock: lock.clone() });
                            Ok(reply(&lock))
                        } else {
                            Ok(reply(l))
                        }
                    }
                    Some(l) => Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("proxy {id} is already rotating (locked by job {})", l.job),
                    )),
                    // A restart or check of a lock that is gone (released, taken back) never re-creates it.
                    None if !req.claim => Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("proxy {id} is not locked by rotation job {}", req.job_id),
                    )),
                    None if !p.catalog.active => Err(ApiError::new(ErrorCode::Conflict, "the proxy is disabled")),
                    None if p.entry().expired(now) => Err(ApiError::new(
                        ErrorCode::Conflict,
                        "the proxy's provider subscription has ended (expired_at)",
                    )),
                    None => {
                        let lock = Lock { job: req.job_id.clone(), since_ms: now, deadline_ms: now + ttl };
                        txn.apply(Op::Lock { proxy: id, lock: lock.clone() });
                        Ok(reply(&lock))
                    }
                }
            })
            .await
    }

    /// After a rotation job stored its result: releases the lock; with `req.reset` (success) also drops every lease
    /// (holders are called back) and starts a new cycle. Applies only while `req.job_id` holds the lock.
    ///
    /// The catalogue the rotation stored is applied like a sync, guarded the same way: a disable, edit or delete
    /// that reached the engine after this re-read is newer and wins.
    pub async fn rotated(&self, req: &RotatedRequest) -> Result<RotatedReply, ApiError> {
        let id = parse_id("proxy_id", &req.proxy_id)?;
        let doc = self.store.proxies().find_one(doc! { "_id": id }).await.map_err(store_error)?;
        // Between the read and the commit a sync may land (a disable): the guard below must let it win.
        proxypool_faults::point_at("lease.rotated.read", id).await;
        let (job, reset) = (req.job_id.clone(), req.reset);
        self.engine
            .submit(move |txn| {
                let Some(p) = txn.state().get(&id) else {
                    return Err(ApiError::not_found(format!("proxy {id} not found")));
                };
                if p.lock.as_ref().is_none_or(|l| l.job != job) {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("proxy {id} is not locked by rotation job {job}"),
                    ));
                }
                let mut dropped_leases = if reset { p.in_use() } else { 0 };
                let healed = reset && p.quarantined;
                txn.apply(Op::Unlock { proxy: id, reset, catalog: None });
                dropped_leases += apply_docs(txn, vec![(id, doc)]).dropped_leases;
                // A successful rotation is judged on the IP it gave: another active proxy's exit keeps it out of the
                // pool until a rotation gives it one of its own.
                let judged = txn.state().get(&id).filter(|_| reset).map(|p| {
                    let of = p.catalog.ip_public.as_deref().and_then(|ip| txn.state().exit_taken(ip, id));
                    (of, of != p.duplicate_of)
                });
                let mut duplicate_of = None;
                if let Some((of, changed)) = judged {
                    if changed {
                        txn.apply(Op::Duplicate { proxy: id, of });
                    }
                    duplicate_of = of.map(|o| o.to_hex());
                }
                Ok((RotatedReply { dropped_leases, duplicate_of }, healed))
            })
            .await
            .map(|(reply, healed)| {
                if healed {
                    self.metrics.quarantine("healed");
                }
                reply
            })
    }

    /// Applies catalogue changes the caller has stored in MongoDB: re-reads the proxies (by `_id`; everything with
    /// `full`) and updates their gates and what grants hand out. A disabled proxy's leases are dropped (holders
    /// called back); a deleted proxy is forgotten.
    pub async fn sync(&self, req: &SyncRequest) -> Result<SyncReply, ApiError> {
        let started = now_ms();
        let mut docs: Vec<(ObjectId, Option<ProxyDoc>)> = Vec::new();
        if req.full {
            let all: Vec<ProxyDoc> = self
                .store
                .proxies()
                .find(doc! {})
                .await
                .map_err(store_error)?
                .try_collect()
                .await
                .map_err(store_error)?;
            docs.extend(all.into_iter().map(|d| (d.id, Some(d))));
        } else {
            for raw in &req.proxy_ids {
                let id = parse_id("proxy_ids", raw)?;
                docs.push((id, self.store.proxies().find_one(doc! { "_id": id }).await.map_err(store_error)?));
            }
        }
        // In chunks, so that no log batch grows past a few hundred operations however large the catalogue.
        let mut reply = SyncReply::default();
        let mut chunks: Vec<Vec<(ObjectId, Option<ProxyDoc>)>> = Vec::new();
        while !docs.is_empty() {
            let rest = docs.split_off(docs.len().min(SYNC_CHUNK));
            chunks.push(std::mem::replace(&mut docs, rest));
        }
        let mut seen = std::collections::HashSet::new();
        for chunk in chunks {
            seen.extend(chunk.iter().map(|(id, _)| *id));
            let part = self.engine.submit(move |txn| Ok(apply_docs(txn, chunk))).await?;
            reply.changed += part.changed;
            reply.dropped_leases += part.dropped_leases;
        }
        if req.full {
            // Gone from MongoDB, and not created after the read began (that one's own sync will come).
            let part = self
                .engine
                .submit(move |txn| {
                    let mut reply = SyncReply::default();
                    let gone: Vec<ObjectId> = txn
                        .state()
                        .iter()
                        .filter(|(id, p)| !seen.contains(id) && p.catalog.updated_ms < started)
                        .map(|(id, _)| *id)
                        .take(SYNC_CHUNK)
                        .collect();
                    for id in gone {
                        reply.dropped_leases += txn.state().get(&id).map_or(0, |p| p.in_use());
                        txn.apply(Op::Remove { proxy: id });
                        reply.changed += 1;
                    }
                    Ok(reply)
                })
                .await?;
            reply.changed += part.changed;
            reply.dropped_leases += part.dropped_leases;
        }
        Ok(reply)
    }
}
