//! The NATS side: the request-reply handlers (through `proxypool-rpc`), served only while this replica leads.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use proxypool_contracts::endpoints::{
    LeaseAcquire, LeaseAcquireMany, LeaseCtlHeal, LeaseCtlLock, LeaseCtlRotated, LeaseCtlSync, LeaseRelease,
    LeaseRenew, LeaseRotate,
};
use proxypool_contracts::lease::{
    AcquireRequest, LeaseGrant, LeaseGrants, ReleaseOutcome, ReleaseRequest, RenewOutcome, RenewRequest, RotateOutcome,
};
use proxypool_contracts::rotation::{LockRequest, RotatedRequest, SyncRequest};
use proxypool_contracts::{subjects, ApiError};
use proxypool_rpc::{Router, ServeOptions};
use proxypool_settings::shutdown::Shutdown;

use crate::service::LeaseService;

/// Longest a request may take before it is answered `service_unavailable`. It stays below the callers' NATS request
/// timeout (5 s by default) so that a consumer gets this answer rather than a bare timeout.
const REQUEST_DEADLINE: Duration = Duration::from_secs(4);

/// How long a replica that stopped leading keeps its subscriptions (answering that it does not lead).
const TERM_GRACE: Duration = Duration::from_millis(300);

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A subscription could not be made.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
    /// The lease log on this NATS belongs to another deployment.
    #[error(transparent)]
    ForeignLog(proxypool_rpc::jetstream::JetStreamError),
    /// The admin endpoint could not listen.
    #[error("cannot listen on LEASE_ADMIN_ADDR: {0}")]
    Admin(#[source] std::io::Error),
}

/// Serves `/metrics`, `/healthz` and `/readyz` (state loaded, NATS connected) on `addr`; returns the bound address.
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
                return Err(proxypool_telemetry::metrics::NotReady("the lease state is still loading"));
            }
            nats.await
        })
    });
    service.metrics().registry.serve_admin(addr, ready).await
}

async fn acquire(service: LeaseService, req: AcquireRequest) -> Result<LeaseGrant, ApiError> {
    if req.count.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "count",
            format!(
                "lease.acquire grants one proxy; ask {} for several",
                proxypool_contracts::subjects::LEASE_ACQUIRE_MANY
            ),
        ));
    }
    let mut grants = grant(service, req).await?;
    grants.pop().ok_or_else(|| ApiError::internal("a grant answered no proxy"))
}

async fn acquire_many(service: LeaseService, mut req: AcquireRequest) -> Result<LeaseGrants, ApiError> {
    req.count = Some(req.count.ok_or_else(|| ApiError::invalid("count", "is required (1-10 distinct proxies)"))?);
    Ok(LeaseGrants { proxies: grant(service, req).await? })
}

async fn grant(service: LeaseService, req: AcquireRequest) -> Result<Vec<LeaseGrant>, ApiError> {
    let started = std::time::Instant::now();
    let req = req.validate(service.private_callbacks_allowed())?;
    // Under a request deadline (see `proxypool_rpc::still_wanted`), do not grant what nobody will receive.
    if !proxypool_rpc::still_wanted() {
        return Err(ApiError::unavailable("the request did not finish in time; retry shortly"));
    }
    let span = tracing::info_span!("lease.acquire", area = %req.area, count = req.count);
    let result = tracing::Instrument::instrument(service.acquire(&req), span).await;
    // A grant stored after the caller was told `service_unavailable` would be a lease nobody holds: undo it. Unless
    // it was made for a request id: that caller asks again with the same id and collects this very grant, and its
    // retry may already have been answered with it (it waited in the engine behind this commit), so withdrawing it
    // would leave the caller holding a lease that is gone.
    if let Ok(grants) = &result {
        if !proxypool_rpc::commit_reply() {
            if req.request_id.is_some() {
                return Err(ApiError::unavailable(
                    "the request did not finish in time; retry with the same request_id",
                ));
            }
            let mut answer = None;
            for g in grants {
                answer = Some(withdraw(&service, g).await);
            }
            return Err(answer.unwrap_or_else(|| ApiError::unavailable("the request did not finish in time")));
        }
    }
    match &result {
        Ok(grants) => {
            for _ in grants {
                service.metrics().lease("granted");
            }
            service.metrics().duration.observe(started.elapsed().as_secs_f64());
        }
        Err(e) if e.code == proxypool_contracts::ErrorCode::NoProxyAvailable => service.metrics().lease("refused"),
        Err(_) => {}
    }
    result
}

async fn release(service: LeaseService, req: ReleaseRequest) -> Result<ReleaseOutcome, ApiError> {
    let req = req.validate()?;
    let result = tracing::Instrument::instrument(service.release(&req), tracing::info_span!("lease.release")).await;
    if result.is_ok() {
        service.metrics().lease("returned");
    }
    result
}

async fn renew(service: LeaseService, req: RenewRequest) -> Result<RenewOutcome, ApiError> {
    let req = req.validate()?;
    let result = tracing::Instrument::instrument(service.renew(&req), tracing::info_span!("lease.renew")).await;
    if result.is_ok() {
        service.metrics().lease("renewed");
    }
    result
}

async fn rotate(service: LeaseService, req: RenewRequest) -> Result<RotateOutcome, ApiError> {
    let req = req.validate()?;
    tracing::Instrument::instrument(service.rotate_request(&req), tracing::info_span!("lease.rotate")).await
}

