//! The deadline contract of `proxypool-rpc`'s router, against a real `nats-server`: a request its caller gave up on is not started; a handler past the deadline learns that its caller was
//! answered `service_unavailable`; a handler that promised its answer in time is waited for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxypool_contracts::{Endpoint, ErrorCode, Reply};
use proxypool_rpc::{commit_reply, Router, ServeOptions};
use proxypool_settings::shutdown::{Shutdown, ShutdownTrigger};
use proxypool_test_support::NatsServer;

type R<T = ()> = anyhow::Result<T>;

// Test-only subjects, outside the product's `proxypool.v1` namespace.
const PROMISED: &str = "test.rpc.promised";
const LATE: &str = "test.rpc.late";

/// Commits its answer early, answers late.
struct Promised;
impl Endpoint for Promised {
    const SUBJECT: &'static str = PROMISED;
    const BOUNDED_BY_CALLER: bool = true;
    type Request = serde_json::Value;
    type Reply = String;
}

/// Commits too late.
struct Late;
impl Endpoint for Late {
    const SUBJECT: &'static str = LATE;
    const BOUNDED_BY_CALLER: bool = true;
    type Request = serde_json::Value;
    type Reply = String;
}

async fn handle(s: Arc<Seen>, subject: &'static str) -> Result<String, proxypool_contracts::ApiError> {
    s.started.fetch_add(1, Ordering::SeqCst);
    let commit_at = if subject == PROMISED { 100 } else { 1_500 };
    tokio::time::sleep(Duration::from_millis(commit_at)).await;
    if commit_reply() {
        s.promised.fetch_add(1, Ordering::SeqCst);
    } else {
        s.refused.fetch_add(1, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(1_500 - commit_at)).await;
    Ok(subject.to_owned())
}

/// Counters kept by the test handler.
#[derive(Default)]
struct Seen {
    started: AtomicUsize,
    promised: AtomicUsize,
    refused: AtomicUsize,
}

/// Serves both subjects with a 600 ms deadline. `PROMISED` asks to commit at 100 ms and answers at 1.5 s; `LATE`
/// asks to commit at 1.5 s.
async fn serve(client: async_nats::Client) -> R<(Arc<Seen>, ShutdownTrigger)> {
    let seen = Arc::new(Seen::default());
    let options =
        ServeOptions { queue_group: "test-rpc", max_in_flight: 8, deadline: Duration::from_millis(600), metrics: None };
    let router = Router::new(seen.clone())
        .on::<Promised, _, _>(|s, _| handle(s, PROMISED))
        .on::<Late, _, _>(|s, _| handle(s, LATE));
    let subscribed = router.subscribe(&client, "test-rpc").await?;
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(subscribed.run(client, options, shutdown));
    Ok((seen, trigger))
}

/// A request with an optional caller deadline `deadline_ms` from now.
async fn call(client: &async_nats::Client, subject: &'static str, deadline_ms: Option<i64>) -> R<Reply<String>> {
    let mut req = async_nats::Request::new().payload(Bytes::from_static(b"{}")).timeout(Some(Duration::from_secs(3)));
    if let Some(ms) = deadline_ms {
        let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(proxypool_contracts::subjects::DEADLINE_HEADER, (now + ms).to_string().as_str());
        req = req.headers(headers);
    }
    let msg = client.send_request(subject, req).await?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

fn assert_unavailable(reply: Reply<String>, what: &str) {
    match reply {
        Reply::Err(e) => assert_eq!(e.code, ErrorCode::ServiceUnavailable, "{what}: {e:?}"),
        Reply::Ok(v) => panic!("{what}: answered {v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_kept_and_promises_are_honoured() -> R {
    let nats = NatsServer::start()?;
    let caller = async_nats::connect(nats.url()).await?;
    let (seen, _trigger) = serve(async_nats::connect(nats.url()).await?).await?;

    // Committed in time, answered past the deadline: the caller gets the handler's answer.
    match call(&caller, PROMISED, None).await? {
        Reply::Ok(v) => assert_eq!(v, PROMISED),
        Reply::Err(e) => panic!("a promised answer was replaced: {e:?}"),
    }
    assert_eq!(seen.promised.load(Ordering::SeqCst), 1);

    // Not committed in time: `service_unavailable` at the deadline, and the handler learns it.
    let t = Instant::now();
    assert_unavailable(call(&caller, LATE, None).await?, "a late answer");
    let at = t.elapsed();
    assert!(at >= Duration::from_millis(550) && at < Duration::from_millis(1_400), "answered at {at:?}, not at 600 ms");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(seen.refused.load(Ordering::SeqCst), 1);

    // A caller's deadline shorter than the service's wins (100 ms of it are kept back for the reply).
    let t = Instant::now();
    assert_unavailable(call(&caller, LATE, Some(350)).await?, "past the caller's deadline");
    assert!(t.elapsed() < Duration::from_millis(550), "answered at {:?}, not by 250 ms", t.elapsed());

    // A caller that has already given up: the handler is not started.
    let before = seen.started.load(Ordering::SeqCst);
    assert_unavailable(call(&caller, PROMISED, Some(-1_000)).await?, "a caller that had gone");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.started.load(Ordering::SeqCst), before, "the handler ran for a caller that had gone");
    Ok(())
}
