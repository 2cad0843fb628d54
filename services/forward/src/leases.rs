//! The door's leases: one per client connection, or one per sticky session shared by its connections, taken
//! through the lease service like any other (same engine, same `PROXY_USE_MAX`), and returned when the last user
//! of it goes, however it goes.
//!
//! A lease is an `Arc<Lease>`: the connection, its tunnel and its session each hold a clone, and dropping the last
//! one returns it (in the background, tracked so that shutdown waits for the returns). When the lease service takes
//! a lease away (rotation after the drain timeout, disable, delete, `LEASE_TTL`), its broadcast cancels the lease's
//! token: tunnels using it close, and the session's next connection leases a new proxy and says why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use proxypool_contracts::callback::TakenReason;
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, Door, LeaseGrant, ReleaseRequest, TakenLease, UpstreamFailure};
use proxypool_contracts::{ApiError, Area, ErrorCode};
use proxypool_rpc::CallError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ForwardMetrics;
use crate::upstream::DialError;

/// Tries of a release whose answer did not come (a lease-leader failover takes about 1.5 s).
const RELEASE_TRIES: u32 = 8;
/// How long an acquire keeps asking (with the same request id) while the lease service is between leaders.
const ACQUIRE_PATIENCE: Duration = proxypool_contracts::lease::RETRY_WINDOW;
/// Longest one attempt waits: a leader that died holding the request never answers it.
const ACQUIRE_ATTEMPT: Duration = Duration::from_secs(2);
/// How often idle sessions are looked at.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// What a connection wants leased.
#[derive(Debug, Clone)]
pub struct Want {
    /// The holder recorded on the lease: `<consumer>@<client IP>`.
    pub holder: String,
    /// The area.
    pub area: Area,
    /// Only from this package.
    pub package: Option<String>,
    /// Only from this provider.
    pub provider: Option<String>,
    /// Only in this region.
    pub region: Option<String>,
    /// The door.
    pub door: Door,
    /// The sticky session id.
    pub session: Option<String>,
    /// The target's host (normalised), sent as the acquire's `domain`: no proxy whose exit IP that site banned.
    pub domain: Option<String>,
}

impl Want {
    /// This want for a request to `host`.
    pub fn to(mut self, host: Option<&str>) -> Self {
        self.domain = host.and_then(|h| proxypool_contracts::health::normalize_domain("target", h).ok());
        self
    }
}

/// One lease held by the door.
#[derive(Debug)]
pub struct Lease {
    /// What the lease service granted (the upstream's address and credentials: never logged or shown).
    pub grant: LeaseGrant,
    /// Cancelled when the lease is taken or the service stops.
    pub cancel: CancellationToken,
    /// Who holds it (`<consumer>@<client IP>`).
    pub holder: String,
    taken: Mutex<Option<TakenReason>>,
    failure: Mutex<Option<UpstreamFailure>>,
    book: Book,
}

impl Lease {
    /// Why the lease service took it, if it did.
    pub fn taken(&self) -> Option<TakenReason> {
        self.taken.lock().ok().and_then(|t| *t)
    }

    fn mark_failed(&self, kind: UpstreamFailure) {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(kind);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let inner = &self.book.inner;
        if let Ok(mut held) = inner.held.lock() {
            held.remove(&self.grant.key);
        }
        if self.taken().is_some() {
            return;
        }
        let failure = self.failure.lock().ok().and_then(|f| *f);
        let req = ReleaseRequest {
            proxy_id: Some(self.grant.id.clone()),
            key: Some(self.grant.key.clone()),
            failure: failure.map(|f| f.as_str().to_owned()),
            ..Default::default()
        };
        let client = inner.client.clone();
        inner.returns.spawn(release(client, req));
    }
}

