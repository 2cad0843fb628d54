//! The lease state: every proxy's catalogue view and lease records, and the operations that change them.
//!
//! The state is a pure function of the MongoDB projection it was loaded from and the log operations applied after
//! it: [`State::apply`] is deterministic, so the leader (which applies an operation as it decides it) and every
//! follower (which applies it from the log) hold the same state. Two secondary structures are kept in step by every
//! change: the candidate index ([`PoolIndex`], `O(log n)` per pick), the expiry order (leases by grant or renewal
//! time, so the `LEASE_TTL` reaper never scans), the lock deadlines (so an abandoned rotation lock is taken back
//! without a scan) and the request ids recently granted (so a repeated acquire gets the same grant).
//!
//! Every time in the state is on the engine's clock ([`super::clock`]), carried in the log, never a replica's own
//! wall clock.

use std::collections::{BTreeSet, HashMap};

/// A rotation lock of a legacy projection (written before locks had deadlines) lives this long from its start.
const LEGACY_LOCK_TTL_MS: i64 = 300_000;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use proxypool_contracts::callback::{CallbackNotice, TakenReason};
use proxypool_contracts::health::Outcome;
use proxypool_contracts::lease::{Door, UpstreamFailure};
use proxypool_contracts::Area;
use proxypool_store::model::ProxyDoc;
use serde::{Deserialize, Serialize};

use super::bans::{Ban, BanIndex};
use crate::index::{Entry, PoolIndex};

/// The most bans one proxy's state remembers.
pub const BANS_PER_PROXY: usize = 32;

/// The most former holders one proxy's state remembers (for their reports).
pub const RECENT_HOLDERS: usize = 16;

/// A proxy's failures in a row after a return: the forward door's upstream failure or a reported `proxy_error` or
/// `timeout` adds one, a reported `ok` resets them, anything else leaves them.
pub fn fails_after(fails: u32, door_failure: bool, outcome: Option<Outcome>) -> u32 {
    match outcome {
        Some(Outcome::Ok) if !door_failure => 0,
        Some(Outcome::ProxyError | Outcome::Timeout) => fails.saturating_add(1),
        _ if door_failure => fails.saturating_add(1),
        _ => fails,
    }
}

/// How a return judges the proxy itself: a door's upstream failure or a reported `proxy_error`/`timeout` is a
/// failure, a reported `ok` a success; a site's refusal (`blocked`, `captcha`) and no report say nothing of it.
pub fn judgement(door_failure: bool, outcome: Option<Outcome>) -> Option<bool> {
    match outcome {
        _ if door_failure => Some(false),
        Some(Outcome::Ok) => Some(true),
        Some(Outcome::ProxyError | Outcome::Timeout) => Some(false),
        _ => None,
    }
}

/// What the lease service needs of a proxy's catalogue document: the gates and what a grant hands out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Area.
    pub area: Area,
    /// `is_active`.
    pub active: bool,
    /// Address (empty: imported without one yet, not leasable).
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Upstream username.
    pub username: String,
    /// Upstream password.
    pub password: String,
    /// Bearer token of the rotate URL.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// Public IP at the last check.
    #[serde(default)]
    pub ip_public: Option<String>,
    /// Region label.
    #[serde(default)]
    pub region: String,
    /// Provider subscription end, epoch ms.
    #[serde(default)]
    pub expired_at_ms: Option<i64>,
    /// Next rotation, epoch ms.
    #[serde(default)]
    pub next_rotate_ms: Option<i64>,
    /// The document's `updatedAt`, epoch ms: a re-read older than what is held is not applied.
    pub updated_ms: i64,
    /// Its package (`proxy_package_id`), for leases from one package.
    #[serde(default)]
    pub package: Option<ObjectId>,
}

impl From<&ProxyDoc> for Catalog {
    fn from(d: &ProxyDoc) -> Self {
        Catalog {
            area: d.area,
            active: d.is_active,
            ip: d.ip.clone(),
            port: u16::try_from(d.port).unwrap_or(0),
            username: d.username.clone(),
            password: d.password.clone(),
            auth_token: d.auth_token.clone(),
            ip_public: d.ip_public.clone(),
            region: d.region.clone(),
            expired_at_ms: d.expired_at.map(|t| t.timestamp_millis()),
            next_rotate_ms: d.next_rotate.map(|t| t.timestamp_millis()),
            updated_ms: d.updated_at.timestamp_millis(),
            package: Some(d.proxy_package_id),
        }
    }
}

/// One lease held on a proxy (`proxy_used[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The lease key.
    pub key: String,
    /// The consumer (its IP or id).
    pub consumer: String,
    /// When granted, epoch ms.
    pub at_ms: i64,
    /// Where to call the holder back when the lease is taken.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The forward door holding it, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<Door>,
    /// The door's sticky session, if it belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The caller's request id, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Last renewed, epoch ms (engine clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_ms: Option<i64>,
}

impl Lease {
    /// Where `LEASE_TTL` counts from: the last renewal, else the grant.
    pub fn base_ms(&self) -> i64 {
        self.renewed_ms.unwrap_or(self.at_ms)
    }
}

/// An upstream failure the forward door reported with a release. The time is in the operation, not read while
/// applying it, so that every replica applies the same state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// How it failed.
    pub kind: UpstreamFailure,
    /// When it was reported, epoch ms.
    pub at_ms: i64,
}

/// A rotation lock: a lease held by one rotation job, with a deadline the job renews while it works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    /// The rotation job holding it.
    pub job: String,
    /// When taken or restarted, epoch ms.
    pub since_ms: i64,
    /// When the leader takes it back unless renewed, epoch ms (0 in batches written before deadlines existed: read
    /// as `since_ms` plus the default lock TTL).
    #[serde(default)]
    pub deadline_ms: i64,
}

