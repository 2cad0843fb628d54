//! `/api/proxies`: list (filters, `get_full`), create, update, delete, bulk-delete, drop.
//!
//! Admin writes never touch lease state: the DTOs refuse unknown fields, so `in_use`, `used_count` and `proxy_used`
//! cannot be sent, and updates `$set` only the fields named here. Every write is synced to the lease service
//! (`leasectl.sync`) before the admin is answered, so disabling a proxy stops new leases at once and a created one
//! can be leased at once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use proxypool_contracts::endpoints::{LeaseCtlSync, RotateNow};
use proxypool_contracts::{ApiError, Area};
use proxypool_store::model::{NewProxy, ProxyDoc, DEFAULT_ROTATE_TIME_SECS};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Admin;
use crate::error::{HttpError, HttpResult};
use crate::extract::{Id, Path, Query};
use crate::routes::body::Body;
use crate::routes::common::{
    db_error, filter_id, http_url, iso, list, non_empty, oid, BulkDelete, DeleteResult, Page, Paged,
};
use crate::state::AppState;

/// Body of `POST /api/proxies`. Lease fields are not accepted (unknown fields are refused).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProxy {
    /// IP or hostname.
    pub ip: String,
    /// Port, 1–65535.
    #[schema(minimum = 1)]
    pub port: u16,
    /// Username.
    #[serde(default)]
    pub username: String,
    /// Password.
    #[serde(default)]
    pub password: String,
    /// `vn` or `global`.
    pub area: Area,
    /// Rotate URL (absolute http(s)).
    #[schema(format = "uri")]
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
    /// Subscription expiry (RFC 3339).
    #[serde(default)]
    pub expired_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Parent package; must exist.
    #[schema(pattern = "^[0-9a-fA-F]{24}$")]
    pub proxy_package_id: String,
}

/// Body of `PUT /api/proxies/{id}`: any subset. Lease fields are refused.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProxy {
    /// IP or hostname.
    pub ip: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// Username.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Area.
    pub area: Option<Area>,
    /// Rotate URL.
    #[schema(format = "uri")]
    pub rotate_url: Option<String>,
    /// Seconds between rotations.
    pub rotate_time: Option<i64>,
    /// Bearer token for the rotate URL; empty string clears it.
    pub auth_token: Option<String>,
    /// Enabled. `false` stops new leases at once.
    pub is_active: Option<bool>,
    /// Skip the rotate call.
    pub disable_auto_rotate: Option<bool>,
    /// Subscription expiry.
    pub expired_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Parent package; must exist (its name is copied).
    #[schema(pattern = "^[0-9a-fA-F]{24}$")]
    pub proxy_package_id: Option<String>,
}

/// A proxy as the API shows it. `password` and `auth_token` only with `get_full=true`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
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
    /// Rotation interval, seconds.
    pub rotate_time: i64,
    /// Public IP at the last check.
    pub ip_public: Option<String>,
    /// Enabled.
    pub is_active: bool,
    /// The last rotation or check failed.
    pub is_error: bool,
    /// A rotation holds the proxy.
    pub is_rotating: bool,
    /// Rotate call skipped.
    pub disable_auto_rotate: bool,
    /// Next rotation.
    pub next_rotate: Option<chrono::DateTime<chrono::Utc>>,
    /// Last lease.
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Expiry.
    pub expired_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the proxy takes no lease now, when it takes none: `disabled`, `no_address`, `subscription_expired`
    /// (`expired_at` has passed: neither leased nor rotated), `rotating` or `quarantined`. (A proxy at `PROXY_USE_MAX` shows
    /// `in_use`/`used_count`.) Lease fields are projected from the lease service and may trail it by a second.
    pub not_leasable: Option<&'static str>,
    /// Active leases (read-only).
    pub in_use: i32,
    /// Leases granted this rotation cycle (read-only).
    pub used_count: i32,
    /// The leases held (read-only): who holds each, since when, and whether the forward door holds it (`door`,
    /// `session`). Lease keys are not shown: a key returns the lease.
    pub leases: Vec<LeaseView>,
    /// Upstream failures the forward door met since the last successful rotation (read-only).
    pub upstream_failures: i64,
    /// The latest of them (read-only): `kind` (`refused`, `auth`, `timeout`, `reset`, `bad_answer`) and `at`.
    pub last_upstream_failure: Option<UpstreamFailureView>,
    /// What consumers reported (read-only): quarantine, failures in a row, and per-site bans of exit IPs reported
    /// through this proxy.
    pub health: HealthView,
    /// Rotation status: 0 pending, 1 processing, 2 completed.
    pub status: i32,
    /// HTTP status of the last rotate call.
    pub status_code: Option<i32>,
    /// Body of the last rotate call, or the last error.
    pub response: Option<String>,
    /// Region.
    pub region: String,
    /// Package name.
    pub package_name: String,
    /// Package.
    pub proxy_package_id: String,
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

