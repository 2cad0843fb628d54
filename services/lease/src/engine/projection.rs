//! The MongoDB projection of lease state: SPEC's lease fields on each `proxies` document, and the log sequence
//! they reflect.
//!
//! The leader marks each proxy a durable batch changed; the projector writes the marked proxies' current state in
//! one multi-statement `update` command per chunk (any MongoDB, no `bulkWrite` needed), then records the sequence
//! up to which every document is current in `lease_meta`. Changes to one proxy coalesce: the backlog is at most one
//! entry per proxy, however many leases come and go. Each statement is guarded by `lease_rev < seq`, so a deposed
//! leader's late write never replaces a newer projection.

use bson::oid::ObjectId;
use bson::{doc, Document};
use futures::TryStreamExt;
use proxypool_store::model::ProxyDoc;
use proxypool_store::{Store, StoreError};

use proxypool_contracts::callback::CallbackNotice;

use super::state::{ProxyState, State};

/// Statements per `update` command.
const CHUNK: usize = 500;
/// Collection of the projection's bookkeeping.
const META: &str = "lease_meta";
/// Its one document.
const META_ID: &str = "projection";

/// The proxies to write, the callback notices not yet delivered, and the sequence their state reflects.
#[derive(Debug)]
pub struct Snapshot {
    /// Every change up to this sequence is in `docs`' state.
    pub seq: u64,
    /// `(id, $set)` per proxy.
    pub docs: Vec<(ObjectId, Document)>,
    /// The outbox at `seq`: a replica that loads from this projection delivers them.
    pub pending: Vec<CallbackNotice>,
}

impl Snapshot {
    /// The current state of `ids` (deleted ones are skipped: their document is gone) and the outbox.
    pub fn of(state: &State, ids: impl IntoIterator<Item = ObjectId>, seq: u64) -> Self {
        let docs =
            ids.into_iter().filter_map(|id| state.get(&id).map(|p: &ProxyState| (id, p.projection(seq)))).collect();
        Self { seq, docs, pending: state.pending_notices() }
    }
}

/// Where the projection stands: the log it was made from (its creation time) and the sequence it covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    /// Creation time of the log stream, epoch ms.
    pub log_created_ms: i64,
    /// Every document reflects the log up to here.
    pub seq: u64,
}

/// Writes `snap` and then advances the mark.
pub async fn write(store: &Store, log_created_ms: i64, snap: &Snapshot) -> Result<(), StoreError> {
    let seq = i64::try_from(snap.seq).unwrap_or(i64::MAX);
    // Kept as JSON text: the notices' own wire form, read back as it was written.
    let pending = serde_json::to_string(&snap.pending).unwrap_or_else(|_| "[]".to_owned());
    for chunk in snap.docs.chunks(CHUNK) {
        let updates: Vec<Document> = chunk
            .iter()
            .map(|(id, set)| doc! { "q": { "_id": id, "lease_rev": { "$lt": seq } }, "u": { "$set": set.clone() } })
            .collect();
        store.db().run_command(doc! { "update": "proxies", "updates": updates, "ordered": false }).await?;
    }
    store
        .db()
        .collection::<Document>(META)
        .update_one(
            doc! { "_id": META_ID },
            doc! { "$set": { "seq": seq, "log_created_ms": log_created_ms, "pending_notices": pending } },
        )
        .upsert(true)
        .await?;
    Ok(())
}

/// The callback notices not yet delivered at the recorded mark.
pub async fn pending(store: &Store) -> Result<Vec<CallbackNotice>, StoreError> {
    let doc = store.db().collection::<Document>(META).find_one(doc! { "_id": META_ID }).await?;
    let Some(raw) = doc.as_ref().and_then(|d| d.get_str("pending_notices").ok()) else { return Ok(Vec::new()) };
    Ok(serde_json::from_str(raw).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the projection's pending callback notices are unreadable; dropped");
        Vec::new()
    }))
}

/// The recorded mark (the default when there is none).
pub async fn mark(store: &Store) -> Result<Mark, StoreError> {
    let doc = store.db().collection::<Document>(META).find_one(doc! { "_id": META_ID }).await?;
    Ok(doc.map_or_else(Mark::default, |d| Mark {
        log_created_ms: d.get_i64("log_created_ms").unwrap_or(0),
        seq: u64::try_from(d.get_i64("seq").unwrap_or(0)).unwrap_or(0),
    }))
}

/// Starts a projection of a new log: every document's `lease_rev` back to 0 (their lease fields are kept as the
/// starting state), and the mark at 0 for `log_created_ms`.
pub async fn start_over(store: &Store, log_created_ms: i64) -> Result<(), StoreError> {
    store.proxies().update_many(doc! {}, doc! { "$set": { "lease_rev": 0_i64 } }).await?;
    store
        .db()
        .collection::<Document>(META)
        .update_one(doc! { "_id": META_ID }, doc! { "$set": { "seq": 0_i64, "log_created_ms": log_created_ms } })
        .upsert(true)
        .await?;
    Ok(())
}

/// Every proxy document (the one full read: at start, or when a follower fell behind the trimmed log).
pub async fn load_all(store: &Store) -> Result<Vec<ProxyDoc>, StoreError> {
    Ok(store.proxies().find(doc! {}).await?.try_collect().await?)
}
