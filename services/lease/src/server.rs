//! The NATS side: request-reply handlers in a queue group (through `proxypool-rpc`), the `proxy.changed` listener and
//! index maintenance.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use futures::stream::BoxStream;
use futures::StreamExt;
use proxypool_contracts::endpoints::{IndexReload, LeaseAcquire, LeaseCtlClear, LeaseCtlRotated, LeaseRelease};
use proxypool_contracts::events::ProxyChanged;
use proxypool_contracts::lease::{AcquireRequest, LeaseGrant, ReleaseOutcome, ReleaseRequest};
use proxypool_contracts::rotation::{ClearRequest, RotatedRequest};
use proxypool_contracts::{subjects, ApiError};
use proxypool_rpc::{Router, ServeOptions};
use proxypool_settings::shutdown::Shutdown;
use tokio::sync::Notify;

use crate::service::{LeaseService, Outcome};

/// Longest a request may take before it is answered `service_unavailable`. It stays below the callers' NATS request
/// timeout (5 s by default) so that a consumer gets this answer rather than a bare timeout.
const REQUEST_DEADLINE: Duration = Duration::from_secs(4);

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A subscription could not be made.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
    /// The admin endpoint could not listen.
    #[error("cannot listen on LEASE_ADMIN_ADDR: {0}")]
    Admin(#[source] std::io::Error),
}

async fn finish<T>(client: &Client, result: Result<Outcome<T>, ApiError>) -> Result<T, ApiError> {
    let outcome = result?;
    // Notices for leases the write took are queued before the reply, so that none is lost.
    proxypool_rpc::notices::queue(client, &outcome.notices).await;
    proxypool_rpc::events::publish(client, &outcome.event).await;
    Ok(outcome.value)
}

/// Serves `/metrics`, `/healthz` and `/readyz` (index loaded, NATS connected) on `addr`; returns the bound address.
pub async fn serve_admin(
    service: &LeaseService,
    client: &Client,
    addr: std::net::SocketAddr,
) -> std::io::Result<std::net::SocketAddr> {
    let (s, nats) = (service.clone(), proxypool_telemetry::metrics::nats_ready(client.clone()));
    let ready: proxypool_telemetry::metrics::Readiness = Arc::new(move || {
        let (loaded, nats) = (s.is_loaded(), nats());
        Box::pin(async move {
            if !loaded {
                return Err(proxypool_telemetry::metrics::NotReady("the lease index is still loading"));
            }
            nats.await
        })
    });
    service.metrics().registry.serve_admin(addr, ready).await
}

async fn acquire(service: LeaseService, client: Client, req: AcquireRequest) -> Result<LeaseGrant, ApiError> {
    let started = std::time::Instant::now();
    let req = req.validate(service.private_callbacks_allowed())?;
    let span = tracing::info_span!("lease.acquire", area = %req.area);
    let result = tracing::Instrument::instrument(service.acquire(&req), span).await;
    // A grant stored after the caller was told `service_unavailable` would be a lease nobody holds: undo it.
    if let Ok(outcome) = &result {
        if !proxypool_rpc::commit_reply() {
            return Err(withdraw(&service, &client, &outcome.value).await);
        }
    }
    match &result {
        Ok(_) => {
            service.metrics().lease("granted");
            service.metrics().duration.observe(started.elapsed().as_secs_f64());
        }
        Err(e) if e.code == proxypool_contracts::ErrorCode::NoProxyAvailable => service.metrics().lease("refused"),
        Err(_) => {}
    }
    finish(&client, result).await
}

async fn release(service: LeaseService, client: Client, req: ReleaseRequest) -> Result<ReleaseOutcome, ApiError> {
    let req = req.validate()?;
    let result = tracing::Instrument::instrument(service.release(&req), tracing::info_span!("lease.release")).await;
    if result.is_ok() {
        service.metrics().lease("returned");
    }
    finish(&client, result).await
}

/// The lease service's endpoints.
fn router(service: &LeaseService, client: &Client) -> Router<(LeaseService, Client)> {
    Router::new((service.clone(), client.clone()))
        .on::<LeaseAcquire, _, _>(|(s, c), req| acquire(s, c, req))
        .on::<LeaseRelease, _, _>(|(s, c), req| release(s, c, req))
        .on::<LeaseCtlClear, _, _>(
            |(s, c), req: ClearRequest| async move { finish(&c, s.clear_leases(&req).await).await },
        )
        .on::<LeaseCtlRotated, _, _>(|(s, c), req: RotatedRequest| async move {
            finish(&c, s.reset_after_rotation(&req).await).await
        })
}

