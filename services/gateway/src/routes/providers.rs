//! `/api/proxy_providers`: list, create, update, delete, bulk-delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::ApiError;
use proxypool_store::model::{ProviderDoc, RotateFields};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Admin;
use crate::error::HttpResult;
use crate::extract::{Id, Path, Query};
use crate::routes::body::Body;
use crate::routes::common::{db_error, delete_checked, iso, list, non_empty, BulkDelete, DeleteResult, Page, Paged};
use crate::state::AppState;

const DUPLICATE: &str = "a provider with this name, account or domain";

/// Body of `POST /api/proxy_providers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProvider {
    /// Unique name.
    pub name: String,
    /// Unique account.
    pub account: String,
    /// Unique domain.
    pub domain: String,
    /// Active, default true.
    #[serde(default)]
    pub is_active: Option<bool>,
    /// For providers other than KiotProxy and ZingProxy: where the rotate response holds the new address.
    #[serde(default)]
    pub rotate_fields: Option<RotateFieldsDto>,
}

/// Dotted JSON paths of a rotate response's fields, e.g. `{"ip": "data.host", "port": "data.port"}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateFieldsDto {
    /// Path of the new IP or host.
    pub ip: String,
    /// Path of the new port.
    pub port: String,
    /// Path of the new username.
    #[serde(default)]
    pub username: Option<String>,
    /// Path of the new password.
    #[serde(default)]
    pub password: Option<String>,
}

impl RotateFieldsDto {
    fn validate(self) -> Result<RotateFields, crate::error::HttpError> {
        let path = |field: &str, v: &str| non_empty(&format!("rotate_fields.{field}"), v, 200);
        Ok(RotateFields {
            ip: path("ip", &self.ip)?,
            port: path("port", &self.port)?,
            username: self.username.as_deref().map(|v| path("username", v)).transpose()?,
            password: self.password.as_deref().map(|v| path("password", v)).transpose()?,
        })
    }
}

impl From<RotateFields> for RotateFieldsDto {
    fn from(f: RotateFields) -> Self {
        Self { ip: f.ip, port: f.port, username: f.username, password: f.password }
    }
}

/// Body of `PUT /api/proxy_providers/{id}`: any subset.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProvider {
    /// Name.
    pub name: Option<String>,
    /// Account.
    pub account: Option<String>,
    /// Domain.
    pub domain: Option<String>,
    /// Active.
    pub is_active: Option<bool>,
    /// Rotate response fields.
    pub rotate_fields: Option<RotateFieldsDto>,
}

/// A provider as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProviderView {
    /// `_id`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Account.
    pub account: String,
    /// Domain.
    pub domain: String,
    /// Active.
    pub is_active: bool,
    /// Rotate response fields (generic providers).
    pub rotate_fields: Option<RotateFieldsDto>,
    /// Creator.
    pub created_by: Option<String>,
    /// Last updater.
    pub updated_by: Option<String>,
    /// Created.
    #[serde(rename = "createdAt")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Updated.
    #[serde(rename = "updatedAt")]
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<ProviderDoc> for ProviderView {
    fn from(d: ProviderDoc) -> Self {
        Self {
            id: d.id.to_hex(),
            name: d.name,
            account: d.account,
            domain: d.domain,
            is_active: d.is_active,
            rotate_fields: d.rotate_fields.map(RotateFieldsDto::from),
            created_by: d.created_by.map(|i| i.to_hex()),
            updated_by: d.updated_by.map(|i| i.to_hex()),
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

/// Filters of the provider list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProviderQuery {
    /// Only active (true) or inactive (false) providers.
    pub active: Option<bool>,
}

/// List providers.
#[utoipa::path(get, path = "/api/proxy_providers", tag = "providers", params(ProviderQuery, Page),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Paged<ProviderView>), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn list_providers(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<ProviderQuery>,
    Query(page): Query<Page>,
) -> HttpResult<Json<Paged<ProviderView>>> {
    let mut filter = doc! {};
    if let Some(a) = q.active {
        filter.insert("is_active", a);
    }
    Ok(Json(list(&state.store.providers(), filter, &page, ProviderView::from).await?))
}

/// Create a provider.
#[utoipa::path(post, path = "/api/proxy_providers", tag = "providers", request_body = CreateProvider,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = ProviderView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn create_provider(
    State(state): State<AppState>,
    admin: Admin,
    Body(b): Body<CreateProvider>,
) -> HttpResult<(StatusCode, Json<ProviderView>)> {
    let now = DateTime::now();
    let d = ProviderDoc {
        id: ObjectId::new(),
        name: non_empty("name", &b.name, 200)?,
        account: non_empty("account", &b.account, 200)?,
        domain: non_empty("domain", &b.domain, 300)?,
        is_active: b.is_active.unwrap_or(true),
        rotate_fields: b.rotate_fields.map(RotateFieldsDto::validate).transpose()?,
        created_by: admin.user_id,
        updated_by: admin.user_id,
        created_at: now,
        updated_at: now,
    };
    state.store.providers().insert_one(&d).await.map_err(|e| db_error(e, DUPLICATE))?;
    Ok((StatusCode::CREATED, Json(d.into())))
}

