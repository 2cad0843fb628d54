//! Callbacks to consumers whose lease was taken from them, and the SSRF rules for callback URLs.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::reply::ApiError;

/// Why a lease was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TakenReason {
    /// The proxy was rotated while the lease was held (the drain timed out).
    Rotated,
    /// An admin disabled the proxy.
    ProxyDisabled,
    /// An admin deleted the proxy.
    ProxyDeleted,
    /// The lease outlived `LEASE_TTL` without being returned.
    Expired,
}

impl TakenReason {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TakenReason::Rotated => "rotated",
            TakenReason::ProxyDisabled => "proxy_disabled",
            TakenReason::ProxyDeleted => "proxy_deleted",
            TakenReason::Expired => "expired",
        }
    }
}

/// The JSON POSTed to a consumer's `callback_url`, and the job on [`crate::subjects::CALLBACKS`]. Delivered at least
/// once: a receiver drops a repeat by its `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackNotice {
    /// The notice's id, the same on every delivery of it: `<proxy id>-<key>-<reason>`.
    #[serde(default)]
    pub id: String,
    /// Where to POST (not part of the body sent).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub callback_url: String,
    /// The proxy.
    pub proxy_id: String,
    /// The lease key that is no longer valid.
    pub key: String,
    /// Why.
    pub reason: TakenReason,
    /// When.
    pub at: DateTime<Utc>,
}

impl CallbackNotice {
    /// The id of the notice that lease `key` on `proxy_id` was taken for `reason`.
    pub fn id_of(proxy_id: &str, key: &str, reason: TakenReason) -> String {
        format!("{proxy_id}-{key}-{}", reason.as_str())
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local (incl. cloud metadata
/// 169.254.169.254), CGNAT, unique-local, unspecified, multicast or documentation ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::/96) addresses reach IPv4 hosts: judge those.
            if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return !v6.is_unspecified()
                    && !v6.is_loopback()
                    && is_public(IpAddr::from([o[12], o[13], o[14], o[15]]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Validates a callback URL supplied by a consumer: absolute http(s), at most 2,000 characters, and (unless
/// `allow_private`) no IP literal or `localhost` outside public ranges. Host names are resolved and checked again
/// at delivery, so a name pointing inside the network is refused there.
pub fn validate_callback_url(raw: &str, allow_private: bool) -> Result<String, ApiError> {
    let field = "callback_url";
    let url = raw.trim();
    if url.len() > 2000 {
        return Err(ApiError::invalid(field, "must be at most 2000 characters"));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ApiError::invalid(field, "must be an absolute http(s) URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    if host.is_empty() {
        return Err(ApiError::invalid(field, "must name a host"));
    }
    if !allow_private {
        let private = match host.parse::<IpAddr>() {
            Ok(ip) => !is_public(ip),
            Err(_) => host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost"),
        };
        if private {
            return Err(ApiError::invalid(field, "must not point at a loopback, private or link-local address"));
        }
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_targets() {
        for bad in [
            "http://127.0.0.1/cb",
            "http://localhost:8080/cb",
            "http://10.1.2.3/cb",
            "http://192.168.0.1/cb",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/cb",
            "http://[fd00::1]/cb",
            "http://user@127.0.0.1/cb",
            "http://100.64.0.1/",
            "http://[64:ff9b::a00:1]/",
            "http://[::127.0.0.1]/",
            "ftp://example.com/",
        ] {
            assert!(validate_callback_url(bad, false).is_err(), "{bad}");
        }
        assert!(validate_callback_url("https://hooks.example.com/cb?x=1", false).is_ok());
        assert!(validate_callback_url("http://8.8.8.8:8080/cb", false).is_ok());
        assert!(validate_callback_url("http://127.0.0.1/cb", true).is_ok(), "allowed by configuration");
    }
}
