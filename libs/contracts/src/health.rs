//! What consumers tell the pool about a proxy when they return it: the outcome of their requests through it, and for
//! which site (`domain`). A block or captcha is about the exit IP the site saw, not the proxy record; the lease
//! service bans that (exit IP, domain) pair for a while and leases that domain elsewhere.

use serde::{Deserialize, Serialize};

use crate::reply::ApiError;

/// How requests through a leased proxy went, reported with its return (`outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The requests worked for `domain`.
    Ok,
    /// The site refused this exit IP.
    Blocked,
    /// The site answered with a captcha for this exit IP.
    Captcha,
    /// The proxy itself failed (refused, reset, 407, not HTTP).
    ProxyError,
    /// No answer in time through the proxy.
    Timeout,
}

impl Outcome {
    /// Every spelling, for error messages and metrics.
    pub const ALL: [Outcome; 5] =
        [Outcome::Ok, Outcome::Blocked, Outcome::Captcha, Outcome::ProxyError, Outcome::Timeout];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Blocked => "blocked",
            Outcome::Captcha => "captcha",
            Outcome::ProxyError => "proxy_error",
            Outcome::Timeout => "timeout",
        }
    }

    /// Parses the wire spelling; the error names `field`.
    pub fn parse_field(field: &str, v: &str) -> Result<Outcome, ApiError> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == v).ok_or_else(|| {
            let valid: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
            ApiError::invalid(field, format!("unknown value {v:?} (expected one of: {})", valid.join(", ")))
        })
    }

    /// Whether the site refused the exit IP (a ban for the domain follows).
    pub fn is_ban(self) -> bool {
        matches!(self, Outcome::Blocked | Outcome::Captcha)
    }
}

/// Request on [`crate::subjects::LEASECTL_HEAL`] (gateway → lease service, admin): lift the ban of a proxy's exit IP
/// for one site, or its quarantine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealRequest {
    /// The proxy.
    pub proxy_id: String,
    /// Lift the ban of the proxy's current exit IP for this site (whichever proxy it was reported through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unban_domain: Option<String>,
    /// Lift the proxy's quarantine (and its failure count).
    #[serde(default)]
    pub unquarantine: bool,
}

/// Reply of [`crate::subjects::LEASECTL_HEAL`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealReply {
    /// The proxy.
    pub proxy_id: String,
    /// The exit IP whose ban was lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Ban records lifted (one per proxy it had been reported through).
    pub bans_lifted: u32,
    /// Whether a quarantine was lifted.
    pub quarantine_lifted: bool,
}

/// Request on [`crate::subjects::LEASE_REPORT`]: how a proxy did for a site, from a consumer that holds it or held it
/// moments ago (the forward door's clients, who never see a lease key, report this way with the proxy id the door
/// showed them in `X-Proxypool-Proxy-Id`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportRequest {
    /// The proxy.
    #[serde(default)]
    pub proxy_id: Option<String>,
    /// `ok`, `blocked`, `captcha`, `proxy_error` or `timeout`.
    #[serde(default)]
    pub outcome: Option<String>,
    /// The site (a host name); required with `blocked` and `captcha`.
    #[serde(default)]
    pub domain: Option<String>,
    /// Who reports: the holder as its leases record it (the client IP, a service id, or for the forward door
    /// `<consumer>@<client IP>`, which a report from that IP matches). Set by the gateway from the caller.
    #[serde(default)]
    pub consumer: Option<String>,
}

/// A validated report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The proxy.
    pub proxy_id: crate::ObjectIdHex,
    /// How it went.
    pub outcome: Outcome,
    /// For which site, normalised.
    pub domain: Option<String>,
    /// Who reports.
    pub consumer: String,
}

impl ReportRequest {
    /// Validates the request.
    pub fn validate(&self) -> Result<Report, ApiError> {
        let proxy_id = crate::ObjectIdHex::parse_field("proxy_id", self.proxy_id.as_deref())?;
        let outcome = match self.outcome.as_deref().map(str::trim).filter(|o| !o.is_empty()) {
            Some(o) => Outcome::parse_field("outcome", o)?,
            None => return Err(ApiError::invalid("outcome", "is required")),
        };
        let domain = match self.domain.as_deref().filter(|d| !d.trim().is_empty()) {
            Some(d) => Some(normalize_domain("domain", d)?),
            None if outcome.is_ban() => {
                return Err(ApiError::invalid("domain", format!("is required with outcome {}", outcome.as_str())))
            }
            None => None,
        };
        let consumer = self.consumer.as_deref().map(str::trim).unwrap_or_default();
        if consumer.is_empty() || consumer.len() > crate::lease::CONSUMER_MAX_LEN {
            return Err(ApiError::invalid("consumer", "is required (the holder, as its leases record it)"));
        }
        Ok(Report { proxy_id, outcome, domain, consumer: consumer.to_owned() })
    }
}

/// Reply of [`crate::subjects::LEASE_REPORT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportOutcome {
    /// The proxy.
    pub proxy_id: String,
    /// With `blocked`/`captcha`: the exit IP now banned for the site, and until when.
    pub banned_ip: Option<String>,
    /// Until when the ban lasts.
    pub banned_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether this report quarantined the proxy (`HEALTH_FAIL_THRESHOLD` failures in a row).
    pub quarantined: bool,
}

/// Broadcast on [`crate::subjects::LEASE_BANNED`] for every new ban of an exit IP for a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanEvent {
    /// The exit IP.
    pub ip: String,
    /// The site.
    pub domain: String,
    /// When the ban ends (Unix milliseconds).
    pub until_ms: i64,
    /// Every proxy exiting on that IP now.
    pub proxies: Vec<String>,
}

