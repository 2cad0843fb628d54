//! Import jobs in `import_jobs`: created when a request is accepted, updated as the job runs, read by
//! `GET /api/imports/{id}`.
//!
//! A running job refreshes `heartbeat_at`; a job still `running` whose heartbeat is older than [`STALE_AFTER`] was
//! cut short (its importer stopped) and is shown as failed. Imports are idempotent, so the operator re-runs it.

use std::time::Duration;

use bson::{doc, DateTime};
use chrono::{TimeZone, Utc};
use mongodb::Collection;
use proxypool_contracts::import::{ImportCounts, ImportJob, ImportKind, JobStatus, RowError, MAX_ROW_ERRORS};
use proxypool_store::model::collections;
use proxypool_store::{Store, StoreError};
use serde::{Deserialize, Serialize};

/// How often a running job refreshes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// A running job whose heartbeat is older than this has been abandoned.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// A document of `import_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDoc {
    /// Job id (ObjectId hex, also the upload's object name).
    #[serde(rename = "_id")]
    pub id: String,
    /// What it imports.
    pub kind: ImportKind,
    /// Where it stands.
    pub status: JobStatus,
    /// Uploaded file name.
    #[serde(default)]
    pub file_name: Option<String>,
    /// Rows by outcome.
    #[serde(default)]
    pub counts: ImportCounts,
    /// Row errors (at most [`MAX_ROW_ERRORS`]).
    #[serde(default)]
    pub errors: Vec<RowError>,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asked.
    #[serde(default)]
    pub requested_by: Option<String>,
    /// Accepted at.
    pub created_at: DateTime,
    /// Started at.
    #[serde(default)]
    pub started_at: Option<DateTime>,
    /// Finished at.
    #[serde(default)]
    pub finished_at: Option<DateTime>,
    /// Last sign of life of a running job.
    #[serde(default)]
    pub heartbeat_at: Option<DateTime>,
}

fn chrono_of(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

impl JobDoc {
    /// A queued job.
    pub fn queued(id: String, kind: ImportKind, file_name: Option<String>, requested_by: Option<String>) -> Self {
        Self {
            id,
            kind,
            status: JobStatus::Queued,
            file_name,
            counts: ImportCounts::default(),
            errors: Vec::new(),
            reason: None,
            requested_by,
            created_at: DateTime::now(),
            started_at: None,
            finished_at: None,
            heartbeat_at: Some(DateTime::now()),
        }
    }

    /// The API view; an abandoned job shows as failed.
    pub fn view(&self) -> ImportJob {
        let mut status = self.status;
        let mut reason = self.reason.clone();
        let stale = self
            .heartbeat_at
            .is_none_or(|h| DateTime::now().timestamp_millis() - h.timestamp_millis() > STALE_AFTER.as_millis() as i64);
        if !status.is_finished() && stale {
            status = JobStatus::Failed;
            reason = Some("the importer stopped before finishing; run the import again (it is idempotent)".into());
        }
        ImportJob {
            id: self.id.clone(),
            kind: self.kind,
            status,
            file_name: self.file_name.clone(),
            counts: self.counts,
            errors: self.errors.clone(),
            reason,
            requested_by: self.requested_by.clone(),
            created_at: chrono_of(self.created_at),
            started_at: self.started_at.map(chrono_of),
            finished_at: self.finished_at.map(chrono_of),
        }
    }
}

/// The `import_jobs` collection.
#[derive(Debug, Clone)]
pub struct Jobs {
    coll: Collection<JobDoc>,
}

impl Jobs {
    /// Over `store`.
    pub fn new(store: &Store) -> Self {
        Self { coll: store.db().collection(collections::IMPORT_JOBS) }
    }

    /// Stores a new job.
    pub async fn insert(&self, job: &JobDoc) -> Result<(), StoreError> {
        self.coll.insert_one(job).await?;
        Ok(())
    }

    /// Reads a job.
    pub async fn get(&self, id: &str) -> Result<Option<JobDoc>, StoreError> {
        Ok(self.coll.find_one(doc! { "_id": id }).await?)
    }

    /// Refreshes a running job's heartbeat (only that field).
    pub async fn touch(&self, id: &str) -> Result<(), StoreError> {
        self.coll.update_one(doc! { "_id": id }, doc! { "$set": { "heartbeat_at": DateTime::now() } }).await?;
        Ok(())
    }

    /// Stores the job's current state (the job task is its only writer, so a whole-state `$set` is safe).
    pub async fn save(&self, job: &JobDoc) -> Result<(), StoreError> {
        let mut set = bson::to_document(job).map_err(|e| StoreError::from(mongodb::error::Error::from(e)))?;
        set.remove("_id");
        self.coll.update_one(doc! { "_id": &job.id }, doc! { "$set": set }).await?;
        Ok(())
    }
}

/// Keeps the first [`MAX_ROW_ERRORS`] errors; the count is kept by the caller.
pub fn keep_errors(errors: &mut Vec<RowError>, more: impl IntoIterator<Item = RowError>) {
    for e in more {
        if errors.len() >= MAX_ROW_ERRORS {
            break;
        }
        errors.push(e);
    }
}
