//! Consumer routes: lease a proxy and return it (the original design's `/api/get-proxy` and `/webhook/return-proxy/:id`).
//!
//! They forward to the lease service over NATS, so HTTP and NATS consumers get the same answers and codes. Each
//! lease request carries an id of the gateway's making, and is asked again with it while the lease service changes
//! leaders, so a failover is no error to the consumer (and a grant whose answer was lost is not left held).

use axum::extract::State;
use axum::Json;
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseAcquireMany, LeaseRelease, LeaseRenew, LeaseRotate};
use proxypool_contracts::lease::{
    new_request_id, AcquireRequest, LeaseGrant, LeaseGrants, ReleaseOutcome, ReleaseRequest, RenewOutcome,
    RenewRequest, RotateOutcome,
};
use proxypool_contracts::{Area, ObjectIdHex};
use serde::Deserialize;

use crate::auth::Consumer;
use crate::error::HttpResult;
use crate::extract::{Id, Path, Query};
use crate::state::AppState;

/// Query of `GET /api/get-proxy`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GetProxyQuery {
    /// `vn` or `global` (required; read as text so that a bad one is refused with the valid values).
    #[param(value_type = Area, required = true)]
    pub area: Option<String>,
    /// Optional URL notified (POST, JSON) if the lease is taken: rotation after the drain timeout, proxy disabled or
    /// deleted. Loopback, private and link-local targets are refused unless `CALLBACK_ALLOW_PRIVATE=true`.
    #[param(format = "uri")]
    pub callback_url: Option<String>,
    /// The site the lease is for (a host name such as `shop.example`): no proxy whose exit IP that site has banned
    /// is handed out.
    pub domain: Option<String>,
    /// Only from this provider (its `name`).
    pub provider: Option<String>,
    /// Only from this package (its `code`).
    pub package: Option<String>,
    /// Only a proxy whose public IP is in this region (its label, such as `HCM`).
    pub region: Option<String>,
    /// Proxy ids not to hand out, comma-separated (at most 16).
    pub exclude: Option<String>,
    /// Lease this many distinct proxies (1-10) in one go, all or none; the answer is then `{"proxies": [...]}`.
    #[param(minimum = 1, maximum = 10)]
    pub count: Option<String>,
}

/// The answer of `GET /api/get-proxy`: one grant, or `{"proxies": [...]}` when `count` was given.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum GetProxyReply {
    /// Without `count`.
    One(Box<LeaseGrant>),
    /// With `count`.
    Many(LeaseGrants),
}

/// Lease a proxy for the calling IP (static key + IP allow list).
#[utoipa::path(get, path = "/api/get-proxy", tag = "consumer", params(GetProxyQuery), security(("api_key" = [])),
    responses((status = 200, body = GetProxyReply), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such provider or package, or no proxy of the area has that region",
            body = crate::openapi::ErrorBody),
        (status = 503, description = "no_proxy_available or service_unavailable; see Retry-After",
            body = crate::openapi::ErrorBody)))]
