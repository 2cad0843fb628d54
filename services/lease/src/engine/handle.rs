//! The engine's handle (what the lease service holds) and the transaction a job decides in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use proxypool_contracts::callback::CallbackNotice;
use proxypool_contracts::{ApiError, Area};
use tokio::sync::{mpsc, oneshot, watch};

use super::state::{Op, ProxyState, State};

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
    pub(super) ops: Vec<Op>,
    pub(super) undo: HashMap<ObjectId, Option<ProxyState>>,
    pub(super) notices: Vec<CallbackNotice>,
}

impl<'a> Txn<'a> {
    pub(super) fn new(state: &'a mut State, now_ms: i64) -> Self {
        Self { state, now_ms, ops: Vec::new(), undo: HashMap::new(), notices: Vec::new() }
    }

    /// The state as the operations decided so far left it.
    pub fn state(&self) -> &State {
        self.state
    }

    /// The time of this commit on the engine's clock ([`super::clock`]), epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The best lease candidate in `area` now.
    pub fn candidate(&mut self, area: Area) -> Option<ObjectId> {
        self.state.candidate(area, self.now_ms, crate::index::Filter::default(), None)
    }

    /// The best candidate within `filter` (one package, some proxies excluded) and, with `domain`, not exiting on an
    /// IP banned for that site.
    pub fn candidate_within(
        &mut self,
        area: Area,
        filter: crate::index::Filter<'_>,
        domain: Option<&str>,
    ) -> Option<ObjectId> {
        self.state.candidate(area, self.now_ms, filter, domain)
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
pub(super) struct Shared {
    pub(super) loaded: AtomicBool,
    /// The last durable batch (while leading).
    pub(super) applied: AtomicU64,
    /// The sequence up to which MongoDB holds the projection.
    pub(super) projected: watch::Sender<u64>,
    /// Whether the request subscriptions are in place (the server's word).
    pub(super) subscribed: watch::Sender<bool>,
}

impl Shared {
    pub(super) fn new() -> Self {
        Self {
            loaded: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            projected: watch::channel(0).0,
            subscribed: watch::channel(false).0,
        }
    }
}

/// The handle requests use to reach the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(super) tx: mpsc::Sender<Job>,
    pub(super) serving: watch::Receiver<bool>,
    pub(super) shared: Arc<Shared>,
    pub(super) hand_over: Arc<watch::Sender<bool>>,
}

/// The answer to a caller when the engine cannot commit.
pub(super) fn unavailable(why: &str) -> ApiError {
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

    /// The server says whether its request subscriptions are in place: a new leader opens its term only once they
    /// are, so that requests never find nobody listening while the lead moves.
    pub fn subscribed(&self, yes: bool) {
        self.shared.subscribed.send_replace(yes);
    }

    /// Whether the state has been loaded (a loaded standby is ready to take over).
    pub fn is_loaded(&self) -> bool {
        self.shared.loaded.load(Ordering::Acquire)
    }
}