impl Lock {
    /// The deadline, with the legacy default applied.
    pub fn deadline(&self) -> i64 {
        if self.deadline_ms > 0 {
            self.deadline_ms
        } else {
            self.since_ms.saturating_add(LEGACY_LOCK_TTL_MS)
        }
    }
}

/// The state of one proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyState {
    /// Catalogue view.
    pub catalog: Catalog,
    /// Leases held.
    pub leases: Vec<Lease>,
    /// Leases granted in this rotation cycle.
    pub used_count: u32,
    /// Last grant, epoch ms.
    pub last_used_ms: Option<i64>,
    /// Return URL of the latest grant.
    pub webhook_url: Option<String>,
    /// The rotation lock, when locked.
    pub lock: Option<Lock>,
    /// The job that held the last lock (shown as `rotation_job` once unlocked).
    pub last_job: Option<String>,
    /// Upstream failures the forward door met since the last successful rotation.
    pub upstream_failures: u32,
    /// The latest of them: kind and epoch ms.
    pub last_failure: Option<(UpstreamFailure, i64)>,
    /// Per-site bans of exit IPs reported through this proxy (at most [`BANS_PER_PROXY`]), expired ones included
    /// (they make the next ban of the same pair longer).
    pub bans: Vec<Ban>,
    /// Failures in a row its holders reported (`proxy_error`, `timeout`) or the forward door met; an `ok` or a
    /// successful rotation resets it.
    pub fails: u32,
    /// Out of the pool until a rotation (a check through the proxy) succeeds.
    pub quarantined: bool,
    /// The latest judgements of the proxy itself, newest in bit 0 (1: `ok`; 0: `proxy_error`, `timeout` or a door's
    /// upstream failure), and how many bits are used (at most [`proxypool_store::model::RECENT_OUTCOMES`]). Site
    /// refusals (`blocked`, `captcha`) are about the IP and the site, not the proxy, and do not count.
    pub recent_outcomes: (u32, u32),
    /// When a holder last asked for a new IP (epoch ms, engine clock): one such request per `ROTATE_MIN_INTERVAL`.
    pub rotate_asked_ms: Option<i64>,
    /// Its last rotation left it exiting on the public IP of this other active proxy: out of the pool until a
    /// rotation gives it an IP of its own.
    pub duplicate_of: Option<ObjectId>,
    /// Holders whose leases ended lately, with their lease's last grant or renewal (epoch ms), newest last, at most
    /// [`RECENT_HOLDERS`]: they may still report how the proxy did. Not projected (after a reload from MongoDB only
    /// current holders can report).
    pub recent: Vec<(String, i64)>,
    /// The log sequence this state reflects (the projection's `lease_rev`).
    pub seq: u64,
}

impl ProxyState {
    /// The state recorded in a projected document.
    pub fn from_doc(d: &ProxyDoc) -> Self {
        Self {
            catalog: Catalog::from(d),
            leases: d
                .proxy_used
                .iter()
                .map(|u| Lease {
                    key: u.key.clone(),
                    consumer: u.ip.clone(),
                    at_ms: u.time.timestamp_millis(),
                    callback_url: u.callback_url.clone(),
                    door: u.door.as_deref().and_then(|d| serde_json::from_value(d.into()).ok()),
                    session: u.session.clone(),
                    request: u.request.clone(),
                    renewed_ms: u.renewed_at.map(|t| t.timestamp_millis()),
                })
                .collect(),
            used_count: u32::try_from(d.used_count).unwrap_or(0),
            last_used_ms: d.last_used_at.map(|t| t.timestamp_millis()),
            webhook_url: d.webhook_url.clone(),
            lock: d.is_rotating.then(|| Lock {
                job: d.rotation_job.clone().unwrap_or_default(),
                since_ms: d.rotating_since.map_or(0, |t| t.timestamp_millis()),
                deadline_ms: d.rotation_deadline.map_or(0, |t| t.timestamp_millis()),
            }),
            last_job: d.rotation_job.clone(),
            upstream_failures: u32::try_from(d.upstream_failures).unwrap_or(0),
            last_failure: d.last_upstream_failure.as_ref().and_then(|f| {
                let kind = serde_json::from_value(f.kind.as_str().into()).ok()?;
                Some((kind, f.at.timestamp_millis()))
            }),
            bans: d
                .health
                .bans
                .iter()
                .filter_map(|b| {
                    Some(Ban {
                        ip: b.ip.clone(),
                        domain: b.domain.clone(),
                        until_ms: b.until.timestamp_millis(),
                        count: u32::try_from(b.count).unwrap_or(1),
                        reason: Outcome::parse_field("reason", &b.reason).ok()?,
                    })
                })
                .collect(),
            fails: u32::try_from(d.health.fails).unwrap_or(0),
            recent_outcomes: (
                u32::try_from(d.health.recent & 0xffff_ffff).unwrap_or(0),
                u32::try_from(d.health.recent_count).unwrap_or(0).min(proxypool_store::model::RECENT_OUTCOMES),
            ),
            quarantined: d.health.state == "quarantined",
            rotate_asked_ms: d.health.rotate_asked_at.map(|t| t.timestamp_millis()),
            duplicate_of: d.health.duplicate_of.as_deref().and_then(|id| ObjectId::parse_str(id).ok()),
            recent: Vec::new(),
            seq: u64::try_from(d.lease_rev).unwrap_or(0),
        }
    }