/// One lease held on a proxy, as the listing shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseView {
    /// The holder: the consumer's IP or id (`proxy_used[].ip`); for the forward door `<consumer>@<client IP>`.
    pub holder: String,
    /// When it was granted.
    pub since: chrono::DateTime<chrono::Utc>,
    /// `http` or `socks5` when the forward door holds it.
    pub door: Option<String>,
    /// The door's sticky session.
    pub session: Option<String>,
}

/// A proxy's health as consumers reported it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthView {
    /// `healthy`, `quarantined` (out of the pool until a rotation succeeds or an admin lifts it) or `duplicate_ip`
    /// (its last rotation gave it the public IP of `duplicate_of`: out of the pool until its next rotation).
    pub state: String,
    /// Failures in a row (`proxy_error`, `timeout`, the forward door's upstream failures).
    pub fails: i64,
    /// The share of `ok` among the proxy's last 32 judgements (none before the first).
    pub success_rate: Option<f64>,
    /// With `duplicate_ip`: the other active proxy on the same public IP.
    pub duplicate_of: Option<String>,
    /// Bans of exit IPs for sites, reported through this proxy (expired ones included until they are forgotten).
    pub bans: Vec<BanView>,
}

/// A site's ban of an exit IP.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BanView {
    /// The exit IP.
    pub ip: String,
    /// The site.
    pub domain: String,
    /// When it ends.
    pub until: chrono::DateTime<chrono::Utc>,
    /// Bans of this pair in a row.
    pub count: i64,
    /// `blocked` or `captcha`.
    pub reason: String,
}

/// The latest upstream failure of a proxy.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpstreamFailureView {
    /// How it failed.
    pub kind: String,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl ProxyView {
    /// The view of a document; secrets only when `full`.
    pub fn of(d: ProxyDoc, full: bool) -> Self {
        let now = bson::DateTime::now();
        let not_leasable = if !d.is_active {
            Some("disabled")
        } else if d.ip.is_empty() {
            Some("no_address")
        } else if d.expired_at.is_some_and(|e| e <= now) {
            Some("subscription_expired")
        } else if d.is_rotating {
            Some("rotating")
        } else if d.health.state == "quarantined" {
            Some("quarantined")
        } else if d.health.state == "duplicate_ip" {
            Some("duplicate_ip")
        } else {
            None
        };
        Self {
            not_leasable,
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
            leases: d
                .proxy_used
                .into_iter()
                .map(|u| LeaseView { holder: u.ip, since: iso(u.time), door: u.door, session: u.session })
                .collect(),
            upstream_failures: d.upstream_failures,
            last_upstream_failure: d.last_upstream_failure.map(|f| UpstreamFailureView { kind: f.kind, at: iso(f.at) }),
            health: HealthView {
                state: d.health.state,
                fails: d.health.fails,
                success_rate: d.health.success_rate,
                duplicate_of: d.health.duplicate_of,
                bans: d
                    .health
                    .bans
                    .into_iter()
                    .map(|b| BanView {
                        ip: b.ip,
                        domain: b.domain,
                        until: iso(b.until),
                        count: b.count,
                        reason: b.reason,
                    })
                    .collect(),
            },
            status: d.status.into(),
            status_code: d.status_code,
            response: d.response,
            region: d.region,
            package_name: d.package_name,
            proxy_package_id: d.proxy_package_id.to_hex(),
            created_by: d.created_by.map(|i| i.to_hex()),
            updated_by: d.updated_by.map(|i| i.to_hex()),
            created_at: iso(d.created_at),
            updated_at: iso(d.updated_at),
        }
    }
}

