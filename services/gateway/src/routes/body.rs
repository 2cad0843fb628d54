//! JSON bodies parsed into typed DTOs, with errors that name the offending field.

use axum::body::Bytes;
use proxypool_contracts::ApiError;
use serde::de::DeserializeOwned;

use crate::error::HttpError;

/// Parses a JSON body. The error names the field (`port`, `proxies[2].area`, …) and the reason.
pub fn parse<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let reason = inner.to_string();
        // serde reports a missing field or an unknown field at the parent; take the field name from the message.
        let named = reason.split('`').nth(1).map(str::to_owned);
        let field = if path.is_empty() || path == "." { named.unwrap_or_else(|| "body".to_owned()) } else { path };
        // Drop serde's "at line x column y" suffix: the field name is the useful part.
        let reason = reason.split(" at line ").next().unwrap_or(&reason).to_owned();
        HttpError(ApiError::invalid(&field, format!("is invalid: {reason}")))
    })
}
