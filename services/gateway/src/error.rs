//! The one HTTP error type: an [`ApiError`] rendered as `{"error": {"code", "message", "field"?}}` with the status
//! its code maps to, and `Retry-After` on retryable errors.
//!
//! A failed request is logged here and nowhere else, when its response is made, so that each is logged once:
//! `internal` (500) at `error` with its cause chain, `service_unavailable` (503: a dependency is down, the request
//! took too long) at `warn`, since it is an outage to watch but not a bug. Client errors (4xx) and
//! `no_proxy_available` (the pool is busy, an answer the API promises) are not logged: they are the caller's
//! business, and counted in the HTTP metrics.

use std::error::Error as StdError;
use std::fmt::Write as _;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proxypool_contracts::{ApiError, ErrorCode};
use serde_json::json;

/// The underlying error of an [`HttpError`], for the log only.
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// An HTTP error response.
#[derive(Debug)]
pub struct HttpError {
    /// What the client is told.
    pub error: ApiError,
    /// Why it happened, logged with its chain of sources and never shown to the client (it may name hosts or
    /// queries).
    cause: Option<Cause>,
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self { error, cause: None }
    }
}

impl HttpError {
    /// 401 with a message.
    pub fn unauthorized(message: &str) -> Self {
        ApiError::new(ErrorCode::Unauthorized, message).into()
    }

    /// 403 with a message.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Forbidden, message).into()
    }

    /// Attaches the error that caused this one, to be logged with the response.
    pub fn with_cause(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// `message: cause: its source: …`.
    fn chain(&self) -> String {
        let mut out = self.error.message.clone();
        let mut next: Option<&(dyn StdError + 'static)> = self.cause.as_deref().map(|c| c as _);
        while let Some(e) = next {
            let _ = write!(out, ": {e}");
            next = e.source();
        }
        out
    }

    /// Logs the failure per the module doc.
    fn log(&self) {
        match self.error.code {
            ErrorCode::Internal => tracing::error!(code = ?self.error.code, error = %self.chain(), "request failed"),
            ErrorCode::ServiceUnavailable => {
                tracing::warn!(code = ?self.error.code, error = %self.chain(), "request failed")
            }
            _ => {}
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        self.log();
        let e = self.error;
        let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written while `f` runs, at `debug` and above.
    fn logs_of(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text =
            String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned();
        text.lines().map(str::to_owned).collect()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the pool")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_internal_error_is_logged_once_at_error_with_its_cause_chain() {
        let cause = Outer(std::io::Error::other("disk on fire"));
        let logs = logs_of(|| {
            let res =
                HttpError::from(ApiError::internal("unexpected database error")).with_cause(cause).into_response();
            assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        });
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(logs[0].contains("ERROR"), "{logs:?}");
        assert!(
            logs[0].contains("unexpected database error: cannot read the pool: disk on fire"),
            "the whole chain: {logs:?}"
        );
    }

    #[test]
    fn unavailable_is_a_warning_and_client_errors_and_a_busy_pool_are_not_logged() {
        let logs = logs_of(|| {
            drop(HttpError::from(ApiError::unavailable("the database is unreachable")).into_response());
        });
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(logs[0].contains("WARN") && logs[0].contains("the database is unreachable"), "{logs:?}");
        let logs = logs_of(|| {
            let busy = HttpError::from(ApiError::new(ErrorCode::NoProxyAvailable, "busy")).into_response();
            assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
            drop(HttpError::from(ApiError::invalid("area", "is required")).into_response());
            drop(HttpError::from(ApiError::not_configured("KIOT_API_KEY")).into_response());
        });
        assert!(logs.is_empty(), "{logs:?}");
    }
}
