//! The one server side of request-reply: a [`Router`] of typed handlers served in a queue group.
//!
//! `Router::new().on::<E>(handler)` registers a handler for endpoint `E`: the router parses the request into
//! `E::Request` (a malformed one is answered `invalid_input` naming `body`), runs the handler and encodes its
//! `Result<E::Reply, ApiError>` in the reply envelope. Serving subscribes every route in the service's queue group
//! (so replicas share the load), runs each request in its own task under a concurrency limit, always answers (with
//! the error envelope when the handler fails or overruns its deadline), and on shutdown drains the subscriptions and
//! waits, bounded, for the requests in flight.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use proxypool_contracts::{ApiError, Endpoint, Reply};
use proxypool_settings::shutdown::Shutdown;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{unix_millis, SubscribeError};

/// How long shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a request body, naming `body` in the error.
pub fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(payload).map_err(|e| ApiError::invalid("body", format!("is not a valid request: {e}")))
}

/// Encodes a result as a reply envelope.
pub fn encode<T: Serialize>(result: Result<T, ApiError>) -> Bytes {
    let reply: Reply<T> = result.into();
    serde_json::to_vec(&reply).map(Bytes::from).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode a reply");
        Bytes::from_static(br#"{"error":{"code":"internal","message":"cannot encode the reply"}}"#)
    })
}

/// Options of a served [`Router`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Queue group shared by the replicas.
    pub queue_group: &'static str,
    /// Requests handled at once by this replica.
    pub max_in_flight: usize,
    /// Longest a request may run before it is answered `service_unavailable`.
    pub deadline: Duration,
    /// Request counts and durations, when the service exports metrics.
    pub metrics: Option<proxypool_telemetry::metrics::RequestMetrics>,
}

type Handler = Arc<dyn Fn(Message) -> BoxFuture<'static, Bytes> + Send + Sync>;

struct Route {
    subject: &'static str,
    bounded_by_caller: bool,
    deadline: Option<Duration>,
    handler: Handler,
}

/// The typed handlers of one service, by endpoint, over the service's state `S` (cloned into each request).
pub struct Router<S> {
    state: S,
    routes: Vec<Route>,
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.routes.iter().map(|r| r.subject)).finish()
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// A router with no routes over `state`.
    pub fn new(state: S) -> Self {
        Self { state, routes: Vec::new() }
    }

    /// Serves endpoint `E` with `handler(state, request)`.
    pub fn on<E, F, Fut>(mut self, handler: F) -> Self
    where
        E: Endpoint,
        F: Fn(S, E::Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<E::Reply, ApiError>> + Send + 'static,
    {
        let (handler, state) = (Arc::new(handler), self.state.clone());
        self.routes.push(Route {
            subject: E::SUBJECT,
            bounded_by_caller: E::BOUNDED_BY_CALLER,
            deadline: E::DEADLINE,
            handler: Arc::new(move |msg: Message| {
                let (handler, state) = (handler.clone(), state.clone());
                Box::pin(async move {
                    match parse::<E::Request>(&msg.payload) {
                        Ok(request) => encode(handler(state, request).await),
                        Err(e) => encode::<E::Reply>(Err(e)),
                    }
                })
            }),
        });
        self
    }

    /// The subjects served.
    pub fn subjects(&self) -> Vec<&'static str> {
        self.routes.iter().map(|r| r.subject).collect()
    }

    /// Subscribes every route in `queue_group` and flushes, so that the server knows of them when this returns: a
    /// caller can do more set-up (load state, report readiness) knowing that requests are already queued for it.
    pub async fn subscribe(self, client: &Client, queue_group: &'static str) -> Result<Subscribed, SubscribeError> {
        let mut subs = Vec::with_capacity(self.routes.len());
        for route in self.routes {
            let sub = client
                .queue_subscribe(
                    proxypool_contracts::subjects::subject(route.subject).into_owned(),
                    queue_group.to_owned(),
                )
                .await
                .map_err(|source| SubscribeError { subject: route.subject.to_owned(), source })?;
            subs.push((route, sub));
        }
        let _ = client.flush().await;
        Ok(Subscribed { subs })
    }

    /// Subscribes and serves until `shutdown` fires (see [`Router::subscribe`] and [`Subscribed::run`]).
    pub async fn serve(self, client: Client, options: ServeOptions, shutdown: Shutdown) -> Result<(), SubscribeError> {
        let subscribed = self.subscribe(&client, options.queue_group).await?;
        subscribed.run(client, options, shutdown).await;
        Ok(())
    }
}

/// A router whose routes are subscribed, ready to [`run`](Subscribed::run).
pub struct Subscribed {
    subs: Vec<(Route, async_nats::Subscriber)>,
}

