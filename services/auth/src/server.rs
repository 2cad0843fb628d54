//! The auth endpoints, each a typed route on the service.

use proxypool_contracts::auth::RegisterRequest;
use proxypool_contracts::endpoints::{
    AuthLogin, AuthMe, AuthRegister, AuthUsersCreate, AuthUsersDelete, AuthUsersList, AuthUsersUpdate,
};
use proxypool_contracts::{ApiError, ErrorCode};
use proxypool_rpc::Router;

use crate::service::AuthService;

/// Every auth endpoint, served by `service`.
pub fn router(service: &AuthService) -> Router<AuthService> {
    Router::new(service.clone())
        // Register applies the bootstrap policy to the caller as the gateway saw it.
        .on::<AuthRegister, _, _>(|s, req: RegisterRequest| async move { s.register(req.user, &req.caller).await })
        .on::<AuthUsersCreate, _, _>(|s, mut req: RegisterRequest| async move {
            if !req.caller.admin {
                return Err(ApiError::new(ErrorCode::Unauthorized, "admin only"));
            }
            req.caller.admin = true;
            s.register(req.user, &req.caller).await
        })
        .on::<AuthLogin, _, _>(|s, req| async move { s.login(req).await })
        .on::<AuthMe, _, _>(|s, req| async move { s.get(&req.id).await })
        .on::<AuthUsersList, _, _>(|s, req| async move { s.list(req).await })
        .on::<AuthUsersUpdate, _, _>(|s, req| async move { s.update(&req.id, req.patch).await })
        .on::<AuthUsersDelete, _, _>(|s, req| async move { s.delete(&req.id).await })
}
