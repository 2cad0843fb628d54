//! The rotator: gives every proxy a fresh IP on its schedule, verified through the proxy itself.
//!
//! Two roles, in one process or apart (`ROTATOR_ROLE`):
//! - the **scheduler** scans every `ROTATE_SCAN_INTERVAL` for due proxies, claims each with the `is_rotating` lock
//!   and queues a job on the `PROXYPOOL_ROTATIONS` WorkQueue stream; it also answers admin "rotate now" requests;
//! - **workers** pull jobs from the durable `rotator-workers` consumer: drain active leases (no new ones are granted
//!   while the lock is held), call the rotate URL through the provider's adapter, check the public IP through the
//!   proxy, store the result, have the lease service reset the lease state, and only then acknowledge.
//!
//! # Layout
//! - [`config`]: `RotatorConfig` from the environment.
//! - [`providers`]: KiotProxy, ZingProxy and generic rotate-response adapters.
//! - [`check`]: public-IP check through the proxy, region lookup.
//! - [`rotation`]: claiming, queuing and running jobs.
//! - [`callbacks`]: delivering notices to consumers whose lease was taken.

pub mod callbacks;
pub mod check;
pub mod config;
pub mod providers;
pub mod rotation;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use proxypool_contracts::rotation::{RotateNowRequest, RotationJob};
use proxypool_contracts::subjects;
use proxypool_rpc::{encode, parse, ServeOptions};
use proxypool_settings::shutdown::Shutdown;
use tokio::sync::Semaphore;

pub use config::{Role, RotatorConfig};
pub use rotation::Rotator;

/// Errors that stop the rotator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// JetStream set-up failed.
    #[error(transparent)]
    Queue(#[from] rotation::QueueError),
    /// A subscription failed.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
}

/// Scans on a timer until shutdown.
pub async fn run_scheduler(rotator: Rotator, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(rotator.config().scan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        rotator.update_queue_depth().await;
        match rotator.scan_once().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(queued = n, "rotation jobs queued"),
            Err(e) => tracing::warn!(error = %e, "rotation scan failed"),
        }
    }
}

/// Serves admin "rotate now" requests until shutdown.
pub async fn serve_rotate_now(
    rotator: Rotator,
    client: async_nats::Client,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let options = ServeOptions {
        queue_group: subjects::ROTATOR_QUEUE_GROUP,
        max_in_flight: 64,
        deadline: Duration::from_secs(4),
        metrics: Some(rotator.metrics().requests.clone()),
        caller_deadline: &[],
    };
    proxypool_rpc::serve(client, &[subjects::ROTATOR_ROTATE_NOW], options, shutdown, move |_, msg| {
        let rotator = rotator.clone();
        async move {
            encode(match parse::<RotateNowRequest>(&msg.payload) {
                Ok(req) => rotator.rotate_now(&req.proxy_id).await,
                Err(e) => Err(e),
            })
        }
    })
    .await?;
    Ok(())
}

/// Pulls one message, waiting up to a few seconds; `None` when none came (or on a transient error).
///
/// One message per free worker, never a prefetched batch: a message waiting in a local buffer would see its ack
/// wait run out and be redelivered to another worker while this process still holds it.
pub async fn pull_one(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
) -> Option<async_nats::jetstream::Message> {
    let batch = consumer.batch().max_messages(1).expires(Duration::from_secs(5)).messages().await;
    match batch {
        Ok(mut b) => match b.next().await {
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

/// Pulls and runs jobs until shutdown, `ROTATOR_WORKERS` at a time. On shutdown it stops pulling and waits for the
/// jobs in hand; a job cut short is redelivered by JetStream after `ROTATE_ACK_WAIT`.
pub async fn run_workers(rotator: Rotator, mut shutdown: Shutdown) -> Result<(), RunError> {
    let consumer = rotator.ensure_queue().await?;
    let workers = rotator.config().workers;

    let permits = Arc::new(Semaphore::new(workers));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { break };
        let msg = tokio::select! {
            () = shutdown.wait() => break,
            next = pull_one(&consumer) => match next { Some(m) => m, None => continue },
        };
        let rotator = rotator.clone();
        // The job continues the trace of the claim that queued it.
        let span = tracing::info_span!("rotation.job", otel.kind = "consumer", proxy = tracing::field::Empty);
        proxypool_telemetry::propagation::continue_from_nats(&span, msg.headers.as_ref());
        tokio::spawn(async move {
            let job: RotationJob = match serde_json::from_slice(&msg.payload) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "dropping a malformed rotation job");
                    let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
                    return;
                }
            };
            // Keep the job alive while it runs (rotate calls and IP checks can outlast the ack wait), so JetStream
            // redelivers it only if this process dies.
            let keepalive_every = (rotator.config().ack_wait / 3).max(Duration::from_millis(200));
            span.record("proxy", job.proxy_id.as_str());
            let outcome = {
                let work = tracing::Instrument::instrument(rotator.process(&job), span.clone());
                tokio::pin!(work);
                loop {
                    tokio::select! {
                        res = &mut work => break res,
                        () = tokio::time::sleep(keepalive_every) => {
                            let _ = msg.ack_with(async_nats::jetstream::AckKind::Progress).await;
                        }
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, job = %job.job_id, "cannot ack a finished job");
                    }
                }
                Err(e) => {
                    let attempt = msg.info().map(|i| i.delivered).unwrap_or(1);
                    let delay = rotation::retry_delay(Duration::from_secs(2), attempt).min(Duration::from_secs(60));
                    tracing::warn!(error = %e, job = %job.job_id, attempt, retry_in = ?delay, "job failed; it will be redelivered");
                    let _ = msg.ack_with(async_nats::jetstream::AckKind::Nak(Some(delay))).await;
                }
            }
            drop(permit);
        });
    }
    let all = u32::try_from(workers).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(30), permits.acquire_many(all)).await.is_err() {
        tracing::warn!("rotation jobs still running at shutdown; JetStream will redeliver them");
    }
    Ok(())
}

/// Runs the configured roles until shutdown.
pub async fn run(rotator: Rotator, client: async_nats::Client, shutdown: Shutdown) -> Result<(), RunError> {
    rotator.ensure_queue().await?;
    let ready = proxypool_telemetry::metrics::nats_ready(client.clone());
    match rotator.metrics().registry.serve_admin(rotator.config().admin_addr, ready).await {
        Ok(addr) => tracing::info!(%addr, "rotator admin endpoint (/metrics, /healthz) listening"),
        Err(e) => tracing::warn!(error = %e, "cannot serve the admin endpoint"),
    }
    let role = rotator.config().role;
    let mut tasks = Vec::new();
    if matches!(role, Role::All | Role::Scheduler) {
        tasks.push(tokio::spawn(run_scheduler(rotator.clone(), shutdown.clone())));
        let (r, c, s) = (rotator.clone(), client.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve_rotate_now(r, c, s).await {
                tracing::error!(error = %e, "rotate-now handler stopped");
            }
        }));
    }
    if matches!(role, Role::All | Role::Worker) {
        let (c, st, n, s) = (rotator.config().clone(), rotator.store().clone(), client.clone(), shutdown.clone());
        let counter = rotator.metrics().callbacks.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = callbacks::run_senders(c, st, n, counter, s).await {
                tracing::error!(error = %e, "callback senders stopped");
            }
        }));
        let (r, s) = (rotator.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = run_workers(r, s).await {
                tracing::error!(error = %e, "workers stopped");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
