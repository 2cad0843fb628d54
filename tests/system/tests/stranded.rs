//! Nothing stranded: rotation locks are leases in the lease engine (created only by a claim, renewed by their job,
//! taken back at their deadline, released on every exit), `rotated` cannot undo a newer catalogue change, a
//! repeated request id gets the same grant, leases can be renewed, a leader that dies between storing a grant and
//! answering it costs the HTTP consumer nothing, and a standby with a skewed wall clock expires nothing early.
//!
//! Every fault is placed at an exact line by a fault point (`proxypool-faults`), not found by luck.

use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, DateTime};
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseCtlLock, LeaseCtlRotated, LeaseRenew};
use proxypool_contracts::lease::{AcquireRequest, LeaseGrant, RenewRequest};
use proxypool_contracts::rotation::{LockReply, LockRequest, RotatedRequest};
use proxypool_contracts::{Area, ErrorCode, Reply};
use proxypool_store::model::{ProxyDoc, ProxyStatus};
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::Value;

type R<T = ()> = anyhow::Result<T>;

fn claim(proxy: ObjectId, job: &str, ttl_ms: Option<u64>) -> LockRequest {
    LockRequest { claim: true, ..LockRequest::check(&proxy.to_hex(), job, ttl_ms) }
}

fn restart(proxy: ObjectId, job: &str) -> LockRequest {
    LockRequest { restart: true, ..LockRequest::check(&proxy.to_hex(), job, None) }
}

fn rotated(proxy: ObjectId, job: &str, reset: bool) -> RotatedRequest {
    RotatedRequest { proxy_id: proxy.to_hex(), job_id: job.to_owned(), reset }
}

async fn lock(app: &TestApp, req: &LockRequest) -> R<Result<LockReply, ErrorCode>> {
    Ok(app.call::<LeaseCtlLock>(req).await?.into_result().map_err(|e| e.code))
}

async fn acquire_code(app: &TestApp) -> R<Result<LeaseGrant, ErrorCode>> {
    Ok(app.nats_acquire("vn", "c").await?.into_result().map_err(|e| e.code))
}

