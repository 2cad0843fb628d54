//! The HTTP door: `CONNECT host:port` tunnels and absolute-URI requests (`GET http://…`), HTTP/1.1 with keep-alive,
//! chunked bodies and `Expect: 100-continue` (hyper's server handles the framing).
//!
//! Every request authenticates with `Proxy-Authorization: Basic` (the username carries the options, the password is
//! the consumer key) from an allowed client IP; nothing is leased before that. A connection's first request binds its
//! username: the connection (or its session) leases once, and later requests on it reuse the lease and the
//! upstream connection. Absolute-URI requests go to the upstream in absolute form with the upstream's
//! `Proxy-Authorization`; `CONNECT` opens a tunnel through the upstream's own `CONNECT`, answered 200 only once the
//! upstream has answered, so a failing upstream is replaced before the client has a byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use proxypool_contracts::lease::{Door, UpstreamFailure};
use proxypool_contracts::{ApiError, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::leases::{DoorError, Lease, Session, SessionUse, Slot, Want};
use crate::limits::Permit;
use crate::tunnel::{self, Activity};
use crate::upstream::{self, DialError};
use crate::username::Username;
use crate::Shared;

/// The body type of everything the door answers and sends upstream.
type Body = BoxBody<Bytes, hyper::Error>;

/// Request bodies up to this size are held so that the request can be retried on another proxy; larger or
/// unsized (chunked) ones stream, and are tried once.
const REPLAY_MAX: u64 = 64 * 1024;

/// Response header naming the upstream proxy used.
pub const PROXY_ID: HeaderName = HeaderName::from_static("x-proxypool-proxy-id");
/// Response header naming the sticky session.
pub const SESSION: HeaderName = HeaderName::from_static("x-proxypool-session");
/// Response header: when the upstream proxy is next due for rotation (RFC 3339); its drain starts then, and a
/// session moves to another proxy once the rotation takes its lease.
pub const NEXT_ROTATE: HeaderName = HeaderName::from_static("x-proxypool-next-rotate");
/// Response header saying why a session's proxy changed (`rotated`, `expired`, `proxy_disabled`, `upstream_failed`…).
pub const SESSION_CHANGED: HeaderName = HeaderName::from_static("x-proxypool-session-changed");
/// Response header with the reason of a refusal or a 502.
pub const REASON: HeaderName = HeaderName::from_static("x-proxypool-reason");

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never: Infallible| match never {}).boxed()
}

/// A client socket that notes when bytes move, for the idle timeout between requests.
#[derive(Debug)]
pub struct Watched {
    tcp: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// What a connection's first authenticated request bound it to.
#[derive(Debug)]
struct Bound {
    user: Username,
    want: Want,
    session: Option<SessionUse>,
    _consumer: Permit,
}

/// One client connection.
#[derive(Debug)]
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    peer_trusted: bool,
    /// The connection's own lease (without a session).
    slot: Slot,
    bound: tokio::sync::Mutex<Option<Bound>>,
    /// The upstream HTTP connection of absolute-URI requests, by lease key.
    upstream: tokio::sync::Mutex<Cached>,
    /// Closes the connection (its lease was taken, or the service stops).
    cancel: CancellationToken,
    /// The lease whose loss closes this connection.
    watched: Mutex<Option<String>>,
    result: Mutex<&'static str>,
    _permits: Vec<Permit>,
}

impl Conn {
    fn set_result(&self, r: &'static str) {
        if let Ok(mut res) = self.result.lock() {
            *res = r;
        }
    }

    /// Closes this connection when `lease` is taken (once per lease).
    fn close_with(self: &Arc<Self>, lease: &Arc<Lease>) {
        let Ok(mut w) = self.watched.lock() else { return };
        if w.as_deref() == Some(lease.grant.key.as_str()) {
            return;
        }
        *w = Some(lease.grant.key.clone());
        let (on_lease, conn) = (lease.cancel.clone(), self.cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = on_lease.cancelled() => conn.cancel(),
                () = conn.cancelled() => {}
            }
        });
    }
}

