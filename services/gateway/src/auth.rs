//! Consumer and admin authentication: the static key (constant-time compare) and the client-IP allow list.
//!
//! The client IP and the key comparison are [`proxypool_authn::client`]'s, shared with the forward door.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap};
use ipnet::IpNet;

use crate::error::HttpError;

/// The client's IP, per the rules in [`proxypool_authn::client`].
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let forwarded = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    proxypool_authn::client::client_ip(peer, forwarded, trusted)
}

/// Whether the `Authorization` header is exactly the static key. Constant time in the key's content.
pub fn has_static_key(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| proxypool_authn::client::key_matches(v.as_bytes().trim_ascii(), key))
}

/// The original design's consumer auth (docs/design.md#http-api): the static key AND an allowed client IP.
pub fn check_consumer(
    peer: SocketAddr,
    headers: &HeaderMap,
    key: &str,
    allowed: &[IpNet],
    trusted: &[IpNet],
) -> Result<IpAddr, HttpError> {
    if headers.get(header::AUTHORIZATION).is_none() {
        return Err(HttpError::unauthorized("the Authorization header is required"));
    }
    if !has_static_key(headers, key) {
        return Err(HttpError::unauthorized("the Authorization header does not hold a valid API key"));
    }
    let ip = client_ip(peer, headers, trusted);
    if !proxypool_authn::client::contains(allowed, ip) {
        return Err(HttpError::forbidden(format!("client IP {ip} is not in IP_ALLOWED")));
    }
    Ok(ip)
}

/// An authenticated consumer (the static key and an allowed client IP, per [`check_consumer`]), extracted before
/// anything else of the request is read, so that a caller without credentials learns nothing from validation errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer {
    /// The client's IP (see the module doc), recorded on its leases.
    pub ip: IpAddr,
}

impl axum::extract::FromRequestParts<crate::state::AppState> for Consumer {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        // Present whenever the server runs through `crate::run` (`into_make_service_with_connect_info`).
        let Some(axum::extract::ConnectInfo(peer)) = parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
        else {
            return Err(proxypool_contracts::ApiError::internal("the peer address of the request is unknown").into());
        };
        let c = &state.config;
        let ip = check_consumer(*peer, &parts.headers, c.allowed_api_key.expose(), &c.ip_allowed, &c.trusted_proxies)?;
        Ok(Consumer { ip })
    }
}

/// An authenticated admin: a user with a valid JWT, or a machine client with the static key.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// The user id from the JWT; `None` for the static key.
    pub user_id: Option<bson::oid::ObjectId>,
}

impl Admin {
    /// As the auth service's [`Caller`](proxypool_contracts::auth::Caller).
    pub fn caller(&self) -> proxypool_contracts::auth::Caller {
        proxypool_contracts::auth::Caller { user_id: self.user_id.map(|id| id.to_hex()), admin: true }
    }
}

/// Authenticates an admin from `Authorization`: `Bearer <jwt>` (HS256, signed with `API_KEY`, expiry enforced) or
/// the raw static key. `Ok(None)` when the header is absent.
pub fn admin_from_headers(headers: &HeaderMap, static_key: &str, jwt_secret: &str) -> Result<Option<Admin>, HttpError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let raw = value.to_str().map_err(|_| HttpError::unauthorized("the Authorization header is not valid text"))?.trim();
    if let Some(token) = raw.strip_prefix("Bearer ").map(str::trim) {
        let claims = proxypool_authn::verify(jwt_secret, token).map_err(|e| match e {
            proxypool_authn::TokenError::Expired => HttpError::unauthorized("the token has expired; log in again"),
            _ => HttpError::unauthorized("the token is invalid"),
        })?;
        let user_id = bson::oid::ObjectId::parse_str(&claims.sub)
            .map_err(|_| HttpError::unauthorized("the token's subject is not a user id"))?;
        return Ok(Some(Admin { user_id: Some(user_id) }));
    }
    if has_static_key(headers, static_key) {
        return Ok(Some(Admin { user_id: None }));
    }
    Err(HttpError::unauthorized("the Authorization header holds neither a valid token nor the API key"))
}

impl axum::extract::FromRequestParts<crate::state::AppState> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        MaybeAdmin::from_request_parts(parts, state)
            .await?
            .0
            .ok_or_else(|| HttpError::unauthorized("admin routes need Authorization: Bearer <token> or the API key"))
    }
}

/// Like [`Admin`], but a request without `Authorization` is let through as `None` (a present but bad header is
/// still refused).
#[derive(Debug, Clone, PartialEq)]
pub struct MaybeAdmin(pub Option<Admin>);

impl axum::extract::FromRequestParts<crate::state::AppState> for MaybeAdmin {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        let c = &state.config;
        admin_from_headers(&parts.headers, c.allowed_api_key.expose(), c.jwt_secret.expose()).map(MaybeAdmin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().filter_map(|n| n.parse().ok()).collect()
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert("x-forwarded-for", v);
        }
        h
    }

    #[test]
    fn untrusted_peer_cannot_spoof() {
        let peer: SocketAddr = ([203, 0, 113, 7], 5000).into();
        assert_eq!(client_ip(peer, &xff("127.0.0.1"), &[]), IpAddr::from([203, 0, 113, 7]));
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted() {
        let peer: SocketAddr = ([10, 0, 0, 2], 5000).into();
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged "127.0.0.1"; the load balancer appended the real address.
        let ip = client_ip(peer, &xff("127.0.0.1, 198.51.100.4, 10.0.0.9"), &trusted);
        assert_eq!(ip, IpAddr::from([198, 51, 100, 4]));
    }

    #[test]
    fn mapped_v6_is_v4() {
        let peer: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        assert_eq!(client_ip(peer, &HeaderMap::new(), &[]), IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn key_must_match_exactly() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("secret-key-0123456"));
        assert!(has_static_key(&h, "secret-key-0123456"));
        assert!(!has_static_key(&h, "secret-key-012345"));
        assert!(!has_static_key(&HeaderMap::new(), "secret-key-0123456"));
    }
}