impl std::fmt::Debug for Subscribed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.subs.iter().map(|(r, _)| r.subject)).finish()
    }
}

/// How far in the past a caller's deadline may be before it is taken for clock skew rather than a stale request: a
/// request buffered longer than this is served as if it had no deadline.
const SKEW_LIMIT_MS: i64 = 60_000;

/// Time kept back from the caller's deadline for the reply to travel back.
const REPLY_MARGIN: Duration = Duration::from_millis(100);

/// What the caller's deadline header says: `None` without (or with an unreadable) header, `Some(None)` when it has
/// already passed, `Some(Some(left))` otherwise.
fn caller_time_left(msg: &Message) -> Option<Option<Duration>> {
    let value = msg.headers.as_ref()?.get(proxypool_contracts::subjects::DEADLINE_HEADER)?;
    let deadline_ms: i64 = value.as_str().parse().ok()?;
    let left_ms = deadline_ms - unix_millis();
    if left_ms < -SKEW_LIMIT_MS {
        tracing::warn!(late_ms = -left_ms, "a request deadline far in the past: clock skew? serving it without");
        return None;
    }
    if left_ms <= 0 {
        // Rare in a healthy system (a request held back by a NATS outage); many of them mean the hosts' clocks
        // disagree.
        tracing::warn!(late_ms = -left_ms, "a request arrived after its caller's deadline; not started (clock skew?)");
    }
    Some(u64::try_from(left_ms).ok().map(Duration::from_millis).and_then(|d| d.checked_sub(REPLY_MARGIN)))
}

const PENDING: u8 = 0;
const COMMITTED: u8 = 1;
const EXPIRED: u8 = 2;

tokio::task_local! {
    static REPLY: Arc<std::sync::atomic::AtomicU8>;
}

/// Called by a request handler before it returns a result that must not be lost (a lease granted): returns `true`
/// when that result will be the caller's answer, `false` when the request's deadline has already passed and the
/// caller was answered `service_unavailable`, in which case the handler must undo what it did. Once it has returned
/// `true`, the reply waits for the handler even past the deadline. Outside a request handler it returns `true`.
pub fn commit_reply() -> bool {
    use std::sync::atomic::Ordering;
    REPLY
        .try_with(|state| match state.compare_exchange(PENDING, COMMITTED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(now) => now == COMMITTED,
        })
        .unwrap_or(true)
}

/// Inside a request handler: `false` once the request's deadline has passed and its caller was answered
/// `service_unavailable`, so that a handler stops before writing what nobody will receive. Outside, `true`.
pub fn still_wanted() -> bool {
    REPLY.try_with(|state| state.load(std::sync::atomic::Ordering::Acquire) != EXPIRED).unwrap_or(true)
}

/// The outcome label of an encoded reply: `ok`, or the error code.
fn outcome(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Code {
        code: proxypool_contracts::ErrorCode,
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Option<Code>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error: None }) => "ok".to_owned(),
        Ok(Envelope { error: Some(c) }) => {
            serde_json::to_value(c.code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
        }
        Err(_) => "unknown".to_owned(),
    }
}

impl Subscribed {
    /// Serves requests until `shutdown` fires, then drains the subscriptions and waits (bounded) for the requests in
    /// flight.
    pub async fn run(self, client: Client, options: ServeOptions, shutdown: Shutdown) {
        let mut routes: std::collections::HashMap<&'static str, (bool, Option<Duration>, Handler)> =
            std::collections::HashMap::new();
        let mut subs = Vec::with_capacity(self.subs.len());
        for (route, sub) in self.subs {
            routes.insert(route.subject, (route.bounded_by_caller, route.deadline, route.handler));
            subs.push((route.subject, sub));
        }
        serve_loop(client, subs, routes, options, shutdown).await;
    }
}