/// The lease service's endpoints.
fn router(service: &LeaseService) -> Router<LeaseService> {
    Router::new(service.clone())
        .on::<LeaseAcquire, _, _>(acquire)
        .on::<LeaseAcquireMany, _, _>(acquire_many)
        .on::<LeaseRelease, _, _>(release)
        .on::<LeaseRenew, _, _>(renew)
        .on::<LeaseRotate, _, _>(rotate)
        .on::<proxypool_contracts::endpoints::LeaseReport, _, _>(
            |s, req: proxypool_contracts::health::ReportRequest| async move {
                let req = req.validate()?;
                tracing::Instrument::instrument(s.report(&req), tracing::info_span!("lease.report")).await
            },
        )
        .on::<LeaseCtlSync, _, _>(|s, req: SyncRequest| async move { s.sync(&req).await })
        .on::<LeaseCtlLock, _, _>(|s, req: LockRequest| async move { s.lock(&req).await })
        .on::<LeaseCtlRotated, _, _>(|s, req: RotatedRequest| async move { s.rotated(&req).await })
        .on::<LeaseCtlHeal, _, _>(|s, req: proxypool_contracts::health::HealRequest| async move { s.heal(&req).await })
        .on::<proxypool_contracts::endpoints::LeaseCtlInspect, _, _>(
            |s, req: proxypool_contracts::health::InspectRequest| async move { s.inspect(&req).await },
        )
}

/// Undoes a grant its caller will never receive, and answers as the caller was answered.
async fn withdraw(service: &LeaseService, grant: &LeaseGrant) -> ApiError {
    match service.withdraw(grant).await {
        Ok(true) => {
            service.metrics().lease("withdrawn");
            tracing::info!(proxy = %grant.id, "a grant made past its deadline was withdrawn");
        }
        Ok(false) => tracing::debug!(proxy = %grant.id, "a late grant was already gone when withdrawn"),
        // The lease stays until LEASE_TTL takes it back.
        Err(e) => tracing::warn!(error = %e, proxy = %grant.id, "cannot withdraw a grant its caller gave up on"),
    }
    ApiError::unavailable("the request did not finish in time; retry shortly")
}

/// While leading, re-reads the whole catalogue every `period`: heals a change written to MongoDB without telling
/// the lease service (by hand, or by a writer that crashed between its write and its sync).
async fn resync(service: LeaseService, period: Duration, mut shutdown: Shutdown) {
    let mut serving = service.engine().serving();
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.wait() => return,
        }
        if !*serving.borrow_and_update() {
            continue;
        }
        match service.sync(&SyncRequest { proxy_ids: Vec::new(), full: true }).await {
            Ok(r) if r.changed > 0 => tracing::info!(changed = r.changed, "catalogue re-read found changes"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "periodic catalogue re-read failed"),
        }
    }
}

/// Serves lease requests while this replica leads, until `shutdown` fires; then stops taking requests and
/// finishes those in flight.
pub async fn serve(
    service: LeaseService,
    client: Client,
    resync_every: Duration,
    max_in_flight: usize,
    mut shutdown: Shutdown,
) -> Result<(), ServeError> {
    let resync = tokio::spawn(resync(service.clone(), resync_every, shutdown.clone()));
    let mut serving = service.engine().serving();
    tracing::info!(instance = service.instance_id(), "lease service started");
    loop {
        // Standby: wait to lead.
        while !*serving.borrow_and_update() {
            tokio::select! {
                r = serving.changed() => if r.is_err() { resync.abort(); return Ok(()) },
                () = shutdown.wait() => { resync.abort(); return Ok(()) }
            }
        }
        let requests = match router(&service).subscribe(&client, subjects::LEASE_QUEUE_GROUP).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to lease requests; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Confirmed by the server before the engine opens its term: the term's barrier deposes the previous leader,
        // which then unsubscribes, and no request may find nobody listening in between.
        if let Err(e) = client.flush().await {
            tracing::debug!(error = %e, "cannot confirm the lease subscriptions yet");
        }
        service.engine().subscribed(true);
        tracing::info!(instance = service.instance_id(), "serving lease requests (leader)");
        // This term ends when the lead is lost or the service stops.
        let (end, term) = Shutdown::new();
        let (mut watch, mut outer) = (serving.clone(), shutdown.clone());
        let ender = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = watch.changed() => if r.is_err() || !*watch.borrow() { break },
                    () = outer.wait() => break,
                }
            }
            // Listen a moment longer, answering `service_unavailable` (retryable), while the next leader subscribes:
            // a request then never finds nobody listening.
            tokio::time::sleep(TERM_GRACE).await;
            end.fire();
        });
        let options = ServeOptions {
            queue_group: subjects::LEASE_QUEUE_GROUP,
            max_in_flight,
            deadline: REQUEST_DEADLINE,
            metrics: Some(service.metrics().requests.clone()),
        };
        requests.run(client.clone(), options, term).await;
        service.engine().subscribed(false);
        let _ = ender.await;
        if shutdown.is_fired() {
            break;
        }
        tracing::info!("no longer leading: stopped serving lease requests");
    }
    resync.abort();
    tracing::info!("lease service stopped");
    Ok(())
}
