//! `/api/proxy_packages`: list, create, update, delete, bulk-delete. A package needs an existing provider.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::ApiError;
use proxypool_store::model::PackageDoc;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Admin;
use crate::error::HttpResult;
use crate::extract::{Id, Path, Query};
use crate::routes::body::Body;
use crate::routes::common::{
    db_error, delete_checked, filter_id, iso, list, non_empty, oid, price, BulkDelete, DeleteResult, Page, Paged,
};
use crate::state::AppState;

/// Body of `POST /api/proxy_packages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePackage {
    /// Unique business key.
    pub code: String,
    /// Display name.
    pub name: String,
    /// Price.
    pub price: f64,
    /// Notes.
    #[serde(default)]
    pub note: String,
    /// Parent provider; must exist.
    #[schema(pattern = "^[0-9a-fA-F]{24}$")]
    pub proxy_provider_id: String,
    /// Active, default true.
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// Body of `PUT /api/proxy_packages/{id}`: any subset.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePackage {
    /// Code.
    pub code: Option<String>,
    /// Name (copied into its proxies' `package_name`).
    pub name: Option<String>,
    /// Price.
    pub price: Option<f64>,
    /// Note.
    pub note: Option<String>,
    /// Provider; must exist.
    #[schema(pattern = "^[0-9a-fA-F]{24}$")]
    pub proxy_provider_id: Option<String>,
    /// Active.
    pub is_active: Option<bool>,
}

/// A package as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PackageView {
    /// `_id`.
    pub id: String,
    /// Code.
    pub code: String,
    /// Name.
    pub name: String,
    /// Price.
    pub price: f64,
    /// Note.
    pub note: String,
    /// Provider.
    pub proxy_provider_id: String,
    /// Active.
    pub is_active: bool,
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

impl From<PackageDoc> for PackageView {
    fn from(d: PackageDoc) -> Self {
        Self {
            id: d.id.to_hex(),
            code: d.code,
            name: d.name,
            price: d.price,
            note: d.note,
            proxy_provider_id: d.proxy_provider_id.to_hex(),
            is_active: d.is_active,
            created_by: d.created_by.map(|i| i.to_hex()),
            updated_by: d.updated_by.map(|i| i.to_hex()),
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

/// Filters of the package list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PackageQuery {
    /// Only packages of this provider id.
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    pub provider: Option<String>,
    /// Only active (true) or inactive (false) packages.
    pub active: Option<bool>,
}

async fn provider_exists(state: &AppState, id: ObjectId) -> HttpResult<()> {
    let found = state.store.providers().find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "provider"))?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiError::invalid("proxy_provider_id", "does not name an existing provider").into()),
    }
}

/// List packages.
#[utoipa::path(get, path = "/api/proxy_packages", tag = "packages", params(PackageQuery, Page),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Paged<PackageView>), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn list_packages(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<PackageQuery>,
    Query(page): Query<Page>,
) -> HttpResult<Json<Paged<PackageView>>> {
    let mut filter = doc! {};
    if let Some(p) = filter_id("provider", q.provider.as_deref())? {
        filter.insert("proxy_provider_id", p);
    }
    if let Some(a) = q.active {
        filter.insert("is_active", a);
    }
    Ok(Json(list(&state.store.packages(), filter, &page, PackageView::from).await?))
}

/// Create a package.
#[utoipa::path(post, path = "/api/proxy_packages", tag = "packages", request_body = CreatePackage,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = PackageView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn create_package(
    State(state): State<AppState>,
    admin: Admin,
    Body(b): Body<CreatePackage>,
) -> HttpResult<(StatusCode, Json<PackageView>)> {
    let provider = oid("proxy_provider_id", &b.proxy_provider_id)?;
    let now = DateTime::now();
    let d = PackageDoc {
        id: ObjectId::new(),
        code: non_empty("code", &b.code, 200)?,
        name: non_empty("name", &b.name, 200)?,
        price: price(b.price)?,
        note: b.note,
        proxy_provider_id: provider,
        is_active: b.is_active.unwrap_or(true),
        created_by: admin.user_id,
        updated_by: admin.user_id,
        created_at: now,
        updated_at: now,
    };
    provider_exists(&state, provider).await?;
    state.store.packages().insert_one(&d).await.map_err(|e| db_error(e, "a package with this code"))?;
    Ok((StatusCode::CREATED, Json(d.into())))
}

/// Update a package.
#[utoipa::path(put, path = "/api/proxy_packages/{id}", tag = "packages", request_body = UpdatePackage,
    params(("id" = inline(crate::extract::Id), Path, description = "Package id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = PackageView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn update_package(
    State(state): State<AppState>,
    admin: Admin,
    Path(Id(id)): Path<Id>,
    Body(b): Body<UpdatePackage>,
) -> HttpResult<Json<PackageView>> {
    let mut set = doc! { "updatedAt": DateTime::now(), "updated_by": admin.user_id };
    if let Some(v) = &b.code {
        set.insert("code", non_empty("code", v, 200)?);
    }
    let name = b.name.as_deref().map(|v| non_empty("name", v, 200)).transpose()?;
    if let Some(v) = &name {
        set.insert("name", v.clone());
    }
    if let Some(v) = b.price {
        set.insert("price", price(v)?);
    }
    if let Some(v) = b.note {
        set.insert("note", v);
    }
    if let Some(v) = b.is_active {
        set.insert("is_active", v);
    }
    if let Some(v) = &b.proxy_provider_id {
        let provider = oid("proxy_provider_id", v)?;
        provider_exists(&state, provider).await?;
        set.insert("proxy_provider_id", provider);
    }
    let coll = state.store.packages();
    let res = coll
        .update_one(doc! { "_id": id }, doc! { "$set": set })
        .await
        .map_err(|e| db_error(e, "a package with this code"))?;
    if res.matched_count == 0 {
        return Err(ApiError::not_found(format!("package {id} not found")).into());
    }
    if let Some(name) = name {
        // Keep the denormalised name on the package's proxies in step.
        state
            .store
            .proxies()
            .update_many(doc! { "proxy_package_id": id }, doc! { "$set": { "package_name": name } })
            .await
            .map_err(|e| db_error(e, "proxy"))?;
    }
    let d = coll.find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "package"))?;
    d.map(|d| Json(d.into())).ok_or_else(|| ApiError::not_found(format!("package {id} not found")).into())
}

/// Delete a package (409 while proxies refer to it).
#[utoipa::path(delete, path = "/api/proxy_packages/{id}", tag = "packages",
    params(("id" = inline(crate::extract::Id), Path, description = "Package id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn delete_package(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<DeleteResult>> {
    let s = &state.store;
    Ok(Json(delete_checked(&s.packages(), &[id], &s.proxies(), "proxy_package_id", "package").await?))
}

/// Delete several packages: all or nothing.
#[utoipa::path(post, path = "/api/proxy_packages/bulk-delete", tag = "packages", request_body = BulkDelete,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 409, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn bulk_delete_packages(
    State(state): State<AppState>,
    _admin: Admin,
    Body(b): Body<BulkDelete>,
) -> HttpResult<Json<DeleteResult>> {
    let ids = b.ids()?;
    let s = &state.store;
    Ok(Json(delete_checked(&s.packages(), &ids, &s.proxies(), "proxy_package_id", "package").await?))
}
