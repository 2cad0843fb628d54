//! The forward door: the pool as one proxy. An HTTP proxy (`FORWARD_HTTP_ADDR`) and a SOCKS5 proxy
//! (`FORWARD_SOCKS_ADDR`) that any tool taking a proxy URL can use; behind them every client connection (or sticky
//! session) is a lease from the lease service like any other, counted against `PROXY_USE_MAX`, drained before
//! rotation and visible in the admin API, and the traffic leaves through the leased upstream proxy, never directly.
//!
//! # Layout
//! - [`config`]: `ForwardConfig` from the environment.
//! - [`username`]: the consumer name and options in the proxy username.
//! - [`leases`]: the door's leases and sticky sessions, returned however a connection ends.
//! - [`upstream`]: reaching a target through an upstream proxy, and sorting its failures.
//! - [`tunnel`]: relaying bytes in bounded memory, with idle timeout and cancellation.
//! - [`http`]: the HTTP door (`CONNECT` and absolute-URI requests).
//! - [`socks`]: the SOCKS5 door.
//! - [`limits`]: connection limits in all, per client IP and per consumer.
//! - [`metrics`]: Prometheus metrics.

pub mod config;
pub mod http;
pub mod leases;
pub mod limits;
pub mod metrics;
pub mod socks;
pub mod tunnel;
pub mod upstream;
pub mod username;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use proxypool_contracts::lease::Door;
use proxypool_settings::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub use config::ForwardConfig;

use crate::leases::{Book, SessionUse, Want};
use crate::limits::{Limits, Permit};
use crate::metrics::ForwardMetrics;
use crate::username::Username;

/// How long a stop waits for open connections to close and their leases to be returned.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Errors that stop the forward door.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A door or the admin endpoint could not listen.
    #[error("cannot listen on {0}")]
    Listen(&'static str, #[source] std::io::Error),
    /// The taken-lease broadcast could not be followed.
    #[error(transparent)]
    Subscribe(#[from] proxypool_rpc::SubscribeError),
}

/// What both doors share.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: ForwardConfig,
    /// Leases and sessions.
    pub book: Book,
    /// Connection limits.
    pub limits: Limits,
    /// Metrics.
    pub metrics: ForwardMetrics,
    /// Tunnels of upgraded HTTP connections (they outlive their connection's task), so that a stop waits for them.
    pub tunnels: TaskTracker,
}

/// Accepts connections on one door until the service stops, admitting each under the limits and running `serve_one`
/// on it, tracked so that a stop waits for it.
pub(crate) async fn accept<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    door: Door,
    serve_one: F,
) where
    F: Fn(Arc<Shared>, tokio::net::TcpStream, SocketAddr, Vec<Permit>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = shared.book.stopping().clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(error = %e, door = door.as_str(), "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permits) = admit(&shared, door, peer) else { continue };
        tracker.spawn(serve_one(shared.clone(), tcp, peer, permits));
    }
}

/// Admits a new client connection under the limits in all and per client IP (a trusted load balancer's address is
/// not limited: its clients are told apart per request).
pub(crate) fn admit(shared: &Shared, door: Door, peer: SocketAddr) -> Option<Vec<Permit>> {
    let refuse = || {
        shared.metrics.finished(door.as_str(), "limited");
        None
    };
    let Some(total) = shared.limits.connection() else { return refuse() };
    let ip = proxypool_authn::client::canonical(peer.ip());
    if door == Door::Http && proxypool_authn::client::contains(&shared.config.trusted_proxies, ip) {
        return Some(vec![total]);
    }
    let Some(per_ip) = shared.limits.enter(format!("ip:{ip}"), shared.config.max_conns_per_ip) else { return refuse() };
    Some(vec![total, per_ip])
}

/// What a connection of `user` from `ip` leases.
pub(crate) fn want(user: &Username, ip: IpAddr, door: Door) -> Want {
    Want {
        holder: format!("{}@{ip}", user.consumer),
        area: user.area,
        package: user.package.clone(),
        provider: user.provider.clone(),
        region: user.region.clone(),
        door,
        session: user.session.clone(),
        domain: None,
    }
}

