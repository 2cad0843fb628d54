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
        Ok(Acquire { area, consumer: consumer.to_owned(), callback_url })
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
}

/// A validated release request.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// The leased proxy's id.
    pub proxy_id: ObjectIdHex,
    /// The lease key.
    pub key: ObjectIdHex,
}

impl ReleaseRequest {
    /// Validates the request.
    pub fn validate(&self) -> Result<Release, ApiError> {
        Ok(Release {
            proxy_id: ObjectIdHex::parse_field("proxy_id", self.proxy_id.as_deref())?,
            key: ObjectIdHex::parse_field("key", self.key.as_deref())?,
        })
    }
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
        let ok = AcquireRequest { area: Some("vn".into()), consumer: Some("10.0.0.1".into()), callback_url: None };
        assert!(ok.validate(false).is_ok());
        let no_area = AcquireRequest { area: None, consumer: Some("c".into()), callback_url: None };
        assert_eq!(no_area.validate(false).err().and_then(|e| e.field).as_deref(), Some("area"));
        let no_consumer =
            AcquireRequest { area: Some("global".into()), consumer: Some(" ".into()), callback_url: None };
        assert_eq!(no_consumer.validate(false).err().and_then(|e| e.field).as_deref(), Some("consumer"));
        let ssrf = AcquireRequest {
            area: Some("vn".into()),
            consumer: Some("c".into()),
            callback_url: Some("http://169.254.169.254/".into()),
        };
        assert_eq!(ssrf.validate(false).err().and_then(|e| e.field).as_deref(), Some("callback_url"));
    }

    #[test]
    fn release_validation_names_fields() {
        let bad_key = ReleaseRequest { proxy_id: Some("65a1b2c3d4e5f60718293a4b".into()), key: Some("nope".into()) };
        assert_eq!(bad_key.validate().err().and_then(|e| e.field).as_deref(), Some("key"));
        let bad_id = ReleaseRequest { proxy_id: Some("x".into()), key: None };
        assert_eq!(bad_id.validate().err().and_then(|e| e.field).as_deref(), Some("proxy_id"));
    }
}