/// Waits until MongoDB's document of `id` satisfies `done`.
async fn wait_doc(app: &TestApp, id: ObjectId, what: &str, secs: u64, done: impl Fn(&ProxyDoc) -> bool) -> R<ProxyDoc> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let d = app.proxy(&id.to_hex()).await?;
        if done(&d) {
            return Ok(d);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_claim_creates_a_rotation_lock_and_a_released_one_is_never_resurrected() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let id = app.all_proxies().await?[0].id;
    // A check or a restart of a lock nobody holds creates nothing.
    assert_eq!(lock(&app, &LockRequest::check(&id.to_hex(), "job-1", None)).await?.err(), Some(ErrorCode::Conflict));
    assert_eq!(lock(&app, &restart(id, "job-1")).await?.err(), Some(ErrorCode::Conflict));
    assert!(acquire_code(&app).await?.is_ok(), "still leasable");
    // A claim does; another job cannot take it.
    let held = lock(&app, &claim(id, "job-1", None)).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    assert_eq!(held.in_use, 1);
    assert!(held.deadline_ms > held.since_ms, "the lock has a deadline: {held:?}");
    assert_eq!(lock(&app, &claim(id, "job-2", None)).await?.err(), Some(ErrorCode::Conflict));
    assert_eq!(acquire_code(&app).await?.err(), Some(ErrorCode::NoProxyAvailable), "no lease while locked");
    // MongoDB's projection names the job (from the engine, not from the rotator).
    wait_doc(&app, id, "the projected lock", 10, |d| d.is_rotating && d.rotation_job.as_deref() == Some("job-1"))
        .await?;
    // The rotation finishes; a redelivered copy of the same job (its drain poll, its restart) must not lock again.
    app.call::<LeaseCtlRotated>(&rotated(id, "job-1", true)).await?.into_result()?;
    assert_eq!(lock(&app, &restart(id, "job-1")).await?.err(), Some(ErrorCode::Conflict));
    assert_eq!(lock(&app, &LockRequest::check(&id.to_hex(), "job-1", None)).await?.err(), Some(ErrorCode::Conflict));
    let again = app.call::<LeaseCtlRotated>(&rotated(id, "job-1", true)).await?.into_result().err();
    assert_eq!(again.map(|e| e.code), Some(ErrorCode::Conflict));
    assert!(acquire_code(&app).await?.is_ok(), "leasable after the rotation, and not locked again");
    app.settle().await;
    assert!(!app.proxy(&id.to_hex()).await?.is_rotating);
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lock_is_taken_back_at_its_deadline_and_a_renewed_one_is_kept() -> R {
    let app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    let ids: Vec<ObjectId> = app.all_proxies().await?.iter().map(|p| p.id).collect();
    let (lost, kept) = (ids[0], ids[1]);
    let ttl = Some(1_000);
    lock(&app, &claim(lost, "job-lost", ttl)).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    lock(&app, &claim(kept, "job-kept", ttl)).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    // The kept job renews its lock as a working job does (a poll every 250 ms); the lost one never does.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_500) {
        let renewed = lock(&app, &LockRequest::check(&kept.to_hex(), "job-kept", ttl)).await?;
        assert!(renewed.is_ok(), "a renewed lock is kept: {renewed:?} after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Taken back by the leader, logged: the proxy is back in service and the lost job can no longer use it.
    let check = LockRequest::check(&lost.to_hex(), "job-lost", ttl);
    assert_eq!(lock(&app, &check).await?.err(), Some(ErrorCode::Conflict));
    let g = acquire_code(&app).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    assert_eq!(g.id, lost.to_hex(), "only the proxy whose lock was taken back is leasable");
    wait_doc(&app, lost, "the unlock in MongoDB", 10, |d| !d.is_rotating).await?;
    // Once its job stops renewing, the kept lock goes the same way.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        lock(&app, &LockRequest::check(&kept.to_hex(), "job-kept", ttl)).await?.err(),
        Some(ErrorCode::Conflict)
    );
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_between_lock_and_rotated_keeps_the_lock_and_its_job() -> R {
    let mut app = TestApp::builder().seed(Area::Vn, 1).lease_instances(2).spawn().await?;
    let id = app.all_proxies().await?[0].id;
    lock(&app, &claim(id, "job-f", None)).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    // The leader goes; the lock, its job and its deadline are in the log, so the next leader holds them.
    let leader = app
        .lease_replicas()
        .iter()
        .position(|r| *r.service.engine().serving().borrow())
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    app.stop_lease(leader).await?;
    app.start_lease().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        match lock(&app, &LockRequest::check(&id.to_hex(), "job-f", None)).await? {
            Ok(l) => break l,
            Err(ErrorCode::ServiceUnavailable) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(c) => anyhow::bail!("the lock did not survive the failover: {c:?}"),
        }
    };
    assert_eq!(held.in_use, 0);
    assert_eq!(acquire_code(&app).await?.err(), Some(ErrorCode::NoProxyAvailable), "still locked");
    app.call::<LeaseCtlRotated>(&rotated(id, "job-f", true)).await?.into_result()?;
    assert!(acquire_code(&app).await?.is_ok());
    app.settle().await;
    let d = app.proxy(&id.to_hex()).await?;
    assert!(!d.is_rotating && d.rotation_job.as_deref() == Some("job-f"), "{d:?}");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_synced_between_rotateds_read_and_its_commit_wins() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let id = app.all_proxies().await?[0].id;
    let held = app.nats_acquire_eventually("vn", "holder").await?;
    lock(&app, &claim(id, "job-d", None)).await?.map_err(|c| anyhow::anyhow!("{c:?}"))?;
    // The rotation stores its result (a new public IP), then tells the lease service; its read is held at the point.
    app.update_proxy(
        id,
        doc! { "$set": { "ip_public": "198.51.100.9", "status": i32::from(ProxyStatus::Completed),
        "updatedAt": DateTime::now() } },
    )
    .await?;
    let gate = proxypool_faults::pause(&format!("lease.rotated.read:{id}"));
    let client = app.client.clone();
    let finishing =
        tokio::spawn(
            async move { proxypool_rpc::call::<LeaseCtlRotated>(&client, &rotated(id, "job-d", false)).await },
        );
    tokio::time::timeout(Duration::from_secs(10), gate.reached()).await?;
    // An admin disables the proxy meanwhile (written later than the rotation's read, and synced).
    tokio::time::sleep(Duration::from_millis(5)).await;
    app.update_proxy(id, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    app.announce(id).await?;
    gate.release();
    finishing.await??;
    // The older read did not bring the proxy back: disabled, its lease taken, not leasable.
    assert_eq!(acquire_code(&app).await?.err(), Some(ErrorCode::NoProxyAvailable));
    let late = app.nats_release(&held.id, &held.key).await?.into_result().err();
    assert_eq!(late.map(|e| e.code), Some(ErrorCode::NotFound), "the disable took the lease");
    app.settle().await;
    let d = app.proxy(&id.to_hex()).await?;
    assert!(!d.is_active && !d.is_rotating && d.in_use == 0, "{d:?}");
    app.shutdown().await;
    Ok(())
}

/// A rotator against `fake`, with a lock TTL far longer than the test: a lock released by a failed step is
/// released at once, not at its deadline.
async fn rotator_world(max_deliver: i64) -> R<(TestApp, FakeWorld, ForwardProxy, proxypool_rotator::RotatorConfig)> {
    let app = TestApp::builder().spawn().await?;
    let fake = FakeWorld::start().await?;
    let proxy = ForwardProxy::start("puser", "ppass").await?;
    let mut config = app.rotator_config(&fake);
    config.lock_ttl = Duration::from_secs(120);
    config.max_deliver = max_deliver;
    Ok((app, fake, proxy, config))
}

fn is_rotated(d: &ProxyDoc) -> bool {
    !d.is_rotating && d.status == ProxyStatus::Completed && d.ip_public.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_failing_after_its_lock_was_logged_releases_it() -> R {
    let (app, fake, proxy, config) = rotator_world(10).await?;
    fake.answer("c1", 200, "{}");
    let id = app.insert_proxy_behind(Area::Vn, &proxy, fake.rotate_url("c1"), |_| {}).await?;
    // The first claim's write to MongoDB fails after the lease service logged its lock.
    proxypool_faults::fail(&format!("rotator.claim.locked:{id}"), 1);
    let started = Instant::now();
    let rotator = app.start_rotator(config).await?;
    let d = wait_doc(&app, id, "the rotation after the failed claim", 20, is_rotated).await?;
    // The next scan claimed it again: the failed claim's lock was released, not left for its 120 s deadline.
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert_eq!(fake.calls("c1"), 1, "rotated once");
    assert!(d.rotation_job.is_some());
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_given_up_after_its_last_delivery_releases_its_lock() -> R {
    let (app, fake, proxy, config) = rotator_world(2).await?;
    fake.answer("g1", 200, "{}");
    let id = app.insert_proxy_behind(Area::Vn, &proxy, fake.rotate_url("g1"), |_| {}).await?;
    // Both deliveries of the first job fail after taking the lock: JetStream gives the job up.
    proxypool_faults::fail(&format!("rotator.job.locked:{id}"), 2);
    let rotator = app.start_rotator(config).await?;
    let first = wait_doc(&app, id, "the first claim", 10, |d| d.is_rotating).await?;
    let d = wait_doc(&app, id, "a rotation by a later claim", 30, is_rotated).await?;
    assert_ne!(d.rotation_job, first.rotation_job, "the given-up job's lock was released and the proxy claimed again");
    assert_eq!(fake.calls("g1"), 1, "the given-up job never called the provider");
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_gets_the_same_grant_and_only_while_it_is_held() -> R {
    let app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some("retrying".into()),
        request_id: Some("req-1".into()),
        ..Default::default()
    };
    let first = app.call::<LeaseAcquire>(&req).await?.into_result()?;
    let again = app.call::<LeaseAcquire>(&req).await?.into_result()?;
    assert_eq!((&again.id, &again.key), (&first.id, &first.key), "the same grant");
    assert_eq!(again.leased_at, first.leased_at);
    app.settle().await;
    let held: i32 = app.all_proxies().await?.iter().map(|p| p.in_use).sum();
    assert_eq!(held, 1, "one lease, not two");
    // Returned (or taken), the id no longer names a held lease: a repeat is a new request.
    app.nats_release(&first.id, &first.key).await?.into_result()?;
    let fresh = app.call::<LeaseAcquire>(&req).await?.into_result()?;
    assert_ne!(fresh.key, first.key);
    // A malformed id is refused, naming the field, and grants nothing.
    let bad = AcquireRequest { request_id: Some("no spaces allowed".into()), ..req.clone() };
    let e = app.call::<LeaseAcquire>(&bad).await?.into_result().err();
    assert_eq!(e.and_then(|e| e.field).as_deref(), Some("request_id"));
    app.settle().await;
    let held: i32 = app.all_proxies().await?.iter().map(|p| p.in_use).sum();
    assert_eq!(held, 1);
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_lease_outlives_its_ttl_and_an_unrenewed_one_does_not() -> R {
    let app = TestApp::builder().seed(Area::Vn, 2).lease_ttl(Duration::from_secs(2)).spawn().await?;
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::OK);
    let kept: Value = res.json().await?;
    let dropped: Value = app.http_get_proxy("vn").await?.json().await?;
    assert!(kept["expires_at"].is_string(), "every grant says when it expires: {kept}");
    let (id, key) = (kept["id"].as_str().unwrap_or_default(), kept["key"].as_str().unwrap_or_default());
    let renew_url = app.url(&format!("/webhook/renew-proxy/{id}?key={key}"));
    let mut last_expiry = kept["expires_at"].as_str().unwrap_or_default().to_owned();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let res = app.http.post(&renew_url).header("Authorization", proxypool_system_tests::API_KEY).send().await?;
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await?;
        let expiry = body["expires_at"].as_str().unwrap_or_default().to_owned();
        assert!(expiry > last_expiry, "each renewal moves the expiry: {expiry} after {last_expiry}");
        assert_eq!(body["next_rotate"], kept["next_rotate"], "a renewal says when the proxy rotates: {body}");
        last_expiry = expiry;
    }
    // 3.2 s after the grant (TTL 2 s): the renewed lease is held, the other was taken back.
    let res = app.http_return(id, key).await?;
    assert_eq!(res.status(), StatusCode::OK, "{}", res.text().await?);
    let res = app
        .http_return(dropped["id"].as_str().unwrap_or_default(), dropped["key"].as_str().unwrap_or_default())
        .await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // A renewal of a lease that is gone says so, over HTTP and NATS alike; a bad key is a 400 naming it.
    let res = app.http.post(&renew_url).header("Authorization", proxypool_system_tests::API_KEY).send().await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let over_nats = RenewRequest { proxy_id: Some(id.to_owned()), key: Some(key.to_owned()) };
    let e = app.call::<LeaseRenew>(&over_nats).await?.into_result().err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::NotFound));
    let bad = app.url(&format!("/webhook/renew-proxy/{id}?key=nope"));
    let res = app.http.post(&bad).header("Authorization", proxypool_system_tests::API_KEY).send().await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await?;
    assert_eq!(body["error"]["field"], "key", "{body}");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_between_storing_a_grant_and_answering_it_costs_the_http_consumer_nothing() -> R {
    let app = TestApp::builder().lease_instances(0).seed(Area::Vn, 3).spawn().await?;
    // The first replica leads and dies at the exact line: its grant is in the log, its answer never sent.
    let mut doomed =
        app.spawn_lease_process("doomed", &[proxypool_faults::abort_env(&["lease.grant.appended"])], &[]).await?;
    doomed.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    let mut standby = app.spawn_lease_process("standby", &[], &[]).await?;
    let started = Instant::now();
    let res = app.http_get_proxy("vn").await?;
    let took = started.elapsed();
    assert_eq!(res.status(), StatusCode::OK, "the consumer saw an error: {}", res.text().await?);
    let grant: Value = res.json().await?;
    assert!(doomed.child.try_wait()?.is_some(), "the leader died at the fault point");
    standby.wait_to_lead(&app.http, Duration::from_secs(5)).await?;
    eprintln!("grant answered through the failover in {took:?}");
    // The one grant the dead leader stored is the one the consumer got: nothing is held by nobody.
    let (id, key) = (grant["id"].as_str().unwrap_or_default(), grant["key"].as_str().unwrap_or_default());
    let outcome: Value = app.http_return(id, key).await?.json().await?;
    assert_eq!(outcome["in_use"], 0, "{outcome}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: i32 = app.all_proxies().await?.iter().map(|p| p.in_use).sum();
        if held == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{held} leases held by nobody");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    doomed.kill().await;
    standby.kill().await;
    Ok(())
}

/// A grant whose answer misses its caller's deadline, while the caller already asks again with the same request id,
/// stays the caller's: the retry is answered this grant, and its return finds it. (The server used to withdraw such a
/// grant after the retry, waiting in the engine behind it, had been answered it: the consumer then held a lease that
/// was gone, and its return answered 404. Chaos caught it about once in 20 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_past_its_deadline_stays_with_the_retry_that_collects_it() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).proxy_use_max(1).spawn().await?;
    let request_id = proxypool_contracts::lease::new_request_id();
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some("c".into()),
        request_id: Some(request_id.clone()),
        ..Default::default()
    };
    let gate = proxypool_faults::pause(&format!("lease.grant.appended:{request_id}"));
    let (client, first_req) = (app.client.clone(), req.clone());
    let first = tokio::spawn(async move {
        proxypool_rpc::call_within::<LeaseAcquire>(&client, &first_req, Some(Duration::from_millis(300))).await
    });
    // Stored, not yet answered; the caller's 300 ms pass.
    if tokio::time::timeout(Duration::from_secs(10), gate.reached()).await.is_err() {
        anyhow::bail!("the grant never reached the fault point; the first call answered {:?}", first.await?);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The caller asks again with the same id; its request waits in the engine behind the paused commit.
    let (client, again) = (app.client.clone(), req.clone());
    let retry = tokio::spawn(async move {
        proxypool_rpc::call_within::<LeaseAcquire>(&client, &again, Some(Duration::from_secs(5))).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.release();
    assert!(first.await?.is_err(), "the first answer came after its caller's deadline");
    let grant = retry.await??;
    // Give a withdrawal, if one were made, the time to land; then the consumer returns what it holds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let returned = app.nats_release(&grant.id, &grant.key).await?.into_result();
    assert!(returned.is_ok(), "the retry's grant was gone at its return: {returned:?}");
    // One grant made, counted once, returned: nothing held.
    app.settle().await;
    let d = app.proxy(&grant.id).await?;
    assert!(d.in_use == 0 && d.proxy_used.is_empty() && d.used_count == 1, "{d:?}");
    app.shutdown().await;
    Ok(())
}

/// libfaketime's preload library, as Debian installs it.
fn libfaketime() -> R<String> {
    let out = std::process::Command::new("dpkg").args(["-L", "libfaketime"]).output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with("libfaketime.so.1"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("libfaketime is not installed (scripts/bootstrap.sh installs faketime)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_its_clock_90_s_ahead_takes_over_without_expiring_anything_early() -> R {
    let app =
        TestApp::builder().lease_instances(0).seed(Area::Vn, 3).lease_ttl(Duration::from_secs(60)).spawn().await?;
    let preload = libfaketime()?;
    let skew = [
        ("LD_PRELOAD", preload.clone()),
        ("FAKETIME", "+90s".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ];
    // The skew is real: a process under the same settings reads a wall clock 90 s ahead.
    let date =
        std::process::Command::new("date").arg("+%s").envs(skew.iter().map(|(k, v)| (*k, v.as_str()))).output()?;
    let skewed: i64 = String::from_utf8_lossy(&date.stdout).trim().parse()?;
    let now = chrono::Utc::now().timestamp();
    assert!(skewed - now >= 85, "libfaketime did not shift the clock: {skewed} vs {now}");

    let mut leader = app.spawn_lease_process("on-time", &[], &[]).await?;
    leader.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    let mut ahead = app.spawn_lease_process("ahead", &skew, &[]).await?;
    let mut grants = Vec::new();
    for i in 0..3 {
        grants.push(app.nats_acquire_eventually("vn", &format!("holder-{i}")).await?);
    }
    leader.kill().await;
    ahead.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    // Give the new leader's reaper its ticks: on its own wall clock every lease would be 90 s old.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for g in &grants {
        let res = app.nats_release(&g.id, &g.key).await?;
        assert!(matches!(res, Reply::Ok(_)), "lease {} expired early on the skewed standby: {res:?}", g.key);
    }
    // Its own grants expire a TTL from now on the log's clock, not 90 s later.
    let g = app.nats_acquire_eventually("vn", "after").await?;
    let expires = g.expires_at.map(|t| t.timestamp()).unwrap_or_default();
    let expected = chrono::Utc::now().timestamp() + 60;
    assert!((expires - expected).abs() <= 5, "expires_at {expires}, expected about {expected}");
    ahead.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_fenced_by_a_newer_term_steps_down_at_once() -> R {
    use proxypool_lease::engine::log::{Batch, LeaseLog};
    let app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    let engine = app.lease_replicas()[0].service.engine().clone();
    assert!(*engine.serving().borrow());
    // Another replica opens a newer term (as after a lost election entry): its barrier lands in the log.
    let log = LeaseLog::open(&app.client, 1, Duration::from_secs(2), &app.store_config.database).await?;
    let (_, last) = log.bounds().await?;
    log.append(last, &Batch::new("usurper", 1_000, 0, Vec::new())).await?;
    // The old leader's next commit is fenced; it reads the newer term and stops leading there and then, instead of
    // leading on until its election entry runs out (the two would refuse each other in turn).
    let fenced = acquire_code(&app).await?;
    assert_eq!(fenced.err(), Some(ErrorCode::ServiceUnavailable));
    let mut serving = engine.serving();
    tokio::time::timeout(Duration::from_millis(500), serving.wait_for(|s| !*s)).await??;
    // With nobody else standing, it is elected again and opens a term above the usurper's.
    tokio::time::timeout(Duration::from_secs(10), serving.wait_for(|s| *s)).await??;
    // (It subscribes a moment after it leads: until then nobody answers.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let g = loop {
        match app.nats_acquire("vn", "after").await {
            Ok(Reply::Ok(g)) => break g,
            other if Instant::now() < deadline => {
                tracing::debug!(?other, "not serving yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => anyhow::bail!("the re-elected leader does not serve: {other:?}"),
        }
    };
    app.nats_release(&g.id, &g.key).await?.into_result()?;
    let (_, end) = log.bounds().await?;
    let mut reader = log.read_from(end).await?;
    let newest = futures::StreamExt::next(&mut reader).await.ok_or_else(|| anyhow::anyhow!("log ended"))?;
    let (_, batch) = newest.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(batch.epoch > 1_000, "the new term is above the usurper's: {batch:?}");
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_after_storing_a_disable_still_delivers_its_callback_once() -> R {
    let app = TestApp::builder().lease_instances(0).seed(Area::Vn, 1).callback_allow_private(true).spawn().await?;
    let fake = FakeWorld::start().await?;
    let id = app.all_proxies().await?[0].id;
    // The leader dies at the exact line: the disable (and its notice) is in the log, nothing was queued or answered.
    let mut doomed = app
        .spawn_lease_process("doomed-notice", &[proxypool_faults::abort_env(&["lease.notices.appended"])], &[])
        .await?;
    doomed.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    let mut standby = app.spawn_lease_process("standby-notice", &[], &[]).await?;
    let held = app.nats_acquire_with_callback("vn", "holder", &fake.callback_url()).await?.into_result()?;
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    // The write is stored; its sync's answer never comes (the leader is gone), but its effect is in the log.
    let disabled = app.update_proxy(id, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await;
    assert!(disabled.is_err(), "the leader answered the sync: it did not die at the fault point");
    standby.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    assert!(doomed.child.try_wait()?.is_some(), "the leader died at the fault point");
    // The next leader delivers what the log holds and nobody marked sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.callbacks().is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "the callback notice was lost with the leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Marked sent once queued: no second delivery follows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = fake.callbacks();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["reason"], "proxy_disabled");
    assert_eq!(got[0]["key"], held.key.as_str());
    let expected_id = format!("{}-{}-proxy_disabled", id.to_hex(), held.key);
    assert_eq!(got[0]["id"], expected_id.as_str(), "each notice carries its id for de-duplication");
    // The disable itself held: nothing is leased.
    assert_eq!(acquire_code(&app).await?.err(), Some(ErrorCode::NoProxyAvailable));
    rotator.stop().await;
    doomed.kill().await;
    standby.kill().await;
    Ok(())
}
