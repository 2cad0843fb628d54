//! Helpers shared by the admin routes: validation, pagination, database errors, reference-checked deletes.

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use proxypool_contracts::{ApiError, ErrorCode, ObjectIdHex, Pagination};
use proxypool_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{HttpError, HttpResult};

/// Maps a database error; `what` names the record for a duplicate. The driver's error goes with it as the cause,
/// logged once with the response (see [`crate::error`]).
pub fn db_error(e: impl Into<StoreError>, what: &str) -> HttpError {
    let e = e.into();
    HttpError::from(e.to_api(what)).with_cause(e)
}

/// BSON time → chrono.
pub fn iso(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

/// A trimmed, non-empty string of at most `max` characters.
pub fn non_empty(field: &str, v: &str, max: usize) -> Result<String, HttpError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty").into());
    }
    if v.chars().count() > max {
        return Err(ApiError::invalid(field, format!("must be at most {max} characters")).into());
    }
    Ok(v.to_owned())
}

/// An absolute http(s) URL.
pub fn http_url(field: &str, v: &str) -> Result<String, HttpError> {
    match url::Url::parse(v.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(v.trim().to_owned()),
        _ => Err(ApiError::invalid(field, "must be an absolute http(s) URL").into()),
    }
}

/// An ObjectId in hex.
pub fn oid(field: &str, v: &str) -> Result<ObjectId, HttpError> {
    let hex = ObjectIdHex::parse_field(field, Some(v))?;
    ObjectId::parse_str(hex.as_str()).map_err(|_| ApiError::invalid(field, "is not a valid ObjectId").into())
}

/// A finite, non-negative price.
pub fn price(v: f64) -> Result<f64, HttpError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(ApiError::invalid("price", "must be a non-negative number").into())
    }
}

/// Pagination query of list routes (`?page=&limit=`), extracted on its own beside each route's filters so that the
/// bounds are declared and checked in one place ([`Pagination`]).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// 1-based page, default 1, at most 1000000.
    #[param(minimum = 1, maximum = 1000000)]
    pub page: Option<u64>,
    /// Page size, default 20, at most 500.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

impl Page {
    /// `(page, limit)` validated; a value out of range is a 400 naming `page` or `limit`.
    pub fn resolve(&self) -> Result<Pagination, HttpError> {
        Ok(Pagination::parse(self.page, self.limit)?)
    }
}

/// A page of results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
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

/// Lists a collection page by page, in insertion (`_id`) order.
pub async fn list<T, V>(
    coll: &mongodb::Collection<T>,
    filter: Document,
    page: &Page,
    view: impl Fn(T) -> V,
) -> HttpResult<Paged<V>>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    let pg = page.resolve()?;
    let (p, limit, skip) = (pg.page, pg.limit, pg.skip());
    let total = coll.count_documents(filter.clone()).await.map_err(|e| db_error(e, "record"))?;
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

/// Body of the `bulk-delete` routes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkDelete {
    /// Ids to delete (at most 10,000).
    #[schema(inline, value_type = Vec<crate::extract::Id>, min_items = 1, max_items = 10000)]
    pub ids: Vec<String>,
}

impl BulkDelete {
    /// The ids, validated; an empty or oversized list is refused.
    pub fn ids(&self) -> Result<Vec<ObjectId>, HttpError> {
        if self.ids.is_empty() || self.ids.len() > 10_000 {
            return Err(ApiError::invalid("ids", "must hold 1 to 10000 ids").into());
        }
        self.ids.iter().enumerate().map(|(i, id)| oid(&format!("ids[{i}]"), id)).collect()
    }
}

/// Result of a delete.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeleteResult {
    /// Records deleted.
    pub deleted: u64,
}

/// Deletes `ids` from `coll` unless a document of `children` still refers to one of them through `child_field`
/// (then 409, nothing deleted); unknown ids are 404. The check and the delete are two steps: a child inserted in
/// between is caught by the insert's own reference check only if it runs after the delete, which is acceptable for an
/// admin operation.
pub async fn delete_checked<T, C>(
    coll: &mongodb::Collection<T>,
    ids: &[ObjectId],
    children: &mongodb::Collection<C>,
    child_field: &str,
    what: &str,
) -> HttpResult<DeleteResult>
where
    T: Send + Sync,
    C: Send + Sync,
{
    let found = coll.count_documents(doc! { "_id": { "$in": ids } }).await.map_err(|e| db_error(e, what))?;
    if found != ids.len() as u64 {
        return Err(ApiError::not_found(format!("{} of the {what} ids do not exist", ids.len() as u64 - found)).into());
    }
    let used = children.count_documents(doc! { child_field: { "$in": ids } }).await.map_err(|e| db_error(e, what))?;
    if used > 0 {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("{used} record(s) still refer to this {what}; delete or move them first"),
        )
        .into());
    }
    let res = coll.delete_many(doc! { "_id": { "$in": ids } }).await.map_err(|e| db_error(e, what))?;
    Ok(DeleteResult { deleted: res.deleted_count })
}

/// An `ObjectId` list query value (comma-free single id) parsed, for filters.
pub fn filter_id(field: &str, v: Option<&str>) -> Result<Option<ObjectId>, HttpError> {
    v.map(|v| oid(field, v)).transpose()
}
