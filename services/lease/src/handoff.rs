//! The rotation hand-off and the admin's clear: the lease state reset after a stored rotation (releasing the lock),
//! and dropping every lease of a disabled proxy, each calling the holders back.

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_contracts::callback::TakenReason;
use proxypool_contracts::events::ChangeReason;
use proxypool_contracts::rotation::{ClearReply, ClearRequest, RotatedReply, RotatedRequest};
use proxypool_contracts::{ApiError, ErrorCode};

use crate::index::Entry;
use crate::service::{store_error, LeaseService, Outcome, MAX_ATTEMPTS};
use crate::sync::count;

impl LeaseService {
    /// After a stored, successful rotation: clears the lease state and releases the rotation lock, making the proxy
    /// leasable again. Applies only while the proxy is still locked by `job_id`; repeating it changes nothing.
    pub async fn reset_after_rotation(&self, req: &RotatedRequest) -> Result<Outcome<RotatedReply>, ApiError> {
        let id = ObjectId::parse_str(&req.proxy_id)
            .map_err(|_| ApiError::invalid("proxy_id", "must be a 24-character hexadecimal ObjectId"))?;
        let proxies = self.inner.store.proxies();
        // The reset is guarded by the revision it read, so the leases it reports (and calls back) are exactly the
        // ones it dropped, even if a holder returns one at the same moment.
        let mut matched = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(before) = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)? else {
                return Err(ApiError::not_found(format!("proxy {id} not found")));
            };
            let filter = doc! {
                "_id": id, "is_rotating": true, "rotation_job": &req.job_id, "lease_rev": before.lease_rev,
            };
            let update = doc! {
                "$set": {
                    "in_use": 0, "used_count": 0, "proxy_used": [], "is_rotating": false, "rotating_since": null,
                    "updatedAt": DateTime::now(),
                },
                "$inc": { "lease_rev": 1 },
            };
            if proxies.update_one(filter, update).await.map_err(store_error)?.matched_count == 1 {
                matched = Some(before);
                break;
            }
            if !(before.is_rotating && before.rotation_job.as_deref() == Some(req.job_id.as_str())) {
                break;
            }
        }
        let doc = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)?;
        let Some(doc) = doc else { return Err(ApiError::not_found(format!("proxy {id} not found"))) };
        if matched.is_none() && (doc.is_rotating || doc.rotation_job.as_deref() != Some(req.job_id.as_str())) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("proxy {id} is not locked by rotation job {}", req.job_id),
            ));
        }
        let entry = Entry::from(&doc);
        self.index().apply(id, entry.clone());
        let dropped_leases = matched.as_ref().map_or(0, |b| count(b.in_use));
        let notices = matched.as_ref().map_or_else(Vec::new, |b| b.callback_notices(TakenReason::Rotated));
        let event = self.event(id, ChangeReason::Rotated, &entry);
        Ok(Outcome { value: RotatedReply { dropped_leases }, event, notices })
    }

    /// Drops every lease held on a proxy an admin disabled (`used_count` is kept: the rotation cycle is not over)
    /// and returns callback notices for their holders. Guarded by `lease_rev`, so a lease granted or returned in
    /// between makes it retry with the newer state rather than drop the wrong records.
    pub async fn clear_leases(&self, req: &ClearRequest) -> Result<Outcome<ClearReply>, ApiError> {
        let id = ObjectId::parse_str(&req.proxy_id)
            .map_err(|_| ApiError::invalid("proxy_id", "must be a 24-character hexadecimal ObjectId"))?;
        let proxies = self.inner.store.proxies();
        for _ in 0..MAX_ATTEMPTS {
            let Some(before) = proxies.find_one(doc! { "_id": id }).await.map_err(store_error)? else {
                return Err(ApiError::not_found(format!("proxy {id} not found")));
            };
            if before.proxy_used.is_empty() {
                let entry = Entry::from(&before);
                self.index().apply(id, entry.clone());
                let event = self.event(id, ChangeReason::Updated, &entry);
                return Ok(Outcome { value: ClearReply { dropped_leases: 0 }, event, notices: Vec::new() });
            }
            let filter = doc! { "_id": id, "lease_rev": before.lease_rev };
            let update = doc! {
                "$set": { "in_use": 0, "proxy_used": [], "updatedAt": DateTime::now() },
                "$inc": { "lease_rev": 1 },
            };
            if proxies.update_one(filter, update).await.map_err(store_error)?.matched_count == 0 {
                continue;
            }
            let notices = before.callback_notices(TakenReason::ProxyDisabled);
            self.refresh_one(id).await.map_err(store_error)?;
            let entry = self.index().get(&id).cloned();
            let Some(entry) = entry else { return Err(ApiError::not_found(format!("proxy {id} not found"))) };
            let dropped_leases = u32::try_from(before.proxy_used.len()).unwrap_or(u32::MAX);
            let event = self.event(id, ChangeReason::Updated, &entry);
            return Ok(Outcome { value: ClearReply { dropped_leases }, event, notices });
        }
        Err(ApiError::unavailable("the proxy kept changing; retry shortly"))
    }
}
