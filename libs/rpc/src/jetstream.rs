//! Every JetStream stream, durable consumer, key-value bucket and object store of proxypool, declared and ensured
//! here and nowhere else.
//!
//! Each `ensure_*` is idempotent (get or create), so every process that uses a resource ensures it at start and
//! none depends on another having run first. Names come from [`proxypool_contracts::subjects`]. Every resource is
//! created with the deployment's `replicas` (`JETSTREAM_REPLICAS`; 3 on a three-server cluster), so the loss of a
//! server loses no stream, bucket or object store. (An existing resource keeps the replicas it was created with.)

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::{self, kv, object_store};
use proxypool_contracts::subjects;
use serde::Serialize;

/// A JetStream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    /// A stream, consumer or bucket could not be created or opened.
    #[error("cannot set up {what}: {message}")]
    Setup {
        /// Which resource.
        what: &'static str,
        /// The server's or client's explanation (the client's errors are not `'static` sources in every case).
        message: String,
    },
    /// A message could not be encoded.
    #[error("cannot encode a message for {subject}")]
    Encode {
        /// The subject.
        subject: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The lease log on this NATS was created by another deployment (another database).
    #[error(
        "the lease log {stream} on this NATS belongs to the deployment of database {theirs:?}, and this lease service \
         uses {ours:?}: two deployments share this NATS; give each its own PROXYPOOL_NAMESPACE"
    )]
    ForeignLog {
        /// The stream.
        stream: String,
        /// The database recorded in it.
        theirs: String,
        /// This service's database.
        ours: String,
    },
    /// A publish was not acknowledged by the stream.
    #[error("cannot publish on {subject}: {message}")]
    Publish {
        /// The subject.
        subject: &'static str,
        /// Why.
        message: String,
    },
}

fn setup(what: &'static str) -> impl FnOnce(String) -> JetStreamError {
    move |message| JetStreamError::Setup { what, message }
}

/// A WorkQueue stream and its one durable pull consumer: each message is handed to one worker and removed once
/// acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct WorkQueue {
    /// Stream name.
    pub stream: &'static str,
    /// The one subject of the stream.
    pub subject: &'static str,
    /// The durable consumer shared by the workers.
    pub consumer: &'static str,
    /// What the stream holds, for operators reading `nats stream ls`.
    pub description: &'static str,
}

/// Rotation jobs, one per claimed proxy; de-duplicated by job id.
pub const ROTATIONS: WorkQueue = WorkQueue {
    stream: subjects::ROTATION_STREAM,
    subject: subjects::ROTATION_JOBS,
    consumer: subjects::ROTATION_CONSUMER,
    description: "proxypool: rotation jobs",
};

/// Callback notices to consumers whose lease was taken; de-duplicated by lease key and reason.
pub const CALLBACKS: WorkQueue = WorkQueue {
    stream: subjects::CALLBACK_STREAM,
    subject: subjects::CALLBACKS,
    consumer: subjects::CALLBACK_CONSUMER,
    description: "proxypool: callback notices waiting for delivery",
};

/// How a work queue's consumer redelivers.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// How long a worker may hold a message without acknowledging or reporting progress before it is redelivered.
    pub ack_wait: Duration,
    /// Deliveries before a message is given up.
    pub max_deliver: i64,
    /// Whether redeliveries after a missed ack back off (ack_wait, 2×, 4×): a message that keeps killing its
    /// worker is retried more and more slowly.
    pub backoff: bool,
}

/// Long enough that a publisher re-sending after a lost ack is de-duplicated.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);

