//! Extractors whose rejection is the one [`HttpError`], so that a query string, path or form that does not parse is
//! answered with the JSON error envelope naming the field, never with axum's plain-text 400.
//!
//! Use these instead of `axum::extract::{Query, Path, Multipart}`; JSON bodies go through
//! [`crate::routes::body::Body`]. Path ids are parsed here too, into [`Id`], so handlers never see a malformed one.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bson::oid::ObjectId;
use proxypool_contracts::{ApiError, ObjectIdHex};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::HttpError;

/// The `invalid_input` error of a value that failed to deserialize at `path` (`page`, `proxies[2].area`, or empty
/// at the top level), naming `fallback` when neither the path nor serde's message names a field.
pub fn invalid_at(path: &str, reason: &str, fallback: &str) -> HttpError {
    // serde reports a missing, unknown or duplicate field at the parent; its message quotes the field's name.
    let named = reason.split('`').nth(1).map(str::to_owned);
    let field = if path.is_empty() || path == "." { named.unwrap_or_else(|| fallback.to_owned()) } else { path.into() };
    // Drop serde's "at line x column y" suffix: the field name is the useful part.
    let reason = reason.split(" at line ").next().unwrap_or(reason);
    ApiError::invalid(&field, format!("is invalid: {reason}")).into()
}

/// A query string deserialized into `T`; a bad value is a 400 naming its parameter (`?page=abc` → `page`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let raw = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| {
            let path = e.path().to_string();
            invalid_at(&path, &e.into_inner().to_string(), "query")
        })
    }
}

/// Path parameters deserialized into `T`; a bad one is a 400 naming it (`/api/proxies/xyz` → `id`).
#[derive(Debug, Clone, Copy)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(match e.into_kind() {
                ErrorKind::DeserializeError { key, message, .. } => ApiError::invalid(&key, message).into(),
                ErrorKind::ParseErrorAtKey { key, value, expected_type } => {
                    ApiError::invalid(&key, format!("is invalid: cannot parse {value:?} as {expected_type}")).into()
                }
                ErrorKind::InvalidUtf8InPathParam { key } => ApiError::invalid(&key, "is not valid UTF-8").into(),
                // The route and the extracted type disagree: a bug, not the caller's fault.
                e @ (ErrorKind::WrongNumberOfParameters { .. } | ErrorKind::UnsupportedType { .. }) => {
                    ApiError::internal(format!("path parameters do not fit the handler: {e}")).into()
                }
                e => ApiError::invalid("path", format!("is invalid: {e}")).into(),
            }),
            Err(e) => Err(ApiError::internal(format!("path parameters unavailable: {e}")).into()),
        }
    }
}

/// A record id in a path (`/api/proxies/{id}`): a 24-character hexadecimal ObjectId, validated when the path is
/// extracted (`Path<Id>`), so a malformed one is a 400 naming the parameter before the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub ObjectId);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a 24-character hexadecimal ObjectId")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Id, E> {
                // The message is the reason only: the extractor prefixes the parameter's name.
                let hex = ObjectIdHex::parse_field("", Some(v)).map_err(|e| E::custom(e.message.trim_start()))?;
                ObjectId::parse_str(hex.as_str()).map(Id).map_err(|_| E::custom("is not a valid ObjectId"))
            }
        }
        d.deserialize_str(V)
    }
}

impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(OBJECT_ID_PATTERN))
            .description(Some("A 24-character hexadecimal ObjectId"))
            .into()
    }
}

impl utoipa::ToSchema for Id {}

/// The pattern of an ObjectId in hex, for the OpenAPI document of id fields (`#[schema(pattern = ...)]` takes a
/// literal: keep those in step).
pub const OBJECT_ID_PATTERN: &str = "^[0-9a-fA-F]{24}$";

/// A `multipart/form-data` body; a request that is not one is a 400 naming `file` (the only form field we take).
#[derive(Debug)]
pub struct Multipart(pub axum::extract::Multipart);

impl<S: Send + Sync> FromRequest<S> for Multipart {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Multipart::from_request(req, state).await.map(Multipart).map_err(|e| {
            ApiError::invalid("file", format!("the body is not a multipart/form-data upload: {}", e.body_text())).into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field() {
        let e = invalid_at("", "duplicate field `page`", "query").error;
        assert_eq!(e.field.as_deref(), Some("page"));
        let e = invalid_at("wait", "provided string was not `true` or `false`", "query").error;
        assert_eq!(e.field.as_deref(), Some("wait"));
        let e = invalid_at("", "expected value at line 1 column 1", "body").error;
        assert_eq!((e.field.as_deref(), e.message.as_str()), (Some("body"), "body is invalid: expected value"));
    }
}
