//! Local fakes of the outside world for rotator tests: a provider API, an IP-echo service, a geo-IP service, and a
//! real HTTP forward proxy with basic auth. Nothing here reaches the internet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

async fn serve(app: Router) -> anyhow::Result<SocketAddr> {
    serve_on(app, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

async fn serve_on(app: Router, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the fake provider answers on `GET /rotate/{key}`.
#[derive(Debug, Clone)]
pub struct ProviderAnswer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
    /// Delay before answering.
    pub delay: Duration,
}

#[derive(Debug, Default)]
struct FakeState {
    answers: Mutex<HashMap<String, ProviderAnswer>>,
    default_answer: Mutex<Option<ProviderAnswer>>,
    calls: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight: Mutex<HashMap<String, usize>>,
    auth_seen: Mutex<Vec<Option<String>>>,
    public_ip: Mutex<String>,
    /// Answer each upstream [`ForwardProxy`] its own IP (from the id it sends), as proxies on separate modems see.
    ip_per_upstream: std::sync::atomic::AtomicBool,
    /// Public IPs a rotate call of a key hands out, in turn (the echo answers the latest).
    next_ips: Mutex<HashMap<String, std::collections::VecDeque<String>>>,
    callbacks: Mutex<Vec<serde_json::Value>>,
    callback_failures_left: AtomicUsize,
}

/// A fake provider + IP echo + geo-IP + callback receiver, on one local port.
#[derive(Debug, Clone)]
pub struct FakeWorld {
    /// Base URL, `http://127.0.0.1:<port>`.
    pub base: String,
    state: Arc<FakeState>,
}

async fn rotate(State(s): State<Arc<FakeState>>, Path(key): Path<String>, headers: HeaderMap) -> Response {
    let answer = {
        let by_key = lock(&s.answers).get(&key).cloned();
        by_key.or_else(|| lock(&s.default_answer).clone())
    };
    lock(&s.auth_seen).push(headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned));
    *lock(&s.calls).entry(key.clone()).or_default() += 1;
    if let Some(ip) = lock(&s.next_ips).get_mut(&key).and_then(std::collections::VecDeque::pop_front) {
        *lock(&s.public_ip) = ip;
    }
    {
        let mut inf = lock(&s.in_flight);
        let n = inf.entry(key.clone()).or_default();
        *n += 1;
        let mut max = lock(&s.max_in_flight);
        let m = max.entry(key.clone()).or_default();
        *m = (*m).max(*n);
    }
    let answer = answer.unwrap_or(ProviderAnswer { status: 200, body: "{}".into(), delay: Duration::ZERO });
    tokio::time::sleep(answer.delay).await;
    *lock(&s.in_flight).entry(key).or_default() -= 1;
    (StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK), answer.body).into_response()
}