/// Update a provider.
#[utoipa::path(put, path = "/api/proxy_providers/{id}", tag = "providers", request_body = UpdateProvider,
    params(("id" = inline(crate::extract::Id), Path, description = "Provider id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProviderView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn update_provider(
    State(state): State<AppState>,
    admin: Admin,
    Path(Id(id)): Path<Id>,
    Body(b): Body<UpdateProvider>,
) -> HttpResult<Json<ProviderView>> {
    let mut set = doc! { "updatedAt": DateTime::now(), "updated_by": admin.user_id };
    if let Some(v) = &b.name {
        set.insert("name", non_empty("name", v, 200)?);
    }
    if let Some(v) = &b.account {
        set.insert("account", non_empty("account", v, 200)?);
    }
    if let Some(v) = &b.domain {
        set.insert("domain", non_empty("domain", v, 300)?);
    }
    if let Some(v) = b.is_active {
        set.insert("is_active", v);
    }
    if let Some(v) = b.rotate_fields {
        let fields = v.validate()?;
        set.insert("rotate_fields", bson::to_bson(&fields).map_err(|e| ApiError::internal(e.to_string()))?);
    }
    let coll = state.store.providers();
    let res = coll.update_one(doc! { "_id": id }, doc! { "$set": set }).await.map_err(|e| db_error(e, DUPLICATE))?;
    if res.matched_count == 0 {
        return Err(ApiError::not_found(format!("provider {id} not found")).into());
    }
    let d = coll.find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "provider"))?;
    d.map(|d| Json(d.into())).ok_or_else(|| ApiError::not_found(format!("provider {id} not found")).into())
}

/// Delete a provider (409 while packages refer to it).
#[utoipa::path(delete, path = "/api/proxy_providers/{id}", tag = "providers",
    params(("id" = inline(crate::extract::Id), Path, description = "Provider id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn delete_provider(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<DeleteResult>> {
    let s = &state.store;
    Ok(Json(delete_checked(&s.providers(), &[id], &s.packages(), "proxy_provider_id", "provider").await?))
}

/// Delete several providers: all or nothing.
#[utoipa::path(post, path = "/api/proxy_providers/bulk-delete", tag = "providers", request_body = BulkDelete,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn bulk_delete_providers(
    State(state): State<AppState>,
    _admin: Admin,
    Body(b): Body<BulkDelete>,
) -> HttpResult<Json<DeleteResult>> {
    let ids = b.ids()?;
    let s = &state.store;
    Ok(Json(delete_checked(&s.providers(), &ids, &s.packages(), "proxy_provider_id", "provider").await?))
}
