//! Imports: `POST /api/proxies/import` (multipart `.xlsx`), `POST /api/proxies/import-kiot`,
//! `POST /api/proxies/import-zing`, and `GET /api/imports/{id}`.
//!
//! The gateway only accepts and hands over: an upload goes into the JetStream object store (not into a NATS message,
//! which has a size limit), and the importer is asked over NATS to run the job. The answer is the job: `200` when it
//! finished within the wait (small files, provider imports), `202` with a `Location` to poll otherwise.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bson::oid::ObjectId;
use proxypool_contracts::endpoints::{ImportExcel, ImportKiot, ImportStatus, ImportZing};
use proxypool_contracts::import::{ExcelImportRequest, ImportJob, JobStatusRequest, ProviderImportRequest};
use proxypool_contracts::{ApiError, Endpoint, ErrorCode};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Admin;
use crate::error::{HttpError, HttpResult};
use crate::extract::{Id, Multipart, Path, Query};
use crate::state::AppState;

/// The longest the gateway waits for a job to finish before answering 202.
const WAIT: Duration = Duration::from_secs(3);

/// Query of the import routes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to 3 s for the job to finish (default `true`); `false` answers 202 at once.
    pub wait: Option<bool>,
}

impl WaitQuery {
    fn wait_ms(&self) -> u64 {
        if self.wait.unwrap_or(true) {
            WAIT.as_millis() as u64
        } else {
            0
        }
    }
}

/// The multipart form of `POST /api/proxies/import`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documents the form; the handler reads the multipart stream itself.
pub struct ImportForm {
    /// The spreadsheet (`.xlsx`). Columns (header row, any order, any case): `host, port, area, rotate_url,
    /// provider, package_code`, and optionally `expired_at, username, password, rotate_time`.
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
}

/// A job answer: 200 when finished, 202 (with `Location`) while it runs.
fn job_response(job: ImportJob) -> Response {
    let status = if job.status.is_finished() { StatusCode::OK } else { StatusCode::ACCEPTED };
    let location = HeaderValue::from_str(&format!("/api/imports/{}", job.id)).ok();
    let mut res = (status, Json(job)).into_response();
    if let Some(l) = location {
        res.headers_mut().insert(header::LOCATION, l);
    }
    res
}

/// How long to wait for the importer: the job wait plus the usual request time.
fn reply_timeout(state: &AppState, wait_ms: u64) -> Duration {
    state.config.nats.request_timeout + Duration::from_millis(wait_ms)
}

fn too_large(limit: usize) -> HttpError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the file is larger than the limit of {limit} bytes")).into()
}

