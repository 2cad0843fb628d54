//! The lease engine: lease state in memory, made durable by a fenced JetStream log, projected to MongoDB.
//!
//! One task owns the [`State`](state::State). Requests reach it as jobs (closures over a [`Txn`]); it takes every
//! job waiting, runs them one after another against the state (so each sees the decisions before it), appends the
//! operations they produced as **one** batch to the log, and only when the stream has acknowledged the batch does
//! it answer them. Requests that arrive during an append wait for the next one: that is the group commit, and it is
//! why the cost per lease falls as load rises.
//!
//! Roles: every replica runs the engine. The one that holds the election key ([`election`]) leads: it serves and
//! appends. The others follow the log and keep the same state, ready to take over. An append names the sequence it
//! expects to follow ([`log`]), so a replica that still believes it leads after another took over is refused by the
//! stream and steps down, with its state restored to the last batch that was stored.
//!
//! Everything that can be held has a deadline in the logged state and is taken back by the leader: leases at
//! `LEASE_TTL` from their grant or last renewal, rotation locks at the deadline their job keeps renewing. Both are
//! measured on the engine's one clock ([`clock`]), read from the log, not from a replica's wall clock.
//!
//! Durability: an answered grant or return is in the log (file storage). The leader also projects the state to
//! MongoDB ([`projector`]) in the background; a replica starts from that projection and replays the log after
//! it, and the log is trimmed up to the projection.
//!
//! # Layout
//! - [`handle`]: the [`Engine`] handle requests use and the [`Txn`] a job decides in.
//! - [`actor`]: the task: load, follow, lead, group commit, expiry.
//! - [`state`]: the state and its operations.
//! - [`clock`]: the one clock.
//! - [`log`]: fenced appends, ordered reads, the format version.
//! - [`election`]: who tries to lead.
//! - [`projection`] and [`projector`]: the MongoDB projection, its mark, and its bookkeeping.

pub mod actor;
pub mod bans;
pub mod clock;
pub mod election;
pub mod handle;
pub mod log;
pub mod projection;
pub mod projector;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;
use tokio::sync::{mpsc, watch};

use self::handle::Shared;
pub use self::handle::{Done, Engine, Job, Txn};
use crate::metrics::LeaseMetrics;

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `PROXY_USE_MAX`.
    pub max: u32,
    /// This replica (the `leader` of its batches, its election value).
    pub instance_id: String,
    /// `LEASE_LEADER_TTL`: how long a leader's election key outlives its last renewal (the failover time).
    pub leader_ttl: Duration,
    /// `LEASE_LOG_REPLICAS`: copies of the log stream in a NATS cluster.
    pub log_replicas: usize,
    /// How long an append may take before it counts as failed.
    pub append_timeout: Duration,
    /// `LEASE_TTL`.
    pub lease_ttl: Option<Duration>,
}

/// Starts the engine task and the election; both stop at `shutdown`.
pub fn start(
    config: EngineConfig,
    client: async_nats::Client,
    store: Store,
    metrics: LeaseMetrics,
    shutdown: Shutdown,
) -> (Engine, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(actor::MAX_BATCH * 4);
    let (serving_tx, serving) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let (hand_over_tx, hand_over) = watch::channel(false);
    let hand_over_tx = Arc::new(hand_over_tx);
    let (deposed_tx, deposed) = watch::channel(0u64);
    let (delivered_tx, delivered_rx) = mpsc::channel(64);
    let shared = Arc::new(Shared::new());
    let election = tokio::spawn(election::run(
        client.clone(),
        config.instance_id.clone(),
        (config.leader_ttl, config.log_replicas),
        leading_tx,
        hand_over,
        deposed,
        shutdown.clone(),
    ));
    let actor = actor::Actor {
        state: state::State::new(config.max),
        config,
        client,
        metrics,
        clock: clock::Clock::default(),
        log: None,
        applied: 0,
        projector: projector::Projector::new(store, shared.clone()),
        rx,
        leading,
        serving: serving_tx,
        step_aside: hand_over_tx.clone(),
        deposed: deposed_tx,
        epoch: 0,
        newest_epoch: 0,
        awaiting_lead_loss: None,
        delivering: std::collections::HashSet::new(),
        sent: Vec::new(),
        delivered_tx,
        delivered_rx,
        last_delivery: Instant::now(),
        shared: shared.clone(),
        last_gauges: Instant::now(),
    };
    let task = tokio::spawn(async move {
        actor.run(shutdown).await;
        let _ = election.await;
    });
    (Engine { tx, serving, shared, hand_over: hand_over_tx }, task)
}

/// Wall-clock now, epoch ms: only for comparisons with times other services wrote from their own wall clocks
/// (a catalogue document's `updatedAt`), never for a lease or lock decision.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
