//! The one reply envelope and the typed error, shared by NATS replies and the gateway's HTTP bodies.
//!
//! A NATS reply is `{"data": …}` or `{"error": {"code": …, "message": …, "field": …}}`; the gateway answers with the
//! same `error` object and maps [`ErrorCode`] to an HTTP status with [`ErrorCode::http_status`], so a consumer sees the
//! same codes on both transports.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A reply on a request-reply subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply<T> {
    /// The request succeeded.
    #[serde(rename = "data")]
    Ok(T),
    /// The request failed; nothing was changed.
    #[serde(rename = "error")]
    Err(ApiError),
}

impl<T> Reply<T> {
    /// Converts into a `Result`.
    pub fn into_result(self) -> Result<T, ApiError> {
        match self {
            Reply::Ok(v) => Ok(v),
            Reply::Err(e) => Err(e),
        }
    }
}

impl<T> From<Result<T, ApiError>> for Reply<T> {
    fn from(r: Result<T, ApiError>) -> Self {
        match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Err(e),
        }
    }
}

/// Stable error codes. Adding a code is a contract change: document it in the README's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field is missing or malformed (`field` names it). HTTP 400.
    InvalidInput,
    /// Missing or wrong credentials. HTTP 401.
    Unauthorized,
    /// Credentials are fine but the caller (e.g. its IP) is not allowed. HTTP 403.
    Forbidden,
    /// The proxy, lease key or record does not exist. HTTP 404.
    NotFound,
    /// The route exists but not with this HTTP method (HTTP only). HTTP 405.
    MethodNotAllowed,
    /// The write conflicts with existing data (duplicate, children still attached). HTTP 409.
    Conflict,
    /// The upload is larger than the configured limit (`IMPORT_MAX_BYTES`). HTTP 413.
    PayloadTooLarge,
    /// The request needs an integration this deployment has not configured (e.g. the KiotProxy import without
    /// `KIOT_API_KEY`). HTTP 409, not retryable.
    ///
    /// 409 rather than 503 or 501: the request is well formed and the server is healthy, but it conflicts with the
    /// deployment's current state, which only an operator can change; once the token is set the same request
    /// succeeds. A 5xx would page the on-call and make clients and proxies retry a request that cannot succeed,
    /// and `Retry-After` (which 503 carried) promised that it might.
    NotConfigured,
    /// Too many requests of this kind for this proxy (a holder's rotate request within `ROTATE_MIN_INTERVAL` of the
    /// last one); retry after `retry_after_secs`. HTTP 429 with `Retry-After`.
    RateLimited,
    /// No proxy in the area can take another lease right now; retry later. HTTP 503 with `Retry-After`.
    NoProxyAvailable,
    /// A dependency (NATS, MongoDB, the lease service) is unreachable; retry later. HTTP 503 with `Retry-After`.
    ServiceUnavailable,
    /// A bug or unexpected state; logged with its cause. HTTP 500.
    Internal,
}

impl ErrorCode {
    /// HTTP status the gateway answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidInput => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict | ErrorCode::NotConfigured => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::NoProxyAvailable | ErrorCode::ServiceUnavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::NoProxyAvailable | ErrorCode::ServiceUnavailable | ErrorCode::RateLimited)
    }
}

/// A typed error: what failed, why, and which input field (when one is to blame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema)]
pub struct ApiError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation. Never contains secrets.
    pub message: String,
    /// The offending input field, for `invalid_input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Suggested wait before retrying, for retryable codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{:?}: {}: {}", self.code, field, self.message),
            None => write!(f, "{:?}: {}", self.code, self.message),
        }
    }
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let retry_after_secs = code.is_retryable().then_some(1);
        Self { code, message: message.into(), field: None, retry_after_secs }
    }

    /// `invalid_input` naming the field; the message reads "`field` `reason`".
    pub fn invalid(field: &str, reason: impl fmt::Display) -> Self {
        Self {
            code: ErrorCode::InvalidInput,
            message: format!("{field} {reason}"),
            field: Some(field.to_owned()),
            retry_after_secs: None,
        }
    }

    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// `service_unavailable`: a dependency is down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ServiceUnavailable, message)
    }

    /// `not_configured`: the integration behind the request is switched off in this deployment.
    pub fn not_configured(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotConfigured, message)
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape_is_stable() {
        let ok: Reply<u32> = Reply::Ok(7);
        assert_eq!(serde_json::to_string(&ok).ok().as_deref(), Some(r#"{"data":7}"#));
        let err: Reply<u32> = Reply::Err(ApiError::invalid("area", "is required"));
        assert_eq!(
            serde_json::to_string(&err).ok().as_deref(),
            Some(r#"{"error":{"code":"invalid_input","message":"area is required","field":"area"}}"#)
        );
        let none = ApiError::new(ErrorCode::NoProxyAvailable, "x");
        assert_eq!(none.retry_after_secs, Some(1));
        assert_eq!(none.code.http_status(), 503);
        let off = ApiError::not_configured("x");
        assert_eq!((off.code.http_status(), off.retry_after_secs), (409, None), "not retryable");
        assert_eq!(serde_json::to_value(off.code).ok(), Some(serde_json::json!("not_configured")));
    }
}
