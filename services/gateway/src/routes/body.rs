//! JSON bodies parsed into typed DTOs, with errors that name the offending field.
//!
//! [`Body`] reads the body itself instead of using `axum::Json`, so that every failure (too large, unreadable,
//! malformed, a field of the wrong type) is the JSON error envelope, and so that a body sent without
//! `Content-Type: application/json` is still read, as it always was.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use proxypool_contracts::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;

use crate::error::HttpError;
use crate::extract::invalid_at;

/// Parses a JSON body. The error names the field (`port`, `proxies[2].area`, …) and the reason.
pub fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        invalid_at(&path, &e.into_inner().to_string(), "body")
    })
}

/// A JSON request body deserialized into `T` (see the module doc).
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| -> HttpError {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than the limit of 2 MB").into()
            } else {
                ApiError::invalid("body", format!("cannot be read: {}", e.body_text())).into()
            }
        })?;
        parse(&bytes).map(Body)
    }
}
