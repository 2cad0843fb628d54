//! Rotation jobs and the messages around them.

use serde::{Deserialize, Serialize};

/// A job on [`crate::subjects::ROTATION_JOBS`]. `job_id` is also the JetStream message id, so the same claim is
/// queued once however many schedulers publish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationJob {
    /// The proxy to rotate.
    pub proxy_id: String,
    /// `{proxy_id}-{claim time ms}`; stored on the proxy as `rotation_job` when claimed.
    pub job_id: String,
}

/// Request on [`crate::subjects::LEASECTL_ROTATED`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotatedRequest {
    /// The rotated proxy.
    pub proxy_id: String,
    /// The job that rotated it; the reset applies only while the proxy is still locked by this job.
    pub job_id: String,
    /// Whether the rotation succeeded: reset the leases and the cycle (true), or only release the lock and keep the
    /// leases (a failed rotation leaves the old address in place).
    #[serde(default = "yes")]
    pub reset: bool,
}

fn yes() -> bool {
    true
}

/// Reply of [`crate::subjects::LEASECTL_ROTATED`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotatedReply {
    /// Leases that were still held when the lease state was reset (drain timeout).
    pub dropped_leases: u32,
    /// The rotation left the proxy on the public IP of this other active proxy: it is marked `duplicate_ip` and
    /// not leased until a rotation gives it an IP of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
}

/// Request on [`crate::subjects::ROTATOR_ROTATE_NOW`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotateNowRequest {
    /// The proxy.
    pub proxy_id: String,
}

/// Reply of [`crate::subjects::ROTATOR_ROTATE_NOW`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotateNowReply {
    /// The queued job.
    pub job_id: String,
}

/// Request on [`crate::subjects::LEASECTL_LOCK`]. The rotation lock is a lease held by one rotation job in the lease
/// engine: it has a deadline in the engine's logged state, the job renews it while it works, and the engine's
/// leader takes it back (and logs the unlock) once the deadline passes. While locked the proxy takes no new lease.
///
/// Only a claim creates a lock: a restart or a check of a lock that is absent or held by another job answers
/// `conflict`, so a late or redelivered job can never re-create a lock that its own rotation already released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockRequest {
    /// The proxy.
    pub proxy_id: String,
    /// The rotation job taking (or holding) the lock.
    pub job_id: String,
    /// The scheduler's claim: create the lock if the proxy is unlocked (asking again with the same job confirms it).
    /// Absent (`false`) in a check, so a request from an older rotator that cannot say which it is never creates one.
    #[serde(default)]
    pub claim: bool,
    /// The job starts its work now: the lock's age (for the drain limit) counts from here.
    #[serde(default)]
    pub restart: bool,
    /// How long the lock lives without a renewal (`ROTATE_LOCK_TTL`); the engine's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// The public IP the rotation just verified through the proxy: the reply says whether another active proxy
    /// exits on it ([`LockReply::duplicate_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_ip: Option<String>,
}

impl LockRequest {
    /// A check (and renewal) of a lock `job_id` already holds.
    pub fn check(proxy_id: &str, job_id: &str, ttl_ms: Option<u64>) -> Self {
        Self {
            proxy_id: proxy_id.to_owned(),
            job_id: job_id.to_owned(),
            claim: false,
            restart: false,
            ttl_ms,
            exit_ip: None,
        }
    }
}

/// Reply of [`crate::subjects::LEASECTL_LOCK`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockReply {
    /// Leases still held on the proxy (the drain waits for 0).
    pub in_use: u32,
    /// When the lock was taken or last restarted, on the engine's clock (Unix milliseconds).
    pub since_ms: i64,
    /// How long ago that was, measured by the engine: the drain's wait, on one clock whatever the rotator's says.
    #[serde(default)]
    pub held_ms: u64,
    /// When the engine takes the lock back unless it is renewed, on the engine's clock (Unix milliseconds).
    #[serde(default)]
    pub deadline_ms: i64,
    /// With the request's `exit_ip`: the other active proxy already exiting on that IP, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
}

/// Request on [`crate::subjects::LEASECTL_SYNC`]: these proxies changed in MongoDB (created, edited, enabled,
/// disabled, deleted, imported, rotated); apply them to lease state before answering.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The changed proxies (24-hex ids).
    #[serde(default)]
    pub proxy_ids: Vec<String>,
    /// Re-read the whole catalogue instead (after a bulk import).
    #[serde(default)]
    pub full: bool,
}

/// Reply of [`crate::subjects::LEASECTL_SYNC`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Proxies whose lease-relevant state changed.
    pub changed: u32,
    /// Leases taken because their proxy was disabled, deleted or expired.
    pub dropped_leases: u32,
}