fn rotate_time(v: i64) -> Result<i64, HttpError> {
    if (1..=31_536_000).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid("rotate_time", "must be between 1 and 31536000 seconds").into())
    }
}

fn port(v: u16) -> Result<u16, HttpError> {
    if v == 0 {
        Err(ApiError::invalid("port", "must be between 1 and 65535").into())
    } else {
        Ok(v)
    }
}

async fn package_name(state: &AppState, id: ObjectId) -> HttpResult<String> {
    let p = state.store.packages().find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "package"))?;
    p.map(|p| p.name).ok_or_else(|| ApiError::invalid("proxy_package_id", "does not name an existing package").into())
}

/// Tells the lease service (the owner of lease state) that these proxies changed, and waits until it has applied
/// the change: when the admin is answered, the next lease sees it (a disabled proxy takes no new lease and its
/// holders are called back; a created one can be leased). If the lease service cannot be reached the admin gets a
/// retryable 503: the write is stored, and repeating it (or the lease leader's periodic re-read) applies it.
async fn sync_leases(state: &AppState, ids: &[ObjectId]) -> HttpResult<()> {
    let req = proxypool_contracts::rotation::SyncRequest {
        proxy_ids: ids.iter().map(|id| id.to_hex()).collect(),
        full: false,
    };
    let reply = state.call::<LeaseCtlSync>(&req).await?;
    if reply.dropped_leases > 0 {
        tracing::info!(dropped = reply.dropped_leases, "leases taken from their holders by an admin change");
    }
    Ok(())
}

/// Filters of the proxy list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProxyQuery {
    /// Include passwords and auth tokens.
    pub get_full: Option<bool>,
    /// `vn` or `global`.
    #[param(value_type = Option<Area>)]
    pub area: Option<String>,
    /// Package id.
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    pub package: Option<String>,
    /// Provider id (proxies of its packages).
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    pub provider: Option<String>,
    /// Enabled (true) or disabled (false).
    pub active: Option<bool>,
    /// In error (true) or healthy (false).
    pub error: Option<bool>,
    /// `healthy`, `quarantined` (consumers' failure reports) or `duplicate_ip` (a rotation gave it another proxy's
    /// public IP).
    pub health: Option<String>,
}

/// List proxies.
#[utoipa::path(get, path = "/api/proxies", tag = "proxies", params(ProxyQuery, Page),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Paged<ProxyView>), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn list_proxies(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<ProxyQuery>,
    Query(page): Query<Page>,
) -> HttpResult<Json<Paged<ProxyView>>> {
    let mut filter = doc! {};
    if let Some(area) = q.area.as_deref() {
        filter.insert("area", Area::parse_field("area", Some(area))?.as_str());
    }
    if let Some(p) = filter_id("package", q.package.as_deref())? {
        filter.insert("proxy_package_id", p);
    }
    if let Some(provider) = filter_id("provider", q.provider.as_deref())? {
        let packages: Vec<ObjectId> = state
            .store
            .packages()
            .clone_with_type::<Document>()
            .find(doc! { "proxy_provider_id": provider })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| db_error(e, "package"))?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(|e| db_error(e, "package"))?
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
        filter.insert("proxy_package_id", doc! { "$in": packages });
    }
    if let Some(a) = q.active {
        filter.insert("is_active", a);
    }
    if let Some(e) = q.error {
        filter.insert("is_error", e);
    }
    match q.health.as_deref() {
        None => {}
        Some(s @ ("quarantined" | "duplicate_ip")) => {
            filter.insert("health.state", s);
        }
        // Documents written before health existed have none: healthy.
        Some("healthy") => {
            filter.insert("health.state", doc! { "$nin": ["quarantined", "duplicate_ip"] });
        }
        Some(other) => {
            return Err(proxypool_contracts::ApiError::invalid(
                "health",
                format!("unknown value {other:?} (expected one of: healthy, quarantined, duplicate_ip)"),
            )
            .into())
        }
    }
    let full = q.get_full.unwrap_or(false);
    Ok(Json(list(&state.store.proxies(), filter, &page, |d| ProxyView::of(d, full)).await?))
}