    /// A new proxy with no lease history.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            catalog,
            leases: Vec::new(),
            used_count: 0,
            last_used_ms: None,
            webhook_url: None,
            lock: None,
            last_job: None,
            upstream_failures: 0,
            last_failure: None,
            bans: Vec::new(),
            fails: 0,
            quarantined: false,
            recent_outcomes: (0, 0),
            rotate_asked_ms: None,
            duplicate_of: None,
            recent: Vec::new(),
            seq: 0,
        }
    }

    /// The IP sites see: the verified public IP, or the proxy's own address while none is known.
    pub fn exit_ip(&self) -> &str {
        self.catalog.ip_public.as_deref().filter(|ip| !ip.is_empty()).unwrap_or(&self.catalog.ip)
    }

    /// Records a ban (replacing an earlier one of the same pair), forgetting the one ending first beyond
    /// [`BANS_PER_PROXY`] (it only made a later ban of its pair longer).
    fn add_ban(&mut self, ban: &Ban) {
        self.bans.retain(|b| b.ip != ban.ip || b.domain != ban.domain);
        self.bans.push(ban.clone());
        if self.bans.len() > BANS_PER_PROXY {
            if let Some(first) = self.bans.iter().enumerate().min_by_key(|(_, b)| b.until_ms).map(|(i, _)| i) {
                self.bans.remove(first);
            }
        }
    }

    /// Whether `consumer` (as a report names it: an IP, a service id) holds a lease on this proxy, or held one whose
    /// last grant or renewal is after `since_ms`. A forward-door holder `<name>@<ip>` is matched by its IP.
    pub fn held_by(&self, consumer: &str, since_ms: i64) -> bool {
        let matches =
            |holder: &str| holder == consumer || holder.rsplit_once('@').is_some_and(|(_, ip)| ip == consumer);
        self.leases.iter().any(|l| matches(&l.consumer))
            || self.recent.iter().any(|(c, at)| *at >= since_ms && matches(c))
    }

    /// The share of `ok` among the proxy's latest judgements, none before the first.
    pub fn success_rate(&self) -> Option<f64> {
        let (bits, n) = self.recent_outcomes;
        (n > 0).then(|| {
            let mask = if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
            f64::from((bits & mask).count_ones()) / f64::from(n)
        })
    }

    /// Records a judgement of the proxy: `Some(true)` ok, `Some(false)` a failure of the proxy, `None` nothing.
    fn judged(&mut self, ok: Option<bool>) {
        if let Some(ok) = ok {
            let (bits, n) = self.recent_outcomes;
            self.recent_outcomes = ((bits << 1) | u32::from(ok), (n + 1).min(proxypool_store::model::RECENT_OUTCOMES));
        }
    }

    /// `healthy`, `quarantined` or `duplicate_ip`.
    pub fn health_state(&self) -> &'static str {
        if self.quarantined {
            "quarantined"
        } else if self.duplicate_of.is_some() {
            "duplicate_ip"
        } else {
            "healthy"
        }
    }

    /// The verified public IP, if known.
    fn public_ip(&self) -> Option<&str> {
        self.catalog.ip_public.as_deref().filter(|ip| !ip.is_empty())
    }

    /// Leases held.
    pub fn in_use(&self) -> u32 {
        u32::try_from(self.leases.len()).unwrap_or(u32::MAX)
    }

    /// The candidate-index entry, without its bans ([`State`] adds those of its exit IP).
    pub fn entry(&self) -> Entry {
        Entry {
            area: self.catalog.area,
            is_active: self.catalog.active
                && !self.catalog.ip.is_empty()
                && !self.quarantined
                && self.duplicate_of.is_none(),
            is_rotating: self.lock.is_some(),
            in_use: self.in_use(),
            used_count: self.used_count,
            last_used_ms: self.last_used_ms,
            next_rotate_ms: self.catalog.next_rotate_ms,
            expired_at_ms: self.catalog.expired_at_ms,
            package: self.catalog.package,
            region: self.catalog.region.clone(),
            // Bans follow the exit IP, whichever proxy they were reported through: the state fills them in.
            bans: Vec::new(),
        }
    }

    /// The `$set` of the projection: SPEC's lease fields, the lock, and the sequence they reflect.
    pub fn projection(&self, seq: u64) -> Document {
        let ms = DateTime::from_millis;
        let proxy_used: Vec<Document> = self
            .leases
            .iter()
            .map(|l| {
                let mut d = doc! { "ip": &l.consumer, "key": &l.key, "time": ms(l.at_ms) };
                if let Some(url) = &l.callback_url {
                    d.insert("callback_url", url);
                }
                if let Some(door) = l.door {
                    d.insert("door", door.as_str());
                }
                if let Some(session) = &l.session {
                    d.insert("session", session);
                }
                if let Some(request) = &l.request {
                    d.insert("request", request);
                }
                if let Some(at) = l.renewed_ms {
                    d.insert("renewed_at", ms(at));
                }
                d
            })
            .collect();
        let mut set = doc! {
            "in_use": i32::try_from(self.leases.len()).unwrap_or(i32::MAX),
            "used_count": i32::try_from(self.used_count).unwrap_or(i32::MAX),
            "proxy_used": proxy_used,
            "last_used_at": self.last_used_ms.map(ms),
            "webhook_url": self.webhook_url.as_deref(),
            "is_rotating": self.lock.is_some(),
            "rotating_since": self.lock.as_ref().map(|l| ms(l.since_ms)),
            "upstream_failures": i64::from(self.upstream_failures),
            "last_upstream_failure": self.last_failure.map(|(kind, at)| doc! { "kind": kind.as_str(), "at": ms(at) }),
            "lease_rev": i64::try_from(seq).unwrap_or(i64::MAX),
            "health.bans": self
                .bans
                .iter()
                .map(|b| doc! {
                    "ip": &b.ip,
                    "domain": &b.domain,
                    "until": ms(b.until_ms),
                    "count": i64::from(b.count),
                    "reason": b.reason.as_str(),
                })
                .collect::<Vec<Document>>(),
            "health.state": self.health_state(),
            "health.duplicate_of": self.duplicate_of.map(|id| id.to_hex()),
            "health.fails": i64::from(self.fails),
            "health.recent": i64::from(self.recent_outcomes.0),
            "health.recent_count": i64::from(self.recent_outcomes.1),
            "health.success_rate": self.success_rate(),
            "health.rotate_asked_at": self.rotate_asked_ms.map(ms),
        };
        // The job stays on the document after the unlock: it names the rotation that last held the proxy.
        if let Some(l) = &self.lock {
            set.insert("rotation_job", l.job.as_str());
            set.insert("rotation_deadline", ms(l.deadline()));
        } else if let Some(job) = &self.last_job {
            set.insert("rotation_job", job.as_str());
        }
        set
    }

    fn notices(&self, id: ObjectId, leases: &[Lease], reason: TakenReason) -> Vec<CallbackNotice> {
        let at = chrono::Utc::now();
        leases
            .iter()
            .map(|l| CallbackNotice {
                id: CallbackNotice::id_of(&id.to_hex(), &l.key, reason),
                callback_url: l.callback_url.clone().unwrap_or_default(),
                proxy_id: id.to_hex(),
                key: l.key.clone(),
                reason,
                at,
            })
            .collect()
    }
}