#[tracing::instrument(skip_all, fields(area = q.area.as_deref().unwrap_or("")))]
pub async fn get_proxy(
    State(state): State<AppState>,
    Consumer { ip }: Consumer,
    Query(q): Query<GetProxyQuery>,
) -> HttpResult<Json<GetProxyReply>> {
    let area = Area::parse_field("area", q.area.as_deref())?;
    let count = match q.count.as_deref() {
        Some(n) => Some(n.trim().parse::<u32>().map_err(|_| {
            proxypool_contracts::ApiError::invalid(
                "count",
                format!("must be 1-{}", proxypool_contracts::lease::COUNT_MAX),
            )
        })?),
        None => None,
    };
    let exclude = q
        .exclude
        .as_deref()
        .map(|list| list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    let req = AcquireRequest {
        area: Some(area.as_str().to_owned()),
        consumer: Some(ip.to_string()),
        callback_url: q.callback_url.clone(),
        request_id: Some(new_request_id()),
        domain: q.domain.clone(),
        provider: q.provider.clone(),
        package: q.package.clone(),
        region: q.region.clone(),
        exclude,
        count,
        ..Default::default()
    };
    Ok(Json(match count {
        Some(_) => GetProxyReply::Many(state.call_retrying::<LeaseAcquireMany>(&req).await?),
        None => GetProxyReply::One(Box::new(state.call_retrying::<LeaseAcquire>(&req).await?)),
    }))
}

/// Body of `POST /api/outcomes`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct OutcomeBody {
    /// The proxy (as `X-Proxypool-Proxy-Id` or a grant showed it).
    pub proxy_id: Option<String>,
    /// `ok`, `blocked`, `captcha`, `proxy_error` or `timeout`.
    pub outcome: Option<String>,
    /// The site (a host name); required with `blocked` and `captcha`.
    pub domain: Option<String>,
}

/// Report how a proxy you hold (or held lately) did for a site, without returning it: the forward door's clients,
/// who never see a lease key, report a block this way, and the door's next connection of that session to that site
/// leaves through another proxy (`X-Proxypool-Session-Changed: banned`). Judged as a return's outcome is. Only for
/// a proxy leased to the calling IP now or within twice `LEASE_TTL`; any other is a 404.
#[utoipa::path(post, path = "/api/outcomes", tag = "consumer", request_body = OutcomeBody, security(("api_key" = [])),
    responses((status = 200, body = proxypool_contracts::health::ReportOutcome),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such proxy, or it is not (and was not lately) leased to you",
            body = crate::openapi::ErrorBody),
        (status = 413, description = "the body is over the 2 MB limit", body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
#[tracing::instrument(skip_all)]
pub async fn report_outcome(
    State(state): State<AppState>,
    Consumer { ip }: Consumer,
    body: crate::routes::body::Body<OutcomeBody>,
) -> HttpResult<Json<proxypool_contracts::health::ReportOutcome>> {
    let body = body.0;
    let req = proxypool_contracts::health::ReportRequest {
        proxy_id: body.proxy_id,
        outcome: body.outcome,
        domain: body.domain,
        consumer: Some(ip.to_string()),
    };
    req.validate()?;
    Ok(Json(state.call::<proxypool_contracts::endpoints::LeaseReport>(&req).await?))
}

/// Query of the renew webhook.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// The lease key.
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    pub key: Option<String>,
}

/// Query of the return webhook.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReturnQuery {
    /// The lease key.
    #[param(pattern = "^[0-9a-fA-F]{24}$")]
    pub key: Option<String>,
    /// How the requests through the proxy went: `ok`, `blocked`, `captcha` (the site refused this exit IP),
    /// `proxy_error`, `timeout`. Optional; also accepted in a JSON body.
    pub outcome: Option<String>,
    /// For which site (a host name); required with `blocked` and `captcha`. Also accepted in a JSON body.
    pub domain: Option<String>,
}

/// Optional JSON body of the return webhook (the query's `outcome` and `domain` win when both are given).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ReturnBody {
    /// `ok`, `blocked`, `captcha`, `proxy_error` or `timeout`.
    pub outcome: Option<String>,
    /// The site (a host name).
    pub domain: Option<String>,
}

