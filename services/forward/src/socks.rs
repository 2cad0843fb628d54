//! The SOCKS5 door: `CONNECT` with username/password authentication (RFC 1928, RFC 1929), to IPv4, IPv6 and domain
//! targets, tunnelled through the leased upstream's HTTP `CONNECT`.
//!
//! The server side of this subset is a few fixed-layout messages, written here rather than taken from a crate: the
//! door must authenticate, lease and reach the upstream between the client's request and the reply (so that a
//! failing upstream is replaced before the client is told "succeeded"), under its own handshake timeout and
//! memory bounds, and then hand the bare TCP stream to the splice that keeps idle tunnels cheap. The whole
//! handshake runs under `FORWARD_HANDSHAKE_TIMEOUT`; a client that does not offer username/password, or fails it,
//! is refused before anything is leased. The refusal of a malformed username names the option in the log: RFC 1929
//! has only a status byte for the client.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use proxypool_contracts::lease::Door;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::leases::{DoorError, Slot};
use crate::limits::Permit;
use crate::upstream;
use crate::Shared;

/// Reply codes (RFC 1928 §6).
mod rep {
    pub const SUCCEEDED: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_NOT_SUPPORTED: u8 = 0x08;
}

/// Why a handshake ended without a tunnel.
#[derive(Debug)]
enum Refused {
    /// The socket failed or the client broke the protocol; nothing to answer.
    Protocol(&'static str),
    /// Authentication failed (answered with a non-zero RFC 1929 status).
    Auth(String),
    /// The request was answered with this reply code.
    Reply(u8, String),
}

/// Accepts SOCKS5 connections until the service stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    crate::accept(listener, shared, tracker, Door::Socks5, connection).await;
}

async fn connection(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr, permits: Vec<Permit>) {
    let _ = tcp.set_nodelay(true);
    let open = shared.metrics.open.get_or_create(&crate::metrics::DoorLabel { door: "socks5" }).clone();
    open.inc();
    let result = match tokio::time::timeout(shared.config.handshake_timeout, handshake(&shared, &mut tcp, peer)).await {
        Err(_) => "timeout",
        Ok(Err(Refused::Protocol(why))) => {
            tracing::debug!(%peer, why, "SOCKS5 handshake failed");
            "bad_request"
        }
        Ok(Err(Refused::Auth(why))) => {
            tracing::info!(%peer, why, "SOCKS5 authentication refused");
            "auth_failed"
        }
        Ok(Err(Refused::Reply(code, why))) => {
            tracing::info!(%peer, code, why, "SOCKS5 request refused");
            match code {
                rep::GENERAL_FAILURE => "no_proxy",
                rep::NETWORK_UNREACHABLE => "upstream_failed",
                rep::HOST_UNREACHABLE => "target_refused",
                rep::NOT_ALLOWED => "limited",
                _ => "bad_request",
            }
        }
        Ok(Ok(ready)) => {
            let Ready { up, lease, want, session, _consumer } = ready;
            let cancel = shared.book.stopping().clone();
            crate::tunnel::relay(&shared, "socks5", &tcp, &up, &lease, &want, &cancel).await;
            drop(session);
            "ok"
        }
    };
    drop(permits);
    open.dec();
    shared.metrics.finished("socks5", result);
}

/// A tunnel ready to relay.
struct Ready {
    up: TcpStream,
    lease: Arc<crate::leases::Lease>,
    want: crate::leases::Want,
    session: Option<crate::leases::SessionUse>,
    _consumer: Permit,
}

async fn read_u8(s: &mut TcpStream) -> Result<u8, Refused> {
    s.read_u8().await.map_err(|_| Refused::Protocol("connection closed during the handshake"))
}

async fn read_exact(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, Refused> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.map_err(|_| Refused::Protocol("connection closed during the handshake"))?;
    Ok(buf)
}

async fn reply(s: &mut TcpStream, code: u8) -> Result<(), Refused> {
    // BND.ADDR/PORT: 0.0.0.0:0; clients of CONNECT do not use them.
    s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await.map_err(|_| Refused::Protocol("cannot reply"))
}

async fn refuse(s: &mut TcpStream, code: u8, why: impl Into<String>) -> Refused {
    let _ = reply(s, code).await;
    Refused::Reply(code, why.into())
}