/// Accepts HTTP proxy connections until the service stops.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    crate::accept(listener, shared, tracker, Door::Http, connection).await;
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, permits: Vec<Permit>) {
    let _ = tcp.set_nodelay(true);
    let open = shared.metrics.open.get_or_create(&crate::metrics::DoorLabel { door: "http" }).clone();
    open.inc();
    let c = &shared.config;
    let peer_trusted =
        proxypool_authn::client::contains(&c.trusted_proxies, proxypool_authn::client::canonical(peer.ip()));
    let (handshake, header_max, idle) = (c.handshake_timeout, c.header_max, c.idle_timeout);
    let conn = Arc::new(Conn {
        cancel: shared.book.stopping().child_token(),
        shared,
        peer,
        peer_trusted,
        slot: Slot::default(),
        bound: tokio::sync::Mutex::new(None),
        upstream: tokio::sync::Mutex::new(None),
        watched: Mutex::new(None),
        result: Mutex::new("ok"),
        _permits: permits,
    });
    let activity = Activity::default();
    let io = TokioIo::new(Watched { tcp, activity: activity.clone() });
    let svc = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(conn, req).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(handshake).max_buf_size(header_max).keep_alive(true);
    let served = builder.serve_connection(io, svc).with_upgrades();
    tokio::select! {
        r = served => {
            if let Err(e) = r {
                if e.is_timeout() {
                    conn.set_result("timeout");
                } else if e.is_parse_too_large() {
                    conn.set_result("header_too_large");
                } else if e.is_parse() {
                    conn.set_result("bad_request");
                }
                tracing::debug!(error = %e, "HTTP door connection ended");
            }
        }
        () = activity.idle_for(idle) => conn.set_result("idle"),
        () = conn.cancel.cancelled() => conn.set_result("cancelled"),
    }
    open.dec();
    let result = conn.result.lock().map(|r| *r).unwrap_or("ok");
    conn.shared.metrics.finished("http", result);
}

/// `user`, `password` from `Proxy-Authorization: Basic …`.
fn credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let raw = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, b64) = raw.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// An error answer: the JSON envelope, `X-Proxypool-Reason`, and `Retry-After` or `Proxy-Authenticate` where they
/// belong.
fn refusal(status: StatusCode, error: &ApiError, reason: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": error }).to_string();
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(reason) {
        h.insert(REASON, v);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"proxypool\""));
    }
    res
}

