//! The rotator against real NATS (JetStream), the MongoDB-protocol server, the lease service, and local fakes of the
//! provider, the IP echo, the geo-IP service and a real forward proxy with basic auth.

use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, DateTime};
use proxypool_contracts::{Area, ErrorCode, Reply};
use proxypool_store::model::{ProxyDoc, ProxyStatus};
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy, ProviderAnswer};
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

struct World {
    app: TestApp,
    fake: FakeWorld,
    proxy: ForwardProxy,
}

async fn world() -> R<World> {
    let app = TestApp::builder().spawn().await?;
    let fake = FakeWorld::start().await?;
    let proxy = ForwardProxy::start("puser", "ppass").await?;
    Ok(World { app, fake, proxy })
}

impl World {
    /// A proxy served by the local forward proxy, due now, rotated through `fake`'s `/rotate/{key}`.
    async fn proxy(&self, key: &str, f: impl FnOnce(&mut ProxyDoc)) -> R<ObjectId> {
        self.app.insert_proxy_behind(Area::Vn, &self.proxy, self.fake.rotate_url(key), f).await
    }

    async fn wait_for(&self, id: ObjectId, what: &str, secs: u64, done: impl Fn(&ProxyDoc) -> bool) -> R<ProxyDoc> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let d = self.app.proxy(&id.to_hex()).await?;
            if done(&d) {
                return Ok(d);
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}: {d:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn rotated(d: &ProxyDoc) -> bool {
    !d.is_rotating && d.status == ProxyStatus::Completed && d.ip_public.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_rotation_stores_the_new_address_and_resets_leases_through_the_lease_service() -> R {
    let w = world().await?;
    w.app.set_provider_name("KiotProxy").await?;
    w.fake.set_public_ip("198.51.100.77");
    // KiotProxy gives a new host:port (the same local forward proxy, found by its http field); no credentials.
    let proxy_without_auth = ForwardProxy::start("", "").await?;
    let kiot = format!(
        r#"{{"success":true,"code":200,"message":"ok","data":{{"http":"127.0.0.1:{0}","host":"127.0.0.1","httpPort":{0}}}}}"#,
        proxy_without_auth.addr.port()
    );
    w.fake.answer("k1", 200, kiot);
    let id = w.proxy("k1", |d| d.auth_token = Some("tok-123".into())).await?;
    // Two leases granted and returned: used_count = 2 must be reset by the rotation.
    for _ in 0..2 {
        let g = w.app.nats_acquire_eventually("vn", "c").await?;
        w.app.nats_release(&g.id, &g.key).await?.into_result()?;
    }
    assert_eq!(w.app.proxy(&id.to_hex()).await?.used_count, 2);

    let config = w.app.rotator_config(&w.fake);
    let admin = config.admin_addr;
    let rotator = w.app.start_rotator(config).await?;
    let d = w.wait_for(id, "rotation", 20, rotated).await?;
    assert_eq!(d.ip_public.as_deref(), Some("198.51.100.77"));
    let metrics = w.app.http.get(format!("http://{admin}/metrics")).send().await?.text().await?;
    assert!(metrics.contains(r#"proxypool_rotator_rotations_total{result="succeeded"} 1"#), "{metrics}");
    assert!(metrics.contains("proxypool_rotator_rotation_duration_seconds_count 1"), "{metrics}");
    assert!(metrics.contains("proxypool_rotator_queue_depth"), "{metrics}");
    assert_eq!((d.ip.as_str(), d.port), ("127.0.0.1", i32::from(proxy_without_auth.addr.port())));
    assert_eq!((d.username.as_str(), d.password.as_str()), ("", ""));
    assert_eq!(d.region, "HCM", "region looked up for the new public IP");
    assert!(!d.is_error);
    assert_eq!(d.status_code, Some(200));
    assert_eq!((d.in_use, d.used_count, d.proxy_used.len()), (0, 0, 0), "lease state reset by the lease service");
    let next = d.next_rotate.map_or(0, |t| t.timestamp_millis()) - DateTime::now().timestamp_millis();
    assert!((500_000..=600_000).contains(&next), "next_rotate = now + rotate_time, got +{next} ms");
    assert!(proxy_without_auth.forwarded() >= 1, "the IP was checked through the proxy");
    assert_eq!(w.fake.auth_seen().first().cloned().flatten().as_deref(), Some("Bearer tok-123"));
    // Leasable again, at the new address.
    let g = w.app.nats_acquire_eventually("vn", "c").await?;
    assert_eq!(g.port, proxy_without_auth.addr.port());
    w.app.assert_invariants().await?;
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rotate_url_and_failing_ip_check_mark_the_error() -> R {
    let w = world().await?;
    w.fake.answer("down", 500, "upstream exploded");
    let down = w.proxy("down", |_| {}).await?;
    // Zing-style: rotation answers 200, but the proxy refuses our credentials, so the IP check fails.
    w.app.set_provider_name("ZingProxy").await?;
    w.fake.answer("ok", 200, r#"{"status":"success"}"#);
    let bad_auth = w.proxy("ok", |d| d.password = "wrong".into()).await?;
    let before = w.app.proxy(&bad_auth.to_hex()).await?;

    let config = w.app.rotator_config(&w.fake);
    let admin = config.admin_addr;
    let rotator = w.app.start_rotator(config).await?;
    let d = w.wait_for(down, "failure", 20, |d| d.is_error && !d.is_rotating).await?;
    assert_eq!(d.status_code, Some(500));
    assert!(d.response.as_deref().unwrap_or_default().contains("HTTP 500"), "{:?}", d.response);
    let later = d.next_rotate.map_or(0, |t| t.timestamp_millis()) - DateTime::now().timestamp_millis();
    assert!(later > 30_000, "next_rotate moved by the back-off");

    let d = w.wait_for(bad_auth, "failure", 20, |d| d.is_error && !d.is_rotating).await?;
    assert!(d.response.as_deref().unwrap_or_default().contains("IP check failed"), "{:?}", d.response);
    assert!(d.response.as_deref().unwrap_or_default().contains("407"), "{:?}", d.response);
    assert_eq!((d.ip.clone(), d.port, d.ip_public.clone()), (before.ip, before.port, None), "address kept");
    // The reason is visible in the admin API.
    let list: serde_json::Value = w
        .app
        .http
        .get(w.app.url("/api/proxies?error=true"))
        .header("Authorization", proxypool_system_tests::app::API_KEY)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list["total"], 2);
    assert!(list["data"][0]["response"].as_str().is_some_and(|r| !r.is_empty()));
    let metrics = w.app.http.get(format!("http://{admin}/metrics")).send().await?.text().await?;
    assert!(metrics.contains(r#"proxypool_rotator_rotations_total{result="failed"} 2"#), "{metrics}");
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_active_leases_and_its_timeout_ends_it() -> R {
    let w = world().await?;
    w.fake.answer("d1", 200, "{}");
    let id = w.proxy("d1", |_| {}).await?;
    let g = w.app.nats_acquire_eventually("vn", "holder").await?;

    let rotator = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    // Claimed (no new leases), but not rotated while the lease is held.
    w.wait_for(id, "claim", 10, |d| d.is_rotating).await?;
    let refused = w.app.nats_acquire("vn", "other").await?;
    assert!(matches!(refused, Reply::Err(ref e) if e.code == ErrorCode::NoProxyAvailable), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.fake.calls("d1"), 0, "no rotate call while a lease is held");
    w.app.nats_release(&g.id, &g.key).await?.into_result()?;
    w.wait_for(id, "rotation after the return", 20, rotated).await?;
    assert_eq!(w.fake.calls("d1"), 1);
    rotator.stop().await;

    // With a short drain limit, a lease that is never returned does not block the rotation.
    w.fake.answer("d2", 200, "{}");
    let id2 = w.proxy("d2", |d| d.area = Area::Global).await?;
    let g2 = w.app.nats_acquire_eventually("global", "forgetful").await?;
    assert_eq!(g2.id, id2.to_hex());
    let mut config = w.app.rotator_config(&w.fake);
    config.drain_max = Duration::from_secs(1);
    let rotator = w.app.start_rotator(config).await?;
    let d = w.wait_for(id2, "rotation after the drain timeout", 20, rotated).await?;
    assert_eq!((d.in_use, d.proxy_used.len()), (0, 0), "the stale lease was dropped by the reset");
    let late = w.app.nats_release(&g2.id, &g2.key).await?;
    assert!(matches!(late, Reply::Err(ref e) if e.code == ErrorCode::NotFound), "{late:?}");
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_the_job_to_another() -> R {
    let w = world().await?;
    // The provider is slow: the first worker is killed while it waits for the answer.
    w.fake.default_answer(ProviderAnswer { status: 200, body: "{}".into(), delay: Duration::from_secs(2) });
    let id = w.proxy("slow", |_| {}).await?;
    let first = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.fake.calls("slow") == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the first worker never called the provider");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().await;
    let locked = w.app.proxy(&id.to_hex()).await?;
    assert!(locked.is_rotating && !rotated(&locked), "killed mid-job: still locked, not done");

    let second = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    let d = w.wait_for(id, "completion by the second worker", 30, rotated).await?;
    assert!(!d.is_rotating, "the lock is released");
    assert_eq!(d.rotation_job, locked.rotation_job, "the same job finished it, not a new claim");
    second.stop().await;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_and_two_workers_never_rotate_a_proxy_twice_at_once() -> R {
    let w = world().await?;
    w.fake.default_answer(ProviderAnswer { status: 200, body: "{}".into(), delay: Duration::from_millis(150) });
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(w.proxy(&format!("p{i}"), |d| d.rotate_time = 1).await?);
    }
    let a = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    let b = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(w.fake.max_concurrent_per_key(), 1, "a proxy was rotated twice at once");
    for i in 0..12 {
        let calls = w.fake.calls(&format!("p{i}"));
        assert!(calls >= 1, "proxy p{i} was never rotated");
    }
    // With rotate_time 1 s, proxies come due again while the others still run: the schedulers keep claiming.
    assert!(w.fake.total_calls() > 12, "no proxy was rotated a second time: {}", w.fake.total_calls());
    for id in ids {
        let d = w.app.proxy(&id.to_hex()).await?;
        assert!(!d.is_error, "{d:?}");
    }
    w.app.assert_invariants().await?;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rotate_now_queues_an_immediate_rotation() -> R {
    let w = world().await?;
    w.fake.answer("now", 200, "{}");
    let id = w
        .proxy("now", |d| d.next_rotate = Some(DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000)))
        .await?;
    let rotator = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    let url = w.app.url(&format!("/api/proxies/{id}/rotate"));
    let key = proxypool_system_tests::app::API_KEY;
    let res = w.app.http.post(&url).header("Authorization", key).send().await?;
    assert_eq!(res.status().as_u16(), 202);
    w.wait_for(id, "rotate-now", 20, rotated).await?;
    let missing = w.app.url(&format!("/api/proxies/{}/rotate", ObjectId::new()));
    assert_eq!(w.app.http.post(&missing).header("Authorization", key).send().await?.status().as_u16(), 404);
    // Disabled as an admin does it (written, then synced to the lease service, which owns the rotation lock).
    w.app.update_proxy(id, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    assert_eq!(w.app.http.post(&url).header("Authorization", key).send().await?.status().as_u16(), 409);
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}

async fn wait_callbacks(fake: &FakeWorld, n: usize) -> R<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = fake.callbacks();
        if got.len() >= n {
            return Ok(got);
        }
        anyhow::ensure!(Instant::now() < deadline, "only {} of {n} callbacks arrived", got.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_lease_is_called_back_with_retries_and_failures_are_counted() -> R {
    // The fakes listen on 127.0.0.1, so this app allows private callback targets.
    let app = TestApp::builder().callback_allow_private(true).spawn().await?;
    let fake = FakeWorld::start().await?;
    let proxy = ForwardProxy::start("puser", "ppass").await?;
    let w = World { app, fake, proxy };
    w.fake.answer("cb", 200, "{}");
    w.fake.fail_callbacks(2);
    let id = w.proxy("cb", |_| {}).await?;
    let mut g = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.is_none() {
        match w.app.nats_acquire_with_callback("vn", "c", &w.fake.callback_url()).await? {
            Reply::Ok(grant) => g = Some(grant),
            Reply::Err(e) => {
                anyhow::ensure!(Instant::now() < deadline && e.code.is_retryable(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let g = g.ok_or_else(|| anyhow::anyhow!("no lease"))?;
    let stored = w.app.proxy(&id.to_hex()).await?;
    assert_eq!(stored.proxy_used[0].callback_url.as_deref(), Some(w.fake.callback_url().as_str()));

    let mut config = w.app.rotator_config(&w.fake);
    config.drain_max = Duration::from_secs(1);
    let rotator = w.app.start_rotator(config).await?;
    let got = wait_callbacks(&w.fake, 1).await?;
    assert_eq!(got[0]["key"], g.key.as_str());
    assert_eq!(got[0]["proxy_id"], id.to_hex().as_str());
    assert_eq!(got[0]["reason"], "rotated");
    assert!(got[0].get("callback_url").is_none(), "the URL is not echoed in the body");
    let d = w.wait_for(id, "failure count", 10, |d| d.call_webhook_count == 2).await?;
    assert_eq!(d.call_webhook_count, 2, "two failed attempts before the delivery");

    // Disabling a proxy calls back its holders too.
    let g2 = w.app.nats_acquire_with_callback("vn", "c2", &w.fake.callback_url()).await?.into_result()?;
    let res = w
        .app
        .http
        .put(w.app.url(&format!("/api/proxies/{}", g2.id)))
        .header("Authorization", proxypool_system_tests::app::API_KEY)
        .json(&serde_json::json!({"is_active": false}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200);
    let got = wait_callbacks(&w.fake, 2).await?;
    assert_eq!(got[1]["reason"], "proxy_disabled");
    assert_eq!(got[1]["key"], g2.key.as_str());
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_into_the_network_are_refused() -> R {
    let w = world().await?;
    w.app.insert_proxies(Area::Vn, 1).await?;
    w.app.announce(w.app.all_proxies().await?[0].id).await?;
    for url in ["http://127.0.0.1:9/cb", "http://169.254.169.254/latest", "http://10.0.0.5/cb", "http://localhost/cb"] {
        let r = w.app.nats_acquire_with_callback("vn", "c", url).await?;
        match r {
            Reply::Err(e) => {
                assert_eq!(e.code, ErrorCode::InvalidInput, "{url}");
                assert_eq!(e.field.as_deref(), Some("callback_url"), "{url}");
            }
            Reply::Ok(_) => panic!("{url} was accepted"),
        }
    }
    // Over HTTP too.
    let res = w
        .app
        .http
        .get(w.app.url("/api/get-proxy"))
        .query(&[("area", "vn"), ("callback_url", "http://192.168.1.1/")])
        .header("Authorization", proxypool_system_tests::app::API_KEY)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(w.app.all_proxies().await?[0].in_use, 0, "nothing leased");
    // At delivery, a host name that resolves inside the network is refused as well.
    let mut config = w.app.rotator_config(&w.fake);
    config.callback_allow_private = false;
    let notice = proxypool_contracts::callback::CallbackNotice {
        id: "n-1".into(),
        callback_url: format!("http://localhost:{}/callback", w.proxy.addr.port()),
        proxy_id: ObjectId::new().to_hex(),
        key: ObjectId::new().to_hex(),
        reason: proxypool_contracts::callback::TakenReason::Rotated,
        at: chrono::Utc::now(),
    };
    let refused = proxypool_rotator::callbacks::deliver(&notice, &config).await;
    assert!(matches!(refused, Err(proxypool_rotator::callbacks::DeliveryError::Refused(_))), "{refused:?}");
    w.app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_auto_rotate_skips_the_rotate_call_and_only_checks_the_ip() -> R {
    let w = world().await?;
    // Calling this rotate URL would fail the rotation: it must not be called.
    w.fake.answer("never", 500, "must not be called");
    w.fake.set_public_ip("198.51.100.9");
    let id = w.proxy("never", |d| d.disable_auto_rotate = true).await?;
    let rotator = w.app.start_rotator(w.app.rotator_config(&w.fake)).await?;
    let d = w.wait_for(id, "IP-only check", 20, rotated).await?;
    assert_eq!(w.fake.calls("never"), 0);
    assert_eq!(d.ip_public.as_deref(), Some("198.51.100.9"));
    assert!(!d.is_error);
    rotator.stop().await;
    w.app.shutdown().await;
    Ok(())
}