async fn handshake(shared: &Arc<Shared>, s: &mut TcpStream, peer: SocketAddr) -> Result<Ready, Refused> {
    let c = &shared.config;
    // Greeting: VER, NMETHODS, METHODS.
    if read_u8(s).await? != 5 {
        return Err(Refused::Protocol("not SOCKS5"));
    }
    let n = read_u8(s).await?;
    let methods = read_exact(s, usize::from(n)).await?;
    if !methods.contains(&2) {
        let _ = s.write_all(&[5, 0xFF]).await;
        return Err(Refused::Auth("the client offers no username/password authentication".into()));
    }
    s.write_all(&[5, 2]).await.map_err(|_| Refused::Protocol("cannot reply"))?;
    // RFC 1929: VER=1, ULEN, UNAME, PLEN, PASSWD.
    if read_u8(s).await? != 1 {
        return Err(Refused::Protocol("bad authentication version"));
    }
    let ulen = read_u8(s).await?;
    let uname = read_exact(s, usize::from(ulen)).await?;
    let plen = read_u8(s).await?;
    let passwd = read_exact(s, usize::from(plen)).await?;
    let ip = proxypool_authn::client::canonical(peer.ip());
    let auth = (|| {
        if !proxypool_authn::client::key_matches(&passwd, c.allowed_api_key.expose()) {
            return Err("the password is not a valid consumer key".to_owned());
        }
        if !proxypool_authn::client::contains(&c.ip_allowed, ip) {
            return Err(format!("client IP {ip} is not in IP_ALLOWED"));
        }
        let name = String::from_utf8(uname).map_err(|_| "the username is not UTF-8".to_owned())?;
        c.grammar().parse(&name).map_err(|e| e.message)
    })();
    let user = match auth {
        Ok(u) => u,
        Err(why) => {
            let _ = s.write_all(&[1, 1]).await;
            return Err(Refused::Auth(why));
        }
    };
    let Some(consumer) =
        shared.limits.enter(format!("consumer:{}", user.consumer), shared.config.max_conns_per_consumer)
    else {
        let _ = s.write_all(&[1, 1]).await;
        return Err(Refused::Auth(format!("consumer {} has its connection limit open", user.consumer)));
    };
    s.write_all(&[1, 0]).await.map_err(|_| Refused::Protocol("cannot reply"))?;
    // Request: VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT.
    let head = read_exact(s, 4).await?;
    if head[0] != 5 {
        return Err(Refused::Protocol("bad request version"));
    }
    let host = match head[3] {
        1 => Ipv4Addr::from(<[u8; 4]>::try_from(read_exact(s, 4).await?).unwrap_or_default()).to_string(),
        4 => format!("[{}]", Ipv6Addr::from(<[u8; 16]>::try_from(read_exact(s, 16).await?).unwrap_or_default())),
        3 => {
            let len = read_u8(s).await?;
            let name = read_exact(s, usize::from(len)).await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() && n.chars().all(|ch| ch.is_ascii_graphic()) => n,
                _ => return Err(refuse(s, rep::ADDRESS_NOT_SUPPORTED, "a malformed domain name").await),
            }
        }
        _ => return Err(refuse(s, rep::ADDRESS_NOT_SUPPORTED, "an unknown address type").await),
    };
    let port = u16::from_be_bytes(<[u8; 2]>::try_from(read_exact(s, 2).await?).unwrap_or_default());
    if head[1] != 1 {
        return Err(refuse(s, rep::COMMAND_NOT_SUPPORTED, "only CONNECT is supported").await);
    }
    let target = format!("{host}:{port}");
    let want = crate::want(&user, ip, Door::Socks5).to(Some(&host));
    let session = crate::session_of(shared, &user);
    let own = Slot::default();
    let slot = session.as_ref().map_or(&own, |u| &u.session.slot);
    let timeout = c.connect_timeout;
    let dialed = shared
        .book
        .dial(slot, &want, true, |lease| {
            let target = target.clone();
            async move { upstream::tunnel(&lease.grant, &target, timeout).await }
        })
        .await;
    let (lease, (up, leftover), _) = match dialed {
        Ok(d) => d,
        Err(e) => {
            let code = match &e {
                DoorError::NoProxy(_) | DoorError::Unavailable(_) | DoorError::Refused(_) => rep::GENERAL_FAILURE,
                DoorError::UpstreamsFailed(_) => rep::NETWORK_UNREACHABLE,
                DoorError::Target(_) => rep::HOST_UNREACHABLE,
            };
            return Err(refuse(s, code, e.reason()).await);
        }
    };
    reply(s, rep::SUCCEEDED).await?;
    if !leftover.is_empty() {
        s.write_all(&leftover).await.map_err(|_| Refused::Protocol("client gone"))?;
    }
    Ok(Ready { up, lease, want, session, _consumer: consumer })
}