/// A proxy with its live lease state.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProxyDetail {
    /// The proxy as stored (its lease fields are the projection, which trails the engine by a moment).
    #[serde(flatten)]
    pub proxy: ProxyView,
    /// The lease state as the lease service holds it now: leases, rotation lock, health.
    pub live: proxypool_contracts::health::LiveState,
}

/// One proxy, with its leases, rotation lock and health read from the lease service (not from the projection).
#[utoipa::path(get, path = "/api/proxies/{id}", tag = "proxies",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id"),
        ("get_full" = Option<bool>, Query, description = "Include the password and auth token")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProxyDetail), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 503, description = "the database or the lease service is unavailable; retry",
            body = crate::openapi::ErrorBody)))]
pub async fn get_proxy_detail(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
    Query(q): Query<FullQuery>,
) -> HttpResult<Json<ProxyDetail>> {
    let d = state.store.proxies().find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "proxy"))?;
    let d = d.ok_or_else(|| ApiError::not_found(format!("proxy {id} not found")))?;
    let req = proxypool_contracts::health::InspectRequest { proxy_id: id.to_hex() };
    let live = state.call::<proxypool_contracts::endpoints::LeaseCtlInspect>(&req).await?;
    Ok(Json(ProxyDetail { proxy: ProxyView::of(d, q.get_full.unwrap_or(false)), live }))
}

/// Query of `GET /api/proxies/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FullQuery {
    /// Include the password and auth token.
    pub get_full: Option<bool>,
}

/// Create a proxy.
#[utoipa::path(post, path = "/api/proxies", tag = "proxies", request_body = CreateProxy,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 201, body = ProxyView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn create_proxy(
    State(state): State<AppState>,
    admin: Admin,
    Body(b): Body<CreateProxy>,
) -> HttpResult<(StatusCode, Json<ProxyView>)> {
    let new = NewProxy {
        ip: non_empty("ip", &b.ip, 255)?,
        port: port(b.port)?,
        username: b.username,
        password: b.password,
        area: b.area,
        rotate_url: http_url("rotate_url", &b.rotate_url)?,
        rotate_time: rotate_time(b.rotate_time.unwrap_or(DEFAULT_ROTATE_TIME_SECS))?,
        auth_token: b.auth_token.filter(|t| !t.is_empty()),
        is_active: b.is_active.unwrap_or(true),
        disable_auto_rotate: b.disable_auto_rotate.unwrap_or(false),
        expired_at: b.expired_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
        proxy_package_id: oid("proxy_package_id", &b.proxy_package_id)?,
        package_name: String::new(),
        created_by: admin.user_id,
    };
    let name = package_name(&state, new.proxy_package_id).await?;
    let d = ProxyDoc::new(NewProxy { package_name: name, ..new });
    state.store.proxies().insert_one(&d).await.map_err(|e| db_error(e, "this proxy"))?;
    sync_leases(&state, &[d.id]).await?;
    Ok((StatusCode::CREATED, Json(ProxyView::of(d, true))))
}