fn door_refusal(conn: &Conn, e: &DoorError) -> Response<Body> {
    let reason = e.reason();
    let (status, error, result) = match e {
        DoorError::NoProxy(err) => (StatusCode::SERVICE_UNAVAILABLE, err.clone(), "no_proxy"),
        DoorError::Unavailable(why) => {
            tracing::warn!(error = %why, "the lease service is unreachable");
            let err = ApiError::unavailable("the lease service is unreachable; retry shortly");
            (StatusCode::SERVICE_UNAVAILABLE, err, "unavailable")
        }
        DoorError::Refused(err) => {
            (StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST), err.clone(), "refused")
        }
        DoorError::UpstreamsFailed(kind) => {
            let err = ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!("every upstream proxy tried failed ({}); retry", kind.as_str()),
            );
            (StatusCode::BAD_GATEWAY, err, "upstream_failed")
        }
        DoorError::Target(status) => {
            let err = ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!("the upstream proxy could not reach the target (it answered {status})"),
            );
            (StatusCode::BAD_GATEWAY, err, "target_refused")
        }
    };
    conn.set_result(result);
    refusal(status, &error, &reason)
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Response<Body> {
    let c = &conn.shared.config;
    let forwarded = req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let ip = proxypool_authn::client::client_ip(conn.peer, forwarded, &c.trusted_proxies);
    let Some((user, pass)) = credentials(req.headers()) else {
        conn.set_result("auth_failed");
        let e = ApiError::new(ErrorCode::Unauthorized, "proxy credentials are required (Proxy-Authorization: Basic)");
        return refusal(StatusCode::PROXY_AUTHENTICATION_REQUIRED, &e, "auth_required");
    };
    if !proxypool_authn::client::key_matches(pass.as_bytes(), c.allowed_api_key.expose()) {
        conn.set_result("auth_failed");
        let e = ApiError::new(ErrorCode::Unauthorized, "the proxy password is not a valid consumer key");
        return refusal(StatusCode::PROXY_AUTHENTICATION_REQUIRED, &e, "auth_failed");
    }
    if !proxypool_authn::client::contains(&c.ip_allowed, ip) {
        conn.set_result("auth_failed");
        let e = ApiError::new(ErrorCode::Forbidden, format!("client IP {ip} is not in IP_ALLOWED"));
        return refusal(StatusCode::PROXY_AUTHENTICATION_REQUIRED, &e, "ip_not_allowed");
    }
    let user = match c.grammar().parse(&user) {
        Ok(u) => u,
        Err(e) => {
            conn.set_result("bad_request");
            return refusal(StatusCode::BAD_REQUEST, &e, "invalid_username");
        }
    };
    let (want, session) = {
        let mut bound = conn.bound.lock().await;
        match bound.as_ref() {
            Some(b) if b.user != user => {
                conn.set_result("bad_request");
                let e = ApiError::invalid("username", "cannot change on one connection; open a new one");
                return refusal(StatusCode::BAD_REQUEST, &e, "invalid_username");
            }
            Some(b) => (b.want.clone(), b.session.as_ref().map(|s| s.session.clone())),
            None => {
                let Some(permit) =
                    conn.shared.limits.enter(format!("consumer:{}", user.consumer), c.max_conns_per_consumer)
                else {
                    conn.set_result("limited");
                    let e = ApiError::new(
                        ErrorCode::ServiceUnavailable,
                        format!("consumer {} has FORWARD_MAX_CONNS_PER_CONSUMER connections open", user.consumer),
                    );
                    return refusal(StatusCode::TOO_MANY_REQUESTS, &e, "connection_limit");
                };
                let want = crate::want(&user, ip, Door::Http);
                let session = crate::session_of(&conn.shared, &user);
                let s = session.as_ref().map(|s| s.session.clone());
                *bound = Some(Bound { user, want: want.clone(), session, _consumer: permit });
                (want, s)
            }
        }
    };
    let want = want.to(req.uri().host());
    if req.method() == Method::CONNECT {
        connect(conn, req, want, session).await
    } else {
        forward(conn, req, want, session).await
    }
}

fn slot<'a>(conn: &'a Conn, session: &'a Option<Arc<Session>>) -> &'a Slot {
    session.as_ref().map_or(&conn.slot, |s| &s.slot)
}

fn mark(res: &mut Response<Body>, lease: &Lease, want: &Want, changed: Option<&str>) {
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&lease.grant.id) {
        h.insert(PROXY_ID, v);
    }
    if let Some(v) = lease.grant.next_rotate.and_then(|t| HeaderValue::from_str(&t.to_rfc3339()).ok()) {
        h.insert(NEXT_ROTATE, v);
    }
    if let Some(s) = want.session.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
        h.insert(SESSION, s);
        if let Some(v) = changed.and_then(|c| HeaderValue::from_str(c).ok()) {
            h.insert(SESSION_CHANGED, v);
        }
    }
}

