//! Dispatch of the auth subjects.

use bytes::Bytes;
use proxypool_contracts::auth::{ListUsersRequest, LoginRequest, RegisterRequest, UpdateUserRequest, UserIdRequest};
use proxypool_contracts::{subjects, ApiError};
use proxypool_rpc::{encode, parse};

use crate::service::AuthService;

/// Handles one request on one of [`subjects::AUTH_ALL`].
pub async fn handle(service: &AuthService, subject: &str, payload: &[u8]) -> Bytes {
    match subject {
        subjects::AUTH_REGISTER | subjects::AUTH_USERS_CREATE => {
            let r = match parse::<RegisterRequest>(payload) {
                Ok(mut req) => {
                    if subject == subjects::AUTH_USERS_CREATE && !req.caller.admin {
                        Err(ApiError::new(proxypool_contracts::ErrorCode::Unauthorized, "admin only"))
                    } else {
                        // users.create is the admin route; register applies the bootstrap policy.
                        if subject == subjects::AUTH_USERS_CREATE {
                            req.caller.admin = true;
                        }
                        service.register(req.user, &req.caller).await
                    }
                }
                Err(e) => Err(e),
            };
            encode(r)
        }
        subjects::AUTH_LOGIN => encode(match parse::<LoginRequest>(payload) {
            Ok(req) => service.login(req).await,
            Err(e) => Err(e),
        }),
        subjects::AUTH_ME => encode(match parse::<UserIdRequest>(payload) {
            Ok(req) => service.get(&req.id).await,
            Err(e) => Err(e),
        }),
        subjects::AUTH_USERS_LIST => encode(match parse::<ListUsersRequest>(payload) {
            Ok(req) => service.list(req).await,
            Err(e) => Err(e),
        }),
        subjects::AUTH_USERS_UPDATE => encode(match parse::<UpdateUserRequest>(payload) {
            Ok(req) => service.update(&req.id, req.patch).await,
            Err(e) => Err(e),
        }),
        subjects::AUTH_USERS_DELETE => encode(match parse::<UserIdRequest>(payload) {
            Ok(req) => service.delete(&req.id).await,
            Err(e) => Err(e),
        }),
        other => encode::<()>(Err(ApiError::internal(format!("no handler for {other}")))),
    }
}
