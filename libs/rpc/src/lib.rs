//! Request-reply serving over NATS with the [`Reply`] envelope.
//!
//! A service lists its subjects and one async handler; [`serve`] subscribes them in the service's queue group (so
//! replicas share the load), runs each request in its own task under a concurrency limit, always answers (with the
//! error envelope when the request is malformed or the handler fails or overruns its deadline), and on shutdown
//! stops taking requests and waits, bounded, for those in flight.

pub mod buckets;
pub mod notices;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use futures::stream::StreamExt;
use proxypool_contracts::{ApiError, Reply};
use proxypool_settings::shutdown::Shutdown;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// How long shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A subscription failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to {subject}: {source}")]
pub struct SubscribeError {
    /// The subject.
    pub subject: String,
    /// Why.
    #[source]
    pub source: async_nats::SubscribeError,
}

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

/// Options of [`serve`].
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
    /// Subjects bounded by their caller's deadline (see [`request`]): not started once it has passed, and answered
    /// by it. Requests on other subjects (idempotent maintenance, whose late run still helps) run when delivered
    /// late, within `deadline`.
    pub caller_deadline: &'static [&'static str],
}

/// Sends a request carrying the current span's trace context (W3C `traceparent` in the headers), in a client span,
/// so the handler's work joins the caller's trace. `timeout` overrides the client's request timeout, and is sent
/// along as the request's deadline ([`DEADLINE_HEADER`](proxypool_contracts::subjects::DEADLINE_HEADER)).
pub async fn request(
    client: &Client,
    subject: &'static str,
    payload: Bytes,
    timeout: Option<Duration>,
) -> Result<Message, async_nats::RequestError> {
    let span = tracing::info_span!("nats.request", subject, otel.kind = "client");
    async {
        let mut headers = proxypool_telemetry::propagation::nats_headers();
        if let Some(t) = timeout {
            let give_up = unix_millis() + i64::try_from(t.as_millis()).unwrap_or(i64::MAX / 2);
            headers.insert(proxypool_contracts::subjects::DEADLINE_HEADER, give_up.to_string().as_str());
        }
        let mut req = async_nats::Request::new().payload(payload).headers(headers);
        if timeout.is_some() {
            req = req.timeout(timeout);
        }
        let res = client.send_request(subject, req).await;
        if res.is_err() {
            proxypool_telemetry::metrics::dependency_error("nats");
        }
        res
    }
    .instrument(span)
    .await
}

/// Wall-clock now in Unix milliseconds (deadlines cross hosts, so they are wall-clock times).
fn unix_millis() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
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

/// Subscriptions to request subjects in a queue group, made before serving so that a caller can do more set-up
/// (load state, report readiness) knowing that requests are already being queued for it.
pub struct Subscriptions {
    subs: Vec<(&'static str, async_nats::Subscriber)>,
}

/// Subscribes `subjects` in `queue_group` and flushes, so that the server knows of them when this returns.
pub async fn subscribe(
    client: &Client,
    subjects: &[&'static str],
    queue_group: &'static str,
) -> Result<Subscriptions, SubscribeError> {
    let mut subs = Vec::with_capacity(subjects.len());
    for &subject in subjects {
        let sub = client
            .queue_subscribe(subject, queue_group.to_owned())
            .await
            .map_err(|source| SubscribeError { subject: subject.to_owned(), source })?;
        subs.push((subject, sub));
    }
    let _ = client.flush().await;
    Ok(Subscriptions { subs })
}

/// Subscribes and serves `subjects` until `shutdown` fires (see [`subscribe`] and [`run`]).
pub async fn serve<F, Fut>(
    client: Client,
    subjects: &[&'static str],
    options: ServeOptions,
    shutdown: Shutdown,
    handler: F,
) -> Result<(), SubscribeError>
where
    F: Fn(&'static str, Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send + 'static,
{
    let subs = subscribe(&client, subjects, options.queue_group).await?;
    run(client, subs, options, shutdown, handler).await;
    Ok(())
}

/// Serves requests from `subs` until `shutdown` fires. `handler(subject, message)` returns the encoded reply (see
/// [`encode`]).
pub async fn run<F, Fut>(client: Client, subs: Subscriptions, options: ServeOptions, shutdown: Shutdown, handler: F)
where
    F: Fn(&'static str, Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send + 'static,
{
    // One forwarder per subscription. On shutdown each *drains* its subscription: the server stops routing new
    // requests here (the queue group sends them to other replicas) and the requests already received are answered.
    // (Only when the server does not confirm the drain, NATS being unreachable, can a request it routed here be
    // missed; its caller times out and retries, as on any lost message.) The channel closes when every subscription
    // is drained.
    let (tx, mut incoming) = tokio::sync::mpsc::channel::<(&'static str, Message)>(1024);
    for (subject, mut sub) in subs.subs {
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
        let (client, handler, deadline) = (client.clone(), handler.clone(), options.deadline);
        let bounded_by_caller = options.caller_deadline.contains(&subject);
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
                    let work = REPLY.scope(state.clone(), handler(subject, msg).instrument(span));
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