async fn connect(conn: Arc<Conn>, req: Request<Incoming>, want: Want, session: Option<Arc<Session>>) -> Response<Body> {
    let Some(target) = req.uri().authority().filter(|a| a.port_u16().is_some()).map(ToString::to_string) else {
        conn.set_result("bad_request");
        return refusal(StatusCode::BAD_REQUEST, &ApiError::invalid("target", "CONNECT needs host:port"), "bad_target");
    };
    let timeout = conn.shared.config.connect_timeout;
    let dialed = conn
        .shared
        .book
        .dial(slot(&conn, &session), &want, true, |lease| {
            let target = target.clone();
            async move { upstream::tunnel(&lease.grant, &target, timeout).await }
        })
        .await;
    let (lease, (up, leftover), changed) = match dialed {
        Ok(d) => d,
        Err(e) => return door_refusal(&conn, &e),
    };
    let mut res = Response::new(empty());
    mark(&mut res, &lease, &want, changed.as_deref());
    let tunnel_conn = conn.clone();
    conn.shared.tunnels.spawn(async move {
        let conn = tunnel_conn;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<Watched>>() else {
            tracing::error!("CONNECT upgrade is not over a TCP stream");
            return;
        };
        let mut client = parts.io.into_inner().tcp;
        let mut up = up;
        // Bytes the client sent after its CONNECT (a TLS hello, often) and bytes the upstream sent after its answer.
        if !parts.read_buf.is_empty() && up.write_all(&parts.read_buf).await.is_err() {
            return;
        }
        if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
            return;
        }
        tunnel::relay(&conn.shared, "http", &client, &up, &lease, &want, &conn.cancel).await;
        drop(session);
    });
    res
}

/// Hop-by-hop headers, and ours, that never pass the door.
fn strip(headers: &mut HeaderMap, peer_trusted: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if peer_trusted {
        // Added by our own load balancer: the client's address is not the target's business.
        headers.remove("x-forwarded-for");
    }
}

/// Whether a request body can be held for a retry: none, or a known length up to [`REPLAY_MAX`].
fn replayable(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(n) => n.trim().parse::<u64>().is_ok_and(|n| n <= REPLAY_MAX),
    }
}

async fn forward(conn: Arc<Conn>, req: Request<Incoming>, want: Want, session: Option<Arc<Session>>) -> Response<Body> {
    if req.uri().scheme_str() != Some("http") || req.uri().authority().is_none() {
        conn.set_result("bad_request");
        let e = ApiError::invalid("target", "must be an absolute http:// URI; use CONNECT for https");
        return refusal(StatusCode::BAD_REQUEST, &e, "bad_target");
    }
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers.clone();
    strip(&mut headers, conn.peer_trusted);
    let held = if replayable(&parts.headers) {
        match Limited::new(body, usize::try_from(REPLAY_MAX).unwrap_or(usize::MAX)).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(_) => {
                conn.set_result("bad_request");
                let e = ApiError::invalid("body", "could not be read");
                return refusal(StatusCode::BAD_REQUEST, &e, "bad_body");
            }
        }
    } else {
        Err(body)
    };
    let retry = held.is_ok();
    let (held, mut streaming) = match held {
        Ok(b) => (Some(b), None),
        Err(body) => (None, Some(body)),
    };
    let timeout = conn.shared.config.connect_timeout;
    let (method, uri, version) = (parts.method.clone(), parts.uri.clone(), parts.version);
    let dialed = conn
        .shared
        .book
        .dial(slot(&conn, &session), &want, retry, |lease| {
            let body = match (&held, streaming.take()) {
                (Some(b), _) => full(b.clone()),
                (None, Some(s)) => s.boxed(),
                (None, None) => empty(),
            };
            let mut up = Request::new(body);
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri.clone();
            *up.version_mut() = version;
            *up.headers_mut() = headers.clone();
            if let Some(v) = upstream::basic_auth(&lease.grant).and_then(|a| HeaderValue::from_str(&a).ok()) {
                up.headers_mut().insert(header::PROXY_AUTHORIZATION, v);
            }
            let conn = conn.clone();
            async move { send(&conn, &lease, up, timeout).await }
        })
        .await;
    let (lease, res, changed) = match dialed {
        Ok(d) => d,
        Err(e) => return door_refusal(&conn, &e),
    };
    conn.close_with(&lease);
    let (mut parts, body) = res.into_parts();
    strip(&mut parts.headers, false);
    let consumer = want.holder.split('@').next().unwrap_or_default().to_owned();
    let m = &conn.shared.metrics;
    let down_proxy = m
        .proxy_bytes
        .get_or_create(&crate::metrics::ProxyBytes { direction: "down", proxy: lease.grant.id.clone() })
        .clone();
    let down_consumer =
        m.consumer_bytes.get_or_create(&crate::metrics::ConsumerBytes { direction: "down", consumer }).clone();
    let counted = body
        .map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                let n = u64::try_from(d.len()).unwrap_or(0);
                down_proxy.inc_by(n);
                down_consumer.inc_by(n);
            }
            f
        })
        .boxed();
    let mut res = Response::from_parts(parts, counted);
    mark(&mut res, &lease, &want, changed.as_deref());
    res
}

