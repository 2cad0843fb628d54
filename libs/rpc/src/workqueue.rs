//! The one work-queue runner: pulls messages from a durable consumer, one per free worker, and hands each handler
//! an [`AckGuard`] that acknowledges only when the handler says its effect is stored.
//!
//! - One message per free worker, never a prefetched batch: a message waiting in a local buffer would see its ack
//!   wait run out and be redelivered to another worker while this process still holds it.
//! - While a handler runs, the runner reports progress every third of the ack wait, so JetStream redelivers the
//!   message only if this process dies.
//! - [`Outcome::Done`] acknowledges; [`Outcome::Retry`] NAKs with a growing delay (given up after `max_deliver`);
//!   [`Outcome::Reject`] terminates the message (it can never succeed). A guard dropped without a verdict (the
//!   handler panicked) NAKs, so the message is redelivered at once rather than after the ack wait.
//! - On shutdown the runner stops pulling and waits, bounded by `drain`, for the messages in hand; one cut short
//!   is redelivered by JetStream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use proxypool_settings::shutdown::Shutdown;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// What a handler made of its message.
#[derive(Debug)]
pub enum Outcome {
    /// The effect is stored (or there was nothing to do): acknowledge.
    Done,
    /// A transient failure: redeliver later, with a growing delay.
    Retry(String),
    /// The message can never succeed: drop it.
    Reject(String),
}

/// Settings of a runner.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Name for logs and spans (`rotation.job`, `callback.deliver`).
    pub name: &'static str,
    /// Messages handled at once.
    pub concurrency: usize,
    /// The consumer's ack wait (progress is reported every third of it).
    pub ack_wait: Duration,
    /// The consumer's `max_deliver`: a retry on the last delivery gives up instead.
    pub max_deliver: i64,
    /// First retry delay; each further delivery waits 4× longer.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest shutdown waits for the messages in hand.
    pub drain: Duration,
}

/// Delay before redelivering a message that failed on delivery `attempt`: `base`, then 4× longer each time, at
/// most `max`.
pub fn retry_delay(base: Duration, attempt: i64, max: Duration) -> Duration {
    let factor = 4u32.saturating_pow(u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(10));
    base.saturating_mul(factor).min(max)
}

/// One message in hand. Consumed by [`AckGuard::finish`]; dropped without it, it NAKs.
#[derive(Debug)]
pub struct AckGuard {
    message: Option<Message>,
    delay: Duration,
}

impl AckGuard {
    /// Which delivery of the message this is (1 for the first).
    pub fn attempt(&self) -> i64 {
        self.message.as_ref().and_then(|m| m.info().ok()).map_or(1, |i| i.delivered)
    }

    async fn report(&self, kind: AckKind) {
        if let Some(m) = &self.message {
            if let Err(e) = m.ack_with(kind).await {
                tracing::warn!(error = %e, "cannot answer a work-queue message");
            }
        }
    }

    /// Applies the handler's verdict.
    async fn finish(mut self, outcome: Outcome, options: &RunnerOptions) {
        let attempt = self.attempt();
        match outcome {
            Outcome::Done => self.report(AckKind::Ack).await,
            Outcome::Reject(reason) => {
                tracing::warn!(queue = options.name, reason, "work-queue message rejected");
                self.report(AckKind::Term).await;
            }
            Outcome::Retry(reason) if attempt >= options.max_deliver => {
                tracing::warn!(queue = options.name, reason, attempt, "work-queue message given up");
                self.report(AckKind::Term).await;
            }
            Outcome::Retry(reason) => {
                let delay = retry_delay(options.retry_base, attempt, options.retry_max);
                tracing::warn!(queue = options.name, reason, attempt, retry_in = ?delay, "work-queue message failed");
                self.report(AckKind::Nak(Some(delay))).await;
            }
        }
        self.message = None;
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(m) = self.message.take() {
            let delay = self.delay;
            // Drop cannot wait; a runtime is always there while messages are in hand.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
                });
            }
        }
    }
}

/// Pulls one message, waiting up to a few seconds; `None` when none came (or on a transient error).
async fn pull_one(consumer: &PullConsumer) -> Option<Message> {
    match consumer.batch().max_messages(1).expires(Duration::from_secs(5)).messages().await {
        Ok(mut batch) => match batch.next().await {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "pull ended without a message");
                None
            }
            None => None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot pull from JetStream");
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    }
}

/// Runs `handler` on every message of `consumer`, decoded as `T`, until `shutdown` fires; then waits (bounded) for
/// the messages in hand. A message that does not decode is rejected.
pub async fn run<T, F, Fut>(consumer: PullConsumer, options: RunnerOptions, mut shutdown: Shutdown, handler: F)
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, i64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    let options = Arc::new(options);
    let permits = Arc::new(Semaphore::new(options.concurrency));
    let keepalive_every = (options.ack_wait / 3).max(Duration::from_millis(200));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let message = tokio::select! {
            () = shutdown.wait() => break,
            next = pull_one(&consumer) => match next { Some(m) => m, None => continue },
        };
        // The handler continues the trace of the publisher that queued the message.
        // Named after the queue in the trace (`rotation.job`, `callback.deliver`).
        let span = tracing::info_span!(
            "workqueue.handle",
            otel.name = options.name,
            queue = options.name,
            otel.kind = "consumer"
        );
        proxypool_telemetry::propagation::continue_from_nats(&span, message.headers.as_ref());
        let decoded = serde_json::from_slice::<T>(&message.payload);
        let guard = AckGuard { message: Some(message), delay: options.retry_base };
        let (handler, options) = (handler.clone(), options.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                let item = match decoded {
                    Ok(item) => item,
                    Err(e) => {
                        guard.finish(Outcome::Reject(format!("malformed message: {e}")), &options).await;
                        return;
                    }
                };
                let work = handler(item, guard.attempt());
                tokio::pin!(work);
                let outcome = loop {
                    tokio::select! {
                        outcome = &mut work => break outcome,
                        () = tokio::time::sleep(keepalive_every) => guard.report(AckKind::Progress).await,
                    }
                };
                guard.finish(outcome, &options).await;
            }
            .instrument(span),
        );
    }
    let all = u32::try_from(options.concurrency).unwrap_or(u32::MAX);
    if tokio::time::timeout(options.drain, permits.acquire_many(all)).await.is_err() {
        tracing::warn!(queue = options.name, "messages still in hand at shutdown; JetStream will redeliver them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let (base, max) = (Duration::from_secs(2), Duration::from_secs(600));
        assert_eq!(retry_delay(base, 1, max), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 2, max), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 3, max), Duration::from_secs(32));
        assert_eq!(retry_delay(base, 30, max), Duration::from_secs(600));
    }
}
