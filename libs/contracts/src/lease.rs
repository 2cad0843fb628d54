//! Lease acquire/release: the consumer-facing request-reply contract.
//!
//! Wire requests hold plain strings and are turned into validated commands with `validate()`, so that a bad field
//! produces an `invalid_input` error naming that field instead of an opaque deserialisation error.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Area, ObjectIdHex};
use crate::reply::ApiError;

/// Request on [`crate::subjects::LEASE_ACQUIRE`]: `{"area": "vn"|"global", "consumer": "<id or ip>"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// `vn` or `global`.
    #[serde(default)]
    pub area: Option<String>,
    /// Who holds the lease: a service id or the client IP (recorded as `proxy_used[].ip`).
    #[serde(default)]
    pub consumer: Option<String>,
    /// Optional URL POSTed a [`crate::callback::CallbackNotice`] if the lease is taken (rotation after the drain
    /// timeout, proxy disabled or deleted).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Proxy ids not to hand out (the forward door's retry after an upstream failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Lease only from this package (its `code`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Set by the forward door: which door holds the lease (`http` or `socks5`), shown in the lease records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
    /// Set by the forward door for a sticky session: its id, shown in the lease records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The caller's id for this request (1–64 of `A–Z a–z 0–9 _ . -`). The lease service remembers it for
    /// [`REQUEST_WINDOW`] and answers a repeated id with the grant it already made, so a caller that lost an answer
    /// (a leader failover) can ask again without taking a second proxy or leaving the first held by nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The site the lease is for (a host name): a proxy whose exit IP is banned for it is not handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Lease only from this provider's packages (its `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Lease only a proxy whose public IP is in this region (its label, e.g. `HCM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// How many distinct proxies to lease in one commit, all or none ([`COUNT_MAX`] at most). Only on
    /// [`crate::subjects::LEASE_ACQUIRE_MANY`], whose answer is [`LeaseGrants`]; `lease.acquire` answers one grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// The most proxies one acquire may lease at once.
pub const COUNT_MAX: u32 = 10;

/// Reply of [`crate::subjects::LEASE_ACQUIRE_MANY`] (and of `GET /api/get-proxy` with `count`): every proxy granted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseGrants {
    /// One grant per proxy, each with its own lease key.
    pub proxies: Vec<LeaseGrant>,
}

/// How long the lease service remembers a request id: at least twice the longest caller deadline (the gateway's and
/// the door's retries stop within [`RETRY_WINDOW`]).
pub const REQUEST_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the gateway and the forward door retry an acquire with the same request id while the lease service is
/// between leaders. A lease replica's failover takes `LEASE_LEADER_TTL` (1.5 s by default) and a catch-up; the loss
/// of the NATS node leading the lease log's RAFT group (a three-node cluster) takes longer: the survivors wait
/// nats-server's election timeout, a random 4–9 s fixed in its `server/raft.go`, before one campaigns (measured
/// 6.5–12.0 s to the next grant). 12 s covers most of that, and with its last attempt stays within the gateway's 15 s
/// request timeout.
pub const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(12);

/// Within [`RETRY_WINDOW`], how long "no responder" is asked again: a lease leader that died leaves nobody
/// subscribed until a standby takes over (`LEASE_LEADER_TTL` and a catch-up); during a RAFT election of the lease
/// log the leader stays subscribed and answers `service_unavailable` instead. A lease service that is not running at
/// all is answered as such after this.
pub const NO_RESPONDER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A new request id: 128 random bits, so ids from any number of gateways and doors never meet.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks a request id: 1 to [`WORD_MAX`] of `A–Z a–z 0–9 _ . -` (a word, or a UUID).
pub fn check_request_id(v: &str) -> Result<String, ApiError> {
    check_chars("request_id", v, "-")
}

/// The most proxy ids an acquire may exclude.
pub const EXCLUDE_MAX: usize = 16;

/// Which forward door holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Door {
    /// The HTTP proxy door (`CONNECT` and absolute-URI requests).
    Http,
    /// The SOCKS5 door.
    Socks5,
}

impl Door {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Http => "http",
            Door::Socks5 => "socks5",
        }
    }
}

/// How an upstream proxy failed the forward door before the client received a byte. Recorded on the proxy (its
/// failure count feeds health scoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamFailure {
    /// Nothing listened (connection refused).
    Refused,
    /// It refused our credentials (407, or 401).
    Auth,
    /// No connection or no answer in time.
    Timeout,
    /// It closed or reset the connection before answering.
    Reset,
    /// Its answer was not HTTP.
    BadAnswer,
}

