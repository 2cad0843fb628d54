//! The lease engine: lease state in memory, made durable by a fenced JetStream log, projected to MongoDB.
//!
//! One task owns the [`State`]. Requests reach it as jobs (closures over a [`Txn`]); it takes every job waiting,
//! runs them one after another against the state (so each sees the decisions before it), appends the operations
//! they produced as **one** batch to the log, and only when the stream has acknowledged the batch does it answer
//! them. Requests that arrive during an append wait for the next one: that is the group commit, and it is why the
//! cost per lease falls as load rises.
//!
//! Roles: every replica runs the engine. The one that holds the election key ([`election`]) leads: it serves and
//! appends. The others follow the log and keep the same state, ready to take over. An append names the sequence it
//! expects to follow ([`log`]), so a replica that still believes it leads after another took over is refused by the
//! stream and steps down, with its state restored to the last batch that was stored.
//!
//! Durability: an answered grant or return is in the log (file storage). The leader also projects the state to
//! MongoDB ([`projection`]) in the background; a replica starts from that projection and replays the log after
//! it, and the log is trimmed up to the projection.
//!
//! # Layout
//! - [`state`]: the state and its operations.
//! - [`log`]: fenced appends and ordered reads.
//! - [`election`]: who tries to lead.
//! - [`projection`]: the MongoDB projection and its mark.

pub mod election;
pub mod log;
pub mod projection;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use futures::StreamExt;
use proxypool_contracts::callback::{CallbackNotice, TakenReason};
use proxypool_contracts::{ApiError, Area};
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::Store;
use tokio::sync::{mpsc, oneshot, watch};

use self::log::{AppendError, Batch, LeaseLog};
use self::projection::{Mark, Snapshot};
use self::state::{Op, ProxyState, State};
use crate::metrics::LeaseMetrics;

/// Most jobs in one group commit (bounds the batch size and the time one commit holds the task).
const MAX_BATCH: usize = 4096;
/// How often the leader looks for expired leases, writes the projection and trims the log.
const TICK: Duration = Duration::from_millis(100);
/// How often the log is trimmed up to the projection.
const TRIM_EVERY: Duration = Duration::from_secs(10);

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

/// What a job answers once its batch is durable (or the engine could not make it so).
pub type Done = Box<dyn FnOnce(Result<(), ApiError>) + Send>;
/// A request to the engine: run against the state inside a [`Txn`] (when leading), or `None` to be refused. Every
/// answer, a refusal included, is sent only after the commit it was decided in.
pub type Job = Box<dyn FnOnce(Option<&mut Txn<'_>>) -> Option<Done> + Send>;

/// One group commit in the making: the state, the operations decided so far, and how to undo them.
#[derive(Debug)]
pub struct Txn<'a> {
    state: &'a mut State,
    now_ms: i64,
    ops: Vec<Op>,
    undo: HashMap<ObjectId, Option<ProxyState>>,
    notices: Vec<CallbackNotice>,
}

impl<'a> Txn<'a> {
    fn new(state: &'a mut State) -> Self {
        Self { state, now_ms: now_ms(), ops: Vec::new(), undo: HashMap::new(), notices: Vec::new() }
    }

    /// The state as the operations decided so far left it.
    pub fn state(&self) -> &State {
        self.state
    }

    /// Wall-clock time of this commit, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The best lease candidate in `area` now.
    pub fn candidate(&mut self, area: Area) -> Option<ObjectId> {
        self.state.candidate(area, self.now_ms, crate::index::Filter::default())
    }

    /// The best candidate within `filter` (one package, some proxies excluded).
    pub fn candidate_within(&mut self, area: Area, filter: crate::index::Filter<'_>) -> Option<ObjectId> {
        self.state.candidate(area, self.now_ms, filter)
    }

    /// Decides an operation: applies it to the state at once (the next job sees it) and logs it with the batch.
    pub fn apply(&mut self, op: Op) {
        let id = op.proxy();
        let state = &*self.state;
        self.undo.entry(id).or_insert_with(|| state.get(&id).cloned());
        self.notices.extend(self.state.apply(&op));
        self.ops.push(op);
    }
}

/// State shared between the engine task and its handle.
#[derive(Debug)]
struct Shared {
    loaded: AtomicBool,
    /// The last durable batch (while leading).
    applied: std::sync::atomic::AtomicU64,
    /// The sequence up to which MongoDB holds the projection.
    projected: watch::Sender<u64>,
}