/// One change to lease state, as logged. Proxy ids are hex strings so the log reads well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A lease granted.
    Grant {
        /// Proxy.
        proxy: ObjectId,
        /// The lease record.
        lease: Lease,
        /// Its return URL.
        webhook_url: String,
    },
    /// A lease returned (`uncount`: also give back the use it counted, for a grant withdrawn past its deadline).
    Release {
        /// Proxy.
        proxy: ObjectId,
        /// Lease key.
        key: String,
        /// Give back the use.
        uncount: bool,
        /// Why it ended, when it was taken rather than returned (its holder is called back).
        #[serde(default)]
        taken: Option<TakenReason>,
        /// How the upstream failed the forward door, when that is why it was returned.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<Failure>,
        /// The ban its holder's `blocked`/`captcha` earned the proxy's exit IP for a site.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ban: Option<Ban>,
        /// What its holder reported (`ok` resets the failures in a row, `proxy_error` and `timeout` add one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<Outcome>,
        /// The failures reached `HEALTH_FAIL_THRESHOLD`: the proxy leaves the pool until a rotation succeeds.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quarantine: bool,
        /// Its holder asked for a new IP at this time (a rotation is queued).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotate_asked_ms: Option<i64>,
    },
    /// A lease renewed by its holder: `LEASE_TTL` counts from `at_ms`.
    Renew {
        /// Proxy.
        proxy: ObjectId,
        /// Lease key.
        key: String,
        /// When renewed, epoch ms (engine clock).
        at_ms: i64,
    },
    /// A rotation lock taken, restarted or renewed.
    Lock {
        /// Proxy.
        proxy: ObjectId,
        /// The lock.
        lock: Lock,
    },
    /// A rotation lock released; with `reset`, after a successful rotation: every lease dropped and the cycle reset.
    Unlock {
        /// Proxy.
        proxy: ObjectId,
        /// Reset the leases and the cycle.
        reset: bool,
        /// The catalogue as the rotation left it.
        catalog: Option<Catalog>,
    },
    /// The catalogue view replaced (created, edited, imported); with `clear`, every lease dropped (disabled).
    Upsert {
        /// Proxy.
        proxy: ObjectId,
        /// Catalogue.
        catalog: Catalog,
        /// Drop the leases.
        clear: bool,
    },
    /// A proxy deleted.
    Remove {
        /// Proxy.
        proxy: ObjectId,
    },
    /// An admin lifted the ban of (ip, domain) reported through this proxy.
    Unban {
        /// The proxy the ban was reported through.
        proxy: ObjectId,
        /// Exit IP.
        ip: String,
        /// Site.
        domain: String,
    },
    /// An admin lifted the proxy's quarantine: back in the pool, its failure count at zero.
    Heal {
        /// Proxy.
        proxy: ObjectId,
    },
    /// A holder (or a recent one) reported how the proxy did, without returning it: like a release's `ban`,
    /// `outcome` and `quarantine`.
    Report {
        /// Proxy.
        proxy: ObjectId,
        /// The ban its `blocked`/`captcha` earned the exit IP for a site.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ban: Option<Ban>,
        /// What was reported.
        outcome: Outcome,
        /// The failures reached `HEALTH_FAIL_THRESHOLD`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quarantine: bool,
    },
    /// A rotation left the proxy exiting on another active proxy's public IP (`of`), or on one of its own (`None`).
    Duplicate {
        /// Proxy.
        proxy: ObjectId,
        /// The other proxy.
        of: Option<ObjectId>,
    },
}

impl Op {
    /// The proxy the operation changes.
    pub fn proxy(&self) -> ObjectId {
        match self {
            Op::Grant { proxy, .. }
            | Op::Release { proxy, .. }
            | Op::Renew { proxy, .. }
            | Op::Lock { proxy, .. }
            | Op::Unlock { proxy, .. }
            | Op::Upsert { proxy, .. }
            | Op::Unban { proxy, .. }
            | Op::Heal { proxy }
            | Op::Duplicate { proxy, .. }
            | Op::Report { proxy, .. }
            | Op::Remove { proxy } => *proxy,
        }
    }
}