impl UpstreamFailure {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Refused => "refused",
            UpstreamFailure::Auth => "auth",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::BadAnswer => "bad_answer",
        }
    }
}

fn parse_enum<T: serde::de::DeserializeOwned>(field: &str, value: &str, valid: &str) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| ApiError::invalid(field, format!("unknown value {value:?} (expected one of: {valid})")))
}

/// The longest word of [`check_word`].
pub const WORD_MAX: usize = 64;

/// A session id (and, in the forward door's username, a consumer name or package code): 1 to [`WORD_MAX`] of
/// `A–Z a–z 0–9 _ .`; the error names `field`.
pub fn check_word(field: &str, v: &str) -> Result<String, ApiError> {
    check_chars(field, v, "")
}

/// 1 to [`WORD_MAX`] of `A–Z a–z 0–9 _ .` and the characters of `extra`; the error names `field`.
fn check_chars(field: &str, v: &str, extra: &str) -> Result<String, ApiError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.' || extra.contains(c);
    if v.is_empty() || v.len() > WORD_MAX || !v.chars().all(ok) {
        let allowed: String = extra.chars().flat_map(|c| [' ', c]).collect();
        return Err(ApiError::invalid(field, format!("must be 1-{WORD_MAX} of A-Z a-z 0-9 _ .{allowed}")));
    }
    Ok(v.to_owned())
}

/// A validated acquire request.
#[derive(Debug, Clone, PartialEq)]
pub struct Acquire {
    /// The area to lease from.
    pub area: Area,
    /// Who holds the lease.
    pub consumer: String,
    /// Where to notify the consumer if the lease is taken, already checked against the SSRF rules.
    pub callback_url: Option<String>,
    /// Proxies not to hand out.
    pub exclude: Vec<ObjectIdHex>,
    /// Only from this package (code).
    pub package: Option<String>,
    /// The forward door holding the lease.
    pub door: Option<Door>,
    /// The door's sticky session.
    pub session: Option<String>,
    /// The caller's request id (a repeat gets the same grant).
    pub request_id: Option<String>,
    /// The site, normalised ([`crate::health::normalize_domain`]).
    pub domain: Option<String>,
    /// Only from this provider (name).
    pub provider: Option<String>,
    /// Only in this region (label).
    pub region: Option<String>,
    /// How many proxies (1 unless a multi-lease).
    pub count: u32,
}

/// Longest accepted consumer identifier; it is stored in every lease record.
pub const CONSUMER_MAX_LEN: usize = 128;

impl AcquireRequest {
    /// Validates the request; `allow_private_callbacks` relaxes the SSRF rule for `callback_url`.
    pub fn validate(&self, allow_private_callbacks: bool) -> Result<Acquire, ApiError> {
        let area = Area::parse_field("area", self.area.as_deref())?;
        let consumer = self.consumer.as_deref().map(str::trim).unwrap_or_default();
        if consumer.is_empty() {
            return Err(ApiError::invalid("consumer", "is required (a service id or the client IP)"));
        }
        if consumer.len() > CONSUMER_MAX_LEN || consumer.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "consumer",
                format!("must be at most {CONSUMER_MAX_LEN} printable characters"),
            ));
        }
        let callback_url = match self.callback_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(u) => Some(crate::callback::validate_callback_url(u, allow_private_callbacks)?),
            None => None,
        };
        if self.exclude.len() > EXCLUDE_MAX {
            return Err(ApiError::invalid("exclude", format!("may name at most {EXCLUDE_MAX} proxies")));
        }
        let exclude =
            self.exclude.iter().map(|id| ObjectIdHex::parse_field("exclude", Some(id))).collect::<Result<_, _>>()?;
        let label = |field: &str, v: Option<&str>| match v.map(str::trim).filter(|p| !p.is_empty()) {
            Some(p) if p.len() <= 128 && !p.chars().any(char::is_control) => Ok(Some(p.to_owned())),
            Some(_) => Err(ApiError::invalid(field, "must be at most 128 printable characters")),
            None => Ok(None),
        };
        let package = label("package", self.package.as_deref())?;
        let provider = label("provider", self.provider.as_deref())?;
        let region = label("region", self.region.as_deref())?;
        let count = match self.count {
            None => 1,
            Some(n) if (1..=COUNT_MAX).contains(&n) => n,
            Some(_) => return Err(ApiError::invalid("count", format!("must be 1-{COUNT_MAX}"))),
        };
        let door = match self.door.as_deref() {
            Some(d) => Some(parse_enum::<Door>("door", d, "http, socks5")?),
            None => None,
        };
        let session = match self.session.as_deref() {
            Some(v) => Some(check_word("session", v)?),
            None => None,
        };
        let request_id = match self.request_id.as_deref() {
            Some(v) => Some(check_request_id(v)?),
            None => None,
        };
        let domain = match self.domain.as_deref().filter(|d| !d.trim().is_empty()) {
            Some(d) => Some(crate::health::normalize_domain("domain", d)?),
            None => None,
        };
        Ok(Acquire {
            area,
            consumer: consumer.to_owned(),
            callback_url,
            exclude,
            package,
            door,
            session,
            request_id,
            domain,
            provider,
            region,
            count,
        })
    }
}

