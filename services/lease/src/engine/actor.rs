//! The engine task: loads the state, follows the log as a standby, and leads (group commit, expiry of leases and
//! rotation locks, projection) while elected.
//!
//! Phases: [`Actor::recover`] (load MongoDB's projection, replay the log after it) → [`Actor::follow`] (apply
//! batches as they are appended, until elected and caught up) → [`Actor::lead`] (open a term with a barrier that
//! sets the clock, then serve) → back to following when the lead is lost or an append is fenced.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use futures::stream::BoxStream;
use futures::StreamExt;
use proxypool_contracts::callback::TakenReason;
use proxypool_contracts::lease::REQUEST_WINDOW;
use proxypool_rpc::jetstream::JetStreamError;
use proxypool_settings::shutdown::Shutdown;
use proxypool_store::StoreError;
use tokio::sync::{mpsc, watch};

use super::clock::Clock;
use super::handle::{unavailable, Done, Job, Shared, Txn};
use super::log::{AppendError, Batch, LeaseLog, ReadError};
use super::projection::{self, Mark};
use super::projector::Projector;
use super::state::{Op, ProxyState, State};
use super::EngineConfig;
use crate::metrics::LeaseMetrics;

/// Most jobs in one group commit (bounds the batch size and the time one commit holds the task).
pub(super) const MAX_BATCH: usize = 4096;
/// How often the leader looks for expired leases and locks, writes the projection and trims the log.
const TICK: Duration = Duration::from_millis(100);
/// Attempts to open a term while the previous leader's last batches keep landing.
const OPEN_TERM_TRIES: u32 = 20;
/// How long a catch-up waits for the log to deliver a batch it knows exists.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Why the state could not be loaded or kept up with the log.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log's stream could not be opened or read.
    #[error(transparent)]
    Log(#[from] JetStreamError),
    /// A batch could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// MongoDB's projection could not be read.
    #[error("cannot read the lease projection")]
    Store(#[from] StoreError),
    /// A batch is missing between the state and the log.
    #[error("lease log gap: expected batch {expected}, read {read}")]
    Gap {
        /// The next batch the state needs.
        expected: u64,
        /// The batch that came.
        read: u64,
    },
    /// The log did not deliver a batch it holds in time.
    #[error("the lease log did not deliver up to batch {0} in time")]
    Stalled(u64),
    /// The reader ended.
    #[error("the lease log reader ended")]
    Ended,
    /// The service is stopping.
    #[error("stopping")]
    Stopping,
}

type Reader = BoxStream<'static, Result<(u64, Batch), ReadError>>;

/// Why a phase ended.
pub(super) enum Next {
    Follow,
    Lead,
    Rebuild,
    /// A batch in a newer format: neither apply nor lead until replaced.
    Refuse,
    Stop,
}

pub(super) struct Actor {
    pub(super) config: EngineConfig,
    pub(super) client: async_nats::Client,
    pub(super) metrics: LeaseMetrics,
    pub(super) state: State,
    pub(super) clock: Clock,
    pub(super) log: Option<LeaseLog>,
    /// The last log sequence the state reflects.
    pub(super) applied: u64,
    pub(super) projector: Projector,
    pub(super) rx: mpsc::Receiver<Job>,
    pub(super) leading: watch::Receiver<bool>,
    pub(super) serving: watch::Sender<bool>,
    /// Tells the election to stop standing (a replica that met a newer log format).
    pub(super) step_aside: Arc<watch::Sender<bool>>,
    /// Tells the election that a newer term deposed this replica.
    pub(super) deposed: watch::Sender<u64>,
    /// The term this replica leads (while leading).
    pub(super) epoch: u64,
    /// The newest term in the log.
    pub(super) newest_epoch: u64,
    /// Deposed at this instant, and the election has not yet said it no longer leads: do not take the lead on that
    /// stale word (for at most two election TTLs: past them, a `true` is a new election won, not the old word).
    pub(super) awaiting_lead_loss: Option<Instant>,
    /// Callback notices being queued now (by id).
    pub(super) delivering: HashSet<String>,
    /// Notices queued and not yet marked sent in the log.
    pub(super) sent: Vec<String>,
    /// Where the delivery tasks report what they queued and what they could not.
    pub(super) delivered_tx: mpsc::Sender<(Vec<String>, Vec<String>)>,
    pub(super) delivered_rx: mpsc::Receiver<(Vec<String>, Vec<String>)>,
    /// The last time undelivered notices were tried.
    pub(super) last_delivery: Instant,
    pub(super) shared: Arc<Shared>,
    pub(super) last_gauges: Instant,
}

impl Actor {
    pub(super) async fn run(mut self, mut shutdown: Shutdown) {
        let mut next = Next::Rebuild;
        loop {
            next = match next {
                Next::Rebuild => self.recover(&mut shutdown).await,
                Next::Follow => self.follow(&mut shutdown).await,
                Next::Lead => self.lead(&mut shutdown).await,
                Next::Refuse => self.refuse(&mut shutdown).await,
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
                Err(ReplayError::Read(e @ ReadError::TooNew { .. })) => return self.too_new(&e),
                Err(ReplayError::Stopping) => return Next::Stop,
                Err(e) => {
                    tracing::warn!(error = %proxypool_rpc::error_chain(&e), retry_in = ?backoff, "cannot load the lease state yet");
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

    async fn try_recover(&mut self, shutdown: &mut Shutdown) -> Result<Next, ReplayError> {
        let started = Instant::now();
        let log = match &self.log {
            Some(l) => l.clone(),
            None => {
                let database = self.projector.store().db().name().to_owned();
                let l = LeaseLog::open(&self.client, self.config.log_replicas, self.config.append_timeout, &database)
                    .await?;
                self.log = Some(l.clone());
                l
            }
        };
        let created = log.created().await?;
        let store = self.projector.store().clone();
        let mut mark = projection::mark(&store).await?;
        if mark.log_created_ms != created {
            tracing::info!("no projection of this lease log yet: starting from MongoDB's lease fields");
            projection::start_over(&store, created).await?;
            mark = Mark { log_created_ms: created, seq: 0 };
        }
        let docs = projection::load_all(&store).await?;
        let mut state = State::new(self.config.max);
        for d in &docs {
            state.put(d.id, Some(ProxyState::from_doc(d)));
        }
        // The outbox as the projection left it; the replay below adds what was logged after the mark.
        state.post(projection::pending(&store).await?);
        self.state = state;
        self.applied = mark.seq;
        self.projector.loaded(mark);
        let (first, last) = log.bounds().await?;
        if last > mark.seq && first > mark.seq + 1 {
            // Cannot happen unless someone trimmed the stream by hand: the batches in between are lost.
            tracing::error!(
                first,
                mark = mark.seq,
                "the lease log was trimmed past the projection; continuing from it"
            );
            self.applied = first.saturating_sub(1);
        }
        // The clock starts from the log: the last batch stored (its server time), then every batch replayed.
        if last > 0 {
            if let Ok(at) = log.stored_at(last).await {
                self.clock.observe(at);
            }
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
    async fn replay_to(&mut self, log: &LeaseLog, last: u64, shutdown: &mut Shutdown) -> Result<(), ReplayError> {
        if self.applied >= last {
            return Ok(());
        }
        let mut reader = log.read_from(self.applied + 1).await?;
        self.replay_with(&mut reader, last, shutdown).await
    }

    /// Reads `reader` until the state reflects sequence `last`.
    async fn replay_with(
        &mut self,
        reader: &mut Reader,
        last: u64,
        shutdown: &mut Shutdown,
    ) -> Result<(), ReplayError> {
        while self.applied < last {
            let item = tokio::select! {
                item = tokio::time::timeout(CATCH_UP_WAIT, reader.next()) => item,
                () = shutdown.wait() => return Err(ReplayError::Stopping),
            };
            match item {
                Ok(Some(Ok((seq, batch)))) => self.apply_logged(seq, &batch)?,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => return Err(ReplayError::Ended),
                Err(_) => return Err(ReplayError::Stalled(last)),
            }
        }
        Ok(())
    }

    /// Applies a batch read from the log. Operations on a proxy whose projected state is already past `seq` were
    /// applied before the projection was written, and are skipped.
    fn apply_logged(&mut self, seq: u64, batch: &Batch) -> Result<(), ReplayError> {
        if seq <= self.applied {
            return Ok(());
        }
        if seq != self.applied + 1 {
            return Err(ReplayError::Gap { expected: self.applied + 1, read: seq });
        }
        self.clock.observe(batch.at_ms);
        self.forget_requests(batch.at_ms);
        self.newest_epoch = self.newest_epoch.max(batch.epoch);
        let skip: HashSet<ObjectId> =
            batch.ops.iter().map(Op::proxy).filter(|id| self.state.get(id).is_some_and(|p| p.seq >= seq)).collect();
        let mut changed = HashSet::new();
        for op in &batch.ops {
            let id = op.proxy();
            if !skip.contains(&id) {
                // The notices an operation causes are part of its batch: every replica puts them in its outbox,
                // so whichever leads next delivers those not yet marked sent.
                let notices = self.state.apply(op);
                self.state.post(notices);
                changed.insert(id);
            }
        }
        self.state.mark_sent(&batch.sent);
        for id in &changed {
            self.state.stamp(id, seq);
        }
        self.projector.followed(changed);
        self.applied = seq;
        Ok(())
    }

    /// Forgets request ids older than the window, measured at a batch's own time (the same on every replica).
    fn forget_requests(&mut self, at_ms: i64) {
        if at_ms > 0 {
            self.state.forget_requests_before(at_ms - i64::try_from(REQUEST_WINDOW.as_millis()).unwrap_or(0));
        }
    }

    fn refuse_waiting(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            job(None);
        }
    }

    /// A batch in a newer format was met: stop standing for the lead.
    fn too_new(&mut self, e: &ReadError) -> Next {
        tracing::error!(error = %e, "this lease replica is older than the log: it will not lead until replaced");
        self.step_aside.send_replace(true);
        Next::Refuse
    }

    /// After meeting a newer format: answers every request `service_unavailable` (the leader is a newer replica)
    /// until the stop.
    async fn refuse(&mut self, shutdown: &mut Shutdown) -> Next {
        self.serving.send_replace(false);
        self.metrics.leader.set(0);
        loop {
            tokio::select! {
                () = shutdown.wait() => return Next::Stop,
                job = self.rx.recv() => match job {
                    Some(job) => { job(None); }
                    None => return Next::Stop,
                },
            }
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
                    Some(Err(e @ ReadError::TooNew { .. })) => return self.too_new(&e),
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
            let stale_word = self.awaiting_lead_loss.is_some_and(|at| at.elapsed() < self.config.leader_ttl * 2);
            if !*self.leading.borrow() {
                self.awaiting_lead_loss = None;
            } else if !stale_word {
                self.awaiting_lead_loss = None;
                // Elected: [`Actor::lead`] subscribes, catches up and opens the term.
                return Next::Lead;
            }
        }
    }

    /// Opens a term one above the newest in the log: appends an empty batch of that term (proving through the
    /// fence that this replica has seen every stored batch) and sets the clock from the time the server stored it.
    async fn open_term(&mut self, log: &LeaseLog) -> Result<(), AppendError> {
        let epoch = self.newest_epoch + 1;
        let batch = Batch::new(&self.config.instance_id, epoch, self.clock.now_ms(), Vec::new());
        let seq = log.append(self.applied, &batch).await?;
        self.applied = seq;
        (self.epoch, self.newest_epoch) = (epoch, epoch);
        match log.stored_at(seq).await {
            Ok(at) => self.clock.observe(at),
            Err(e) => tracing::warn!(error = %e, "cannot read the time of the term's barrier; keeping the log's"),
        }
        Ok(())
    }

    /// Serves as the leader until it loses the election, is fenced, or shuts down.
    async fn lead(&mut self, shutdown: &mut Shutdown) -> Next {
        let Some(log) = self.log.clone() else { return Next::Rebuild };
        // Subscribe first (requests wait in the queue until the term is open), then open the term: its barrier
        // deposes the previous leader, which unsubscribes, and by then this replica is listening.
        self.serving.send_replace(true);
        let mut subscribed = self.shared.subscribed.subscribe();
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(1), subscribed.wait_for(|s| *s)) => {
                if !matches!(r, Ok(Ok(_))) {
                    tracing::warn!("the lease subscriptions were not confirmed in time; opening the term anyway");
                }
            }
            () = shutdown.wait() => return Next::Stop,
        }
        // Catch up with everything stored before leading, on a reader of its own (the follower's may still be
        // resuming after a reconnect), and open the term. A previous leader still finishing its last batch fences the
        // barrier: read it and try again.
        let mut tries = 0;
        loop {
            let caught_up = match log.bounds().await {
                Ok((_, last)) => self.replay_to(&log, last, shutdown).await,
                Err(e) => Err(e.into()),
            };
            let opened = match caught_up {
                Ok(()) => self.open_term(&log).await,
                Err(ReplayError::Read(e @ ReadError::TooNew { .. })) => {
                    self.serving.send_replace(false);
                    return self.too_new(&e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot catch up with the lease log before leading");
                    self.serving.send_replace(false);
                    return Next::Rebuild;
                }
            };
            match opened {
                Ok(()) => break,
                Err(AppendError::Fenced { .. }) if tries < OPEN_TERM_TRIES && *self.leading.borrow() => tries += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a lease term; following");
                    self.serving.send_replace(false);
                    return Next::Follow;
                }
            }
        }
        tracing::info!(from = self.applied, epoch = self.epoch, clock_ms = self.clock.now_ms(), "lease leader serving");
        self.metrics.leader.set(1);
        // What followed the log since its load may not be in MongoDB yet.
        self.projector.adopt_followed();
        self.shared.applied.store(self.applied, Ordering::Release);
        self.projector.publish_mark();
        // What the previous leader logged and did not deliver (it may have died in between) goes out now.
        self.delivering.clear();
        self.deliver();
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
                Some(written) = self.projector.written() => self.projector.finish(written, &self.metrics),
                Some((queued, failed)) = self.delivered_rx.recv() => {
                    for id in queued.iter().chain(&failed) {
                        self.delivering.remove(id);
                    }
                    self.sent.extend(queued);
                }
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
                    // Mark delivered notices sent (an empty batch when nothing else is going on), and try again
                    // those that could not be queued, once a second.
                    if let Err(e) = self.commit(&log, Vec::new()).await {
                        if let Some(next) = self.recover_lead(&log, e, shutdown).await {
                            break next;
                        }
                    }
                    if self.last_delivery.elapsed() >= Duration::from_secs(1) {
                        self.deliver();
                    }
                    self.projector.start(&self.state, self.applied);
                    self.projector.trim(&log).await;
                    // The counts walk every proxy: once a second is enough for a gauge.
                    if self.last_gauges.elapsed() >= Duration::from_secs(1) {
                        self.last_gauges = Instant::now();
                        self.metrics.pool_gauges(&self.state, self.projector.backlog());
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
        // What another replica appended must reach MongoDB too, and its notices (or those of a batch of ours that
        // was stored although its append failed) must go out.
        self.projector.adopt_followed();
        self.deliver();
        self.shared.applied.store(self.applied, Ordering::Release);
        if self.newest_epoch > self.epoch {
            // Another replica opened a newer term: step down at this first fence, not after our election entry runs
            // out, or the two would fence each other in turn.
            tracing::warn!(mine = self.epoch, newest = self.newest_epoch, "deposed by a newer lease term; following");
            self.awaiting_lead_loss = Some(Instant::now());
            self.deposed.send_modify(|n| *n += 1);
            return Some(Next::Follow);
        }
        (!*self.leading.borrow()).then_some(Next::Follow)
    }

    /// Runs `jobs` as one group commit: decide, append once, then answer.
    async fn commit(&mut self, log: &LeaseLog, jobs: Vec<Job>) -> Result<(), AppendError> {
        let now = self.clock.now_ms();
        self.forget_requests(now);
        let mut txn = Txn::new(&mut self.state, now);
        let dones: Vec<Done> = jobs.into_iter().filter_map(|job| job(Some(&mut txn))).collect();
        let Txn { ops, undo, notices, .. } = txn;
        if ops.is_empty() && dones.is_empty() && self.sent.is_empty() {
            return Ok(());
        }
        // With no operation the batch is empty: a barrier that only proves, through the fence, that this replica
        // still leads and has seen every stored batch before its answers go out.
        // A grant made for a request id is collected by its caller's retry (the same id gets the same grant), so
        // only the others are returned when their append's fate is unknown.
        let grants: Vec<(ObjectId, String)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Grant { proxy, lease, .. } if lease.request.is_none() => Some((*proxy, lease.key.clone())),
                _ => None,
            })
            .collect();
        let n_ops = ops.len();
        let mut batch = Batch::new(&self.config.instance_id, self.epoch, now, ops);
        batch.sent = std::mem::take(&mut self.sent);
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
                }
                self.projector.changed(undo.into_keys());
                // Stored, not yet answered: a leader that dies here leaves its grants to its callers' retries and its
                // notices to the next leader's outbox.
                for op in &batch.ops {
                    if let Op::Grant { lease, .. } = op {
                        // Keyed by request id: a test pauses the grant of its own request.
                        proxypool_faults::point_at("lease.grant.appended", lease.request.as_deref().unwrap_or("-"))
                            .await;
                    }
                }
                if !notices.is_empty() {
                    proxypool_faults::point("lease.notices.appended").await;
                }
                for done in dones {
                    done(Ok(()));
                }
                self.state.mark_sent(&batch.sent);
                if !notices.is_empty() {
                    self.state.post(notices);
                    self.deliver();
                }
                Ok(())
            }
            Err(e) => {
                // Back to the last stored batch: a follower reads the log from there, so if this append was stored
                // after all (an acknowledgement lost), it is applied from the log like any other batch, its notices
                // included. The sent marks go in a later batch.
                self.sent.extend(batch.sent);
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

    /// Queues every notice of the outbox that is not being queued already; the delivery task reports what the callback
    /// stream stored, and the next batch marks those sent. At least once: a notice queued twice (a leader died between
    /// queueing and marking) is one message on the stream within its de-duplication window, and carries its `id` to
    /// the receiver in any case.
    fn deliver(&mut self) {
        self.last_delivery = Instant::now();
        let todo: Vec<_> =
            self.state.pending_notices().into_iter().filter(|n| !self.delivering.contains(&n.id)).collect();
        if todo.is_empty() {
            return;
        }
        self.delivering.extend(todo.iter().map(|n| n.id.clone()));
        let (client, replicas, done) = (self.client.clone(), self.config.log_replicas, self.delivered_tx.clone());
        tokio::spawn(async move {
            let queued = proxypool_rpc::notices::queue(&client, &todo, replicas).await;
            // Those not queued leave `delivering` too, so that the next try picks them up.
            let failed: Vec<String> = todo.iter().map(|n| n.id.clone()).filter(|id| !queued.contains(id)).collect();
            let _ = done.send((queued, failed)).await;
        });
    }

    /// Takes back leases whose `LEASE_TTL` has run out and rotation locks past their deadline, from their ordered
    /// indexes (no scan), on the engine's clock.
    async fn reap(&mut self, log: &LeaseLog) -> Result<(), AppendError> {
        let now = self.clock.now_ms();
        let leases = match self.config.lease_ttl {
            Some(ttl) => self.state.expired_leases(now - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX), MAX_BATCH),
            None => Vec::new(),
        };
        let locks = self.state.expired_locks(now, MAX_BATCH);
        if leases.is_empty() && locks.is_empty() {
            return Ok(());
        }
        let (n_leases, n_locks) = (leases.len(), locks.len());
        let stale: Vec<String> = locks.iter().map(|(id, job)| format!("{id} ({job})")).collect();
        let job: Job = Box::new(move |txn: Option<&mut Txn<'_>>| {
            if let Some(txn) = txn {
                for (proxy, key) in leases {
                    txn.apply(Op::Release {
                        proxy,
                        key,
                        uncount: false,
                        taken: Some(TakenReason::Expired),
                        failure: None,
                        ban: None,
                        outcome: None,
                        quarantine: false,
                        rotate_asked_ms: None,
                    });
                }
                for (proxy, _) in locks {
                    // The job that held it stopped renewing (it crashed, or gave up): the proxy goes back in
                    // service with its leases, as after a failed rotation.
                    txn.apply(Op::Unlock { proxy, reset: false, catalog: None });
                }
            }
            None
        });
        self.commit(log, vec![job]).await?;
        if n_leases > 0 {
            tracing::info!(leases = n_leases, "expired leases taken back");
            for _ in 0..n_leases {
                self.metrics.lease("expired");
            }
        }
        if n_locks > 0 {
            tracing::warn!(locks = ?stale, "rotation locks past their deadline taken back");
            for _ in 0..n_locks {
                self.metrics.lease("lock_expired");
            }
        }
        Ok(())
    }
}

/// Returns grants from a batch whose append failed without an answer: if the batch was stored after all, its
/// grants are held by nobody. Retries (through whichever replica leads) until each is returned or known absent.
async fn return_orphans(client: async_nats::Client, grants: Vec<(ObjectId, String)>) {
    use proxypool_contracts::endpoints::LeaseRelease;
    use proxypool_contracts::lease::ReleaseRequest;
    for (proxy, key) in grants {
        let req = ReleaseRequest {
            proxy_id: Some(proxy.to_hex()),
            key: Some(key.clone()),
            failure: None,
            ..Default::default()
        };
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
