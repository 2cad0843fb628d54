//! Admin routes of this stage: create and list providers, packages and proxies, guarded by the static admin key.
//!
//! Admin writes never touch lease state: the DTOs refuse unknown fields, so `in_use`, `used_count` and `proxy_used`
//! cannot be sent, and new proxies start with SPEC.md's defaults. Every proxy write publishes `proxy.changed`.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use proxypool_contracts::events::{ChangeReason, ProxyChanged};
use proxypool_contracts::{subjects, ApiError, Area, ErrorCode, ObjectIdHex};
use proxypool_store::model::{NewProxy, PackageDoc, ProviderDoc, ProxyDoc, DEFAULT_ROTATE_TIME_SECS};
use proxypool_store::StoreError;
use serde::{Deserialize, Serialize};

use crate::auth;
use crate::error::{HttpError, HttpResult};
use crate::routes::body;
use crate::state::AppState;

fn db_error(e: impl Into<StoreError>, what: &str) -> HttpError {
    match e.into() {
        StoreError::Unavailable(_) => HttpError(ApiError::unavailable("the database is unreachable; retry shortly")),
        StoreError::Duplicate(_) => HttpError(ApiError::new(ErrorCode::Conflict, format!("{what} already exists"))),
        StoreError::Other(e) => {
            tracing::error!(error = ?e, "database error");
            HttpError(ApiError::internal("unexpected database error"))
        }
    }
}

fn iso(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

fn non_empty(field: &str, v: &str, max: usize) -> Result<String, HttpError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty").into());
    }
    if v.len() > max {
        return Err(ApiError::invalid(field, format!("must be at most {max} characters")).into());
    }
    Ok(v.to_owned())
}

fn http_url(field: &str, v: &str) -> Result<String, HttpError> {
    match url::Url::parse(v.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(v.trim().to_owned()),
        _ => Err(ApiError::invalid(field, "must be an absolute http(s) URL").into()),
    }
}

fn oid(field: &str, v: &str) -> Result<ObjectId, HttpError> {
    let hex = ObjectIdHex::parse_field(field, Some(v))?;
    ObjectId::parse_str(hex.as_str()).map_err(|_| ApiError::invalid(field, "is not a valid ObjectId").into())
}

/// Pagination of list routes.
#[derive(Debug, Deserialize)]
pub struct Page {
    /// 1-based page, default 1.
    pub page: Option<u64>,
    /// Page size, default 20, at most 500.
    pub limit: Option<i64>,
}

impl Page {
    fn resolve(&self) -> Result<(u64, i64), HttpError> {
        let page = self.page.unwrap_or(1);
        let limit = self.limit.unwrap_or(20);
        if page == 0 {
            return Err(ApiError::invalid("page", "must be at least 1").into());
        }
        if !(1..=500).contains(&limit) {
            return Err(ApiError::invalid("limit", "must be between 1 and 500").into());
        }
        Ok((page, limit))
    }
}

/// A page of results.
#[derive(Debug, Serialize, Deserialize)]
pub struct Paged<T> {
    /// The items.
    pub data: Vec<T>,
    /// Matching items in all pages.
    pub total: u64,
    /// This page.
    pub page: u64,
    /// Page size.
    pub limit: i64,
}

async fn list<T, V>(
    coll: &mongodb::Collection<T>,
    filter: Document,
    page: &Page,
    view: impl Fn(T) -> V,
) -> HttpResult<Paged<V>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let (p, limit) = page.resolve()?;
    let total = coll.count_documents(filter.clone()).await.map_err(|e| db_error(e, "record"))?;
    let skip = (p - 1).saturating_mul(u64::try_from(limit).unwrap_or(20));
    let docs: Vec<T> = coll
        .find(filter)
        .sort(doc! { "_id": 1 })
        .skip(skip)
        .limit(limit)
        .await
        .map_err(|e| db_error(e, "record"))?
        .try_collect()
        .await
        .map_err(|e| db_error(e, "record"))?;
    Ok(Paged { data: docs.into_iter().map(view).collect(), total, page: p, limit })
}

// ---------------------------------------------------------------- providers

/// Body of `POST /api/proxy_providers`.
#[derive(Debug, Deserialize)]
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
}

/// A provider as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
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
    /// Created.
    #[serde(rename = "createdAt")]
    pub created_at: chrono::DateTime<Utc>,
    /// Updated.
    #[serde(rename = "updatedAt")]
    pub updated_at: chrono::DateTime<Utc>,
}

