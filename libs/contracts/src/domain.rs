//! Validated domain types parsed at the edge, so that inner code never sees bad input.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::reply::ApiError;

/// Geographic scope of a proxy, as in the original design (docs/design.md#collections): `vn` or `global`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    /// Vietnam-specific proxies.
    Vn,
    /// International proxies.
    Global,
}

impl Area {
    /// Every area, for iteration (metrics, index loading).
    pub const ALL: [Area; 2] = [Area::Vn, Area::Global];

    /// The wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Area::Vn => "vn",
            Area::Global => "global",
        }
    }

    /// Parses a user-supplied area, naming `field` in the error.
    pub fn parse_field(field: &str, value: Option<&str>) -> Result<Self, ApiError> {
        match value.map(str::trim) {
            None | Some("") => Err(ApiError::invalid(field, "is required (one of: vn, global)")),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::invalid(field, format!("unknown area {v:?} (expected one of: vn, global)"))),
        }
    }
}

impl FromStr for Area {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vn" => Ok(Area::Vn),
            "global" => Ok(Area::Global),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MongoDB ObjectId in its 24-character lowercase hex form: proxy ids and lease keys.
///
/// Kept as a string here so the contracts crate does not depend on the database driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ObjectIdHex(String);

impl ObjectIdHex {
    /// Parses a user-supplied id, naming `field` in the error.
    pub fn parse_field(field: &str, value: Option<&str>) -> Result<Self, ApiError> {
        let v = value.map(str::trim).unwrap_or_default();
        if v.is_empty() {
            return Err(ApiError::invalid(field, "is required"));
        }
        if v.len() == 24 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(v.to_ascii_lowercase()))
        } else {
            Err(ApiError::invalid(field, "must be a 24-character hexadecimal ObjectId"))
        }
    }

    /// Wraps a value already known to be valid (produced by the database driver).
    pub fn from_trusted(hex: String) -> Self {
        Self(hex)
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated page of a list: the one place the bounds of `page` and `limit` live, for the gateway's list routes
/// and the auth service's user list alike.
///
/// `page` is bounded so that the number of documents skipped, `(page - 1) * limit`, always fits MongoDB's signed
/// 64-bit `skip` (an unbounded `u64` page made the driver fail with a 500); a million pages of 500 is far past any
/// pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagination {
    /// 1-based page.
    pub page: u64,
    /// Page size.
    pub limit: i64,
}

impl Pagination {
    /// The largest `page` accepted.
    pub const MAX_PAGE: u64 = 1_000_000;
    /// The largest `limit` accepted.
    pub const MAX_LIMIT: i64 = 500;
    /// `limit` when none is given.
    pub const DEFAULT_LIMIT: i64 = 20;

    /// Validates a requested page (default 1) and limit (default 20); the error names `page` or `limit`.
    pub fn parse(page: Option<u64>, limit: Option<i64>) -> Result<Self, ApiError> {
        let page = page.unwrap_or(1);
        let limit = limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_PAGE).contains(&page) {
            return Err(ApiError::invalid("page", format!("must be between 1 and {}", Self::MAX_PAGE)));
        }
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid("limit", format!("must be between 1 and {}", Self::MAX_LIMIT)));
        }
        Ok(Self { page, limit })
    }

    /// Documents to skip: at most `(MAX_PAGE - 1) * MAX_LIMIT`, well inside `i64`.
    pub fn skip(self) -> u64 {
        (self.page - 1).saturating_mul(self.limit.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn area_parsing_names_the_field() {
        assert_eq!(Area::parse_field("area", Some("vn")).ok(), Some(Area::Vn));
        let e = Area::parse_field("area", Some("mars")).err();
        let e = e.as_ref();
        assert_eq!(e.map(|e| e.code), Some(ErrorCode::InvalidInput));
        assert_eq!(e.and_then(|e| e.field.as_deref()), Some("area"));
        assert!(Area::parse_field("area", None).is_err());
        assert!(Area::parse_field("area", Some("VN ")).is_err(), "areas are lowercase on the wire");
    }

    #[test]
    fn pagination_is_bounded_and_names_the_field() {
        assert_eq!(Pagination::parse(None, None).ok(), Some(Pagination { page: 1, limit: 20 }));
        let max = Pagination::parse(Some(Pagination::MAX_PAGE), Some(Pagination::MAX_LIMIT));
        let max = max.map(Pagination::skip).unwrap_or_default();
        assert!(i64::try_from(max).is_ok(), "the largest skip fits MongoDB's i64");
        for (page, limit, field) in [
            (Some(0), None, "page"),
            (Some(9_223_372_036_854_775_808), None, "page"),
            (Some(u64::MAX), None, "page"),
            (None, Some(0), "limit"),
            (None, Some(-1), "limit"),
            (None, Some(501), "limit"),
        ] {
            let e = Pagination::parse(page, limit).err();
            assert_eq!(e.as_ref().map(|e| e.code), Some(ErrorCode::InvalidInput));
            assert_eq!(e.as_ref().and_then(|e| e.field.as_deref()), Some(field), "{page:?} {limit:?}");
        }
    }

    #[test]
    fn object_ids_are_validated() {
        assert!(ObjectIdHex::parse_field("key", Some("65a1b2c3d4e5f60718293a4b")).is_ok());
        assert!(ObjectIdHex::parse_field("key", Some("65a1b2c3d4e5f60718293a4")).is_err());
        assert!(ObjectIdHex::parse_field("key", Some("zza1b2c3d4e5f60718293a4b")).is_err());
        assert!(ObjectIdHex::parse_field("key", None).is_err());
    }
}
