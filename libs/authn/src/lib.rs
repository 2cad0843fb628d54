//! Admin tokens: HS256 JWTs signed with `API_KEY`, `sub` = user id, 14 days by default; and, in [`client`], how
//! every door tells who a consumer is (the static key, the client IP).
//!
//! The auth service issues them at login; the gateway verifies them on every admin request without a round trip
//! (signature and expiry). A token stays valid until it expires even if its user is deleted; keep `API_KEY` secret
//! and rotate it to revoke every token at once.

pub mod client;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The original design's token lifetime (docs/design.md#http-api).
pub const DEFAULT_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// The claims we sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id (ObjectId hex).
    pub sub: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expires at, seconds since the epoch.
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Expired.
    #[error("the token has expired")]
    Expired,
    /// Bad signature, malformed, wrong algorithm.
    #[error("the token is invalid")]
    Invalid,
    /// Signing failed (never expected with HS256).
    #[error("cannot sign a token: {0}")]
    Sign(String),
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Signs a token for `user_id`, valid for `ttl`.
pub fn issue(secret: &str, user_id: &str, ttl: Duration) -> Result<(String, Claims), TokenError> {
    let iat = now();
    let claims = Claims { sub: user_id.to_owned(), iat, exp: iat + ttl.as_secs() };
    let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|e| TokenError::Sign(e.to_string()))?;
    Ok((token, claims))
}

/// Verifies signature, algorithm and expiry (no leeway).
pub fn verify(secret: &str, token: &str) -> Result<Claims, TokenError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation).map(|d| d.claims).map_err(|e| {
        match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test-secret-0123456789abcdef";

    #[test]
    fn round_trip_and_refusals() {
        let (token, claims) = issue(SECRET, "65a1b2c3d4e5f60718293a4b", DEFAULT_TTL).expect("sign");
        assert_eq!(verify(SECRET, &token).ok(), Some(claims));
        assert!(matches!(verify("another-secret-0123456789", &token), Err(TokenError::Invalid)));
        let mut tampered = token.clone();
        tampered.insert(tampered.len() / 2, 'x');
        assert!(verify(SECRET, &tampered).is_err());
        let (old, _) = issue(SECRET, "u", Duration::ZERO).expect("sign");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(verify(SECRET, &old), Err(TokenError::Expired)));
    }
}
