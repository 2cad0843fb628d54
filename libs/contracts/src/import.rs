//! Import requests and jobs (gateway → importer).
//!
//! Every import is a job with an id. The importer answers a request with the job as it stands after at most
//! `wait_ms` (finished, for small imports), and [`crate::subjects::IMPORT_STATUS`] gives it later.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What an import reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImportKind {
    /// An uploaded `.xlsx` spreadsheet.
    Excel,
    /// The KiotProxy key list.
    Kiot,
    /// The active ZingProxy proxies.
    Zing,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted; waiting for another import to finish.
    Queued,
    /// Reading and writing.
    Running,
    /// Finished; rows that failed are listed in `errors`.
    Succeeded,
    /// Stopped without importing (bad file, provider down or garbled); `reason` says why. Nothing was written.
    Failed,
}

impl JobStatus {
    /// Whether the job will not change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

/// Request on [`crate::subjects::IMPORT_EXCEL`]: the file is object `object` of the uploads bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExcelImportRequest {
    /// The job id, also the object's name in [`crate::subjects::IMPORT_UPLOADS_BUCKET`].
    pub job_id: String,
    /// The uploaded file's name, for the operator.
    pub file_name: String,
    /// The admin who asked (`users._id`), if a user.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// How long to wait for the job to finish before answering with its current state.
    #[serde(default)]
    pub wait_ms: u64,
}

/// Request on [`crate::subjects::IMPORT_KIOT`] and [`crate::subjects::IMPORT_ZING`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderImportRequest {
    /// The admin who asked (`users._id`), if a user.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// How long to wait for the job to finish before answering with its current state.
    #[serde(default)]
    pub wait_ms: u64,
}

/// Request on [`crate::subjects::IMPORT_STATUS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatusRequest {
    /// The job id.
    pub id: String,
}

/// One row (or provider item) that was not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RowError {
    /// 1-based row number as the spreadsheet shows it (the header is row 1), or the 1-based position of the item
    /// in the provider's answer.
    pub row: u32,
    /// The column or field to blame, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why the row was not imported.
    pub reason: String,
}

/// Rows by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportCounts {
    /// New proxies.
    pub created: u64,
    /// Existing proxies whose imported fields changed.
    pub updated: u64,
    /// Rows that matched an existing proxy with nothing to change, or provider items skipped on purpose (expired
    /// keys).
    pub skipped: u64,
    /// Rows that were not imported; the first [`MAX_ROW_ERRORS`] are listed in `errors`.
    pub failed: u64,
}

/// How many row errors a job keeps (the count in `failed` is always complete).
pub const MAX_ROW_ERRORS: usize = 1_000;

/// An import job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportJob {
    /// Job id.
    pub id: String,
    /// What it imports.
    pub kind: ImportKind,
    /// Where it stands.
    pub status: JobStatus,
    /// The uploaded file's name (Excel imports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Rows by outcome so far.
    pub counts: ImportCounts,
    /// Rows that were not imported, in row order (at most [`MAX_ROW_ERRORS`]).
    pub errors: Vec<RowError>,
    /// Why a failed job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The admin who asked, if a user; `null` for the static key and the schedule.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// When the job was accepted.
    pub created_at: DateTime<Utc>,
    /// When it started running.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}