impl WorkQueue {
    /// Creates (idempotently) the stream, with `replicas` copies.
    pub async fn ensure_stream(
        &self,
        js: &jetstream::Context,
        replicas: usize,
    ) -> Result<jetstream::stream::Stream, JetStreamError> {
        js.get_or_create_stream(jetstream::stream::Config {
            name: subjects::resource(self.stream).into_owned(),
            description: Some(self.description.to_owned()),
            subjects: vec![subjects::subject(self.subject).into_owned()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(|e| setup("a work-queue stream")(e.to_string()))
    }

    /// Creates (idempotently) the stream and its durable consumer (which has the stream's replicas).
    pub async fn ensure_consumer(
        &self,
        js: &jetstream::Context,
        delivery: Delivery,
        replicas: usize,
    ) -> Result<PullConsumer, JetStreamError> {
        let stream = self.ensure_stream(js, replicas).await?;
        let backoff = if delivery.backoff {
            // The server requires fewer back-off steps than deliveries.
            (0..delivery.max_deliver.saturating_sub(1).min(3))
                .map(|i| delivery.ack_wait.saturating_mul(1 << i))
                .collect()
        } else {
            Vec::new()
        };
        stream
            .get_or_create_consumer(
                &subjects::resource(self.consumer),
                jetstream::consumer::pull::Config {
                    durable_name: Some(self.consumer.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: delivery.ack_wait,
                    max_deliver: delivery.max_deliver,
                    backoff,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup("a work-queue consumer")(e.to_string()))
    }

    /// Publishes one message with `id` as its JetStream message id (de-duplicated within the window) and the
    /// current trace context, and waits for the stream's acknowledgement: when this returns `Ok`, the message is
    /// stored.
    pub async fn publish<T: Serialize>(
        &self,
        js: &jetstream::Context,
        id: &str,
        message: &T,
    ) -> Result<(), JetStreamError> {
        publish_acked(js, self.subject, message, Some(id)).await.map(|_| ())
    }

    /// Messages pending or in hand, as the consumer reports them.
    pub async fn depth(&self, js: &jetstream::Context) -> Option<u64> {
        let mut consumer: PullConsumer = js
            .get_consumer_from_stream(&*subjects::resource(self.consumer), &*subjects::resource(self.stream))
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        Some(info.num_pending.saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(0)))
    }
}

/// The lease log stream (see [`subjects::LEASE_LOG_STREAM`]): file storage, so an acknowledged append survives
/// `kill -9` of any process; `replicas` > 1 in a cluster, so it also survives the loss of a server. The leader trims
/// it once MongoDB holds the projection, so its size is bounded by how far the projection lags, not by traffic.
///
/// The log records the MongoDB database of the deployment that created it (stream metadata `proxypool.database`):
/// a lease service of another database is refused ([`JetStreamError::ForeignLog`]), since replaying another
/// deployment's log would grant proxies its own database does not hold. (A log created before the record existed is
/// taken as it is.)
pub async fn ensure_lease_log(
    js: &jetstream::Context,
    replicas: usize,
    database: &str,
) -> Result<jetstream::stream::Stream, JetStreamError> {
    let name = subjects::resource(subjects::LEASE_LOG_STREAM).into_owned();
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            description: Some("proxypool: the lease log (group-committed batches from the lease leader)".to_owned()),
            subjects: vec![subjects::subject(subjects::LEASE_LOG).into_owned()],
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            // One batch holds a group commit of up to a few thousand operations.
            max_message_size: 8 * 1024 * 1024,
            metadata: [(LOG_DATABASE.to_owned(), database.to_owned())].into_iter().collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| setup("the lease log")(e.to_string()))?;
    match stream.cached_info().config.metadata.get(LOG_DATABASE) {
        Some(theirs) if theirs != database => {
            Err(JetStreamError::ForeignLog { stream: name, theirs: theirs.clone(), ours: database.to_owned() })
        }
        _ => Ok(stream),
    }
}

/// The lease log's metadata key naming its deployment's database.
const LOG_DATABASE: &str = "proxypool.database";

/// The lease leader bucket (see [`subjects::LEASE_LEADER_BUCKET`]): one key whose value names the leader; it
/// disappears `ttl` after the leader's last renewal, so a standby can take over.
pub async fn ensure_lease_leader(
    js: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, JetStreamError> {
    if let Ok(store) = js.get_key_value(&*subjects::resource(subjects::LEASE_LEADER_BUCKET)).await {
        return Ok(store);
    }
    // File storage: a memory bucket vanishes with a NATS restart, and a healthy leader then fails to renew and
    // steps down for nothing. Replicated like the log, so the election survives the loss of a server too.
    js.create_key_value(kv::Config {
        bucket: subjects::resource(subjects::LEASE_LEADER_BUCKET).into_owned(),
        description: "proxypool: lease leader election".to_owned(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| setup("the lease leader bucket")(e.to_string()))
}

/// Publishes `message` on `subject` with the current trace context (and `id` as its JetStream message id, for
/// de-duplication), waits for the stream's acknowledgement and returns the stored sequence.
async fn publish_acked<T: Serialize>(
    js: &jetstream::Context,
    subject: &'static str,
    message: &T,
    id: Option<&str>,
) -> Result<u64, JetStreamError> {
    let body = serde_json::to_vec(message).map_err(|source| JetStreamError::Encode { subject, source })?;
    let failed = |e: String| JetStreamError::Publish { subject, message: e };
    // The trace context first: `headers` replaces the map, `message_id` adds to it.
    let mut publish = Publish::build().payload(body.into()).headers(proxypool_telemetry::propagation::nats_headers());
    if let Some(id) = id {
        publish = publish.message_id(id);
    }
    let ack = js
        .send_publish(subjects::subject(subject).into_owned(), publish)
        .await
        .map_err(|e| failed(e.to_string()))?
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(ack.sequence)
}

/// Longest an uploaded spreadsheet is kept: an upload whose import never read it (importer down) expires.
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Opens the object store of uploaded spreadsheets, creating it when missing.
pub async fn ensure_import_uploads(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<object_store::ObjectStore, JetStreamError> {
    if let Ok(store) = js.get_object_store(&*subjects::resource(subjects::IMPORT_UPLOADS_BUCKET)).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: subjects::resource(subjects::IMPORT_UPLOADS_BUCKET).into_owned(),
        description: Some("proxypool: spreadsheets waiting for their import".to_owned()),
        max_age: UPLOAD_MAX_AGE,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| setup("the import uploads object store")(e.to_string()))
}

/// Opens the importer's key-value bucket of locks (one import at a time; the ZingProxy schedule), creating it when
/// missing.
pub async fn ensure_import_locks(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, JetStreamError> {
    if let Ok(store) = js.get_key_value(&*subjects::resource(subjects::IMPORT_LOCKS_BUCKET)).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: subjects::resource(subjects::IMPORT_LOCKS_BUCKET).into_owned(),
        description: "proxypool: importer locks and schedule".to_owned(),
        history: 1,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| setup("the importer locks bucket")(e.to_string()))
}
