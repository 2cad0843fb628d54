//! Driver errors, classified into what a caller acts on.

use mongodb::error::{Error, ErrorKind, WriteFailure};

/// A database error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (selection timeout, network, shutdown in progress): answer 503.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Error),
    /// A unique index refused the write (E11000).
    #[error("duplicate key: {0}")]
    Duplicate(#[source] Error),
    /// Anything else: a bug or unexpected data.
    #[error("database error: {0}")]
    Other(#[source] Error),
}

impl StoreError {
    /// The reply a caller gets: unreachable → retryable `service_unavailable`, a unique-index refusal → `conflict`
    /// ("`what` already exists"), anything else → `internal`, logged with its cause.
    pub fn into_api(self, what: &str) -> proxypool_contracts::ApiError {
        match &self {
            StoreError::Unavailable(e) => tracing::warn!(error = %e, "database unavailable"),
            StoreError::Duplicate(_) => {}
            StoreError::Other(e) => tracing::error!(error = ?e, "database error"),
        }
        self.to_api(what)
    }

    /// [`StoreError::into_api`] without the log line, for a caller that logs the error itself with this one as
    /// its cause (the gateway logs each failed request once).
    pub fn to_api(&self, what: &str) -> proxypool_contracts::ApiError {
        use proxypool_contracts::{ApiError, ErrorCode};
        match self {
            StoreError::Unavailable(_) => {
                proxypool_telemetry::metrics::dependency_error("mongodb");
                ApiError::unavailable("the database is unreachable; retry shortly")
            }
            StoreError::Duplicate(_) => ApiError::new(ErrorCode::Conflict, format!("{what} already exists")),
            StoreError::Other(_) => {
                proxypool_telemetry::metrics::dependency_error("mongodb");
                ApiError::internal("unexpected database error")
            }
        }
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        if is_duplicate(&e) {
            return StoreError::Duplicate(e);
        }
        match *e.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::Shutdown => StoreError::Unavailable(e),
            _ => StoreError::Other(e),
        }
    }
}

fn is_duplicate(e: &Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        ErrorKind::InsertMany(m) => m.write_errors.as_ref().is_some_and(|ws| ws.iter().any(|w| w.code == 11000)),
        _ => false,
    }
}