/// The handle requests use to reach the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    serving: watch::Receiver<bool>,
    shared: Arc<Shared>,
    hand_over: Arc<watch::Sender<bool>>,
}

/// The answer to a caller when the engine cannot commit.
fn unavailable(why: &str) -> ApiError {
    ApiError::unavailable(format!("{why}; retry shortly"))
}

impl Engine {
    /// Runs `f` in the next group commit and returns its value once the commit is durable.
    pub async fn submit<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, ApiError>>();
        let job: Job = Box::new(move |txn: Option<&mut Txn<'_>>| {
            let Some(txn) = txn else {
                let _ = tx.send(Err(unavailable("this lease replica is not leading")));
                return None;
            };
            match f(txn) {
                Ok(value) => Some(Box::new(move |r: Result<(), ApiError>| {
                    let _ = tx.send(r.map(|()| value));
                }) as Done),
                // A refusal rests on the state too, so it waits for the same commit: a replica that no longer leads
                // (and so may not have seen a grant) is fenced before it can say "not found".
                Err(e) => Some(Box::new(move |r: Result<(), ApiError>| {
                    let _ = tx.send(r.and(Err(e)));
                }) as Done),
            }
        });
        self.tx.send(job).await.map_err(|_| unavailable("the lease engine has stopped"))?;
        rx.await.unwrap_or_else(|_| Err(unavailable("the lease engine has stopped")))
    }

    /// Before a graceful stop: if leading, lets a standby take over and returns once this replica no longer leads
    /// (at once on a standby). Until then it keeps serving, so a rolling restart leaves no gap.
    pub async fn hand_over(&self) {
        self.hand_over.send_replace(true);
        let mut serving = self.serving.clone();
        // The election bounds this: with no standby it gives the leadership up after two TTLs.
        let _ = serving.wait_for(|s| !*s).await;
    }

    /// Whether this replica leads and serves (changes as leadership moves).
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.serving.clone()
    }

    /// Waits until MongoDB shows every change this leader had made durable when called (the projection is
    /// asynchronous). `false` on timeout.
    pub async fn wait_projected(&self, timeout: Duration) -> bool {
        let target = self.shared.applied.load(Ordering::Acquire);
        let mut rx = self.shared.projected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|seq| *seq >= target)).await.is_ok_and(|r| r.is_ok())
    }

    /// Whether the state has been loaded (a loaded standby is ready to take over).
    pub fn is_loaded(&self) -> bool {
        self.shared.loaded.load(Ordering::Acquire)
    }
}

/// Starts the engine task and the election; both stop at `shutdown`.
pub fn start(
    config: EngineConfig,
    client: async_nats::Client,
    store: Store,
    metrics: LeaseMetrics,
    shutdown: Shutdown,
) -> (Engine, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
    let (serving_tx, serving) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);
    let (hand_over_tx, hand_over) = watch::channel(false);
    let shared = Arc::new(Shared {
        loaded: AtomicBool::new(false),
        applied: std::sync::atomic::AtomicU64::new(0),
        projected: watch::channel(0).0,
    });
    let election = tokio::spawn(election::run(
        client.clone(),
        config.instance_id.clone(),
        config.leader_ttl,
        leading_tx,
        hand_over,
        shutdown.clone(),
    ));
    let (proj_tx, proj_rx) = mpsc::channel(1);
    let actor = Actor {
        state: State::new(config.max),
        config,
        client,
        store,
        metrics,
        log: None,
        applied: 0,
        log_created_ms: 0,
        mark: Mark::default(),
        rx,
        leading,
        serving: serving_tx,
        shared: shared.clone(),
        dirty: HashSet::new(),
        dirty_since: None,
        touched: HashSet::new(),
        projecting: false,
        proj_tx,
        proj_rx,
        trimmed: 0,
        last_trim: Instant::now(),
        last_gauges: Instant::now(),
    };
    let task = tokio::spawn(async move {
        actor.run(shutdown).await;
        let _ = election.await;
    });
    (Engine { tx, serving, shared, hand_over: Arc::new(hand_over_tx) }, task)
}

type ProjectionDone = (Result<u64, proxypool_store::StoreError>, Vec<ObjectId>, Instant);