/// Sends one absolute-URI request through the lease's upstream, over the connection's upstream connection when it
/// goes to the same lease.
///
/// A kept-alive upstream connection may have been closed by the upstream between two requests (tinyproxy answers in
/// HTTP/1.0 and closes): a request that hyper gives back unsent is sent again on a fresh connection to the same
/// proxy, so that a normal close is never counted as the proxy failing.
async fn send(
    conn: &Conn,
    lease: &Arc<Lease>,
    req: Request<Body>,
    timeout: std::time::Duration,
) -> Result<Response<Incoming>, DialError> {
    let mut cached = conn.upstream.lock().await;
    let reusable = cached.as_ref().is_some_and(|(key, s)| key == &lease.grant.key && !s.is_closed());
    let mut req = Some(req);
    if reusable {
        if let Some((_, sender)) = cached.as_mut() {
            let first = req.take().ok_or(DialError::Upstream(UpstreamFailure::Reset))?;
            let sent = match sender.ready().await {
                Ok(()) => sender.try_send_request(first).await,
                Err(_) => {
                    req = Some(first);
                    *cached = None;
                    return send_fresh(&mut cached, lease, req, timeout).await;
                }
            };
            match sent {
                Ok(res) => return check(&mut cached, res),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = Some(unsent),
                    None => {
                        *cached = None;
                        return Err(DialError::Upstream(UpstreamFailure::Reset));
                    }
                },
            }
        }
    }
    *cached = None;
    send_fresh(&mut cached, lease, req, timeout).await
}

type Cached = Option<(String, hyper::client::conn::http1::SendRequest<Body>)>;

/// Opens a new upstream connection for `lease`, keeps it in `cached`, and sends `req` on it.
async fn send_fresh(
    cached: &mut Cached,
    lease: &Arc<Lease>,
    req: Option<Request<Body>>,
    timeout: std::time::Duration,
) -> Result<Response<Incoming>, DialError> {
    let req = req.ok_or(DialError::Upstream(UpstreamFailure::Reset))?;
    let tcp = upstream::connect(&lease.grant, timeout).await?;
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(tcp));
    let (mut sender, connection) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| DialError::Upstream(UpstreamFailure::Timeout))?
        .map_err(|_| DialError::Upstream(UpstreamFailure::Reset))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let res = sender.send_request(req).await.map_err(|_| DialError::Upstream(UpstreamFailure::Reset))?;
    *cached = Some((lease.grant.key.clone(), sender));
    check(cached, res)
}

/// 407 is the upstream refusing our credentials. (A 401 may be the target's own answer, so it passes through.)
fn check(cached: &mut Cached, res: Response<Incoming>) -> Result<Response<Incoming>, DialError> {
    if res.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        *cached = None;
        return Err(DialError::Upstream(UpstreamFailure::Auth));
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_basic_credentials() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("demo-session-1:key:with:colons"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("")));
        assert_eq!(credentials(&h), Some(("demo-session-1".to_owned(), "key:with:colons".to_owned())));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(credentials(&h), None);
    }

    #[test]
    fn strips_hop_by_hop_and_credentials() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        strip(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn holds_small_bodies_for_retries() {
        let mut h = HeaderMap::new();
        assert!(replayable(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("65536"));
        assert!(replayable(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("65537"));
        assert!(!replayable(&h));
        h.remove(header::CONTENT_LENGTH);
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(!replayable(&h));
    }
}
