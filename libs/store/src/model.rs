//! Document types of the four collections, with the original's field names and defaults (docs/design.md#collections).
//!
//! Every field the original gives a default is `#[serde(default)]`, so documents written by the original system (or
//! by hand) load even when they lack a field. `createdAt`/`updatedAt` are set by the writer on every insert/update.

use bson::oid::ObjectId;
use bson::DateTime;
use proxypool_contracts::Area;
use serde::{Deserialize, Serialize};

/// Collection names.
pub mod collections {
    /// `proxies`.
    pub const PROXIES: &str = "proxies";
    /// `proxy_packages`.
    pub const PROXY_PACKAGES: &str = "proxy_packages";
    /// `proxy_providers`.
    pub const PROXY_PROVIDERS: &str = "proxy_providers";
    /// `users`.
    pub const USERS: &str = "users";
    /// `import_jobs` (our addition): one document per import, with its counts and row errors.
    pub const IMPORT_JOBS: &str = "import_jobs";
}

/// The original design's default rotation interval in seconds.
pub const DEFAULT_ROTATE_TIME_SECS: i64 = 60;

/// `proxies.status`: 0 = PENDING, 1 = PROCESSING, 2 = COMPLETED.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "i32", into = "i32")]
pub enum ProxyStatus {
    /// Never rotated, or waiting.
    #[default]
    Pending,
    /// A rotation is running.
    Processing,
    /// The last rotation completed.
    Completed,
}

impl From<i32> for ProxyStatus {
    fn from(v: i32) -> Self {
        match v {
            1 => ProxyStatus::Processing,
            2 => ProxyStatus::Completed,
            _ => ProxyStatus::Pending,
        }
    }
}

impl From<ProxyStatus> for i32 {
    fn from(s: ProxyStatus) -> i32 {
        match s {
            ProxyStatus::Pending => 0,
            ProxyStatus::Processing => 1,
            ProxyStatus::Completed => 2,
        }
    }
}

/// One active lease on a proxy (`proxy_used[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyUsed {
    /// The consumer holding the lease (its IP or id).
    pub ip: String,
    /// The lease key (ObjectId hex); required to return the lease.
    pub key: String,
    /// When the lease was granted.
    pub time: DateTime,
    /// Where to notify the consumer if the lease is taken (our addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The forward door holding the lease (`http`, `socks5`), when a door holds it (our addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
    /// The door's sticky session id, when the lease belongs to one (our addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The request id the lease was granted for (a repeated request gets this lease back). Our addition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// When the holder last renewed the lease (`LEASE_TTL` counts from here, else from `time`). Our addition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<DateTime>,
}

/// The last time the forward door found a proxy failing (our addition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamFailureRecord {
    /// `refused`, `auth`, `timeout`, `reset` or `bad_answer`.
    pub kind: String,
    /// When.
    pub at: DateTime,
}

/// What the pool learned about a proxy from its consumers (our addition; projected by the lease service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthDoc {
    /// Per-site bans on exit IPs reported through this proxy (a ban is about the IP: it applies to whichever proxy
    /// exits on it), including expired ones kept to double the next ban of the same pair.
    #[serde(default)]
    pub bans: Vec<BanDoc>,
    /// `healthy`, `quarantined` (out of the pool until a rotation, checked through the proxy, succeeds) or
    /// `duplicate_ip` (its last rotation gave it another active proxy's public IP: out of the pool until the next).
    #[serde(default = "default_health_state")]
    pub state: String,
    /// Failures in a row reported by holders (`proxy_error`, `timeout`) or met by the forward door.
    #[serde(default)]
    pub fails: i64,
    /// The last [`RECENT_OUTCOMES`] judgements of the proxy itself, newest in the lowest bit (1: `ok`, 0: a
    /// `proxy_error`, a `timeout` or a door's upstream failure), and how many of the bits are used.
    #[serde(default)]
    pub recent: i64,
    /// How many bits of `recent` are used (0 to [`RECENT_OUTCOMES`]).
    #[serde(default)]
    pub recent_count: i64,
    /// The share of `ok` among them (none before the first).
    #[serde(default)]
    pub success_rate: Option<f64>,
    /// When a holder last asked for a new IP (`POST /webhook/rotate-proxy/{id}`).
    #[serde(default)]
    pub rotate_asked_at: Option<DateTime>,
    /// With state `duplicate_ip`: the other active proxy whose public IP its last rotation gave it.
    #[serde(default)]
    pub duplicate_of: Option<String>,
}

/// How many of a proxy's latest outcomes its success rate is over.
pub const RECENT_OUTCOMES: u32 = 32;

fn default_health_state() -> String {
    "healthy".to_owned()
}

impl Default for HealthDoc {
    fn default() -> Self {
        Self {
            bans: Vec::new(),
            state: default_health_state(),
            fails: 0,
            recent: 0,
            recent_count: 0,
            success_rate: None,
            rotate_asked_at: None,
            duplicate_of: None,
        }
    }
}