impl From<ProviderDoc> for ProviderView {
    fn from(d: ProviderDoc) -> Self {
        Self {
            id: d.id.to_hex(),
            name: d.name,
            account: d.account,
            domain: d.domain,
            is_active: d.is_active,
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

/// `POST /api/proxy_providers`.
pub async fn create_provider(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> HttpResult<(StatusCode, Json<ProviderView>)> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    let b: CreateProvider = body::parse(&bytes)?;
    let now = DateTime::now();
    let d = ProviderDoc {
        id: ObjectId::new(),
        name: non_empty("name", &b.name, 200)?,
        account: non_empty("account", &b.account, 200)?,
        domain: non_empty("domain", &b.domain, 300)?,
        is_active: b.is_active.unwrap_or(true),
        created_by: None,
        updated_by: None,
        created_at: now,
        updated_at: now,
    };
    state
        .store
        .providers()
        .insert_one(&d)
        .await
        .map_err(|e| db_error(e, "a provider with this name, account or domain"))?;
    Ok((StatusCode::CREATED, Json(d.into())))
}

/// `GET /api/proxy_providers`.
pub async fn list_providers(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> HttpResult<Json<Paged<ProviderView>>> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    Ok(Json(list(&state.store.providers(), doc! {}, &page, ProviderView::from).await?))
}

// ---------------------------------------------------------------- packages

/// Body of `POST /api/proxy_packages`.
#[derive(Debug, Deserialize)]
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
    /// Parent provider.
    pub proxy_provider_id: String,
    /// Active, default true.
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// A package as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
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
    /// Created.
    #[serde(rename = "createdAt")]
    pub created_at: chrono::DateTime<Utc>,
    /// Updated.
    #[serde(rename = "updatedAt")]
    pub updated_at: chrono::DateTime<Utc>,
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
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

/// `POST /api/proxy_packages`: the provider must exist.
pub async fn create_package(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> HttpResult<(StatusCode, Json<PackageView>)> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    let b: CreatePackage = body::parse(&bytes)?;
    let provider = oid("proxy_provider_id", &b.proxy_provider_id)?;
    if !(b.price.is_finite() && b.price >= 0.0) {
        return Err(ApiError::invalid("price", "must be a non-negative number").into());
    }
    let now = DateTime::now();
    let d = PackageDoc {
        id: ObjectId::new(),
        code: non_empty("code", &b.code, 200)?,
        name: non_empty("name", &b.name, 200)?,
        price: b.price,
        note: b.note,
        proxy_provider_id: provider,
        is_active: b.is_active.unwrap_or(true),
        created_by: None,
        updated_by: None,
        created_at: now,
        updated_at: now,
    };
    let exists =
        state.store.providers().find_one(doc! { "_id": provider }).await.map_err(|e| db_error(e, "provider"))?;
    if exists.is_none() {
        return Err(ApiError::invalid("proxy_provider_id", "does not name an existing provider").into());
    }
    state.store.packages().insert_one(&d).await.map_err(|e| db_error(e, "a package with this code"))?;
    Ok((StatusCode::CREATED, Json(d.into())))
}

/// `GET /api/proxy_packages`.
pub async fn list_packages(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> HttpResult<Json<Paged<PackageView>>> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    Ok(Json(list(&state.store.packages(), doc! {}, &page, PackageView::from).await?))
}

// ---------------------------------------------------------------- proxies

/// Body of `POST /api/proxies`. Lease fields are not accepted (unknown fields are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProxy {
    /// IP or hostname.
    pub ip: String,
    /// Port, 1–65535.
    pub port: u16,
    /// Username.
    #[serde(default)]
    pub username: String,
    /// Password.
    #[serde(default)]
    pub password: String,
    /// `vn` or `global`.
    pub area: Area,
    /// Rotate URL.
    pub rotate_url: String,
    /// Seconds between rotations, default 60.
    #[serde(default)]
    pub rotate_time: Option<i64>,
    /// Bearer token for the rotate URL.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// Enabled, default true.
    #[serde(default)]
    pub is_active: Option<bool>,
    /// Skip the rotate call, default false.
    #[serde(default)]
    pub disable_auto_rotate: Option<bool>,
    /// Subscription expiry.
    #[serde(default)]
    pub expired_at: Option<chrono::DateTime<Utc>>,
    /// Parent package; must exist.
    pub proxy_package_id: String,
}

/// A proxy as the API shows it. `password` and `auth_token` only with `get_full=true`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyView {
    /// `_id`.
    pub id: String,
    /// IP or host.
    pub ip: String,
    /// Port.
    pub port: i32,
    /// Username.
    pub username: String,
    /// Password (full view only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Bearer token of the rotate URL (full view only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    /// Area.
    pub area: Area,
    /// Rotate URL.
    pub rotate_url: String,
    /// Rotation interval.
    pub rotate_time: i64,
    /// Public IP.
    pub ip_public: Option<String>,
    /// Enabled.
    pub is_active: bool,
    /// Last rotation failed.
    pub is_error: bool,
    /// A rotation holds the proxy.
    pub is_rotating: bool,
    /// Rotate call skipped.
    pub disable_auto_rotate: bool,
    /// Next rotation.
    pub next_rotate: Option<chrono::DateTime<Utc>>,
    /// Last lease.
    pub last_used_at: Option<chrono::DateTime<Utc>>,
    /// Expiry.
    pub expired_at: Option<chrono::DateTime<Utc>>,
    /// Active leases (read-only).
    pub in_use: i32,
    /// Leases this cycle (read-only).
    pub used_count: i32,
    /// Rotation status (0 pending, 1 processing, 2 completed).
    pub status: i32,
    /// Last rotate HTTP status.
    pub status_code: Option<i32>,
    /// Last rotate response.
    pub response: Option<String>,
    /// Region.
    pub region: String,
    /// Package name.
    pub package_name: String,
    /// Package.
    pub proxy_package_id: String,
    /// Created.
    #[serde(rename = "createdAt")]
    pub created_at: chrono::DateTime<Utc>,
    /// Updated.
    #[serde(rename = "updatedAt")]
    pub updated_at: chrono::DateTime<Utc>,
}

impl ProxyView {
    /// The view of a document; secrets only when `full`.
    pub fn of(d: ProxyDoc, full: bool) -> Self {
        Self {
            id: d.id.to_hex(),
            ip: d.ip,
            port: d.port,
            username: d.username,
            password: full.then_some(d.password),
            auth_token: if full { d.auth_token } else { None },
            area: d.area,
            rotate_url: d.rotate_url,
            rotate_time: d.rotate_time,
            ip_public: d.ip_public,
            is_active: d.is_active,
            is_error: d.is_error,
            is_rotating: d.is_rotating,
            disable_auto_rotate: d.disable_auto_rotate,
            next_rotate: d.next_rotate.map(iso),
            last_used_at: d.last_used_at.map(iso),
            expired_at: d.expired_at.map(iso),
            in_use: d.in_use,
            used_count: d.used_count,
            status: d.status.into(),
            status_code: d.status_code,
            response: d.response,
            region: d.region,
            package_name: d.package_name,
            proxy_package_id: d.proxy_package_id.to_hex(),
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

/// `POST /api/proxies`: the package must exist; its name is copied into `package_name`.
pub async fn create_proxy(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> HttpResult<(StatusCode, Json<ProxyView>)> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    let b: CreateProxy = body::parse(&bytes)?;
    if b.port == 0 {
        return Err(ApiError::invalid("port", "must be between 1 and 65535").into());
    }
    let rotate_time = b.rotate_time.unwrap_or(DEFAULT_ROTATE_TIME_SECS);
    if !(1..=31_536_000).contains(&rotate_time) {
        return Err(ApiError::invalid("rotate_time", "must be between 1 and 31536000 seconds").into());
    }
    let new = NewProxy {
        ip: non_empty("ip", &b.ip, 255)?,
        port: b.port,
        username: b.username,
        password: b.password,
        area: b.area,
        rotate_url: http_url("rotate_url", &b.rotate_url)?,
        rotate_time,
        auth_token: b.auth_token.filter(|t| !t.is_empty()),
        is_active: b.is_active.unwrap_or(true),
        disable_auto_rotate: b.disable_auto_rotate.unwrap_or(false),
        expired_at: b.expired_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
        proxy_package_id: oid("proxy_package_id", &b.proxy_package_id)?,
        package_name: String::new(),
        created_by: None,
    };
    let package = state
        .store
        .packages()
        .find_one(doc! { "_id": new.proxy_package_id })
        .await
        .map_err(|e| db_error(e, "package"))?
        .ok_or_else(|| HttpError(ApiError::invalid("proxy_package_id", "does not name an existing package")))?;
    let d = ProxyDoc::new(NewProxy { package_name: package.name, ..new });
    state.store.proxies().insert_one(&d).await.map_err(|e| db_error(e, "this proxy"))?;
    state
        .publish(
            subjects::PROXY_CHANGED,
            &ProxyChanged { proxy_id: d.id.to_hex(), reason: ChangeReason::Created, origin: None, snapshot: None },
        )
        .await;
    Ok((StatusCode::CREATED, Json(ProxyView::of(d, true))))
}

/// Query of `GET /api/proxies`.
#[derive(Debug, Deserialize)]
pub struct ProxyListQuery {
    /// Include passwords and auth tokens.
    pub get_full: Option<bool>,
    /// Filter by area.
    pub area: Option<String>,
    /// Page.
    pub page: Option<u64>,
    /// Page size.
    pub limit: Option<i64>,
}

/// `GET /api/proxies?get_full=&area=&page=&limit=`.
pub async fn list_proxies(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ProxyListQuery>,
) -> HttpResult<Json<Paged<ProxyView>>> {
    auth::check_admin(&headers, state.config.allowed_api_key.expose())?;
    let mut filter = doc! {};
    if let Some(area) = q.area.as_deref() {
        filter.insert("area", Area::parse_field("area", Some(area))?.as_str());
    }
    let full = q.get_full.unwrap_or(false);
    let page = Page { page: q.page, limit: q.limit };
    Ok(Json(list(&state.store.proxies(), filter, &page, |d| ProxyView::of(d, full)).await?))
}