/// The state of every proxy, with its index, expiry order, lock deadlines and recent request ids.
#[derive(Debug)]
pub struct State {
    max: u32,
    proxies: HashMap<ObjectId, ProxyState>,
    index: PoolIndex,
    /// Leases by grant or renewal time: (base ms, proxy, key).
    expiry: BTreeSet<(i64, ObjectId, String)>,
    /// Rotation locks by deadline: (deadline ms, proxy).
    locks: BTreeSet<(i64, ObjectId)>,
    /// Request ids granted recently: id → (proxy, key, granted ms).
    requests: HashMap<String, (ObjectId, String, i64)>,
    /// The same ids by grant time, to forget them after the window.
    request_order: BTreeSet<(i64, String)>,
    /// The outbox: callback notices (and taken-lease broadcasts) of logged batches not yet marked sent, by id.
    outbox: std::collections::BTreeMap<String, CallbackNotice>,
    /// Every proxy's bans, by exit IP and site.
    bans: BanIndex,
    /// Proxies by verified public IP.
    exits: HashMap<String, std::collections::BTreeSet<ObjectId>>,
}

impl State {
    /// An empty state for `PROXY_USE_MAX = max`.
    pub fn new(max: u32) -> Self {
        Self {
            max,
            proxies: HashMap::new(),
            index: PoolIndex::new(max),
            expiry: BTreeSet::new(),
            locks: BTreeSet::new(),
            requests: HashMap::new(),
            request_order: BTreeSet::new(),
            outbox: std::collections::BTreeMap::new(),
            bans: BanIndex::default(),
            exits: HashMap::new(),
        }
    }

    /// `PROXY_USE_MAX`.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The state of a proxy.
    pub fn get(&self, id: &ObjectId) -> Option<&ProxyState> {
        self.proxies.get(id)
    }

