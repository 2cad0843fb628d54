//! The proxy username: who the consumer is and what it wants, in the convention scraping tools and proxy vendors
//! use, since a proxy URL has no other place for options.
//!
//! ```text
//! <consumer>[-area-<vn|global>][-session-<id>][-sesstime-<minutes>][-package-<code>][-provider-<name>][-region-<label>]
//! ```
//!
//! - `consumer`: 1–64 of `A–Z a–z 0–9 _ .` (no `-`, which separates the options); it names the holder in the lease
//!   records and is the unit of the per-consumer connection limit.
//! - `area`: `vn` or `global` (default `FORWARD_DEFAULT_AREA`).
//! - `session`: 1–64 of `A–Z a–z 0–9 _ .`; connections with the same consumer, options and session id share one
//!   lease, so they leave through the same upstream proxy.
//! - `sesstime`: minutes a session keeps its lease without a connection, 1 to `FORWARD_SESSION_MAX` (default
//!   `FORWARD_SESSION_DEFAULT`); only with `session`.
//! - `package`: a package code (`KiotProxy_…`); leases only from that package's proxies. Codes with `-` cannot be
//!   named here.
//! - `provider`: a provider's name; leases only from its packages' proxies (names with `-` cannot be named here).
//! - `region`: a region label (`HCM`); leases only proxies whose public IP is in that region.
//!
//! Options come in any order, each at most once. Anything else is refused with the option's name, so a typo never
//! silently leases from the wrong place.

use proxypool_contracts::lease::check_word as word;
use proxypool_contracts::{ApiError, Area};

/// A parsed username.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username {
    /// The consumer's name.
    pub consumer: String,
    /// The area to lease from.
    pub area: Area,
    /// The sticky session, when asked for.
    pub session: Option<String>,
    /// Minutes the session keeps its lease without a connection, when named (else `FORWARD_SESSION_DEFAULT`).
    pub sesstime_minutes: Option<u32>,
    /// Lease only from this package.
    pub package: Option<String>,
    /// Lease only from this provider.
    pub provider: Option<String>,
    /// Lease only in this region.
    pub region: Option<String>,
}

/// The limits the grammar is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Grammar {
    /// Area when none is named.
    pub default_area: Area,
    /// The largest `sesstime`.
    pub session_max_minutes: u32,
}

impl Grammar {
    /// Parses a username per the module doc; the error names the option (`username.<option>`).
    pub fn parse(&self, raw: &str) -> Result<Username, ApiError> {
        let mut parts = raw.split('-');
        let consumer = word("username.consumer", parts.next().unwrap_or_default())?;
        let mut u = Username {
            consumer,
            area: self.default_area,
            session: None,
            sesstime_minutes: None,
            package: None,
            provider: None,
            region: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        while let Some(key) = parts.next() {
            let Some(value) = parts.next() else {
                return Err(ApiError::invalid("username", format!("option {key:?} has no value (`-{key}-<value>`)")));
            };
            if seen.contains(&key) {
                return Err(ApiError::invalid("username", format!("option {key:?} is given twice")));
            }
            match key {
                "area" => u.area = Area::parse_field("username.area", Some(value))?,
                "session" => u.session = Some(word("username.session", value)?),
                "sesstime" => {
                    let max = self.session_max_minutes;
                    let n: u32 = value.parse().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                        ApiError::invalid("username.sesstime", format!("must be minutes, 1 to {max}"))
                    })?;
                    u.sesstime_minutes = Some(n);
                }
                "package" => u.package = Some(word("username.package", value)?),
                "provider" => u.provider = Some(word("username.provider", value)?),
                "region" => u.region = Some(word("username.region", value)?),
                other => {
                    return Err(ApiError::invalid(
                        "username",
                        format!("unknown option {other:?}; the options are area, session, sesstime, package, provider and region"),
                    ))
                }
            }
            seen.push(key);
        }
        if u.session.is_none() && u.sesstime_minutes.is_some() {
            return Err(ApiError::invalid("username.sesstime", "is only meaningful with a session (`-session-<id>`)"));
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Grammar = Grammar { default_area: Area::Vn, session_max_minutes: 60 };

    fn field(raw: &str) -> Option<String> {
        G.parse(raw).err().and_then(|e| e.field)
    }

    #[test]
    fn parses_every_option_in_any_order() {
        let u = G.parse("scraper-session-a1-region-HCM-area-global-sesstime-5-package-KiotProxy_x-provider-Kiot").ok();
        let u = u.unwrap_or_else(|| Username {
            consumer: String::new(),
            area: Area::Vn,
            session: None,
            sesstime_minutes: None,
            package: None,
            provider: None,
            region: None,
        });
        assert_eq!(u.provider.as_deref(), Some("Kiot"));
        assert_eq!(u.region.as_deref(), Some("HCM"));
        assert_eq!(u.consumer, "scraper");
        assert_eq!(u.area, Area::Global);
        assert_eq!(u.session.as_deref(), Some("a1"));
        assert_eq!(u.sesstime_minutes, Some(5));
        assert_eq!(u.package.as_deref(), Some("KiotProxy_x"));
        let plain = G.parse("demo").ok();
        assert_eq!(plain.as_ref().map(|u| (u.area, u.session.is_none())), Some((Area::Vn, true)));
        let sess = G.parse("demo-session-s").ok();
        assert_eq!(sess.map(|u| u.sesstime_minutes), Some(None), "the default sesstime is the configuration's");
    }

    #[test]
    fn refusals_name_the_option() {
        assert_eq!(field("").as_deref(), Some("username.consumer"));
        assert_eq!(field("a b").as_deref(), Some("username.consumer"));
        assert_eq!(field("demo-area-mars").as_deref(), Some("username.area"));
        assert_eq!(field("demo-session-").as_deref(), Some("username.session"));
        assert_eq!(field("demo-session-s-sesstime-61").as_deref(), Some("username.sesstime"));
        assert_eq!(field("demo-session-s-sesstime-0").as_deref(), Some("username.sesstime"));
        assert_eq!(field("demo-sesstime-5").as_deref(), Some("username.sesstime"));
        assert_eq!(field("demo-country-vn").as_deref(), Some("username"));
        assert_eq!(field("demo-area").as_deref(), Some("username"));
        assert_eq!(field("demo-area-vn-area-vn").as_deref(), Some("username"));
        assert_eq!(field("demo-region-H/N").as_deref(), Some("username.region"));
        assert_eq!(field("demo-provider-").as_deref(), Some("username.provider"));
        let msg = G.parse("demo-country-vn").err().map(|e| e.message).unwrap_or_default();
        assert!(msg.contains("country"), "{msg}");
    }
}