/// Import proxies from a spreadsheet.
///
/// Every row is checked; the job lists each refused row with its number and reason, and imports the others. A
/// proxy already in the pool (same host and port, and username when the sheet has one) is updated in place, so
/// importing the same file twice creates nothing new.
#[utoipa::path(post, path = "/api/proxies/import", tag = "imports", params(WaitQuery),
    request_body(content = ImportForm, content_type = "multipart/form-data"),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Finished", body = ImportJob),
        (status = 202, description = "Accepted; poll the Location", body = ImportJob),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 413, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn import_excel(
    State(state): State<AppState>,
    admin: Admin,
    Query(q): Query<WaitQuery>,
    Multipart(mut form): Multipart,
) -> HttpResult<Response> {
    let limit = state.config.import_max_bytes;
    let multipart_error = |e: axum::extract::multipart::MultipartError| -> HttpError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit)
        } else {
            ApiError::invalid("file", format!("the upload is not a valid multipart form: {}", e.body_text())).into()
        }
    };
    let mut upload = None;
    while let Some(mut field) = form.next_field().await.map_err(multipart_error)? {
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or("upload.xlsx").to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            bytes.extend_from_slice(&chunk);
        }
        upload = Some((name, bytes));
        break;
    }
    let Some((file_name, bytes)) = upload else {
        return Err(ApiError::invalid("file", "is required (a multipart field named \"file\")").into());
    };
    // Every spreadsheet format we read is a ZIP (xlsx, xlsb, ods) or an OLE2 (xls) container: anything else is
    // refused before it is stored.
    if !(bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(&[0xD0, 0xCF, 0x11, 0xE0])) {
        return Err(ApiError::invalid("file", "is not a spreadsheet (.xlsx, .xls, .xlsb or .ods)").into());
    }
    let job_id = ObjectId::new().to_hex();
    let js = async_nats::jetstream::new(state.nats.clone());
    let unreachable = || HttpError::from(ApiError::unavailable("the upload store is unreachable; retry shortly"));
    let bucket = proxypool_rpc::jetstream::ensure_import_uploads(&js, state.config.nats.replicas)
        .await
        .map_err(|e| unreachable().with_cause(e))?;
    bucket.put(job_id.as_str(), &mut bytes.as_slice()).await.map_err(|e| unreachable().with_cause(e))?;
    let req = ExcelImportRequest {
        job_id: job_id.clone(),
        file_name,
        requested_by: admin.user_id.map(|id| id.to_hex()),
        wait_ms: q.wait_ms(),
    };
    match state.call_within::<ImportExcel>(&req, Some(reply_timeout(&state, req.wait_ms))).await {
        Ok(job) => Ok(job_response(job)),
        Err(e) => {
            // Nobody will read it: do not keep the upload until it expires.
            if e.code == ErrorCode::ServiceUnavailable {
                let _ = bucket.delete(job_id.as_str()).await;
            }
            Err(e.into())
        }
    }
}

async fn provider_import<E>(state: &AppState, admin: &Admin, q: &WaitQuery) -> HttpResult<Response>
where
    E: Endpoint<Request = ProviderImportRequest, Reply = ImportJob>,
{
    let req = ProviderImportRequest { requested_by: admin.user_id.map(|id| id.to_hex()), wait_ms: q.wait_ms() };
    let job = state.call_within::<E>(&req, Some(reply_timeout(state, req.wait_ms))).await?;
    Ok(job_response(job))
}

/// Import the KiotProxy keys (packages and provider created when missing; expired keys skipped).
#[utoipa::path(post, path = "/api/proxies/import-kiot", tag = "imports", params(WaitQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Finished", body = ImportJob),
        (status = 202, description = "Accepted; poll the Location", body = ImportJob),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 409, description = "not_configured: KIOT_API_KEY is not set; not retryable", body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn import_kiot(
    State(state): State<AppState>,
    admin: Admin,
    Query(q): Query<WaitQuery>,
) -> HttpResult<Response> {
    provider_import::<ImportKiot>(&state, &admin, &q).await
}

/// Import the active ZingProxy proxies (provider and `ZingProxy_Pack` created when missing).
#[utoipa::path(post, path = "/api/proxies/import-zing", tag = "imports", params(WaitQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, description = "Finished", body = ImportJob),
        (status = 202, description = "Accepted; poll the Location", body = ImportJob),
        (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody),
        (status = 409, description = "not_configured: ZING_PROXY_TOKEN is not set; not retryable", body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn import_zing(
    State(state): State<AppState>,
    admin: Admin,
    Query(q): Query<WaitQuery>,
) -> HttpResult<Response> {
    provider_import::<ImportZing>(&state, &admin, &q).await
}

/// An import job: status, counts and row errors.
#[utoipa::path(get, path = "/api/imports/{id}", tag = "imports",
    params(("id" = inline(crate::extract::Id), Path, description = "Job id")), security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ImportJob), (status = 400, body = crate::openapi::ErrorBody),
        (status = 401, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)))]
pub async fn get_import(
    State(state): State<AppState>,
    _admin: Admin,
    Path(Id(id)): Path<Id>,
) -> HttpResult<Json<ImportJob>> {
    let id = id.to_hex();
    Ok(Json(state.call::<ImportStatus>(&JobStatusRequest { id }).await?))
}
