//! The one HTTP error type: an [`ApiError`] rendered as `{"error": {"code", "message", "field"?}}` with the status
//! its code maps to, and `Retry-After` on retryable errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proxypool_contracts::{ApiError, ErrorCode};
use serde_json::json;

/// An HTTP error response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl HttpError {
    /// 401 with a message.
    pub fn unauthorized(message: &str) -> Self {
        Self(ApiError::new(ErrorCode::Unauthorized, message))
    }

    /// 403 with a message.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self(ApiError::new(ErrorCode::Forbidden, message))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() && e.code != ErrorCode::NoProxyAvailable {
            tracing::warn!(code = ?e.code, message = %e.message, "request failed");
        }
        let retry_after = e.retry_after_secs;
        let mut res = (status, Json(json!({ "error": e }))).into_response();
        if let Some(secs) = retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}

/// Result type of handlers.
pub type HttpResult<T> = Result<T, HttpError>;
