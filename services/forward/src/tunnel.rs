//! Relaying bytes between a client and its upstream until either side closes, the tunnel is idle for
//! `FORWARD_IDLE_TIMEOUT`, its lease is taken, or the service stops.
//!
//! Buffers are taken only while bytes move: each direction waits for readiness with no buffer, then borrows one,
//! reads, writes, and gives it back. An idle tunnel therefore holds two sockets and a task, not 2 × 64 KiB, which is
//! what lets one replica keep tens of thousands of idle tunnels open in bounded memory.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bytes moved per read while data flows.
const CHUNK: usize = 64 * 1024;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished (or one closed and the other followed).
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// The lease was taken, or the service stops.
    Cancelled,
    /// A socket failed.
    Error,
}

impl End {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::Cancelled => "cancelled",
            End::Error => "error",
        }
    }
}

/// Bytes relayed: `up` from client to upstream, `down` back.
#[derive(Debug, Default)]
pub struct Meter {
    /// Client → upstream.
    pub up: AtomicU64,
    /// Upstream → client.
    pub down: AtomicU64,
}

fn now_ms(origin: Instant) -> i64 {
    i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Copies `from` → `to` until `from` ends (then half-closes `to`) or a socket fails.
async fn pump(from: &TcpStream, to: &TcpStream, count: &AtomicU64, activity: &Activity) -> bool {
    loop {
        if from.readable().await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; CHUNK];
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return false,
        };
        let mut sent = 0;
        while sent < n {
            if to.ready(Interest::WRITABLE).await.is_err() {
                return false;
            }
            match to.try_write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        count.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
        activity.touch();
    }
}

/// Relays between `client` and `upstream` per the module doc.
pub async fn splice(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    cancel: &CancellationToken,
    meter: &Meter,
) -> End {
    let activity = Activity::default();
    let up = pump(client, upstream, &meter.up, &activity);
    let down = pump(upstream, client, &meter.down, &activity);
    let both = async {
        let (a, b) = tokio::join!(up, down);
        if a && b {
            End::Closed
        } else {
            End::Error
        }
    };
    tokio::select! {
        end = both => end,
        () = activity.idle_for(idle) => End::Idle,
        () = cancel.cancelled() => End::Cancelled,
    }
}

/// Relays a tunnel of either door until it ends or its lease is taken (or `cancel` fires), and records it: bytes
/// per proxy and consumer, duration.
pub(crate) async fn relay(
    shared: &crate::Shared,
    door: &'static str,
    client: &TcpStream,
    up: &TcpStream,
    lease: &crate::leases::Lease,
    want: &crate::leases::Want,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let meter = Meter::default();
    let either = CancellationToken::new();
    let link = {
        let (a, b, either) = (lease.cancel.clone(), cancel.clone(), either.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = a.cancelled() => {}
                () = b.cancelled() => {}
            }
            either.cancel();
        })
    };
    let end = splice(client, up, shared.config.idle_timeout, &either, &meter).await;
    link.abort();
    let (sent, received) = (meter.up.load(Ordering::Relaxed), meter.down.load(Ordering::Relaxed));
    let consumer = want.holder.split('@').next().unwrap_or_default();
    shared.metrics.bytes(&lease.grant.id, consumer, sent, received);
    let label = crate::metrics::DoorLabel { door };
    shared.metrics.tunnel_duration.get_or_create(&label).observe(started.elapsed().as_secs_f64());
    tracing::debug!(proxy = %lease.grant.id, end = end.as_str(), sent, received, "tunnel closed");
}

/// A shared "last activity" clock for a connection, for idle timeouts outside tunnels.
#[derive(Debug, Clone)]
pub struct Activity {
    origin: Instant,
    last: Arc<AtomicI64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self { origin: Instant::now(), last: Arc::new(AtomicI64::new(0)) }
    }
}

impl Activity {
    /// Records activity now.
    pub fn touch(&self) {
        self.last.store(now_ms(self.origin), Ordering::Relaxed);
    }

    /// Resolves once nothing happened for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
        loop {
            let quiet = now_ms(self.origin) - self.last.load(Ordering::Relaxed);
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(u64::try_from(idle_ms - quiet).unwrap_or(1).max(1))).await;
        }
    }
}