/// Request on [`crate::subjects::LEASECTL_INSPECT`] (gateway → lease service, admin): one proxy's lease state as
/// the engine holds it now (MongoDB's projection trails it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InspectRequest {
    /// The proxy.
    pub proxy_id: String,
}

/// One proxy's live lease state, read from the lease engine's leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveState {
    /// Leases held now.
    pub in_use: u32,
    /// `PROXY_USE_MAX`.
    pub max: u32,
    /// Leases granted in this rotation cycle.
    pub used_count: u32,
    /// The IP sites see (the verified public IP, or the proxy's address while none is known).
    pub exit_ip: String,
    /// Whether it could take a lease now (enabled, not rotating, quarantined or a duplicate, below the cap).
    pub leasable: bool,
    /// The rotation holding it, if one does.
    pub rotation: Option<LiveRotation>,
    /// Every lease held.
    pub leases: Vec<LiveLease>,
    /// Health: state, failures in a row, duplicate mark, bans.
    pub health: LiveHealth,
    /// The lease-log sequence this state reflects.
    pub seq: u64,
}

/// A rotation lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveRotation {
    /// The rotation job.
    pub job: String,
    /// When it took (or restarted) the lock.
    pub since: chrono::DateTime<chrono::Utc>,
    /// When the lease service takes it back unless renewed.
    pub deadline: chrono::DateTime<chrono::Utc>,
}

/// A lease, as an admin sees it (its key is the holder's alone and is not shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveLease {
    /// The holder (client IP, service id, or `<consumer>@<ip>` through the forward door).
    pub consumer: String,
    /// The forward door holding it (`http`, `socks5`), if one does.
    pub door: Option<String>,
    /// The door's sticky session, if any.
    pub session: Option<String>,
    /// When granted.
    pub since: chrono::DateTime<chrono::Utc>,
    /// When it is taken back unless returned or renewed (`LEASE_TTL`); none when leases do not expire.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A proxy's health as the engine holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveHealth {
    /// `healthy`, `quarantined` or `duplicate_ip`.
    pub state: String,
    /// Failures in a row reported or met.
    pub fails: u32,
    /// The share of `ok` among the proxy's last 32 judgements (`ok` against `proxy_error`, `timeout` and the door's
    /// upstream failures; a site's refusal is not the proxy's fault); none before the first.
    pub success_rate: Option<f64>,
    /// With `duplicate_ip`: the other proxy exiting on the same public IP.
    pub duplicate_of: Option<String>,
    /// Bans reported through this proxy (expired ones included: they double the next ban of their pair).
    pub bans: Vec<LiveBan>,
}

/// A site's ban of an exit IP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiveBan {
    /// The exit IP.
    pub ip: String,
    /// The site.
    pub domain: String,
    /// Until when.
    pub until: chrono::DateTime<chrono::Utc>,
    /// Bans of this pair in a row.
    pub count: u32,
    /// `blocked` or `captcha`.
    pub reason: String,
    /// Whether it is still in force.
    pub active: bool,
}

/// The longest host name (RFC 1035: 253 characters in text form).
pub const DOMAIN_MAX: usize = 253;

/// A site's host name as bans key it: lower case, no port, no trailing dot, international names in their ASCII
/// (IDNA) form, 1–253 characters of labels of 1–63 `a–z 0–9 -`. The error names `field`.
pub fn normalize_domain(field: &str, v: &str) -> Result<String, ApiError> {
    let bad = |why: &str| ApiError::invalid(field, format!("{why} (a host name such as shop.example)"));
    let v = v.trim();
    if v.is_empty() {
        return Err(bad("is empty"));
    }
    if v.len() > 4 * DOMAIN_MAX {
        return Err(bad(&format!("is longer than {DOMAIN_MAX} characters")));
    }
    // A port is not part of the site; IPv6 literals (with their colons) are not host names.
    let host = match v.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => h,
        Some(_) => return Err(bad("is not a host name")),
        None => v,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let ascii = idna::domain_to_ascii(host).map_err(|_| bad("is not a valid international host name"))?;
    if ascii.is_empty() || ascii.len() > DOMAIN_MAX {
        return Err(bad(&format!("must be 1-{DOMAIN_MAX} characters")));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !ascii.split('.').all(label_ok) {
        return Err(bad("is not a host name"));
    }
    Ok(ascii)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalised_and_bad_ones_name_the_field() {
        assert_eq!(normalize_domain("domain", "Shop.Example").unwrap(), "shop.example");
        assert_eq!(normalize_domain("domain", "shop.example:443").unwrap(), "shop.example");
        assert_eq!(normalize_domain("domain", "shop.example.").unwrap(), "shop.example");
        assert_eq!(normalize_domain("domain", "bücher.example").unwrap(), "xn--bcher-kva.example");
        for bad in ["", "a b.example", "shop..example", "-x.example", "[::1]:80", "x:y", "a_b.example"] {
            let e = normalize_domain("domain", bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("domain"), "{bad}: {e:?}");
        }
        assert!(normalize_domain("domain", &"a.".repeat(200)).is_err());
    }

    #[test]
    fn outcomes_parse_their_spelling_only() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse_field("outcome", o.as_str()).unwrap(), o);
        }
        let e = Outcome::parse_field("outcome", "banned").unwrap_err();
        assert!(e.message.contains("proxy_error"), "{e:?}");
        assert!(Outcome::Captcha.is_ban() && !Outcome::Timeout.is_ban());
    }
}