async fn release(client: async_nats::Client, req: ReleaseRequest) {
    for attempt in 1..=RELEASE_TRIES {
        match proxypool_rpc::call::<LeaseRelease>(&client, &req).await {
            Ok(_) => return,
            // Already gone (taken while the broadcast was on its way): nothing to return.
            Err(CallError::Remote(e)) if e.code == ErrorCode::NotFound => return,
            Err(e) if e.is_retryable() && attempt < RELEASE_TRIES => {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            Err(e) => {
                let proxy = req.proxy_id.as_deref().unwrap_or_default();
                tracing::warn!(error = %e, proxy, "cannot return a door lease; LEASE_TTL will take it back");
                return;
            }
        }
    }
}

/// Where a connection's current lease lives: the connection's own slot, or its session's.
pub type Slot = tokio::sync::Mutex<Option<Arc<Lease>>>;

/// A sticky session.
#[derive(Debug)]
pub struct Session {
    /// The session's lease.
    pub slot: Slot,
    open: AtomicUsize,
    last_ms: AtomicI64,
    idle: Duration,
}

/// A connection's use of a session: while held, the session does not expire.
#[derive(Debug)]
pub struct SessionUse {
    /// The session.
    pub session: Arc<Session>,
}

impl Drop for SessionUse {
    fn drop(&mut self) {
        self.session.last_ms.store(now_ms(), Ordering::Relaxed);
        self.session.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Why a connection got no tunnel.
#[derive(Debug)]
pub enum DoorError {
    /// No proxy can take another lease now (503, `Retry-After`).
    NoProxy(ApiError),
    /// The lease service is unreachable (503, `Retry-After`).
    Unavailable(String),
    /// The request was refused by the lease service (e.g. an unknown package).
    Refused(ApiError),
    /// Every proxy tried failed before the first byte (502).
    UpstreamsFailed(UpstreamFailure),
    /// The upstream answered, but the target could not be reached (502).
    Target(u16),
}

impl DoorError {
    /// The `X-Proxypool-Reason` / metric result.
    pub fn reason(&self) -> String {
        match self {
            DoorError::NoProxy(_) => "no_proxy_available".into(),
            DoorError::Unavailable(_) => "service_unavailable".into(),
            DoorError::Refused(e) => format!("{:?}", e.code).to_lowercase(),
            DoorError::UpstreamsFailed(kind) => DialError::Upstream(*kind).reason(),
            DoorError::Target(status) => DialError::Refused(*status).reason(),
        }
    }
}

/// The door's lease book. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Book {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    metrics: ForwardMetrics,
    retries: u32,
    /// Leases held, by key, so that a taken-lease broadcast finds its lease.
    held: Mutex<HashMap<String, std::sync::Weak<Lease>>>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Bans heard from the lease service: proxy id → (site, until epoch ms). A session's next connection to a site
    /// its proxy's exit IP is banned for moves to another proxy.
    bans: Mutex<HashMap<String, Vec<(String, i64)>>>,
    returns: TaskTracker,
    stop: CancellationToken,
}

impl Book {
    /// A book over `client`, trying `retries` other proxies after an upstream fails.
    pub fn new(client: async_nats::Client, metrics: ForwardMetrics, retries: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                metrics,
                retries,
                held: Mutex::default(),
                sessions: Mutex::default(),
                bans: Mutex::default(),
                returns: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Cancelled when the service stops.
    pub fn stopping(&self) -> &CancellationToken {
        &self.inner.stop
    }

    async fn acquire(&self, want: &Want, exclude: &[String]) -> Result<Arc<Lease>, DoorError> {
        let req = AcquireRequest {
            area: Some(want.area.as_str().to_owned()),
            consumer: Some(want.holder.clone()),
            callback_url: None,
            exclude: exclude.to_vec(),
            package: want.package.clone(),
            door: Some(want.door.as_str().to_owned()),
            session: want.session.clone(),
            // Asked again with the same id below: a failover that lost the answer hands back the same grant.
            request_id: Some(proxypool_contracts::lease::new_request_id()),
            domain: want.domain.clone(),
            provider: want.provider.clone(),
            region: want.region.clone(),
            count: None,
        };
        // A lease-leader failover or a NATS reconnect takes a second or two: a client behind the door is better
        // served by waiting that long than by a 503 it may not retry.
        let give_up = tokio::time::Instant::now() + ACQUIRE_PATIENCE;
        let mut nobody_since: Option<tokio::time::Instant> = None;
        let grant = loop {
            match proxypool_rpc::call_within::<LeaseAcquire>(&self.inner.client, &req, Some(ACQUIRE_ATTEMPT)).await {
                Ok(g) => break g,
                Err(CallError::Remote(e)) if e.code == ErrorCode::NoProxyAvailable => {
                    return Err(DoorError::NoProxy(e))
                }
                Err(CallError::Remote(e)) if !e.code.is_retryable() && e.code != ErrorCode::Internal => {
                    return Err(DoorError::Refused(e))
                }
                // Nobody subscribed for longer than a leader's take-over: the lease service is not running.
                Err(e @ CallError::NoResponders { .. })
                    if nobody_since.get_or_insert_with(tokio::time::Instant::now).elapsed()
                        >= proxypool_contracts::lease::NO_RESPONDER_GRACE =>
                {
                    return Err(DoorError::Unavailable(e.to_string()))
                }
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < give_up => {
                    tracing::debug!(error = %e, "the lease service did not answer; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(DoorError::Unavailable(e.to_string())),
            }
        };
        let lease = Arc::new(Lease {
            grant,
            cancel: self.inner.stop.child_token(),
            holder: want.holder.clone(),
            taken: Mutex::new(None),
            failure: Mutex::new(None),
            book: self.clone(),
        });
        if let Ok(mut held) = self.inner.held.lock() {
            held.insert(lease.grant.key.clone(), Arc::downgrade(&lease));
        }
        Ok(lease)
    }

    /// The slot's lease if it still holds one, else a new one (excluding `exclude`); with why the previous one
    /// went, when one did.
    async fn current(
        &self,
        slot: &Slot,
        want: &Want,
        exclude: &[String],
    ) -> Result<(Arc<Lease>, Option<String>), DoorError> {
        let mut held = slot.lock().await;
        let mut changed = None;
        if let Some(l) = held.as_ref() {
            if l.cancel.is_cancelled() {
                changed = Some(l.taken().map_or("stopped".to_owned(), |r| r.as_str().to_owned()));
            } else if want.domain.as_deref().is_some_and(|d| self.banned(&l.grant.id, d)) {
                // The site banned this proxy's exit IP since the session took it: the lease service skips it for
                // that site, and so does the session from now on.
                changed = Some("banned".to_owned());
            } else {
                return Ok((l.clone(), None));
            }
        }
        *held = None;
        let lease = self.acquire(want, exclude).await?;
        *held = Some(lease.clone());
        Ok((lease, changed))
    }

    /// Reaches a target through the slot's lease with `attempt`; when the upstream fails, records it, takes another
    /// proxy (never one that failed) and tries again, `FORWARD_RETRIES` times. Returns the lease used, what
    /// `attempt` gave, and, when the slot's lease changed, why (for the session's answer).
    pub async fn dial<T, F, Fut>(
        &self,
        slot: &Slot,
        want: &Want,
        retries_allowed: bool,
        mut attempt: F,
    ) -> Result<(Arc<Lease>, T, Option<String>), DoorError>
    where
        F: FnMut(Arc<Lease>) -> Fut,
        Fut: std::future::Future<Output = Result<T, DialError>>,
    {
        let mut exclude: Vec<String> = Vec::new();
        let mut changed: Option<String> = None;
        let tries = if retries_allowed { self.inner.retries + 1 } else { 1 };
        let mut last = UpstreamFailure::Reset;
        for _ in 0..tries {
            let (lease, why) = self.current(slot, want, &exclude).await?;
            changed = changed.or(why);
            match attempt(lease.clone()).await {
                Ok(t) => return Ok((lease, t, changed)),
                Err(DialError::Refused(status)) => return Err(DoorError::Target(status)),
                Err(DialError::Upstream(kind)) => {
                    last = kind;
                    self.inner
                        .metrics
                        .upstream_errors
                        .get_or_create(&crate::metrics::KindLabel { kind: kind.as_str() })
                        .inc();
                    tracing::info!(proxy = %lease.grant.id, kind = kind.as_str(), "upstream failed; trying another proxy");
                    lease.mark_failed(kind);
                    exclude.push(lease.grant.id.clone());
                    let mut held = slot.lock().await;
                    if held.as_ref().is_some_and(|l| Arc::ptr_eq(l, &lease)) {
                        *held = None;
                    }
                    changed = Some("upstream_failed".to_owned());
                }
            }
        }
        Err(DoorError::UpstreamsFailed(last))
    }

    /// The session named `key` (created on first use), held for one connection.
    pub fn session(&self, key: String, idle: Duration) -> SessionUse {
        let mut sessions = self.inner.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let session = sessions
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Session {
                    slot: Slot::default(),
                    open: AtomicUsize::new(0),
                    last_ms: AtomicI64::new(now_ms()),
                    idle,
                })
            })
            .clone();
        session.open.fetch_add(1, Ordering::AcqRel);
        self.inner.metrics.sessions.set(i64::try_from(sessions.len()).unwrap_or(i64::MAX));
        SessionUse { session }
    }

    /// Forgets sessions idle past their `sesstime` (returning their leases) until the service stops.
    pub async fn reap_sessions(self) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.stop.cancelled() => break,
            }
            let now = now_ms();
            let gone: Vec<Arc<Session>> = {
                let mut sessions = self.inner.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let expired: Vec<String> = sessions
                    .iter()
                    .filter(|(_, s)| {
                        let idle_ms = i64::try_from(s.idle.as_millis()).unwrap_or(i64::MAX);
                        s.open.load(Ordering::Acquire) == 0 && now - s.last_ms.load(Ordering::Relaxed) >= idle_ms
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                let gone = expired.iter().filter_map(|k| sessions.remove(k)).collect();
                self.inner.metrics.sessions.set(i64::try_from(sessions.len()).unwrap_or(i64::MAX));
                gone
            };
            // Dropping a session's lease returns it (unless a connection that just started still holds it).
            for s in gone {
                s.slot.lock().await.take();
            }
        }
        // Stopping: every session goes.
        let all: Vec<Arc<Session>> = {
            let mut sessions = self.inner.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            sessions.drain().map(|(_, s)| s).collect()
        };
        for s in all {
            s.slot.lock().await.take();
        }
    }

    /// Whether proxy `id`'s exit IP is banned for `domain` now, as far as the door has heard.
    fn banned(&self, id: &str, domain: &str) -> bool {
        let now = now_ms();
        let bans = self.inner.bans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        bans.get(id).is_some_and(|b| b.iter().any(|(d, until)| d == domain && *until > now))
    }

    /// Applies the ban broadcast until the service stops.
    pub async fn follow_bans(
        self,
        mut bans: impl futures::Stream<Item = proxypool_contracts::health::BanEvent> + Unpin,
    ) {
        loop {
            let ban = tokio::select! {
                b = bans.next() => b,
                () = self.inner.stop.cancelled() => return,
            };
            let Some(ban) = ban else { return };
            let now = now_ms();
            let mut known = self.inner.bans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Bounded by what is in force: expired bans go as new ones come.
            known.retain(|_, b| {
                b.retain(|(_, until)| *until > now);
                !b.is_empty()
            });
            for proxy in ban.proxies {
                let b = known.entry(proxy).or_default();
                b.retain(|(d, _)| *d != ban.domain);
                b.push((ban.domain.clone(), ban.until_ms));
            }
        }
    }

    /// Applies the taken-lease broadcast until the service stops.
    pub async fn follow_taken(self, mut taken: impl futures::Stream<Item = TakenLease> + Unpin) {
        loop {
            let t = tokio::select! {
                t = taken.next() => t,
                () = self.inner.stop.cancelled() => return,
            };
            let Some(t) = t else { return };
            let lease = self.inner.held.lock().ok().and_then(|h| h.get(&t.key).and_then(std::sync::Weak::upgrade));
            if let Some(lease) = lease {
                tracing::info!(proxy = %t.proxy_id, reason = t.reason.as_str(), "a door lease was taken; closing its tunnels");
                if let Ok(mut r) = lease.taken.lock() {
                    *r = Some(t.reason);
                }
                lease.cancel.cancel();
            }
        }
    }

    /// Stops: cancels every tunnel and session, and waits (up to `limit`) until their leases are returned.
    pub async fn stop(&self, limit: Duration) {
        self.inner.stop.cancel();
        // The reaper drops the sessions; connections drop theirs as they close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.inner.returns.close();
        if tokio::time::timeout(limit, self.inner.returns.wait()).await.is_err() {
            tracing::warn!("some door leases were not returned before the stop; LEASE_TTL will take them back");
        }
    }

    /// The proxies of the leases `holder` (`<consumer>@<client IP>`) holds now.
    pub fn held_by(&self, holder: &str) -> Vec<String> {
        let held = self.inner.held.lock().map(|h| h.values().filter_map(std::sync::Weak::upgrade).collect::<Vec<_>>());
        held.unwrap_or_default().iter().filter(|l| l.holder == holder).map(|l| l.grant.id.clone()).collect()
    }

    /// Leases the door holds now.
    pub fn held(&self) -> usize {
        self.inner.held.lock().map(|h| h.len()).unwrap_or(0)
    }
}