struct Actor {
    config: EngineConfig,
    client: async_nats::Client,
    store: Store,
    metrics: LeaseMetrics,
    state: State,
    log: Option<LeaseLog>,
    /// The last log sequence the state reflects.
    applied: u64,
    log_created_ms: i64,
    mark: Mark,
    rx: mpsc::Receiver<Job>,
    leading: watch::Receiver<bool>,
    serving: watch::Sender<bool>,
    shared: Arc<Shared>,
    /// Proxies changed by durable batches and not yet projected.
    dirty: HashSet<ObjectId>,
    dirty_since: Option<Instant>,
    /// Proxies a follower changed from the log since its load (the projection may not have them).
    touched: HashSet<ObjectId>,
    projecting: bool,
    proj_tx: mpsc::Sender<ProjectionDone>,
    proj_rx: mpsc::Receiver<ProjectionDone>,
    trimmed: u64,
    last_trim: Instant,
    last_gauges: Instant,
}

/// Why a phase ended.
enum Next {
    Follow,
    Lead,
    Rebuild,
    Stop,
}

impl Actor {
    async fn run(mut self, mut shutdown: Shutdown) {
        let mut next = Next::Rebuild;
        loop {
            next = match next {
                Next::Rebuild => self.recover(&mut shutdown).await,
                Next::Follow => self.follow(&mut shutdown).await,
                Next::Lead => self.lead(&mut shutdown).await,
                Next::Stop => break,
            };
        }
        self.serving.send_replace(false);
        // Answer what is still queued rather than leave callers to time out.
        self.rx.close();
        while let Ok(job) = self.rx.try_recv() {
            job(None);
        }
    }

