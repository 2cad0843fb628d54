//! Users and logins: requests to the auth service (`proxypool.v1.auth.*`), sent by the gateway.
//!
//! Passwords travel in these requests inside the cluster; run NATS with TLS between nodes in production. They are
//! never part of a reply and never logged (their `Debug` is redacted).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Who is calling, as the gateway authenticated them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Caller {
    /// The user id from a verified JWT; `None` for the static admin key.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Whether the caller is an authenticated admin (JWT or static key).
    #[serde(default)]
    pub admin: bool,
}

/// `POST /api/register` and `POST /api/users/users` body.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Email, the login; validated, unique.
    pub email: String,
    /// Display name; unique.
    pub username: String,
    /// Password, 8 to 72 bytes (bcrypt's limit).
    pub password: String,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser").field("email", &self.email).field("username", &self.username).finish_non_exhaustive()
    }
}

/// Request on [`crate::subjects::AUTH_REGISTER`] and [`crate::subjects::AUTH_USERS_CREATE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The new user.
    pub user: NewUser,
    /// Who asks (registration policy).
    #[serde(default)]
    pub caller: Caller,
}

/// `POST /api/login` body and request on [`crate::subjects::AUTH_LOGIN`].
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest").field("email", &self.email).finish_non_exhaustive()
    }
}

/// A user as the API shows it: never the password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    /// `_id`.
    pub id: String,
    /// Email.
    pub email: String,
    /// Username.
    pub username: String,
    /// Created.
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    /// Updated.
    #[serde(rename = "updatedAt")]
    pub updated_at: DateTime<Utc>,
}

/// Reply of a login.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginReply {
    /// The JWT; send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// When the token expires.
    pub expires_at: DateTime<Utc>,
    /// The user.
    pub user: UserView,
}

/// Request on [`crate::subjects::AUTH_ME`] and [`crate::subjects::AUTH_USERS_DELETE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserIdRequest {
    /// The user id.
    pub id: String,
}

/// Request on [`crate::subjects::AUTH_USERS_LIST`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListUsersRequest {
    /// 1-based page.
    #[serde(default)]
    pub page: Option<u64>,
    /// Page size.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `PUT /api/users/users/{id}` body: any subset of the fields.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New email.
    #[serde(default)]
    pub email: Option<String>,
    /// New username.
    #[serde(default)]
    pub username: Option<String>,
    /// New password.
    #[serde(default)]
    pub password: Option<String>,
}

impl fmt::Debug for UserPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPatch")
            .field("email", &self.email)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// Request on [`crate::subjects::AUTH_USERS_UPDATE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateUserRequest {
    /// The user id.
    pub id: String,
    /// The changes.
    pub patch: UserPatch,
}

/// A page of users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserPage {
    /// Users.
    pub data: Vec<UserView>,
    /// Users in all pages.
    pub total: u64,
    /// Page.
    pub page: u64,
    /// Page size.
    pub limit: i64,
}

/// Reply of a delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deleted {
    /// How many records were deleted.
    pub deleted: u64,
}
