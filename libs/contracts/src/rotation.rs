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
}

/// Reply of [`crate::subjects::LEASECTL_ROTATED`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotatedReply {
    /// Leases that were still held when the lease state was reset (drain timeout).
    pub dropped_leases: u32,
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

/// Request on [`crate::subjects::LEASECTL_CLEAR`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClearRequest {
    /// The proxy whose leases are taken.
    pub proxy_id: String,
}

/// Reply of [`crate::subjects::LEASECTL_CLEAR`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClearReply {
    /// Leases dropped.
    pub dropped_leases: u32,
}