async fn serve_loop(
    client: Client,
    subs: Vec<(&'static str, async_nats::Subscriber)>,
    routes: std::collections::HashMap<&'static str, (bool, Option<Duration>, Handler)>,
    options: ServeOptions,
    shutdown: Shutdown,
) {
    // One forwarder per subscription. On shutdown each *drains* its subscription: the server stops routing new
    // requests here (the queue group sends them to other replicas) and the requests already received are answered.
    // (Only when the server does not confirm the drain, NATS being unreachable, can a request it routed here be
    // missed; its caller times out and retries, as on any lost message.) The channel closes when every subscription
    // is drained.
    let (tx, mut incoming) = tokio::sync::mpsc::channel::<(&'static str, Message)>(1024);
    for (subject, mut sub) in subs {
        let (tx, mut stop, client) = (tx.clone(), shutdown.clone(), client.clone());
        tokio::spawn(async move {
            let (mut draining, mut confirmed) = (false, false);
            // Bounded, in case the server is unreachable and never confirms the drain.
            let mut give_up = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            loop {
                tokio::select! {
                    next = sub.next() => match next {
                        Some(m) => if tx.send((subject, m)).await.is_err() { break },
                        None => break,
                    },
                    () = tokio::time::sleep_until(give_up), if draining => {
                        if !confirmed {
                            tracing::warn!(subject, "a subscription did not finish draining in time");
                        }
                        break;
                    }
                    () = stop.wait(), if !draining => {
                        draining = true;
                        give_up = tokio::time::Instant::now() + DRAIN_TIMEOUT;
                        match tokio::time::timeout(DRAIN_TIMEOUT, sub.drain()).await {
                            // The client ends a drained subscription's stream only when its connection task next
                            // wakes, on a quiet connection the next ping, minutes away. A completed flush proves the
                            // server has processed the unsubscribe (it answers in order) and that every request it
                            // routed here before is already in this subscription's buffer: take those, then stop.
                            Ok(Ok(())) => {
                                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
                                    confirmed = true;
                                    give_up = tokio::time::Instant::now() + Duration::from_millis(100);
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, subject, "cannot drain a subscription");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(subject, "the server did not take the drain in time");
                                break;
                            }
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let permits = Arc::new(Semaphore::new(options.max_in_flight));
    loop {
        let Some((subject, msg)) = incoming.recv().await else { break };
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let Some((bounded_by_caller, own_deadline, handler)) = routes.get(subject).cloned() else { continue };
        let (client, deadline) = (client.clone(), own_deadline.unwrap_or(options.deadline));
        let metrics = options.metrics.clone();
        // One server span per request, continuing the caller's trace from the message headers.
        let span = tracing::info_span!("nats.handle", subject, otel.kind = "server");
        proxypool_telemetry::propagation::continue_from_nats(&span, msg.headers.as_ref());
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let reply_to = msg.reply.clone();
            let expired =
                || encode::<()>(Err(ApiError::unavailable("the request did not finish in time; retry shortly")));
            // The caller's own deadline, when it sent one, shortens ours; a request it has given up on is not started.
            let caller_left = if bounded_by_caller { caller_time_left(&msg) } else { None };
            let deadline = match caller_left {
                None => Some(deadline),
                Some(left) => left.map(|l| l.min(deadline)),
            };
            let body = match deadline {
                None => expired(),
                Some(deadline) => {
                    // The handler runs in its own task: past the deadline the caller gets `service_unavailable`,
                    // but a handler that already wrote still finishes its work (events, notices, undoing a grant
                    // nobody will receive) instead of being cut off.
                    // It holds its permit until it ends, so that `max_in_flight` and the shutdown drain count it.
                    let state = Arc::new(std::sync::atomic::AtomicU8::new(PENDING));
                    let work = REPLY.scope(state.clone(), handler(msg).instrument(span));
                    let mut work = tokio::spawn(async move {
                        let _permit = permit;
                        work.await
                    });
                    let joined = match tokio::time::timeout(deadline, &mut work).await {
                        Ok(joined) => Some(joined),
                        Err(_) => {
                            use std::sync::atomic::Ordering;
                            match state.compare_exchange(PENDING, EXPIRED, Ordering::AcqRel, Ordering::Acquire) {
                                Ok(_) => None,
                                // The handler has promised this answer (`commit_reply`): it is on its way.
                                Err(_) => Some(work.await),
                            }
                        }
                    };
                    match joined {
                        Some(Ok(body)) => body,
                        Some(Err(e)) => {
                            tracing::error!(error = %e, subject, "request handler panicked");
                            encode::<()>(Err(ApiError::internal("the request failed")))
                        }
                        None => expired(),
                    }
                }
            };
            if let Some(m) = &metrics {
                let labels = proxypool_telemetry::metrics::RequestLabels { subject, outcome: outcome(&body) };
                m.requests.get_or_create(&labels).inc();
                let s = proxypool_telemetry::metrics::SubjectLabel { subject };
                m.duration.get_or_create(&s).observe(started.elapsed().as_secs_f64());
            }
            match reply_to {
                Some(to) => {
                    if let Err(e) = client.publish(to, body).await {
                        proxypool_telemetry::metrics::dependency_error("nats");
                        tracing::warn!(error = %e, subject, "cannot publish a reply");
                    }
                }
                None => tracing::debug!(subject, "request without a reply subject"),
            }
        });
    }
    let all = u32::try_from(options.max_in_flight).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all)).await.is_err() {
        tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
    }
    // Bounded: with the server gone a flush waits for a reconnection that may never come.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
}