/// Request on [`crate::subjects::LEASE_RELEASE`]: `{"proxy_id": "...", "key": "..."}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The leased proxy's id.
    #[serde(default)]
    pub proxy_id: Option<String>,
    /// The lease key returned by acquire.
    #[serde(default)]
    pub key: Option<String>,
    /// Set by the forward door when it returns the lease because the upstream failed
    /// ([`UpstreamFailure`] spelling); recorded on the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// How the consumer's requests through the proxy went ([`Outcome`](crate::health::Outcome) spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// For which site (a host name); required with `blocked` and `captcha`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A validated release request.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// The leased proxy's id.
    pub proxy_id: ObjectIdHex,
    /// The lease key.
    pub key: ObjectIdHex,
    /// How the upstream failed, when that is why it is returned.
    pub failure: Option<UpstreamFailure>,
    /// How the consumer's requests went.
    pub outcome: Option<crate::health::Outcome>,
    /// For which site, normalised.
    pub domain: Option<String>,
}

impl ReleaseRequest {
    /// Validates the request.
    pub fn validate(&self) -> Result<Release, ApiError> {
        let outcome = match self.outcome.as_deref().map(str::trim).filter(|o| !o.is_empty()) {
            Some(o) => Some(crate::health::Outcome::parse_field("outcome", o)?),
            None => None,
        };
        let domain = match self.domain.as_deref().filter(|d| !d.trim().is_empty()) {
            Some(d) => Some(crate::health::normalize_domain("domain", d)?),
            None => None,
        };
        if let (Some(o), None) = (outcome, &domain) {
            if o.is_ban() {
                return Err(ApiError::invalid("domain", format!("is required with outcome {}", o.as_str())));
            }
        }
        Ok(Release {
            proxy_id: ObjectIdHex::parse_field("proxy_id", self.proxy_id.as_deref())?,
            key: ObjectIdHex::parse_field("key", self.key.as_deref())?,
            failure: match self.failure.as_deref() {
                Some(f) => Some(parse_enum("failure", f, "refused, auth, timeout, reset, bad_answer")?),
                None => None,
            },
            outcome,
            domain,
        })
    }
}

/// Reply of [`crate::subjects::LEASE_ROTATE`]: the lease ended, the proxy's rotation asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotateOutcome {
    /// The proxy.
    pub proxy_id: String,
    /// The lease that ended.
    pub key: String,
    /// Leases other holders still have (the rotation drains them first).
    pub in_use: u32,
}

/// Request on [`crate::subjects::LEASE_RENEW`]: `{"proxy_id": "...", "key": "..."}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// The leased proxy's id.
    #[serde(default)]
    pub proxy_id: Option<String>,
    /// The lease key returned by acquire.
    #[serde(default)]
    pub key: Option<String>,
}

/// A validated renew request.
#[derive(Debug, Clone, PartialEq)]
pub struct Renew {
    /// The leased proxy's id.
    pub proxy_id: ObjectIdHex,
    /// The lease key.
    pub key: ObjectIdHex,
}

impl RenewRequest {
    /// Validates the request.
    pub fn validate(&self) -> Result<Renew, ApiError> {
        Ok(Renew {
            proxy_id: ObjectIdHex::parse_field("proxy_id", self.proxy_id.as_deref())?,
            key: ObjectIdHex::parse_field("key", self.key.as_deref())?,
        })
    }
}

/// Reply data of a successful renew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenewOutcome {
    /// The proxy's id.
    pub proxy_id: String,
    /// The renewed key.
    pub key: String,
    /// When the lease service now takes the lease back unless it is returned or renewed again; none when `LEASE_TTL`
    /// is not set (leases never expire).
    pub expires_at: Option<DateTime<Utc>>,
    /// When the proxy is next due for rotation (its drain starts then): plan to return the lease before.
    #[serde(default)]
    pub next_rotate: Option<DateTime<Utc>>,
}