    /// Loads the projection from MongoDB and replays the log after it; retries until it succeeds.
    async fn recover(&mut self, shutdown: &mut Shutdown) -> Next {
        let mut backoff = Duration::from_millis(200);
        loop {
            self.serving.send_replace(false);
            match self.try_recover(shutdown).await {
                Ok(next) => return next,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot load the lease state yet");
                    self.refuse_waiting();
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.wait() => return Next::Stop,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_recover(&mut self, shutdown: &mut Shutdown) -> Result<Next, String> {
        let started = Instant::now();
        let log = match &self.log {
            Some(l) => l.clone(),
            None => {
                let l = LeaseLog::open(&self.client, self.config.log_replicas, self.config.append_timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                self.log = Some(l.clone());
                l
            }
        };
        let created = log.created().await.map_err(|e| e.to_string())?;
        let mut mark = projection::mark(&self.store).await.map_err(|e| e.to_string())?;
        if mark.log_created_ms != created {
            tracing::info!("no projection of this lease log yet: starting from MongoDB's lease fields");
            projection::start_over(&self.store, created).await.map_err(|e| e.to_string())?;
            mark = Mark { log_created_ms: created, seq: 0 };
        }
        let docs = projection::load_all(&self.store).await.map_err(|e| e.to_string())?;
        let mut state = State::new(self.config.max);
        for d in &docs {
            state.put(d.id, Some(ProxyState::from_doc(d)));
        }
        self.state = state;
        self.applied = mark.seq;
        self.mark = mark;
        self.log_created_ms = created;
        self.touched.clear();
        self.dirty.clear();
        let (first, last) = log.bounds().await.map_err(|e| e.to_string())?;
        if last > mark.seq && first > mark.seq + 1 {
            // Cannot happen unless someone trimmed the stream by hand: the batches in between are lost.
            tracing::error!(
                first,
                mark = mark.seq,
                "the lease log was trimmed past the projection; continuing from it"
            );
            self.applied = first.saturating_sub(1);
        }
        self.replay_to(&log, last, shutdown).await?;
        tracing::info!(
            proxies = self.state.len(),
            replayed_to = self.applied,
            took = ?started.elapsed(),
            "lease state loaded"
        );
        self.shared.loaded.store(true, Ordering::Release);
        Ok(Next::Follow)
    }

    /// Reads the log until the state reflects sequence `last`.
    async fn replay_to(&mut self, log: &LeaseLog, last: u64, shutdown: &mut Shutdown) -> Result<(), String> {
        if self.applied >= last {
            return Ok(());
        }
        let mut reader = log.read_from(self.applied + 1).await.map_err(|e| e.to_string())?;
        self.replay_with(&mut reader, last, shutdown).await
    }

    /// Applies a batch read from the log. Operations on a proxy whose projected state is already past `seq` were
    /// applied before the projection was written, and are skipped.
    fn apply_logged(&mut self, seq: u64, batch: &Batch) -> Result<(), String> {
        if seq <= self.applied {
            return Ok(());
        }
        if seq != self.applied + 1 {
            return Err(format!("lease log gap: expected {}, read {seq}", self.applied + 1));
        }
        let skip: HashSet<ObjectId> =
            batch.ops.iter().map(Op::proxy).filter(|id| self.state.get(id).is_some_and(|p| p.seq >= seq)).collect();
        let mut changed = HashSet::new();
        for op in &batch.ops {
            let id = op.proxy();
            if !skip.contains(&id) {
                self.state.apply(op);
                changed.insert(id);
            }
        }
        for id in &changed {
            self.state.stamp(id, seq);
        }
        self.touched.extend(changed);
        self.applied = seq;
        Ok(())
    }

    fn refuse_waiting(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            job(None);
        }
    }

    /// Follows the log until this replica is elected (and caught up), or must rebuild.
    async fn follow(&mut self, shutdown: &mut Shutdown) -> Next {
        self.serving.send_replace(false);
        self.metrics.leader.set(0);
        let Some(log) = self.log.clone() else { return Next::Rebuild };
        // Every wait here also watches the stop: with NATS gone, setting up the reader fails after its timeout
        // again and again, and a stop must not wait for NATS to come back.
        let opened = tokio::select! {
            r = log.read_from(self.applied + 1) => r,
            () = shutdown.wait() => return Next::Stop,
        };
        let mut reader = match opened {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the lease log");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                    () = shutdown.wait() => return Next::Stop,
                }
                return Next::Follow;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = shutdown.wait() => return Next::Stop,
                item = reader.next() => match item {
                    Some(Ok((seq, batch))) => {
                        if let Err(e) = self.apply_logged(seq, &batch) {
                            tracing::warn!(error = %e, "the lease log moved past this replica; reloading");
                            return Next::Rebuild;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "lease log reader failed; reading again");
                        return Next::Follow;
                    }
                    None => return Next::Follow,
                },
                job = self.rx.recv() => match job {
                    Some(job) => { job(None); }
                    None => return Next::Stop,
                },
                _ = self.leading.changed() => {}
                _ = tick.tick() => {}
            }
            if *self.leading.borrow() {
                // Elected: catch up with everything stored before leading.
                match log.bounds().await {
                    Ok((_, last)) => match self.replay_with(&mut reader, last, shutdown).await {
                        Ok(()) => return Next::Lead,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot catch up with the lease log before leading");
                            return Next::Rebuild;
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot read the lease log's end; not leading yet"),
                }
            }
        }
    }

    /// Reads `reader` until the state reflects sequence `last`.
    async fn replay_with(
        &mut self,
        reader: &mut futures::stream::BoxStream<'static, Result<(u64, Batch), String>>,
        last: u64,
        shutdown: &mut Shutdown,
    ) -> Result<(), String> {
        while self.applied < last {
            let item = tokio::select! {
                item = tokio::time::timeout(Duration::from_secs(5), reader.next()) => item,
                () = shutdown.wait() => return Err("shutting down".into()),
            };
            match item {
                Ok(Some(Ok((seq, batch)))) => self.apply_logged(seq, &batch)?,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err("the lease log reader ended".into()),
                Err(_) => return Err(format!("the lease log did not deliver up to {last}")),
            }
        }
        Ok(())
    }

    /// Serves as the leader until it loses the election, is fenced, or shuts down.
    async fn lead(&mut self, shutdown: &mut Shutdown) -> Next {
        let Some(log) = self.log.clone() else { return Next::Rebuild };
        tracing::info!(from = self.applied, "lease leader serving");
        self.metrics.leader.set(1);
        // What followed the log since its load may not be in MongoDB yet.
        self.dirty.extend(self.touched.drain());
        if !self.dirty.is_empty() {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        self.shared.applied.store(self.applied, Ordering::Release);
        self.shared.projected.send_replace(self.mark.seq);
        self.serving.send_replace(true);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let next = loop {
            tokio::select! {
                biased;
                () = shutdown.wait() => break Next::Stop,
                _ = self.leading.changed() => {
                    if !*self.leading.borrow() {
                        tracing::warn!("lost the lease leadership; following");
                        break Next::Follow;
                    }
                }
                Some(done) = self.proj_rx.recv() => self.projected(done),
                job = self.rx.recv() => {
                    let Some(job) = job else { break Next::Stop };
                    let mut jobs = vec![job];
                    while jobs.len() < MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.commit(&log, jobs).await {
                        if let Some(next) = self.recover_lead(&log, e, shutdown).await {
                            break next;
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.reap(&log).await {
                        if let Some(next) = self.recover_lead(&log, e, shutdown).await {
                            break next;
                        }
                    }
                    self.project();
                    self.trim(&log).await;
                    // The counts walk every proxy: once a second is enough for a gauge.
                    if self.last_gauges.elapsed() >= Duration::from_secs(1) {
                        self.last_gauges = Instant::now();
                        self.update_gauges();
                    }
                }
            }
        };
        self.serving.send_replace(false);
        self.metrics.leader.set(0);
        next
    }

    /// After a failed append (the state is already back at the last stored batch): catch up with the log and go on
    /// leading, keeping the subscription, so that a fence (another replica appended in between, as during a
    /// hand-over) costs the callers of one batch a retry, not a gap. `Some` when this replica must stop leading.
    async fn recover_lead(&mut self, log: &LeaseLog, e: AppendError, shutdown: &mut Shutdown) -> Option<Next> {
        tracing::warn!(error = %e, "lease append failed; catching up with the log");
        self.metrics.lease("step_down");
        let last = match log.bounds().await {
            Ok((_, last)) => last,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the lease log's end; following");
                return Some(Next::Follow);
            }
        };
        if let Err(e) = self.replay_to(log, last, shutdown).await {
            tracing::warn!(error = %e, "cannot catch up with the lease log; reloading");
            return Some(Next::Rebuild);
        }
        // What another replica appended must reach MongoDB too.
        if !self.touched.is_empty() {
            self.dirty.extend(self.touched.drain());
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        self.shared.applied.store(self.applied, Ordering::Release);
        (!*self.leading.borrow()).then_some(Next::Follow)
    }

    /// Runs `jobs` as one group commit: decide, append once, then answer.
    async fn commit(&mut self, log: &LeaseLog, jobs: Vec<Job>) -> Result<(), AppendError> {
        let mut txn = Txn::new(&mut self.state);
        let dones: Vec<Done> = jobs.into_iter().filter_map(|job| job(Some(&mut txn))).collect();
        let Txn { ops, undo, notices, .. } = txn;
        if ops.is_empty() && dones.is_empty() {
            return Ok(());
        }
        // With no operation the batch is empty: a barrier that only proves, through the fence, that this replica
        // still leads and has seen every stored batch before its answers go out.
        let grants: Vec<(ObjectId, String)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Grant { proxy, lease, .. } => Some((*proxy, lease.key.clone())),
                _ => None,
            })
            .collect();
        let n_ops = ops.len();
        let batch = Batch { leader: self.config.instance_id.clone(), ops };
        let started = Instant::now();
        let appended = log.append(self.applied, &batch).await;
        self.metrics.append_duration.observe(started.elapsed().as_secs_f64());
        match appended {
            Ok(seq) => {
                self.applied = seq;
                self.shared.applied.store(seq, Ordering::Release);
                self.metrics.batch_ops.observe(n_ops as f64);
                for id in undo.keys() {
                    self.state.stamp(id, seq);
                    self.dirty.insert(*id);
                }
                self.dirty_since.get_or_insert_with(Instant::now);
                for done in dones {
                    done(Ok(()));
                }
                if !notices.is_empty() {
                    let client = self.client.clone();
                    tokio::spawn(async move { proxypool_rpc::notices::queue(&client, &notices).await });
                }
                Ok(())
            }
            Err(e) => {
                // Back to the last stored batch: a follower reads the log from there, so if this append was stored
                // after all (an acknowledgement lost), it is applied from the log like any other batch.
                for (id, before) in undo {
                    self.state.put(id, before);
                }
                for done in dones {
                    done(Err(unavailable("the lease log is unavailable")));
                }
                if matches!(e, AppendError::Unavailable(_)) && !grants.is_empty() {
                    // Stored or not, nobody was told of these grants: return them if they exist.
                    let client = self.client.clone();
                    tokio::spawn(return_orphans(client, grants));
                }
                Err(e)
            }
        }
    }

    /// Takes back leases older than `LEASE_TTL` (from the expiry order: no scan).
    async fn reap(&mut self, log: &LeaseLog) -> Result<(), AppendError> {
        let Some(ttl) = self.config.lease_ttl else { return Ok(()) };
        let cutoff = now_ms() - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expired = self.state.expired_leases(cutoff, MAX_BATCH);
        if expired.is_empty() {
            return Ok(());
        }
        let n = expired.len();
        let job: Job = Box::new(move |txn: Option<&mut Txn<'_>>| {
            if let Some(txn) = txn {
                for (proxy, key) in expired {
                    txn.apply(Op::Release {
                        proxy,
                        key,
                        uncount: false,
                        taken: Some(TakenReason::Expired),
                        failure: None,
                    });
                }
            }
            None
        });
        self.commit(log, vec![job]).await?;
        tracing::info!(leases = n, "expired leases taken back");
        for _ in 0..n {
            self.metrics.lease("expired");
        }
        Ok(())
    }

    /// Starts writing the projection of the proxies changed since the last one, unless a write is in flight.
    fn project(&mut self) {
        if self.projecting || self.dirty.is_empty() {
            return;
        }
        let ids: Vec<ObjectId> = self.dirty.drain().collect();
        let since = self.dirty_since.take().unwrap_or_else(Instant::now);
        let snap = Snapshot::of(&self.state, ids.iter().copied(), self.applied);
        let (store, created, tx) = (self.store.clone(), self.log_created_ms, self.proj_tx.clone());
        self.projecting = true;
        tokio::spawn(async move {
            let res = projection::write(&store, created, &snap).await.map(|()| snap.seq);
            let _ = tx.send((res, ids, since)).await;
        });
    }

    fn projected(&mut self, (res, ids, since): ProjectionDone) {
        self.projecting = false;
        match res {
            Ok(seq) => {
                self.mark.seq = self.mark.seq.max(seq);
                self.shared.projected.send_replace(self.mark.seq);
                self.metrics.projection_lag.observe(since.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(error = %e, proxies = ids.len(), "cannot write the lease projection; will retry");
                self.dirty.extend(ids);
                self.dirty_since.get_or_insert(since);
            }
        }
    }

    async fn trim(&mut self, log: &LeaseLog) {
        if self.mark.seq <= self.trimmed + 1 || self.last_trim.elapsed() < TRIM_EVERY {
            return;
        }
        self.last_trim = Instant::now();
        // Keep the batch at the mark itself, so the stream is never empty and its last sequence stays visible.
        match log.trim_below(self.mark.seq).await {
            Ok(()) => self.trimmed = self.mark.seq,
            Err(e) => tracing::debug!(error = %e, "cannot trim the lease log"),
        }
    }

    fn update_gauges(&self) {
        for area in [Area::Vn, Area::Global] {
            let (total, leasable, held, rotating) = self.state.counts(area);
            let set = |state: &'static str, v: u64| {
                let labels = crate::metrics::PoolLabels { area: area.as_str(), state };
                self.metrics.pool.get_or_create(&labels).set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set("total", total as u64);
            set("leasable", leasable as u64);
            set("in_use", held);
            set("rotating", rotating as u64);
        }
        self.metrics.projection_backlog.set(i64::try_from(self.dirty.len()).unwrap_or(i64::MAX));
    }
}

/// Returns grants from a batch whose append failed without an answer: if the batch was stored after all, its
/// grants are held by nobody. Retries (through whichever replica leads) until each is returned or known absent.
async fn return_orphans(client: async_nats::Client, grants: Vec<(ObjectId, String)>) {
    use proxypool_contracts::endpoints::LeaseRelease;
    use proxypool_contracts::lease::ReleaseRequest;
    for (proxy, key) in grants {
        let req = ReleaseRequest { proxy_id: Some(proxy.to_hex()), key: Some(key.clone()), failure: None };
        for _ in 0..60 {
            match proxypool_rpc::call::<LeaseRelease>(&client, &req).await {
                Ok(_) => {
                    tracing::info!(%proxy, "returned a grant whose append was not acknowledged");
                    break;
                }
                Err(proxypool_rpc::CallError::Remote(e)) if e.code == proxypool_contracts::ErrorCode::NotFound => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Wall-clock now, epoch ms.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