/// Undoes a grant its caller will never receive, announces the undo, and answers as the caller was answered.
async fn withdraw(service: &LeaseService, client: &Client, grant: &LeaseGrant) -> ApiError {
    match service.withdraw(grant).await {
        Ok(Some(event)) => {
            service.metrics().lease("withdrawn");
            tracing::info!(proxy = %grant.id, "a grant stored past its deadline was withdrawn");
            proxypool_rpc::events::publish(client, &event).await;
        }
        Ok(None) => tracing::debug!(proxy = %grant.id, "a late grant was already gone when withdrawn"),
        // The lease stays until LEASE_TTL takes it back.
        Err(e) => tracing::warn!(error = %e, proxy = %grant.id, "cannot withdraw a grant its caller gave up on"),
    }
    ApiError::unavailable("the request did not finish in time; retry shortly")
}

/// Applies `proxy.changed` events from other writers to the index.
async fn listen_events(service: LeaseService, mut events: BoxStream<'static, (ProxyChanged, tracing::Span)>) {
    while let Some((event, span)) = events.next().await {
        if let Some(id) = service.apply_event(&event) {
            let s = service.clone();
            let refresh = async move {
                if let Err(e) = s.refresh_one(id).await {
                    tracing::warn!(error = %e, proxy = %id, "cannot refresh a changed proxy");
                }
            };
            tokio::spawn(tracing::Instrument::instrument(refresh, span));
        }
    }
}

/// Refreshes the pool gauges every few seconds until shutdown.
async fn update_pool_metrics(service: LeaseService, mut shutdown: Shutdown) {
    loop {
        service.update_pool_metrics();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Takes back expired leases a few times per TTL (at most every 30 s) until shutdown.
async fn reap(service: LeaseService, client: Client, mut shutdown: Shutdown) {
    let Some(ttl) = service.ttl() else { return };
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.wait() => return,
        }
        match service.reap_expired().await {
            Ok(outcomes) => {
                for outcome in outcomes {
                    let _ = finish(&client, Ok(outcome)).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reap expired leases"),
        }
    }
}

/// Turns `leasectl.reload` broadcasts (sent after bulk imports) into a wake-up of [`maintain_index`]. Several
/// broadcasts during one reload collapse into one more reload.
async fn listen_reloads(mut requests: BoxStream<'static, (IndexReload, tracing::Span)>, wake: Arc<Notify>) {
    while requests.next().await.is_some() {
        wake.notify_one();
    }
}

/// Creates indexes and loads the lease index (retrying while the database is down), then reloads it every `period`
/// or when woken by `wake`.
async fn maintain_index(service: LeaseService, period: Duration, wake: Arc<Notify>, mut shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(200);
    let mut indexes_done = false;
    loop {
        if !indexes_done {
            match service.ensure_indexes().await {
                Ok(()) => indexes_done = true,
                Err(e) => tracing::warn!(error = %e, "cannot create indexes yet; retrying"),
            }
        }
        let wait = match service.reload().await {
            Ok(n) => {
                tracing::info!(proxies = n, "lease index loaded");
                backoff = Duration::from_millis(200);
                period
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot load the lease index; retrying");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                w
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => tracing::debug!("reloading the lease index on request"),
            () = shutdown.wait() => return,
        }
    }
}

/// Serves lease requests until `shutdown` fires, then stops taking requests and finishes those in flight.
pub async fn serve(
    service: LeaseService,
    client: Client,
    index_refresh: Duration,
    max_in_flight: usize,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    // Subscribe to changes before the first load, so that no change falls between the load and the subscription,
    // and to requests before reporting loaded, so that a loaded replica is a reachable one.
    let events = proxypool_rpc::events::subscribe::<ProxyChanged>(&client).await?;
    let catalog = loop {
        match crate::catalog::follow(&service, &client).await {
            Ok((cursor, follower)) => {
                service.set_catalog(cursor);
                break tokio::spawn(crate::catalog::run_until(follower, shutdown.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the catalogue yet; retrying");
                let mut s = shutdown.clone();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = s.wait() => return Ok(()),
                }
            }
        }
    };
    let reloads = proxypool_rpc::events::subscribe::<IndexReload>(&client).await?;
    let wake = Arc::new(Notify::new());
    let requests = router(&service, &client).subscribe(&client, subjects::LEASE_QUEUE_GROUP).await?;
    let listener = tokio::spawn(listen_events(service.clone(), events));
    let reload_listener = tokio::spawn(listen_reloads(reloads, wake.clone()));
    let maintenance = tokio::spawn(maintain_index(service.clone(), index_refresh, wake, shutdown.clone()));
    let reaper = tokio::spawn(reap(service.clone(), client.clone(), shutdown.clone()));
    tracing::info!(instance = service.instance_id(), "lease service serving");
    let pool_metrics = tokio::spawn(update_pool_metrics(service.clone(), shutdown.clone()));
    let options = ServeOptions {
        queue_group: subjects::LEASE_QUEUE_GROUP,
        max_in_flight,
        deadline: REQUEST_DEADLINE,
        metrics: Some(service.metrics().requests.clone()),
    };
    requests.run(client, options, shutdown).await;
    listener.abort();
    catalog.abort();
    pool_metrics.abort();
    reload_listener.abort();
    maintenance.abort();
    reaper.abort();
    tracing::info!("lease service stopped");
    Ok(())
}