/// A site refused an exit IP: that (IP, domain) pair is not leased for the domain until `until`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanDoc {
    /// The exit IP the site saw.
    pub ip: String,
    /// The site (normalised host name).
    pub domain: String,
    /// When the ban ends.
    pub until: DateTime,
    /// How many times in a row this pair was banned (each ban lasts twice the one before, up to `BAN_MAX`).
    pub count: i64,
    /// `blocked` or `captcha`.
    pub reason: String,
}

fn default_true() -> bool {
    true
}

fn default_rotate_time() -> i64 {
    DEFAULT_ROTATE_TIME_SECS
}

/// A document of `proxies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyDoc {
    /// `_id`.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// Current IP or hostname of the proxy server.
    pub ip: String,
    /// Proxy port.
    pub port: i32,
    /// Proxy auth username.
    #[serde(default)]
    pub username: String,
    /// Proxy auth password.
    #[serde(default)]
    pub password: String,
    /// `vn` or `global`.
    pub area: Area,
    /// URL that rotates the proxy's IP.
    pub rotate_url: String,
    /// Seconds between rotations.
    #[serde(default = "default_rotate_time")]
    pub rotate_time: i64,
    /// Bearer token for `rotate_url`.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// Public IP seen through the proxy at the last check.
    #[serde(default)]
    pub ip_public: Option<String>,
    /// Eligible for leases.
    #[serde(default = "default_true")]
    pub is_active: bool,
    /// The last rotation or check failed.
    #[serde(default)]
    pub is_error: bool,
    /// A rotation holds this proxy.
    #[serde(default)]
    pub is_rotating: bool,
    /// Skip the rotate call; verify the IP only.
    #[serde(default)]
    pub disable_auto_rotate: bool,
    /// When the proxy is next due for rotation.
    #[serde(default)]
    pub next_rotate: Option<DateTime>,
    /// When the proxy was last leased.
    #[serde(default)]
    pub last_used_at: Option<DateTime>,
    /// Provider subscription expiry.
    #[serde(default)]
    pub expired_at: Option<DateTime>,
    /// Active leases (lease service only).
    #[serde(default)]
    pub in_use: i32,
    /// Leases granted in this rotation cycle (lease service only).
    #[serde(default)]
    pub used_count: i32,
    /// Active lease records (lease service only).
    #[serde(default)]
    pub proxy_used: Vec<ProxyUsed>,
    /// Revision of the lease state, incremented by every lease-service write (our addition to the original schema).
    ///
    /// Lease replicas keep an in-memory index fed by events that can arrive out of order; the revision lets them
    /// keep the newest state instead of whichever arrived last.
    #[serde(default)]
    pub lease_rev: i64,
    /// When the current rotation claimed (or started) the proxy (`is_rotating`). Our addition.
    #[serde(default)]
    pub rotating_since: Option<DateTime>,
    /// Id of the rotation job that holds the lock (written by the lease service's projection). Our addition.
    #[serde(default)]
    pub rotation_job: Option<String>,
    /// When the lease service takes the rotation lock back unless its job renews it. Our addition.
    #[serde(default)]
    pub rotation_deadline: Option<DateTime>,
    /// Upstream failures the forward door met on this proxy since its last successful rotation (written by the
    /// lease service; the input of health scoring). Our addition.
    #[serde(default)]
    pub upstream_failures: i64,
    /// The latest of those failures. Our addition.
    #[serde(default)]
    pub last_upstream_failure: Option<UpstreamFailureRecord>,
    /// What consumers reported: bans on exit IPs per site. Our addition.
    #[serde(default)]
    pub health: HealthDoc,
    /// Return URL of the latest lease.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Failed outbound webhook attempts.
    #[serde(default)]
    pub call_webhook_count: i32,
    /// Rotation status.
    #[serde(default)]
    pub status: ProxyStatus,
    /// HTTP status of the last rotate call.
    #[serde(default)]
    pub status_code: Option<i32>,
    /// Body of the last rotate call (truncated, for debugging).
    #[serde(default)]
    pub response: Option<String>,
    /// Region label of the public IP.
    #[serde(default)]
    pub region: String,
    /// Denormalised package name.
    #[serde(default)]
    pub package_name: String,
    /// Parent package.
    pub proxy_package_id: ObjectId,
    /// Creator (`users._id`), or none for machine clients.
    #[serde(default)]
    pub created_by: Option<ObjectId>,
    /// Last updater.
    #[serde(default)]
    pub updated_by: Option<ObjectId>,
    /// Creation time.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime,
    /// Last update time.
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime,
}

/// What a writer supplies to create a proxy; everything else takes the original design's default.
#[derive(Debug, Clone)]
pub struct NewProxy {
    /// IP or hostname.
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
    /// Area.
    pub area: Area,
    /// Rotate URL.
    pub rotate_url: String,
    /// Seconds between rotations.
    pub rotate_time: i64,
    /// Bearer token for the rotate URL.
    pub auth_token: Option<String>,
    /// Enabled.
    pub is_active: bool,
    /// Skip the rotate call.
    pub disable_auto_rotate: bool,
    /// Subscription expiry.
    pub expired_at: Option<DateTime>,
    /// Parent package and its name.
    pub proxy_package_id: ObjectId,
    /// Denormalised package name.
    pub package_name: String,
    /// Creator.
    pub created_by: Option<ObjectId>,
}