/// Update a proxy (never its lease state).
#[utoipa::path(put, path = "/api/proxies/{id}", tag = "proxies", request_body = UpdateProxy,
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ProxyView), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn update_proxy(
    State(state): State<AppState>,
    admin: Admin,
    Path(Id(id)): Path<Id>,
    Body(b): Body<UpdateProxy>,
) -> HttpResult<Json<ProxyView>> {
    let mut set = doc! { "updatedAt": DateTime::now(), "updated_by": admin.user_id };
    if let Some(v) = &b.ip {
        set.insert("ip", non_empty("ip", v, 255)?);
    }
    if let Some(v) = b.port {
        set.insert("port", i32::from(port(v)?));
    }
    if let Some(v) = b.username {
        set.insert("username", v);
    }
    if let Some(v) = b.password {
        set.insert("password", v);
    }
    if let Some(v) = b.area {
        set.insert("area", v.as_str());
    }
    if let Some(v) = &b.rotate_url {
        set.insert("rotate_url", http_url("rotate_url", v)?);
    }
    if let Some(v) = b.rotate_time {
        set.insert("rotate_time", rotate_time(v)?);
    }
    if let Some(v) = b.auth_token {
        set.insert("auth_token", if v.is_empty() { None } else { Some(v) });
    }
    if let Some(v) = b.is_active {
        set.insert("is_active", v);
    }
    if let Some(v) = b.disable_auto_rotate {
        set.insert("disable_auto_rotate", v);
    }
    if let Some(v) = b.expired_at {
        set.insert("expired_at", DateTime::from_millis(v.timestamp_millis()));
    }
    if let Some(v) = &b.proxy_package_id {
        let package = oid("proxy_package_id", v)?;
        set.insert("package_name", package_name(&state, package).await?);
        set.insert("proxy_package_id", package);
    }
    let coll = state.store.proxies();
    let res = coll.update_one(doc! { "_id": id }, doc! { "$set": set }).await.map_err(|e| db_error(e, "proxy"))?;
    if res.matched_count == 0 {
        return Err(ApiError::not_found(format!("proxy {id} not found")).into());
    }
    sync_leases(&state, &[id]).await?;
    let d = coll.find_one(doc! { "_id": id }).await.map_err(|e| db_error(e, "proxy"))?;
    d.map(|d| Json(ProxyView::of(d, true))).ok_or_else(|| ApiError::not_found(format!("proxy {id} not found")).into())
}

async fn find_proxies(state: &AppState, filter: Document) -> HttpResult<Vec<ProxyDoc>> {
    state
        .store
        .proxies()
        .find(filter)
        .await
        .map_err(|e| db_error(e, "proxy"))?
        .try_collect()
        .await
        .map_err(|e| db_error(e, "proxy"))
}

/// Deletes the proxies `doomed`; the lease service then forgets them and calls their holders back.
async fn delete_docs(state: &AppState, doomed: &[ProxyDoc]) -> HttpResult<DeleteResult> {
    let ids: Vec<ObjectId> = doomed.iter().map(|d| d.id).collect();
    let res =
        state.store.proxies().delete_many(doc! { "_id": { "$in": &ids } }).await.map_err(|e| db_error(e, "proxy"))?;
    sync_leases(state, &ids).await?;
    Ok(DeleteResult { deleted: res.deleted_count })
}

/// Deletes `ids`, all or nothing: an unknown id is a 404 and deletes nothing.
async fn delete_ids(state: &AppState, ids: &[ObjectId]) -> HttpResult<DeleteResult> {
    let doomed = find_proxies(state, doc! { "_id": { "$in": ids } }).await?;
    if doomed.len() != ids.len() {
        return Err(ApiError::not_found(format!("{} of the proxy ids do not exist", ids.len() - doomed.len())).into());
    }
    delete_docs(state, &doomed).await
}

/// Delete a proxy.
#[utoipa::path(delete, path = "/api/proxies/{id}", tag = "proxies",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn delete_proxy(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<DeleteResult>> {
    Ok(Json(delete_ids(&state, &[id]).await?))
}

/// Delete several proxies: all or nothing.
#[utoipa::path(post, path = "/api/proxies/bulk-delete", tag = "proxies", request_body = BulkDelete,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn bulk_delete_proxies(
    State(state): State<AppState>,
    _admin: Admin,
    Body(b): Body<BulkDelete>,
) -> HttpResult<Json<DeleteResult>> {
    let ids = b.ids()?;
    Ok(Json(delete_ids(&state, &ids).await?))
}

