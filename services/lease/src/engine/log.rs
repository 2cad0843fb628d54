//! The lease log on JetStream: fenced appends by the leader, ordered reads by followers.
//!
//! Every append carries the sequence the writer believes is last (`Nats-Expected-Last-Sequence`). The stream
//! stores it only if nothing was appended since, so two replicas that both believe they lead cannot both extend the
//! log: the second append fails with [`AppendError::Fenced`] and its writer steps down. The fence is in the log
//! itself, not in the election, so it holds whatever the clocks or the network do.
//!
//! Every batch names its format ([`FORMAT`]). A replica reads every format up to its own and refuses a newer one
//! ([`ReadError::TooNew`]): it then neither applies it nor leads, so during a rolling upgrade an older replica
//! never misreads what a newer leader wrote.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, context::PublishErrorKind};
use futures::stream::BoxStream;
use futures::StreamExt;
use proxypool_contracts::subjects;
use proxypool_rpc::jetstream::JetStreamError;
use serde::{Deserialize, Serialize};

use super::state::Op;

/// The log format this replica writes and the newest it reads. 1: the first (no `v`, no `at_ms`); 2: batch
/// times and terms, lock deadlines, renewals, request ids and the callback outbox; 3: per-site bans on exit IPs
/// (a release's `ban`), quarantines, holders' rotation requests and duplicate exit IPs (`duplicate`), which a
/// format-2 replica would drop without noticing, so it must not lead after one.
pub const FORMAT: u32 = 3;

/// One group commit: the operations decided while the previous append was in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The log format ([`FORMAT`]); absent in format 1.
    #[serde(default = "format_1")]
    pub v: u32,
    /// The replica that appended it.
    pub leader: String,
    /// When its leader decided it, on the engine's clock (epoch ms; 0 in format 1).
    #[serde(default)]
    pub at_ms: i64,
    /// The term of its leader: each new leader opens a term one above the newest in the log (0 in format 1).
    #[serde(default)]
    pub epoch: u64,
    /// In the order they were decided.
    pub ops: Vec<Op>,
    /// Callback notices of earlier batches now stored on the callback stream: out of the outbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<String>,
}

fn format_1() -> u32 {
    1
}

impl Batch {
    /// A batch in this replica's format, of term `epoch`.
    pub fn new(leader: &str, epoch: u64, at_ms: i64, ops: Vec<Op>) -> Self {
        Self { v: FORMAT, leader: leader.to_owned(), at_ms, epoch, ops, sent: Vec::new() }
    }

    /// Decodes a stored batch, refusing a format newer than [`FORMAT`] before reading its operations.
    pub fn decode(seq: u64, body: &[u8]) -> Result<Self, ReadError> {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default = "format_1")]
            v: u32,
        }
        let head: Head = serde_json::from_slice(body).map_err(|source| ReadError::Malformed { seq, source })?;
        if head.v > FORMAT {
            return Err(ReadError::TooNew { seq, found: head.v });
        }
        serde_json::from_slice(body).map_err(|source| ReadError::Malformed { seq, source })
    }
}

/// Why the log could not be read on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream or the connection failed.
    #[error("cannot read the lease log: {0}")]
    Transport(String),
    /// A batch is not a batch (a bug, or someone published on the log's subject).
    #[error("lease log batch {seq} is malformed")]
    Malformed {
        /// Its sequence.
        seq: u64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A batch written by a newer version of the lease service.
    #[error("lease log batch {seq} is in format {found}; this replica reads formats up to {FORMAT}: upgrade it")]
    TooNew {
        /// Its sequence.
        seq: u64,
        /// Its format.
        found: u32,
    },
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Something was appended after the sequence this writer expected: another replica leads.
    #[error("the lease log moved past sequence {expected}: another replica is leading")]
    Fenced {
        /// What the writer expected to be last.
        expected: u64,
    },
    /// The append may or may not be stored (timeout, NATS down).
    #[error("cannot append to the lease log: {0}")]
    Unavailable(String),
}

/// The log, as one replica uses it.
#[derive(Debug, Clone)]
pub struct LeaseLog {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
}

