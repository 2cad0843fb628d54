//! Lifecycle: a rolling restart of the gateway and of the lease service under a stream of leases loses no request;
//! the real gateway binary stops on SIGTERM with exit code 0 and flushes its spans to an OTLP collector.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use proxypool_contracts::{Area, Reply};
use proxypool_system_tests::app::{nats_call, API_KEY};
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::Value;

type R<T = ()> = anyhow::Result<T>;

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    retryable: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(what);
    }
}

/// The load balancer: the gateways currently in rotation.
type Endpoints = Arc<RwLock<Vec<SocketAddr>>>;

fn pick(endpoints: &Endpoints, n: usize) -> Option<SocketAddr> {
    let e = endpoints.read().ok()?;
    (!e.is_empty()).then(|| e[n % e.len()])
}

/// One HTTP consumer: lease, then return, until told to stop. A 503 with `Retry-After` is retried (that is what it
/// is for); anything else that is not a success — including a connection error — is a lost request.
async fn http_consumer(
    http: reqwest::Client,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    id: usize,
) {
    let mut n = id;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Some(gw) = pick(&endpoints, n) else { continue };
        let res = http.get(format!("http://{gw}/api/get-proxy?area=vn")).header("Authorization", API_KEY).send().await;
        let lease: Value = match res {
            Ok(r) if r.status() == StatusCode::OK => r.json().await.unwrap_or(Value::Null),
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE && r.headers().contains_key("retry-after") => {
                tally.retryable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(r) => {
                tally.fail(format!("lease via {gw}: {} {}", r.status(), r.text().await.unwrap_or_default()));
                continue;
            }
            Err(e) => {
                tally.fail(format!("lease via {gw}: {e}"));
                continue;
            }
        };
        let (pid, key) = (lease["id"].as_str().unwrap_or_default(), lease["key"].as_str().unwrap_or_default());
        // The return is retried until it lands, through whichever gateway is up.
        loop {
            n += 1;
            let Some(gw) = pick(&endpoints, n) else { continue };
            let res = http
                .post(format!("http://{gw}/webhook/return-proxy/{pid}?key={key}"))
                .header("Authorization", API_KEY)
                .send()
                .await;
            match res {
                Ok(r) if r.status() == StatusCode::OK => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    tally.retryable.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(r) => {
                    tally.fail(format!("return via {gw}: {} {}", r.status(), r.text().await.unwrap_or_default()));
                    break;
                }
                Err(e) => {
                    tally.fail(format!("return via {gw}: {e}"));
                    break;
                }
            }
        }
    }
}