impl ProxyDoc {
    /// Callback notices for every lease held on this proxy whose holder gave a `callback_url`, for when the
    /// leases are taken for `reason`.
    pub fn callback_notices(
        &self,
        reason: proxypool_contracts::callback::TakenReason,
    ) -> Vec<proxypool_contracts::callback::CallbackNotice> {
        let at = chrono::Utc::now();
        self.proxy_used
            .iter()
            .filter_map(|u| {
                Some(proxypool_contracts::callback::CallbackNotice {
                    id: proxypool_contracts::callback::CallbackNotice::id_of(&self.id.to_hex(), &u.key, reason),
                    callback_url: u.callback_url.clone()?,
                    proxy_id: self.id.to_hex(),
                    key: u.key.clone(),
                    reason,
                    at,
                })
            })
            .collect()
    }

    /// A new document with the original design's defaults: no leases, `next_rotate = now + rotate_time`.
    pub fn new(p: NewProxy) -> Self {
        let now = DateTime::now();
        let next = DateTime::from_millis(now.timestamp_millis() + p.rotate_time.saturating_mul(1000));
        Self {
            id: ObjectId::new(),
            ip: p.ip,
            port: i32::from(p.port),
            username: p.username,
            password: p.password,
            area: p.area,
            rotate_url: p.rotate_url,
            rotate_time: p.rotate_time,
            auth_token: p.auth_token,
            ip_public: None,
            is_active: p.is_active,
            is_error: false,
            is_rotating: false,
            disable_auto_rotate: p.disable_auto_rotate,
            next_rotate: Some(next),
            last_used_at: None,
            expired_at: p.expired_at,
            in_use: 0,
            used_count: 0,
            proxy_used: Vec::new(),
            lease_rev: 0,
            rotating_since: None,
            rotation_job: None,
            rotation_deadline: None,
            upstream_failures: 0,
            last_upstream_failure: None,
            health: HealthDoc::default(),
            webhook_url: None,
            call_webhook_count: 0,
            status: ProxyStatus::Pending,
            status_code: None,
            response: None,
            region: String::new(),
            package_name: p.package_name,
            proxy_package_id: p.proxy_package_id,
            created_by: p.created_by,
            updated_by: p.created_by,
            created_at: now,
            updated_at: now,
        }
    }
}

/// A document of `proxy_packages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageDoc {
    /// `_id`.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// Unique business key (`KiotProxy_<code>`, `ZingProxy_Pack`, …).
    pub code: String,
    /// Display name.
    pub name: String,
    /// Monthly price.
    pub price: f64,
    /// Notes.
    #[serde(default)]
    pub note: String,
    /// Parent provider.
    pub proxy_provider_id: ObjectId,
    /// Active.
    #[serde(default = "default_true")]
    pub is_active: bool,
    /// Creator.
    #[serde(default)]
    pub created_by: Option<ObjectId>,
    /// Last updater.
    #[serde(default)]
    pub updated_by: Option<ObjectId>,
    /// Creation time.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime,
    /// Last update time.
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime,
}

/// A document of `proxy_providers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderDoc {
    /// `_id`.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// Unique display name.
    pub name: String,
    /// Unique account on the provider's platform.
    pub account: String,
    /// Unique website domain.
    pub domain: String,
    /// How to read a rotate response of this provider when it is neither KiotProxy nor ZingProxy: JSON paths of
    /// the new address. Absent: the provider only answers 200 and the proxy keeps its address. Our addition.
    #[serde(default)]
    pub rotate_fields: Option<RotateFields>,
    /// Active.
    #[serde(default = "default_true")]
    pub is_active: bool,
    /// Creator.
    #[serde(default)]
    pub created_by: Option<ObjectId>,
    /// Last updater.
    #[serde(default)]
    pub updated_by: Option<ObjectId>,
    /// Creation time.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime,
    /// Last update time.
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime,
}

/// Dotted JSON paths (e.g. `data.host`) of the fields of a rotate response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RotateFields {
    /// Path of the new IP or host.
    pub ip: String,
    /// Path of the new port.
    pub port: String,
    /// Path of the new username, when the provider sends one.
    #[serde(default)]
    pub username: Option<String>,
    /// Path of the new password, when the provider sends one.
    #[serde(default)]
    pub password: Option<String>,
}

/// A document of `users`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDoc {
    /// `_id`.
    #[serde(rename = "_id")]
    pub id: ObjectId,
    /// Unique email, the login.
    pub email: String,
    /// Unique display name.
    pub username: String,
    /// bcrypt hash.
    pub password: String,
    /// Creation time.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime,
    /// Last update time.
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime,
}

impl std::fmt::Debug for UserDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDoc")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}