    /// Every proxy.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectId, &ProxyState)> {
        self.proxies.iter()
    }

    /// Number of proxies.
    pub fn len(&self) -> usize {
        self.proxies.len()
    }

    /// Whether there are no proxies.
    pub fn is_empty(&self) -> bool {
        self.proxies.is_empty()
    }

    /// Replaces (or with `None` removes) a proxy's state, keeping the index and the expiry order in step. Also how
    /// the engine restores the states a failed append had changed.
    pub fn put(&mut self, id: ObjectId, state: Option<ProxyState>) {
        // The exit IPs whose bans this change adds or drops: every other proxy exiting on them is re-linked, since
        // a ban follows the IP whichever proxy it was reported through.
        let mut ban_ips: Vec<String> = Vec::new();
        {
            let old = self.proxies.get(&id).map(|p| &p.bans);
            let new = state.as_ref().map(|p| &p.bans);
            if old != new {
                for b in old.into_iter().chain(new).flatten() {
                    if !ban_ips.contains(&b.ip) {
                        ban_ips.push(b.ip.clone());
                    }
                }
            }
        }
        // Most changes (every grant and return) keep the exit IP: the by-IP index is then left as it is.
        let same_exit = self.proxies.get(&id).map(ProxyState::exit_ip) == state.as_ref().map(ProxyState::exit_ip);
        if let Some(old) = self.proxies.remove(&id) {
            for l in &old.leases {
                self.expiry.remove(&(l.base_ms(), id, l.key.clone()));
            }
            if let Some(lock) = &old.lock {
                self.locks.remove(&(lock.deadline(), id));
            }
            self.bans.remove(id, &old.bans);
            if !same_exit {
                if let Some(set) = self.exits.get_mut(old.exit_ip()) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.exits.remove(old.exit_ip());
                    }
                }
            }
            self.index.remove(id);
        }
        if let Some(new) = state {
            for l in &new.leases {
                self.expiry.insert((l.base_ms(), id, l.key.clone()));
                // A lease loaded or restored with its request id answers a repeat of that request.
                if let Some(r) = &l.request {
                    self.remember(r, id, &l.key, l.at_ms);
                }
            }
            if let Some(lock) = &new.lock {
                self.locks.insert((lock.deadline(), id));
            }
            self.bans.add(id, &new.bans);
            if !same_exit {
                self.exits.entry(new.exit_ip().to_owned()).or_default().insert(id);
            }
            let mut entry = new.entry();
            entry.bans = self.bans.on_ip(new.exit_ip());
            self.index.set(id, entry);
            self.proxies.insert(id, new);
        }
        for ip in ban_ips {
            for other in self.exiting_on(&ip) {
                if other != id {
                    self.relink(other);
                }
            }
        }
    }

    /// Re-links a proxy's index entry (its bans changed through another proxy).
    fn relink(&mut self, id: ObjectId) {
        if let Some(p) = self.proxies.get(&id) {
            let mut entry = p.entry();
            entry.bans = self.bans.on_ip(p.exit_ip());
            self.index.set(id, entry);
        }
    }

    /// The best candidate for a lease in `area` at `now_ms`; with `domain`, none whose exit IP is banned for it.
    pub fn candidate(
        &mut self,
        area: Area,
        now_ms: i64,
        filter: crate::index::Filter<'_>,
        domain: Option<&str>,
    ) -> Option<ObjectId> {
        self.index.pick_for(area, now_ms, filter, domain)
    }

    /// Whether any proxy in `area` has the region label `region`.
    pub fn has_region(&self, area: Area, region: &str) -> bool {
        self.index.has_region(area, region)
    }

    /// Another active proxy than `id` whose verified public IP is `ip` (and is not itself marked a duplicate): the
    /// proxy `id` would share its exit with.
    pub fn exit_taken(&self, ip: &str, id: ObjectId) -> Option<ObjectId> {
        self.exits.get(ip)?.iter().copied().find(|other| {
            *other != id
                && self
                    .proxies
                    .get(other)
                    .is_some_and(|p| p.catalog.active && p.duplicate_of.is_none() && p.public_ip() == Some(ip))
        })
    }

    /// Every proxy exiting on `ip` now (its verified public IP, or its address while none is known).
    pub fn exiting_on(&self, ip: &str) -> Vec<ObjectId> {
        self.exits.get(ip).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Proxies by health state: (healthy, quarantined, duplicate_ip).
    pub fn health_counts(&self) -> (usize, usize, usize) {
        let (mut q, mut d) = (0, 0);
        for p in self.proxies.values() {
            match p.health_state() {
                "quarantined" => q += 1,
                "duplicate_ip" => d += 1,
                _ => {}
            }
        }
        (self.proxies.len() - q - d, q, d)
    }

    /// Every ban, by exit IP and site.
    pub fn bans(&self) -> &BanIndex {
        &self.bans
    }

    /// Rotation locks whose deadline is before `now_ms`, at most `limit`: (proxy, job).
    pub fn expired_locks(&self, now_ms: i64, limit: usize) -> Vec<(ObjectId, String)> {
        self.locks
            .iter()
            .take_while(|(deadline, _)| *deadline < now_ms)
            .take(limit)
            .filter_map(|(_, id)| Some((*id, self.proxies.get(id)?.lock.as_ref()?.job.clone())))
            .collect()
    }

    fn remember(&mut self, request: &str, proxy: ObjectId, key: &str, at_ms: i64) {
        if let Some((_, _, old)) = self.requests.insert(request.to_owned(), (proxy, key.to_owned(), at_ms)) {
            self.request_order.remove(&(old, request.to_owned()));
        }
        self.request_order.insert((at_ms, request.to_owned()));
    }

    /// The lease still held for request id `request`, if one was granted within the window: (proxy, key).
    pub fn recall(&self, request: &str) -> Option<(ObjectId, String)> {
        let (proxy, key, _) = self.requests.get(request)?;
        let held = self.proxies.get(proxy)?.leases.iter().any(|l| &l.key == key);
        held.then(|| (*proxy, key.clone()))
    }

    /// Forgets request ids granted before `cutoff_ms`. Run with each batch's own time, on the leader and on every
    /// follower alike.
    pub fn forget_requests_before(&mut self, cutoff_ms: i64) {
        while let Some((at, id)) = self.request_order.first().cloned() {
            if at >= cutoff_ms {
                break;
            }
            self.request_order.remove(&(at, id.clone()));
            self.requests.remove(&id);
        }
    }

    /// Puts the notices of a logged batch in the outbox (a repeat of one already there changes nothing).
    pub fn post(&mut self, notices: impl IntoIterator<Item = CallbackNotice>) {
        for n in notices {
            self.outbox.entry(n.id.clone()).or_insert(n);
        }
    }

    /// Takes out of the outbox the notices a logged batch marked sent.
    pub fn mark_sent(&mut self, ids: &[String]) {
        for id in ids {
            self.outbox.remove(id);
        }
    }

    /// The notices not yet marked sent.
    pub fn pending_notices(&self) -> Vec<CallbackNotice> {
        self.outbox.values().cloned().collect()
    }

    /// Leases whose `LEASE_TTL` counts from before `cutoff_ms`, oldest first, at most `limit`.
    pub fn expired_leases(&self, cutoff_ms: i64, limit: usize) -> Vec<(ObjectId, String)> {
        self.expiry
            .iter()
            .take_while(|(at, _, _)| *at < cutoff_ms)
            .take(limit)
            .map(|(_, id, k)| (*id, k.clone()))
            .collect()
    }

    /// Applies one operation and returns the callback notices for the holders whose leases it took. An operation
    /// that no longer fits the state (a release of a lease already gone) changes nothing.
    pub fn apply(&mut self, op: &Op) -> Vec<CallbackNotice> {
        let id = op.proxy();
        let Some(mut p) = self.proxies.get(&id).cloned() else {
            if let Op::Upsert { catalog, .. } = op {
                self.put(id, Some(ProxyState::new(catalog.clone())));
            }
            return Vec::new();
        };
        let mut notices = Vec::new();
        match op {
            Op::Grant { lease, webhook_url, .. } => {
                if let Some(r) = &lease.request {
                    self.remember(r, id, &lease.key, lease.at_ms);
                }
                p.used_count += 1;
                p.last_used_ms = Some(lease.at_ms);
                p.webhook_url = Some(webhook_url.clone());
                p.leases.push(lease.clone());
            }
            Op::Release { key, uncount, taken, failure, ban, outcome, quarantine, rotate_asked_ms, .. } => {
                let Some(at) = p.leases.iter().position(|l| &l.key == key) else { return Vec::new() };
                let gone = p.leases.remove(at);
                p.fails = fails_after(p.fails, failure.is_some(), *outcome);
                p.judged(judgement(failure.is_some(), *outcome));
                p.quarantined |= *quarantine;
                if rotate_asked_ms.is_some() {
                    p.rotate_asked_ms = *rotate_asked_ms;
                }
                if let Some(ban) = ban {
                    p.add_ban(ban);
                }
                p.recent.retain(|(c, _)| *c != gone.consumer);
                p.recent.push((gone.consumer.clone(), gone.base_ms()));
                if p.recent.len() > RECENT_HOLDERS {
                    p.recent.remove(0);
                }
                if let Some(f) = failure {
                    p.upstream_failures = p.upstream_failures.saturating_add(1);
                    p.last_failure = Some((f.kind, f.at_ms));
                }
                if *uncount {
                    p.used_count = p.used_count.saturating_sub(1);
                }
                if let Some(reason) = taken {
                    notices = p.notices(id, std::slice::from_ref(&gone), *reason);
                }
            }
            Op::Renew { key, at_ms, .. } => {
                let Some(l) = p.leases.iter_mut().find(|l| &l.key == key) else { return Vec::new() };
                l.renewed_ms = Some(*at_ms);
            }
            Op::Lock { lock, .. } => p.lock = Some(lock.clone()),
            Op::Unlock { reset, catalog, .. } => {
                if let Some(l) = p.lock.take() {
                    p.last_job = Some(l.job);
                }
                if let Some(c) = catalog {
                    p.catalog = c.clone();
                }
                if *reset {
                    let gone = std::mem::take(&mut p.leases);
                    notices = p.notices(id, &gone, TakenReason::Rotated);
                    p.used_count = 0;
                    // A new address: its health starts over, and the rotation (checked through the proxy) is the
                    // judge that ends a quarantine.
                    p.upstream_failures = 0;
                    p.fails = 0;
                    p.quarantined = false;
                }
            }
            Op::Upsert { catalog, clear, .. } => {
                p.catalog = catalog.clone();
                if *clear {
                    let gone = std::mem::take(&mut p.leases);
                    notices = p.notices(id, &gone, TakenReason::ProxyDisabled);
                }
            }
            Op::Unban { ip, domain, .. } => p.bans.retain(|b| &b.ip != ip || &b.domain != domain),
            Op::Heal { .. } => {
                p.quarantined = false;
                p.fails = 0;
            }
            Op::Duplicate { of, .. } => p.duplicate_of = *of,
            Op::Report { ban, outcome, quarantine, .. } => {
                p.fails = fails_after(p.fails, false, Some(*outcome));
                p.judged(judgement(false, Some(*outcome)));
                p.quarantined |= *quarantine;
                if let Some(ban) = ban {
                    p.add_ban(ban);
                }
            }
            Op::Remove { .. } => {
                let gone = std::mem::take(&mut p.leases);
                let notices = p.notices(id, &gone, TakenReason::ProxyDeleted);
                self.put(id, None);
                return notices;
            }
        }
        self.put(id, Some(p));
        notices
    }

    /// Records that `id` reflects the log up to `seq`.
    pub fn stamp(&mut self, id: &ObjectId, seq: u64) {
        if let Some(p) = self.proxies.get_mut(id) {
            p.seq = seq;
        }
    }

    /// Counts per area for metrics: (known, leasable, leases held, rotating).
    pub fn counts(&self, area: Area) -> (usize, usize, u64, usize) {
        self.index.counts(area)
    }

    /// Leasable/total counts per area.
    pub fn stats(&self, area: Area) -> crate::index::AreaStats {
        self.index.stats(area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Filter;

    fn catalog() -> Catalog {
        Catalog {
            area: Area::Vn,
            active: true,
            ip: "10.0.0.1".into(),
            port: 8080,
            username: "u".into(),
            password: "p".into(),
            auth_token: None,
            ip_public: None,
            region: String::new(),
            expired_at_ms: None,
            next_rotate_ms: Some(i64::MAX / 2),
            updated_ms: 0,
            package: None,
        }
    }

    /// A plain return of `key` (`uncount`: as a withdrawal).
    fn returned(proxy: ObjectId, key: &str, uncount: bool) -> Op {
        Op::Release {
            proxy,
            key: key.into(),
            uncount,
            taken: None,
            failure: None,
            ban: None,
            outcome: None,
            quarantine: false,
            rotate_asked_ms: None,
        }
    }

    fn grant(proxy: ObjectId, key: &str, at_ms: i64) -> Op {
        let lease = Lease {
            key: key.into(),
            consumer: "c".into(),
            at_ms,
            callback_url: Some("http://cb".into()),
            door: None,
            session: None,
            request: Some(format!("r-{key}")),
            renewed_ms: None,
        };
        Op::Grant { proxy, lease, webhook_url: "http://w".into() }
    }

    #[test]
    fn failures_in_a_row_count_up_and_an_ok_starts_over() {
        assert_eq!(fails_after(2, false, Some(Outcome::ProxyError)), 3);
        assert_eq!(fails_after(2, false, Some(Outcome::Timeout)), 3);
        assert_eq!(fails_after(2, true, None), 3, "the door's upstream failure counts");
        assert_eq!(fails_after(2, false, Some(Outcome::Ok)), 0);
        assert_eq!(fails_after(2, false, Some(Outcome::Blocked)), 2, "a ban is about the site, not the proxy");
        assert_eq!(fails_after(2, false, None), 2);
    }

    #[test]
    fn ops_keep_index_and_expiry_in_step() {
        let mut s = State::new(2);
        let id = ObjectId::new();
        s.apply(&Op::Upsert { proxy: id, catalog: catalog(), clear: false });
        assert_eq!(s.candidate(Area::Vn, 1, Filter::default(), None), Some(id));
        s.apply(&grant(id, "a", 10));
        s.apply(&grant(id, "b", 20));
        assert_eq!(s.candidate(Area::Vn, 30, Filter::default(), None), None, "full at PROXY_USE_MAX");
        assert_eq!(s.expired_leases(15, 10), vec![(id, "a".to_owned())]);
        let notices = s.apply(&returned(id, "a", false));
        assert!(notices.is_empty());
        // Returning the same key again changes nothing.
        let before = s.get(&id).cloned();
        s.apply(&returned(id, "a", false));
        assert_eq!(s.get(&id).cloned(), before);
        // used_count still 2: no more leases in this cycle.
        assert_eq!(s.candidate(Area::Vn, 30, Filter::default(), None), None);
        s.apply(&Op::Lock { proxy: id, lock: Lock { job: "j".into(), since_ms: 40, deadline_ms: 100 } });
        assert!(s.expired_locks(100, 10).is_empty());
        assert_eq!(s.expired_locks(101, 10), vec![(id, "j".to_owned())]);
        let notices = s.apply(&Op::Unlock { proxy: id, reset: true, catalog: None });
        assert_eq!(notices.len(), 1, "the holder of b is called back");
        assert_eq!(s.candidate(Area::Vn, 50, Filter::default(), None), Some(id));
        assert!(s.expired_leases(i64::MAX, 10).is_empty());
        assert!(s.expired_locks(i64::MAX, 10).is_empty(), "the unlock drops the deadline");
    }

    #[test]
    fn renewal_moves_the_expiry_and_request_ids_recall_held_leases_only() {
        let mut s = State::new(3);
        let id = ObjectId::new();
        s.apply(&Op::Upsert { proxy: id, catalog: catalog(), clear: false });
        s.apply(&grant(id, "a", 10));
        assert_eq!(s.recall("r-a"), Some((id, "a".to_owned())));
        s.apply(&Op::Renew { proxy: id, key: "a".into(), at_ms: 50 });
        assert!(s.expired_leases(40, 10).is_empty(), "renewed at 50");
        assert_eq!(s.expired_leases(51, 10), vec![(id, "a".to_owned())]);
        s.apply(&returned(id, "a", true));
        assert_eq!(s.recall("r-a"), None, "a withdrawn grant is not handed out again");
        s.apply(&grant(id, "b", 20));
        s.forget_requests_before(21);
        assert_eq!(s.recall("r-b"), None, "forgotten after the window");
    }

    #[test]
    fn disable_clears_and_delete_forgets() {
        let mut s = State::new(3);
        let id = ObjectId::new();
        s.apply(&Op::Upsert { proxy: id, catalog: catalog(), clear: false });
        s.apply(&grant(id, "a", 10));
        let off = Catalog { active: false, ..catalog() };
        let notices = s.apply(&Op::Upsert { proxy: id, catalog: off, clear: true });
        assert_eq!(notices[0].reason, TakenReason::ProxyDisabled);
        assert_eq!(s.get(&id).map(ProxyState::in_use), Some(0));
        assert_eq!(s.candidate(Area::Vn, 20, Filter::default(), None), None);
        s.apply(&Op::Remove { proxy: id });
        assert!(s.get(&id).is_none());
        assert!(s.expired_leases(i64::MAX, 10).is_empty());
    }

    #[test]
    fn a_ban_reported_through_one_proxy_applies_to_every_proxy_on_that_exit_ip_until_it_ends() {
        let mut s = State::new(10);
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        let on = |ip: &str| Catalog { ip_public: Some(ip.into()), ..catalog() };
        s.apply(&Op::Upsert { proxy: a, catalog: on("198.51.100.1"), clear: false });
        s.apply(&Op::Upsert { proxy: b, catalog: on("198.51.100.1"), clear: false });
        s.apply(&Op::Upsert { proxy: c, catalog: on("198.51.100.2"), clear: false });
        let ban = Ban {
            ip: "198.51.100.1".into(),
            domain: "shop.example".into(),
            until_ms: 1_000,
            count: 1,
            reason: Outcome::Blocked,
        };
        s.apply(&Op::Report { proxy: a, ban: Some(ban), outcome: Outcome::Blocked, quarantine: false });
        let pick = |s: &mut State, now: i64, domain: &str, exclude: &[ObjectId]| {
            s.candidate(Area::Vn, now, Filter { exclude, ..Filter::default() }, Some(domain))
        };
        assert_eq!(pick(&mut s, 500, "shop.example", &[]), Some(c), "a and b exit on the banned IP");
        assert_eq!(pick(&mut s, 500, "shop.example", &[c]), None);
        assert!(pick(&mut s, 500, "news.example", &[c]).is_some(), "another site is not affected");
        assert!(pick(&mut s, 1_000, "shop.example", &[c]).is_some(), "the ban has ended");
        // A proxy that moves onto the banned IP carries the ban; an admin's unban lifts it for both.
        s.apply(&Op::Upsert { proxy: c, catalog: on("198.51.100.1"), clear: false });
        assert_eq!(pick(&mut s, 500, "shop.example", &[]), None);
        s.apply(&Op::Unban { proxy: a, ip: "198.51.100.1".into(), domain: "shop.example".into() });
        assert!(pick(&mut s, 500, "shop.example", &[]).is_some());
    }

    #[test]
    fn the_success_rate_counts_the_proxys_own_judgements_only() {
        let mut p = ProxyState::new(catalog());
        assert_eq!(p.success_rate(), None);
        for o in [Outcome::Ok, Outcome::Ok, Outcome::Blocked, Outcome::ProxyError] {
            p.judged(judgement(false, Some(o)));
        }
        p.judged(judgement(true, None));
        p.judged(judgement(false, None));
        assert_eq!(p.success_rate(), Some(0.5), "2 ok, 2 failures; a site's refusal and no report do not count");
        for _ in 0..40 {
            p.judged(Some(true));
        }
        assert_eq!((p.success_rate(), p.recent_outcomes.1), (Some(1.0), 32), "over the last 32 only");
    }
}