/// The session `user` names, held for one connection.
pub(crate) fn session_of(shared: &Shared, user: &Username) -> Option<SessionUse> {
    let id = user.session.as_ref()?;
    let opt = |o: &Option<String>| o.clone().unwrap_or_default();
    let key = format!(
        "{}|{}|{}|{}|{}|{id}",
        user.consumer,
        user.area.as_str(),
        opt(&user.package),
        opt(&user.provider),
        opt(&user.region)
    );
    let idle = user.sesstime_minutes.map_or(shared.config.session_default, |m| Duration::from_secs(u64::from(m) * 60));
    Some(shared.book.session(key, idle))
}

/// The forward door, built from its configuration and NATS connection, listening, ready to [`run`](App::run).
/// `main.rs` and the tests both start it this way.
#[derive(Debug)]
pub struct App {
    shared: Arc<Shared>,
    client: async_nats::Client,
    http: TcpListener,
    socks: TcpListener,
    http_addr: SocketAddr,
    socks_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl App {
    /// Binds both doors and the admin endpoint (`/metrics`, `/healthz`, `/readyz` on `FORWARD_ADMIN_ADDR`).
    pub async fn build(config: ForwardConfig, client: async_nats::Client) -> Result<Self, RunError> {
        let metrics = ForwardMetrics::new();
        let http = TcpListener::bind(config.http_addr).await.map_err(|e| RunError::Listen("FORWARD_HTTP_ADDR", e))?;
        let socks =
            TcpListener::bind(config.socks_addr).await.map_err(|e| RunError::Listen("FORWARD_SOCKS_ADDR", e))?;
        let http_addr = http.local_addr().map_err(|e| RunError::Listen("FORWARD_HTTP_ADDR", e))?;
        let socks_addr = socks.local_addr().map_err(|e| RunError::Listen("FORWARD_SOCKS_ADDR", e))?;
        let ready = proxypool_telemetry::metrics::nats_ready(client.clone());
        let admin_addr = metrics
            .registry
            .serve_admin(config.admin_addr, ready)
            .await
            .map_err(|e| RunError::Listen("FORWARD_ADMIN_ADDR", e))?;
        tracing::info!(%http_addr, %socks_addr, %admin_addr, "forward door listening (HTTP, SOCKS5, admin)");
        let book = Book::new(client.clone(), metrics.clone(), config.retries);
        let limits = Limits::new(config.max_conns);
        let shared = Arc::new(Shared { config, book, limits, metrics, tunnels: TaskTracker::new() });
        Ok(Self { shared, client, http, socks, http_addr, socks_addr, admin_addr })
    }

    /// Where the HTTP door listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the SOCKS5 door listens.
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks_addr
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The shared state (the lease book, metrics).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves both doors until `shutdown` fires; then stops accepting, closes every connection and tunnel, and
    /// returns every lease before it returns.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), RunError> {
        let Self { shared, client, http, socks, .. } = self;
        // Subscribed before the first lease, so that no taken lease goes unnoticed.
        let taken = proxypool_rpc::notices::taken(&client).await?;
        let book = shared.book.clone();
        let follow = tokio::spawn(book.clone().follow_taken(Box::pin(taken)));
        let bans = proxypool_rpc::notices::bans(&client).await?;
        let follow_bans = tokio::spawn(book.clone().follow_bans(Box::pin(bans)));
        let reaper = tokio::spawn(book.clone().reap_sessions());
        let connections = TaskTracker::new();
        let doors = [
            tokio::spawn(http::serve(http, shared.clone(), connections.clone())),
            tokio::spawn(socks::serve(socks, shared.clone(), connections.clone())),
        ];
        shutdown.wait().await;
        tracing::info!("forward door stopping: closing connections and returning leases");
        book.stopping().cancel();
        for d in doors {
            let _ = d.await;
        }
        connections.close();
        shared.tunnels.close();
        let closed = async {
            connections.wait().await;
            shared.tunnels.wait().await;
        };
        if tokio::time::timeout(STOP_LIMIT, closed).await.is_err() {
            tracing::warn!("some connections did not close in time");
        }
        let _ = reaper.await;
        follow.abort();
        follow_bans.abort();
        book.stop(STOP_LIMIT).await;
        Ok(())
    }
}
