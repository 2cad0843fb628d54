//! Auth routes, forwarded to the auth service over NATS: register, login, me, users CRUD.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use proxypool_contracts::auth::{
    Deleted, ListUsersRequest, LoginReply, LoginRequest, NewUser, RegisterRequest, UpdateUserRequest, UserIdRequest,
    UserPage, UserPatch, UserView,
};
use proxypool_contracts::endpoints::{
    AuthLogin, AuthMe, AuthRegister, AuthUsersCreate, AuthUsersDelete, AuthUsersList, AuthUsersUpdate,
};
use proxypool_contracts::{ApiError, ErrorCode};

use crate::auth::{Admin, MaybeAdmin};
use crate::error::HttpResult;
use crate::extract::{Id, Path, Query};
use crate::routes::body::Body;
use crate::routes::common::Page;
use crate::state::AppState;

/// Register a user. The first user registers freely; after that an admin token (or `ALLOW_REGISTRATION=true`) is
/// required.
#[utoipa::path(post, path = "/api/register", tag = "auth", request_body = NewUser,
    security((), ("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = UserView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn register(
    State(state): State<AppState>,
    MaybeAdmin(admin): MaybeAdmin,
    Body(user): Body<NewUser>,
) -> HttpResult<(StatusCode, Json<UserView>)> {
    let caller = admin.map(|a| a.caller()).unwrap_or_default();
    let view = state.call::<AuthRegister>(&RegisterRequest { user, caller }).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Log in with email and password; returns a JWT valid for 14 days.
#[utoipa::path(post, path = "/api/login", tag = "auth", request_body = LoginRequest, security(()),
    responses((status = 200, body = LoginReply), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn login(State(state): State<AppState>, Body(req): Body<LoginRequest>) -> HttpResult<Json<LoginReply>> {
    Ok(Json(state.call::<AuthLogin>(&req).await?))
}

/// The user of the bearer token.
#[utoipa::path(get, path = "/api/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = crate::openapi::ErrorBody),
        (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn me(State(state): State<AppState>, admin: Admin) -> HttpResult<Json<UserView>> {
    let Some(id) = admin.user_id else {
        return Err(
            ApiError::new(ErrorCode::Unauthorized, "/api/me needs a user's bearer token, not the API key").into()
        );
    };
    Ok(Json(state.call::<AuthMe>(&UserIdRequest { id: id.to_hex() }).await?))
}

/// List users.
#[utoipa::path(get, path = "/api/users/users", tag = "users", params(Page),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = UserPage), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn list_users(
    State(state): State<AppState>,
    _admin: Admin,
    Query(page): Query<Page>,
) -> HttpResult<Json<UserPage>> {
    let page = page.resolve()?;
    let req = ListUsersRequest { page: Some(page.page), limit: Some(page.limit) };
    Ok(Json(state.call::<AuthUsersList>(&req).await?))
}

/// Create a user.
#[utoipa::path(post, path = "/api/users/users", tag = "users", request_body = NewUser,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = UserView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn create_user(
    State(state): State<AppState>,
    admin: Admin,
    Body(user): Body<NewUser>,
) -> HttpResult<(StatusCode, Json<UserView>)> {
    let req = RegisterRequest { user, caller: admin.caller() };
    Ok((StatusCode::CREATED, Json(state.call::<AuthUsersCreate>(&req).await?)))
}

/// Update a user's email, username or password.
#[utoipa::path(put, path = "/api/users/users/{id}", tag = "users", request_body = UserPatch,
    params(("id" = inline(crate::extract::Id), Path, description = "User id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = UserView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn update_user(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
    Body(patch): Body<UserPatch>,
) -> HttpResult<Json<UserView>> {
    Ok(Json(state.call::<AuthUsersUpdate>(&UpdateUserRequest { id: id.to_hex(), patch }).await?))
}

/// Delete a user.
#[utoipa::path(delete, path = "/api/users/users/{id}", tag = "users",
    params(("id" = inline(crate::extract::Id), Path, description = "User id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Deleted), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn delete_user(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<Deleted>> {
    Ok(Json(state.call::<AuthUsersDelete>(&UserIdRequest { id: id.to_hex() }).await?))
}