/// Return a lease (static key + IP allow list), optionally saying how it went. `blocked`/`captcha` with a `domain`
/// bans the proxy's exit IP for that site (`BAN_BASE`, doubling on repeats up to `BAN_MAX`). A bad `outcome` or
/// `domain` is a 400 naming the field, and the lease stays held.
#[utoipa::path(post, path = "/webhook/return-proxy/{id}", tag = "consumer",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id"), ReturnQuery), security(("api_key" = [])),
    request_body(content = Option<ReturnBody>, content_type = "application/json"),
    responses((status = 200, body = ReleaseOutcome), (status = 400, body = crate::openapi::ErrorBody),
        (status = 413, description = "the body is over the 2 MB limit", body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
#[tracing::instrument(skip_all)]
pub async fn return_proxy(
    State(state): State<AppState>,
    _consumer: Consumer,
    Path(Id(id)): Path<Id>,
    Query(q): Query<ReturnQuery>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> HttpResult<Json<ReleaseOutcome>> {
    let key = ObjectIdHex::parse_field("key", q.key.as_deref())?;
    // The JSON error envelope for an unreadable body too (axum's own answer is plain text).
    let body = body.map_err(|e| match e.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            proxypool_contracts::ApiError::new(proxypool_contracts::ErrorCode::PayloadTooLarge, e.body_text())
        }
        _ => proxypool_contracts::ApiError::invalid("body", e.body_text()),
    })?;
    // Today's callers send no body; one that does sends JSON.
    let body: ReturnBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReturnBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| proxypool_contracts::ApiError::invalid("body", format!("is not a valid JSON object: {e}")))?
    };
    let req = ReleaseRequest {
        proxy_id: Some(id.to_hex()),
        key: Some(key.to_string()),
        failure: None,
        outcome: q.outcome.or(body.outcome),
        domain: q.domain.or(body.domain),
    };
    // Checked here as well as by the lease service, so that a bad report costs no round trip.
    req.validate()?;
    Ok(Json(state.call::<LeaseRelease>(&req).await?))
}

/// Renew a lease: `LEASE_TTL` counts again from now (static key + IP allow list).
#[utoipa::path(post, path = "/webhook/renew-proxy/{id}", tag = "consumer",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id"), KeyQuery), security(("api_key" = [])),
    responses((status = 200, body = RenewOutcome), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such lease: returned, taken back (rotation, disable, LEASE_TTL) or never granted",
            body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
#[tracing::instrument(skip_all)]
pub async fn renew_proxy(
    State(state): State<AppState>,
    _consumer: Consumer,
    Path(Id(id)): Path<Id>,
    Query(q): Query<KeyQuery>,
) -> HttpResult<Json<RenewOutcome>> {
    let key = ObjectIdHex::parse_field("key", q.key.as_deref())?;
    let req = RenewRequest { proxy_id: Some(id.to_hex()), key: Some(key.to_string()) };
    Ok(Json(state.call::<LeaseRenew>(&req).await?))
}

/// Ask for a new IP: ends the caller's lease and rotates the proxy now (other holders are drained first, as for any
/// rotation). At most one such request per proxy per `ROTATE_MIN_INTERVAL` (30 s): a later one is a 429 with
/// `Retry-After`, and its lease stays held.
#[utoipa::path(post, path = "/webhook/rotate-proxy/{id}", tag = "consumer",
    params(("id" = inline(crate::extract::Id), Path, description = "Proxy id"), KeyQuery), security(("api_key" = [])),
    responses((status = 202, body = RotateOutcome), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody),
        (status = 404, description = "no such lease: returned, taken back or never granted",
            body = crate::openapi::ErrorBody),
        (status = 429, description = "rate_limited: a new IP was asked for this proxy less than ROTATE_MIN_INTERVAL ago",
            body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
#[tracing::instrument(skip_all)]
pub async fn rotate_proxy(
    State(state): State<AppState>,
    _consumer: Consumer,
    Path(Id(id)): Path<Id>,
    Query(q): Query<KeyQuery>,
) -> HttpResult<(axum::http::StatusCode, Json<RotateOutcome>)> {
    let key = ObjectIdHex::parse_field("key", q.key.as_deref())?;
    let req = RenewRequest { proxy_id: Some(id.to_hex()), key: Some(key.to_string()) };
    Ok((axum::http::StatusCode::ACCEPTED, Json(state.call::<LeaseRotate>(&req).await?)))
}
