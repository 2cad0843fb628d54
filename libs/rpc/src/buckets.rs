//! The importer's JetStream buckets, opened or created the same way by every process that uses them.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use proxypool_contracts::subjects;

/// Longest an uploaded spreadsheet is kept: an upload whose import never read it (importer down) expires.
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Opens the uploads object store, creating it when missing.
pub async fn uploads(js: &jetstream::Context) -> Result<object_store::ObjectStore, String> {
    if let Ok(store) = js.get_object_store(subjects::IMPORT_UPLOADS_BUCKET).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: subjects::IMPORT_UPLOADS_BUCKET.to_owned(),
        description: Some("proxypool: spreadsheets waiting for their import".to_owned()),
        max_age: UPLOAD_MAX_AGE,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot open the {} object store: {e}", subjects::IMPORT_UPLOADS_BUCKET))
}

/// Opens the importer's lock bucket, creating it when missing.
///
/// The bucket's stream is created here with the key-value layout (`KV_<bucket>`, subjects `$KV.<bucket>.>`, one
/// value per key, roll-ups, direct get, discard new) rather than with `create_key_value`, which first queries the
/// account info in a shape that JetStream servers before 2.10 do not send; the result is the same bucket.
pub async fn import_locks(js: &jetstream::Context) -> Result<kv::Store, String> {
    let bucket = subjects::IMPORT_LOCKS_BUCKET;
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("proxypool: importer locks and schedule".to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot create the {bucket} key-value bucket: {e}"))?;
    js.get_key_value(bucket).await.map_err(|e| format!("cannot open the {bucket} key-value bucket: {e}"))
}
