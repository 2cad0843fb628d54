//! The lease log on JetStream: fenced appends by the leader, ordered reads by followers.
//!
//! Every append carries the sequence the writer believes is last (`Nats-Expected-Last-Sequence`). The stream
//! stores it only if nothing was appended since, so two replicas that both believe they lead cannot both extend the
//! log: the second append fails with [`AppendError::Fenced`] and its writer steps down. The fence is in the log
//! itself, not in the election, so it holds whatever the clocks or the network do.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, context::PublishErrorKind};
use futures::stream::BoxStream;
use futures::StreamExt;
use proxypool_contracts::subjects;
use proxypool_rpc::jetstream::JetStreamError;
use serde::{Deserialize, Serialize};

use super::state::Op;

/// One group commit: the operations decided while the previous append was in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The replica that appended it.
    pub leader: String,
    /// In the order they were decided.
    pub ops: Vec<Op>,
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
    /// Ensures the stream exists (`replicas` copies).
    pub async fn open(client: &async_nats::Client, replicas: usize, timeout: Duration) -> Result<Self, JetStreamError> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        let stream = proxypool_rpc::jetstream::ensure_lease_log(&js, replicas).await?;
        Ok(Self { js, stream })
    }

    /// Appends `batch` if the log's last sequence is `expected`; returns the batch's sequence.
    pub async fn append(&self, expected: u64, batch: &Batch) -> Result<u64, AppendError> {
        let body = serde_json::to_vec(batch).map_err(|e| AppendError::Unavailable(e.to_string()))?;
        let publish = jetstream::context::Publish::build().payload(body.into()).expected_last_sequence(expected);
        let fenced = |kind: PublishErrorKind| kind == PublishErrorKind::WrongLastSequence;
        let ack = match self.js.send_publish(subjects::LEASE_LOG, publish).await {
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
    ) -> Result<BoxStream<'static, Result<(u64, Batch), String>>, JetStreamError> {
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
                let m = m.map_err(|e| e.to_string())?;
                let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
                let batch: Batch = serde_json::from_slice(&m.payload).map_err(|e| format!("batch {seq}: {e}"))?;
                Ok((seq, batch))
            })
            .boxed())
    }
}