async fn ip(State(s): State<Arc<FakeState>>, headers: HeaderMap) -> String {
    let upstream = headers.get(UPSTREAM_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    match upstream {
        Some(n) if s.ip_per_upstream.load(Ordering::SeqCst) => format!("198.18.{}.{}", (n >> 8) & 255, n & 255),
        _ => lock(&s.public_ip).clone(),
    }
}

/// The header a [`ForwardProxy`] adds to what it forwards: its own id, so that the fake IP echo can tell upstreams
/// apart ([`FakeWorld::ip_per_upstream`]).
const UPSTREAM_HEADER: &str = "x-fake-upstream";

/// Ids of the [`ForwardProxy`]s started in this process.
static UPSTREAMS: AtomicUsize = AtomicUsize::new(1);

async fn region(Path(ip): Path<String>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ip": ip, "region": "HCM", "country": "VN" }))
}

async fn callback(State(s): State<Arc<FakeState>>, Json(v): Json<serde_json::Value>) -> StatusCode {
    let left = s.callback_failures_left.load(Ordering::SeqCst);
    if left > 0 {
        s.callback_failures_left.store(left - 1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    lock(&s.callbacks).push(v);
    StatusCode::OK
}

impl FakeWorld {
    /// Starts it on a free port. The echo answers `public_ip` (default `203.0.113.1`).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts it on `addr` (the local demo's provider, `examples/demo-world`).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let state = Arc::new(FakeState::default());
        *lock(&state.public_ip) = "203.0.113.1".into();
        let app = Router::new()
            .route("/rotate/{key}", get(rotate))
            .route("/ip", get(ip))
            .route("/region/{ip}", get(region))
            .route("/callback", post(callback))
            .with_state(state.clone());
        let addr = serve_on(app, addr).await?;
        Ok(Self { base: format!("http://{addr}"), state })
    }

    /// Sets the answer for one rotate key.
    pub fn answer(&self, key: &str, status: u16, body: impl Into<String>) {
        lock(&self.state.answers)
            .insert(key.to_owned(), ProviderAnswer { status, body: body.into(), delay: Duration::ZERO });
    }

    /// Sets the answer for keys without their own.
    pub fn default_answer(&self, answer: ProviderAnswer) {
        *lock(&self.state.default_answer) = Some(answer);
    }

    /// The public IPs the next rotate calls of `key` give, one per call, in turn (then the echo keeps the last).
    pub fn hand_out_ips(&self, key: &str, ips: &[&str]) {
        lock(&self.state.next_ips).insert(key.to_owned(), ips.iter().map(|ip| (*ip).to_owned()).collect());
    }

    /// Makes the IP echo answer each upstream [`ForwardProxy`] an IP of its own (`198.18.x.y` from its id) instead
    /// of the one [`FakeWorld::set_public_ip`] sets: proxies behind separate upstreams then exit on separate IPs.
    pub fn ip_per_upstream(&self, yes: bool) {
        self.state.ip_per_upstream.store(yes, Ordering::SeqCst);
    }

    /// Sets what the IP echo answers.
    pub fn set_public_ip(&self, ip: &str) {
        *lock(&self.state.public_ip) = ip.to_owned();
    }

    /// Rotate calls seen for a key.
    pub fn calls(&self, key: &str) -> usize {
        lock(&self.state.calls).get(key).copied().unwrap_or(0)
    }

    /// Rotate calls seen in all.
    pub fn total_calls(&self) -> usize {
        lock(&self.state.calls).values().sum()
    }

    /// The most concurrent rotate calls ever seen for any one key.
    pub fn max_concurrent_per_key(&self) -> usize {
        lock(&self.state.max_in_flight).values().copied().max().unwrap_or(0)
    }

    /// `Authorization` headers seen on rotate calls.
    pub fn auth_seen(&self) -> Vec<Option<String>> {
        lock(&self.state.auth_seen).clone()
    }

    /// Callbacks received (after the configured failures).
    pub fn callbacks(&self) -> Vec<serde_json::Value> {
        lock(&self.state.callbacks).clone()
    }

    /// The next `n` callbacks fail with 500.
    pub fn fail_callbacks(&self, n: usize) {
        self.state.callback_failures_left.store(n, Ordering::SeqCst);
    }

    /// `{base}/rotate/{key}`.
    pub fn rotate_url(&self, key: &str) -> String {
        format!("{}/rotate/{key}", self.base)
    }

    /// `{base}/ip`.
    pub fn ip_url(&self) -> String {
        format!("{}/ip", self.base)
    }

    /// `{base}/region/{ip}` template.
    pub fn region_url(&self) -> String {
        format!("{}/region/{{ip}}", self.base)
    }

    /// `{base}/callback`.
    pub fn callback_url(&self) -> String {
        format!("{}/callback", self.base)
    }
}

/// A real HTTP forward proxy: takes absolute-form requests (`GET http://host/path`), checks `Proxy-Authorization:
/// Basic`, forwards them and relays the answer. Answers 407 on wrong credentials.
#[derive(Debug, Clone)]
pub struct ForwardProxy {
    /// Listening address.
    pub addr: SocketAddr,
    /// The credentials it accepts.
    pub user: String,
    /// The password it accepts.
    pub password: String,
    forwarded: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct ProxyState {
    id: usize,
    expected: String,
    client: reqwest::Client,
    forwarded: Arc<AtomicUsize>,
}

async fn forward(State(s): State<ProxyState>, req: Request) -> Response {
    let given = req.headers().get("proxy-authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !s.expected.is_empty() && given != s.expected {
        return (StatusCode::PROXY_AUTHENTICATION_REQUIRED, [("proxy-authenticate", "Basic realm=\"test\"")], "")
            .into_response();
    }
    let uri = req.uri().to_string();
    if !uri.starts_with("http://") {
        return (StatusCode::BAD_REQUEST, "absolute-form http:// requests only").into_response();
    }
    s.forwarded.fetch_add(1, Ordering::SeqCst);
    match s.client.request(req.method().clone(), &uri).header(UPSTREAM_HEADER, s.id.to_string()).send().await {
        Ok(res) => {
            let status = res.status();
            let body = res.bytes().await.unwrap_or_default();
            (status, Body::from(body)).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

impl ForwardProxy {
    /// Starts a proxy that accepts `user:password` (an empty user: no authentication).
    pub async fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let expected = if user.is_empty() {
            String::new()
        } else {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
        };
        let forwarded = Arc::new(AtomicUsize::new(0));
        let state = ProxyState {
            id: UPSTREAMS.fetch_add(1, Ordering::SeqCst),
            expected,
            client: reqwest::Client::builder().no_proxy().build()?,
            forwarded: forwarded.clone(),
        };
        let app = Router::new().fallback(forward).with_state(state);
        let addr = serve(app).await?;
        Ok(Self { addr, user: user.to_owned(), password: password.to_owned(), forwarded })
    }

    /// Requests forwarded so far.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}