/// One NATS consumer: lease and return over request-reply while lease replicas come and go.
async fn nats_consumer(nc: async_nats::Client, stop: Arc<AtomicBool>, tally: Arc<Tally>, id: usize) {
    use proxypool_contracts::lease::{LeaseGrant, ReleaseOutcome};
    use proxypool_contracts::subjects::{LEASE_ACQUIRE, LEASE_RELEASE};
    while !stop.load(Ordering::Relaxed) {
        let body = serde_json::json!({"area": "vn", "consumer": format!("nats-{id}")});
        let grant = match nats_call::<LeaseGrant>(&nc, LEASE_ACQUIRE, &body).await {
            Ok(Reply::Ok(g)) => g,
            Ok(Reply::Err(e)) if e.code.is_retryable() => {
                tally.retryable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            other => {
                tally.fail(format!("nats lease: {:?}", other.map(|r| r.into_result().map(|g| g.id))));
                continue;
            }
        };
        loop {
            let body = serde_json::json!({"proxy_id": grant.id, "key": grant.key});
            match nats_call::<ReleaseOutcome>(&nc, LEASE_RELEASE, &body).await {
                Ok(Reply::Ok(_)) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Reply::Err(e)) if e.code.is_retryable() => {
                    tally.retryable.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => {
                    tally.fail(format!("nats return: {:?}", other.map(|r| r.into_result().map(|_| ()))));
                    break;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_gateway_and_lease_service_loses_no_request() -> R {
    let mut app = TestApp::builder().proxy_use_max(1_000).lease_instances(2).seed(Area::Vn, 20).spawn().await?;
    let (g1, g2) = (app.spawn_gateway().await?, app.spawn_gateway().await?);
    let endpoints: Endpoints = Arc::new(RwLock::new(vec![g1.addr, g2.addr]));
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(tokio::spawn(http_consumer(http.clone(), endpoints.clone(), stop.clone(), tally.clone(), i)));
    }
    for i in 0..3 {
        clients.push(tokio::spawn(nats_consumer(app.client.clone(), stop.clone(), tally.clone(), i)));
    }

    // Roll the gateways: take one out of the balancer, let the balancer catch up (preStop), stop it (SIGTERM),
    // bring a new one in.
    let mut gateways = vec![g1, g2];
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let old = gateways.remove(0);
        endpoints.write().map_err(|_| anyhow::anyhow!("poisoned"))?.retain(|a| *a != old.addr);
        tokio::time::sleep(Duration::from_millis(300)).await;
        old.stop().await;
        let new = app.spawn_gateway().await?;
        endpoints.write().map_err(|_| anyhow::anyhow!("poisoned"))?.push(new.addr);
        gateways.push(new);
    }
    // Roll the lease replicas: a new one comes up (index loaded) before an old one stops (SIGTERM: it drains its
    // subscriptions and answers what it already received).
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        app.start_lease().await?;
        app.stop_lease(0).await?;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }

    let failures = tally.failures.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "rolling restart: {ok} leases; retryable answers seen by the consumers: {}",
        tally.retryable.load(Ordering::Relaxed)
    );
    assert!(failures.is_empty(), "{} lost requests (of {ok} leases): {:?}", failures.len(), failures);
    assert!(ok > 100, "only {ok} leases went through");
    // Every lease was returned, and the lease fields agree with each other.
    app.assert_invariants().await?;
    let held: i32 = app.all_proxies().await?.iter().map(|p| p.in_use).sum();
    assert_eq!(held, 0);
    for g in gateways {
        g.stop().await;
    }
    app.shutdown().await;
    Ok(())
}

/// A fake OpenTelemetry collector: counts OTLP/HTTP trace exports.
async fn fake_collector() -> R<(String, Arc<AtomicUsize>)> {
    let exports = Arc::new(AtomicUsize::new(0));
    let counter = exports.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                if !body.is_empty() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), exports))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_binary_exits_0_on_sigterm_exports_its_spans_and_writes_its_log_file() -> R {
    let app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    let workdir = tempfile::tempdir()?;
    let (collector, exports) = fake_collector().await?;
    let port = proxypool_system_tests::servers::free_port()?;
    let mut child =
        tokio::process::Command::new(proxypool_test_support::process::workspace_binary("proxypool-gateway")?)
            .env_clear()
            .env("PORT", port.to_string())
            .env("ALLOWED_API_KEY", API_KEY)
            .env("API_KEY", proxypool_system_tests::app::JWT_SECRET)
            .env("IP_ALLOWED", "127.0.0.1")
            .env("NATS_URL", app.nats_server.url())
            .env("MONGODB_URI", app.mongo_server.uri())
            .env("MONGODB_DATABASE", &app.store_config.database)
            .env("LOG_WRITE_TO_FILE", "true")
            .env("LOG_FORMAT", "json")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector)
            .current_dir(workdir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !matches!(app.http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == StatusCode::OK) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the gateway binary did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = app.http.get(format!("{base}/api/get-proxy?area=vn")).header("Authorization", API_KEY).send().await?;
    assert_eq!(res.status(), StatusCode::OK);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap_or(0))?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status:?}");
    // The spans of the lease were flushed at shutdown.
    assert!(exports.load(Ordering::SeqCst) >= 1, "no OTLP export reached the collector");
    // The original design's log files: storage/log/, one JSON object per line.
    let logs: Vec<_> = std::fs::read_dir(workdir.path().join("storage/log"))?.collect::<Result<_, _>>()?;
    let file = logs.first().ok_or_else(|| anyhow::anyhow!("no log file under storage/log/"))?;
    assert!(file.file_name().to_string_lossy().starts_with("proxypool-gateway"), "{:?}", file.file_name());
    let text = std::fs::read_to_string(file.path())?;
    let first: Value = serde_json::from_str(text.lines().next().unwrap_or_default())?;
    assert!(first["level"].is_string() && first["message"].is_string(), "{first}");
    app.shutdown().await;
    Ok(())
}
