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
    fn object_ids_are_validated() {
        assert!(ObjectIdHex::parse_field("key", Some("65a1b2c3d4e5f60718293a4b")).is_ok());
        assert!(ObjectIdHex::parse_field("key", Some("65a1b2c3d4e5f60718293a4")).is_err());
        assert!(ObjectIdHex::parse_field("key", Some("zza1b2c3d4e5f60718293a4b")).is_err());
        assert!(ObjectIdHex::parse_field("key", None).is_err());
    }
}