impl LeaseLog {
    /// Ensures the stream exists (`replicas` copies) and belongs to the deployment of `database`.
    pub async fn open(
        client: &async_nats::Client,
        replicas: usize,
        timeout: Duration,
        database: &str,
    ) -> Result<Self, JetStreamError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let stream = proxypool_rpc::jetstream::ensure_lease_log(&js, replicas, database).await?;
        Ok(Self { js, stream })
    }

    /// Appends `batch` if the log's last sequence is `expected`; returns the batch's sequence.
    pub async fn append(&self, expected: u64, batch: &Batch) -> Result<u64, AppendError> {
        let body = serde_json::to_vec(batch).map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let publish = jetstream::context::Publish::build().payload(body.into()).expected_last_sequence(expected);
        let fenced = |kind: PublishErrorKind| kind == PublishErrorKind::WrongLastSequence;
        let ack = match self.js.send_publish(subjects::subject(subjects::LEASE_LOG).into_owned(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if fenced(e.kind()) => Err(AppendError::Fenced { expected }),
            Err(e) => Err(AppendError::Unavailable(e.to_string())),
        }
    }

    /// The stream's first and last sequence (first is past what was trimmed).
    pub async fn bounds(&self) -> Result<(u64, u64), JetStreamError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| JetStreamError::Setup { what: "the lease log", message: e.to_string() })?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// When the NATS server stored the batch at `seq`, epoch ms: the engine's clock reading at a take-over.
    pub async fn stored_at(&self, seq: u64) -> Result<i64, JetStreamError> {
        let msg = self
            .stream
            .get_raw_message(seq)
            .await
            .map_err(|e| JetStreamError::Setup { what: "the lease log", message: e.to_string() })?;
        Ok(i64::try_from(msg.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
    }

    /// When the stream was created (identifies this log: a projection made from another log is not replayed
    /// against it).
    pub async fn created(&self) -> Result<i64, JetStreamError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| JetStreamError::Setup { what: "the lease log", message: e.to_string() })?;
        Ok(info.created.unix_timestamp_nanos() as i64 / 1_000_000)
    }

    /// Drops every batch below `seq` (MongoDB holds their effect).
    pub async fn trim_below(&self, seq: u64) -> Result<(), JetStreamError> {
        self.stream
            .purge()
            .sequence(seq)
            .await
            .map(|_| ())
            .map_err(|e| JetStreamError::Setup { what: "the lease log trim", message: e.to_string() })
    }

    /// Reads the batches from `start` on, in order, as `(sequence, batch)`. A malformed batch ends the stream with an
    /// error (the follower then rebuilds rather than skip a change).
    pub async fn read_from(
        &self,
        start: u64,
    ) -> Result<BoxStream<'static, Result<(u64, Batch), ReadError>>, JetStreamError> {
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start.max(1) },
                ..Default::default()
            })
            .await
            .map_err(|e| JetStreamError::Setup { what: "the lease log reader", message: e.to_string() })?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| JetStreamError::Setup { what: "the lease log reader", message: e.to_string() })?;
        Ok(messages
            .map(|m| {
                let m = m.map_err(|e| ReadError::Transport(e.to_string()))?;
                let seq = m.info().map_err(|e| ReadError::Transport(e.to_string()))?.stream_sequence;
                Ok((seq, Batch::decode(seq, &m.payload)?))
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_format_1_and_refuses_a_newer_format() {
        let v1 = br#"{"leader":"a","ops":[]}"#;
        let b = Batch::decode(7, v1).map_err(|e| e.to_string());
        assert_eq!(b.map(|b| (b.v, b.at_ms)), Ok((1, 0)));
        let ours = serde_json::to_vec(&Batch::new("a", 1, 5, Vec::new())).unwrap_or_default();
        assert_eq!(Batch::decode(8, &ours).map(|b| b.v).ok(), Some(FORMAT));
        // A newer format is refused before its operations are read (they may not parse here at all).
        let newer = format!(r#"{{"v":{},"leader":"b","at_ms":1,"ops":[{{"op":"from_the_future"}}]}}"#, FORMAT + 1);
        match Batch::decode(9, newer.as_bytes()) {
            Err(ReadError::TooNew { seq: 9, found }) => assert_eq!(found, FORMAT + 1),
            other => panic!("expected TooNew, got {other:?}"),
        }
        assert!(matches!(Batch::decode(10, b"{"), Err(ReadError::Malformed { seq: 10, .. })));
    }
}