/// The confirmation `POST /api/proxies/drop` requires, spelled out so that it cannot be sent by accident.
pub const DROP_CONFIRMATION: &str = "DELETE ALL PROXIES";

/// Body of `POST /api/proxies/drop`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DropProxies {
    /// Must be exactly `DELETE ALL PROXIES`.
    pub confirm: String,
}

/// Delete every proxy.
#[utoipa::path(post, path = "/api/proxies/drop", tag = "proxies", request_body = DropProxies,
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = DeleteResult), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 413, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn drop_proxies(
    State(state): State<AppState>,
    _admin: Admin,
    Body(b): Body<DropProxies>,
) -> HttpResult<Json<DeleteResult>> {
    if b.confirm != DROP_CONFIRMATION {
        return Err(ApiError::invalid("confirm", format!("must be exactly {DROP_CONFIRMATION:?}")).into());
    }
    let doomed = find_proxies(&state, doc! {}).await?;
    if doomed.is_empty() {
        return Ok(Json(DeleteResult { deleted: 0 }));
    }
    let res = delete_docs(&state, &doomed).await?;
    tracing::warn!(deleted = res.deleted, "all proxies dropped by an admin");
    Ok(Json(res))
}

/// Queue an immediate rotation of a proxy (drains its leases first).
#[utoipa::path(post, path = "/api/proxies/{id}/rotate", tag = "proxies",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 202, body = proxypool_contracts::rotation::RotateNowReply),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 404, body = crate::openapi::ErrorBody), (status = 409, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn rotate_proxy(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<(StatusCode, Json<proxypool_contracts::rotation::RotateNowReply>)> {
    let req = proxypool_contracts::rotation::RotateNowRequest { proxy_id: id.to_hex() };
    Ok((StatusCode::ACCEPTED, Json(state.call::<RotateNow>(&req).await?)))
}

/// Path of `DELETE /api/proxies/{id}/bans/{domain}`.
#[derive(Debug, serde::Deserialize)]
pub struct BanPath {
    id: String,
    domain: String,
}

/// Lift the ban of a proxy's current exit IP for one site (a consumer reported it `blocked` or `captcha` there): the
/// site is leased that IP again at once.
#[utoipa::path(delete, path = "/api/proxies/{id}/bans/{domain}", tag = "proxies",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id"),
        ("domain" = String, Path, description = "The site (a host name)")),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = proxypool_contracts::health::HealReply),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such proxy, or its exit IP is not banned for that site",
            body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn unban_proxy(
    State(state): State<AppState>,
    _admin: Admin,
    Path(p): Path<BanPath>,
) -> HttpResult<Json<proxypool_contracts::health::HealReply>> {
    let id = proxypool_contracts::ObjectIdHex::parse_field("id", Some(&p.id))?;
    let domain = proxypool_contracts::health::normalize_domain("domain", &p.domain)?;
    let req = proxypool_contracts::health::HealRequest {
        proxy_id: id.to_string(),
        unban_domain: Some(domain),
        unquarantine: false,
    };
    Ok(Json(state.call::<proxypool_contracts::endpoints::LeaseCtlHeal>(&req).await?))
}

/// Lift a proxy's quarantine (failures in a row reported by consumers): back in the pool at once, its failure count
/// at zero, without waiting for the rotation that would otherwise end it.
#[utoipa::path(delete, path = "/api/proxies/{id}/quarantine", tag = "proxies",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = proxypool_contracts::health::HealReply),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such proxy, or it is not quarantined", body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn unquarantine_proxy(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<proxypool_contracts::health::HealReply>> {
    let req =
        proxypool_contracts::health::HealRequest { proxy_id: id.to_hex(), unban_domain: None, unquarantine: true };
    Ok(Json(state.call::<proxypool_contracts::endpoints::LeaseCtlHeal>(&req).await?))
}
