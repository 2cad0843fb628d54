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