/// A granted lease: the original's `{ ip, port, username, password, auth_token, webhook_url, … }` plus the lease key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseGrant {
    /// The proxy's id (`_id`).
    pub id: String,
    /// Proxy host or IP to connect to.
    pub ip: String,
    /// Proxy port.
    pub port: u16,
    /// Proxy auth username.
    pub username: String,
    /// Proxy auth password.
    pub password: String,
    /// Bearer token of the rotate URL, when the provider needs one.
    pub auth_token: Option<String>,
    /// URL to POST to return this lease: `{WEBHOOK_RETURN_PROXY}/{id}?key={key}`.
    pub webhook_url: String,
    /// The lease key; return it with the proxy id.
    pub key: String,
    /// The proxy's area.
    pub area: Area,
    /// Public IP seen through the proxy at its last check.
    pub ip_public: Option<String>,
    /// Region label of the public IP.
    #[serde(default)]
    pub region: String,
    /// Provider subscription expiry.
    pub expired_at: Option<DateTime<Utc>>,
    /// When the proxy is next due for rotation; plan to return the lease before then.
    pub next_rotate: Option<DateTime<Utc>>,
    /// When this lease was granted.
    pub leased_at: DateTime<Utc>,
    /// When the lease service takes the lease back if it has not been returned (`LEASE_TTL`); none when disabled.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Broadcast on [`crate::subjects::LEASE_TAKEN`] (core NATS, not durable) for every lease the lease service takes
/// from its holder, so that the forward door closes the tunnels that use it. The durable, per-consumer form is the
/// callback ([`crate::callback::CallbackNotice`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasesTaken {
    /// The leases taken in one commit.
    pub leases: Vec<TakenLease>,
}

/// One lease taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TakenLease {
    /// The proxy.
    pub proxy_id: String,
    /// The lease key that is no longer valid.
    pub key: String,
    /// Why.
    pub reason: crate::callback::TakenReason,
}

/// Reply data of a successful release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseOutcome {
    /// The proxy's id.
    pub proxy_id: String,
    /// The released key.
    pub key: String,
    /// Leases still held on this proxy after the release.
    pub in_use: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_validation_names_fields() {
        let ok = AcquireRequest {
            area: Some("vn".into()),
            consumer: Some("10.0.0.1".into()),
            callback_url: None,
            ..Default::default()
        };
        assert!(ok.validate(false).is_ok());
        let no_area =
            AcquireRequest { area: None, consumer: Some("c".into()), callback_url: None, ..Default::default() };
        assert_eq!(no_area.validate(false).err().and_then(|e| e.field).as_deref(), Some("area"));
        let no_consumer = AcquireRequest {
            area: Some("global".into()),
            consumer: Some(" ".into()),
            callback_url: None,
            ..Default::default()
        };
        assert_eq!(no_consumer.validate(false).err().and_then(|e| e.field).as_deref(), Some("consumer"));
        let ssrf = AcquireRequest {
            area: Some("vn".into()),
            consumer: Some("c".into()),
            callback_url: Some("http://169.254.169.254/".into()),
            ..Default::default()
        };
        assert_eq!(ssrf.validate(false).err().and_then(|e| e.field).as_deref(), Some("callback_url"));
    }

    #[test]
    fn release_validation_names_fields() {
        let bad_key = ReleaseRequest {
            proxy_id: Some("65a1b2c3d4e5f60718293a4b".into()),
            key: Some("nope".into()),
            failure: None,
            ..Default::default()
        };
        assert_eq!(bad_key.validate().err().and_then(|e| e.field).as_deref(), Some("key"));
        let good = ReleaseRequest {
            proxy_id: Some("65a1b2c3d4e5f60718293a4b".into()),
            key: Some("65a1b2c3d4e5f60718293a4c".into()),
            ..Default::default()
        };
        let with = |outcome: Option<&str>, domain: Option<&str>| ReleaseRequest {
            outcome: outcome.map(str::to_owned),
            domain: domain.map(str::to_owned),
            ..good.clone()
        };
        let field = |r: ReleaseRequest| r.validate().err().and_then(|e| e.field);
        assert_eq!(field(with(Some("banned"), None)).as_deref(), Some("outcome"));
        assert_eq!(field(with(Some("blocked"), None)).as_deref(), Some("domain"), "a ban needs its site");
        assert_eq!(field(with(Some("ok"), Some("not a host"))).as_deref(), Some("domain"));
        let ok = with(Some("captcha"), Some("Shop.Example:443")).validate().unwrap();
        assert_eq!(ok.domain.as_deref(), Some("shop.example"));
        assert!(with(Some("timeout"), None).validate().is_ok(), "only bans need a site");
        let bad_id = ReleaseRequest { proxy_id: Some("x".into()), key: None, failure: None, ..Default::default() };
        assert_eq!(bad_id.validate().err().and_then(|e| e.field).as_deref(), Some("proxy_id"));
    }
}
