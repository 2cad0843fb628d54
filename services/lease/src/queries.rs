//! The lease key, and the original design's lease query: its guard pinned to one `_id`, the grant update, and the
//! index that serves them. The engine no longer runs them: the benchmark measures them as the baseline of a
//! database-bound lease (one guarded write per grant).

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use proxypool_contracts::Area;

use crate::index::ROTATE_GRACE_MS;

/// A lease key: 96 random bits as 24 hex characters, the shape of the ObjectId keys the original used, but not
/// guessable (an ObjectId is a timestamp, a per-process value and a counter), since the key alone returns a lease.
pub(crate) fn lease_key() -> String {
    let bytes: [u8; 12] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The original design's lease query: the conditions a proxy must meet to take one more lease at `now`.
pub fn lease_filter(area: Area, now: DateTime, max: u32) -> Document {
    let max = i64::from(max);
    let window = DateTime::from_millis(now.timestamp_millis() - ROTATE_GRACE_MS);
    doc! {
        "area": area.as_str(),
        "is_active": true,
        "is_rotating": false,
        "in_use": { "$lt": max },
        "used_count": { "$lt": max },
        "$or": [ { "next_rotate": { "$gt": window } }, { "used_count": 0 } ],
    }
}

/// The `lease_candidates` index the original query needs (the benchmark builds it for its baseline).
pub fn lease_candidates_index() -> mongodb::IndexModel {
    mongodb::IndexModel::builder()
        .keys(doc! { "area": 1, "is_active": 1, "is_rotating": 1 })
        .options(mongodb::options::IndexOptions::builder().name("lease_candidates".to_owned()).build())
        .build()
}

/// The original design's order of candidates (it ran this as a sorted `findOneAndUpdate`).
pub fn lease_sort() -> Document {
    doc! { "used_count": 1, "last_used_at": 1 }
}

/// The guard of a grant: the lease query pinned to one `_id`, so the database re-checks every condition at write
/// time and nothing rests on the in-memory index.
///
/// The query's `next_rotate > now-4min OR used_count = 0` is replaced by the one branch the index expects to hold
/// (`unused_this_cycle`). Either branch implies the disjunction, so the guard is never weaker than the query; if the
/// other branch is the one that holds, the write misses, the entry is re-read, and the next attempt uses it. The
/// reason is cost: a server may plan an `$or` as a scan even beside an `_id` equality (SecantusDB does: 98 updates/s
/// instead of ~900 at 1,000 documents), while equality and range conditions next to `_id` stay point lookups.
pub fn guard_filter(id: ObjectId, area: Area, now: DateTime, max: u32, unused_this_cycle: bool) -> Document {
    let max = i64::from(max);
    let mut filter = doc! {
        "_id": id,
        "area": area.as_str(),
        "is_active": true,
        "is_rotating": false,
        "in_use": { "$lt": max },
        // A proxy imported without an address (a KiotProxy key before its first rotation) is not leasable.
        "ip": { "$ne": "" },
    };
    if unused_this_cycle {
        filter.insert("used_count", 0);
    } else {
        let window = DateTime::from_millis(now.timestamp_millis() - ROTATE_GRACE_MS);
        filter.insert("used_count", doc! { "$lt": max });
        filter.insert("next_rotate", doc! { "$gt": window });
    }
    filter
}

/// The grant itself: counters, lease record, timestamps, return URL, revision — all in one update.
pub fn grant_update(
    consumer: &str,
    key: &str,
    now: DateTime,
    webhook_url: &str,
    callback_url: Option<&str>,
) -> Document {
    let mut record = doc! { "ip": consumer, "key": key, "time": now };
    if let Some(url) = callback_url {
        record.insert("callback_url", url);
    }
    doc! {
        "$inc": { "in_use": 1, "used_count": 1, "lease_rev": 1 },
        "$push": { "proxy_used": record },
        "$set": { "last_used_at": now, "webhook_url": webhook_url, "updatedAt": now },
    }
}
