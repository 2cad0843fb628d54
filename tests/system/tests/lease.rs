//! Lease service over NATS, against a real `nats-server -js` and the MongoDB-protocol server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bson::{doc, DateTime};
use futures::future::join_all;
use proxypool_contracts::endpoints::{LeaseCtlLock, LeaseCtlSync};
use proxypool_contracts::rotation::{LockRequest, SyncRequest};
use proxypool_contracts::{Area, ErrorCode, Reply};
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

/// Fires `n` acquires at once and counts grants and refusals per code.
async fn storm(app: &TestApp, n: usize, area: &str) -> R<(Vec<(String, String)>, HashMap<ErrorCode, usize>)> {
    let replies = join_all((0..n).map(|i| {
        let consumer = format!("consumer-{i}");
        async move { app.nats_acquire(area, &consumer).await }
    }))
    .await;
    let mut grants = Vec::new();
    let mut refused = HashMap::new();
    for r in replies {
        match r? {
            Reply::Ok(g) => grants.push((g.id, g.key)),
            Reply::Err(e) => *refused.entry(e.code).or_insert(0) += 1,
        }
    }
    Ok((grants, refused))
}

async fn check_storm(app: &TestApp) -> R {
    let (grants, refused) = storm(app, 200, "vn").await?;
    assert_eq!(grants.len(), 30, "10 proxies x PROXY_USE_MAX=3; refused: {refused:?}");
    assert_eq!(refused.get(&ErrorCode::NoProxyAvailable).copied(), Some(170), "{refused:?}");
    let mut per_proxy: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &grants {
        *per_proxy.entry(id.as_str()).or_default() += 1;
    }
    assert_eq!(per_proxy.len(), 10);
    assert!(per_proxy.values().all(|&n| n == 3), "{per_proxy:?}");
    app.assert_invariants().await?;
    for p in app.all_proxies().await? {
        assert_eq!((p.in_use, p.used_count, p.proxy_used.len()), (3, 3, 3));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_200_grants_exactly_30() -> R {
    let app = TestApp::builder().proxy_use_max(3).seed(Area::Vn, 10).spawn().await?;
    check_storm(&app).await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_with_two_lease_replicas_grants_exactly_30() -> R {
    let app = TestApp::builder().proxy_use_max(3).lease_instances(2).seed(Area::Vn, 10).spawn().await?;
    check_storm(&app).await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_and_releases_keep_invariants() -> R {
    let app = TestApp::builder().proxy_use_max(2).lease_instances(2).seed(Area::Global, 4).spawn().await?;
    // 8 workers each lease and return 10 times; with 4 proxies x 2 slots some refusals are expected, and at every
    // moment the database must hold in_use == len(proxy_used) <= 2.
    let workers = (0..8).map(|w| {
        let app = &app;
        async move {
            let mut granted = 0;
            for i in 0..10 {
                if let Reply::Ok(g) = app.nats_acquire("global", &format!("w{w}-{i}")).await? {
                    granted += 1;
                    let back = app.nats_release(&g.id, &g.key).await?;
                    assert!(matches!(back, Reply::Ok(_)), "{back:?}");
                }
            }
            R::Ok(granted)
        }
    });
    let checker = async {
        for _ in 0..10 {
            app.assert_invariants().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        R::Ok(())
    };
    let (results, checked) = tokio::join!(join_all(workers), checker);
    checked?;
    let granted: usize = results.into_iter().collect::<R<Vec<_>>>()?.into_iter().sum();
    assert!(granted > 0);
    app.assert_invariants().await?;
    for p in app.all_proxies().await? {
        assert_eq!(p.in_use, 0, "every lease was returned");
    }
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_idempotent() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let g = app.nats_acquire("vn", "c1").await?.into_result()?;
    let g2 = app.nats_acquire("vn", "c2").await?.into_result()?;
    assert_eq!(g.id, g2.id);
    assert_ne!(g.key, g2.key);
    assert_eq!(g.webhook_url, format!("http://127.0.0.1:33033/webhook/return-proxy/{}?key={}", g.id, g.key));
    let held = app.proxy(&g.id).await?;
    assert_eq!(held.in_use, 2);
    assert!(held.proxy_used.iter().any(|u| u.key == g.key && u.ip == "c1"));

    let first = app.nats_release(&g.id, &g.key).await?.into_result()?;
    assert_eq!(first.in_use, 1);
    let after_first = app.proxy(&g.id).await?;
    let second = app.nats_release(&g.id, &g.key).await?;
    match second {
        Reply::Err(e) => assert_eq!(e.code, ErrorCode::NotFound, "{e:?}"),
        Reply::Ok(o) => panic!("second release must not succeed: {o:?}"),
    }
    let after_second = app.proxy(&g.id).await?;
    assert_eq!(after_first, after_second, "the second release changed nothing");
    assert_eq!(after_second.in_use, 1);
    assert_eq!(after_second.used_count, 2, "used_count counts the cycle's grants, not the held leases");
    assert_eq!(after_second.proxy_used.len(), 1);

    // Unknown proxy and unknown key are both clear not_found errors.
    let e = app.nats_release("65a1b2c3d4e5f60718293a4b", &g2.key).await?.into_result().err();
    assert_eq!(e.as_ref().map(|e| e.code), Some(ErrorCode::NotFound));
    assert!(e.map(|e| e.message).unwrap_or_default().contains("not found"));
    let e = app.nats_release(&g.id, "65a1b2c3d4e5f60718293a4b").await?.into_result().err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::NotFound));
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_only_from_the_requested_area() -> R {
    let app = TestApp::builder().seed(Area::Vn, 2).seed(Area::Global, 3).spawn().await?;
    let (grants, _) = storm(&app, 20, "global").await?;
    assert_eq!(grants.len(), 9);
    for (id, _) in &grants {
        assert_eq!(app.proxy(id).await?.area, Area::Global);
    }
    let (grants, _) = storm(&app, 20, "vn").await?;
    assert_eq!(grants.len(), 6);
    for (id, _) in &grants {
        assert_eq!(app.proxy(id).await?.area, Area::Vn);
    }
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_locked_expired_addressless_and_overused_proxies_are_never_leased() -> R {
    let app = TestApp::builder().seed(Area::Vn, 5).spawn().await?;
    let ids: Vec<_> = app.all_proxies().await?.into_iter().map(|p| p.id).collect();
    let past = DateTime::from_millis(DateTime::now().timestamp_millis() - 60_000);
    app.update_proxy(ids[0], doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } }).await?;
    // Locked for rotation, as the rotator does it: through the lease service.
    let lock = LockRequest { claim: true, ..LockRequest::check(&ids[1].to_hex(), "job-1", None) };
    app.call::<LeaseCtlLock>(&lock).await?.into_result()?;
    // The provider subscription has ended.
    app.update_proxy(ids[2], doc! { "$set": { "expired_at": past, "updatedAt": DateTime::now() } }).await?;
    // Imported without an address yet.
    app.update_proxy(ids[3], doc! { "$set": { "ip": "", "updatedAt": DateTime::now() } }).await?;
    let (grants, _) = storm(&app, 12, "vn").await?;
    assert_eq!(grants.len(), 3, "only the fifth proxy is leasable");
    assert!(grants.iter().all(|(id, _)| *id == ids[4].to_hex()));
    for id in &ids[..4] {
        assert_eq!(app.proxy(&id.to_hex()).await?.proxy_used.len(), 0);
    }
    // Returned, but used PROXY_USE_MAX times in this rotation cycle: no new lease until it rotates.
    for (id, key) in &grants {
        app.nats_release(id, key).await?.into_result()?;
    }
    let e = app.nats_acquire("vn", "c").await?.into_result().err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::NoProxyAvailable));
    // An expired subscription is not rotated either, and the listing says why it is not leased.
    let again = LockRequest { claim: true, ..LockRequest::check(&ids[2].to_hex(), "job-2", None) };
    let refused = app.call::<LeaseCtlLock>(&again).await?.into_result().err().map(|e| e.message).unwrap_or_default();
    assert!(refused.contains("subscription has ended"), "{refused}");
    let listed = listed_proxy(&app, &ids[2].to_hex()).await?;
    assert_eq!(listed["not_leasable"], "subscription_expired", "{listed}");
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_written_behind_the_lease_service_are_applied_by_a_full_reread() -> R {
    // Written without telling the lease service: seen only at the leader's periodic full re-read
    // (LEASE_INDEX_REFRESH), which this request performs now.
    let app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    let ids: Vec<_> = app.all_proxies().await?.into_iter().map(|p| p.id).collect();
    app.store
        .proxies()
        .update_one(doc! { "_id": ids[0] }, doc! { "$set": { "is_active": false, "updatedAt": DateTime::now() } })
        .await?;
    let reply = app.call::<LeaseCtlSync>(&SyncRequest { proxy_ids: Vec::new(), full: true }).await?.into_result()?;
    assert_eq!(reply.changed, 1);
    let (grants, _) = storm(&app, 8, "vn").await?;
    assert_eq!(grants.len(), 3);
    assert!(grants.iter().all(|(id, _)| *id == ids[1].to_hex()));
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_proxy_is_leasable_once_synced() -> R {
    let app = TestApp::builder().spawn().await?;
    let e = app.nats_acquire("vn", "c").await?.into_result().err();
    assert_eq!(e.map(|e| e.code), Some(ErrorCode::NoProxyAvailable));
    let id = app.insert_proxies(Area::Vn, 1).await?[0];
    app.announce(id).await?;
    // At once: the sync answered only after the lease service applied it.
    let g = app.nats_acquire("vn", "c").await?.into_result()?;
    assert_eq!(g.id, id.to_hex());
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_change_nothing() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let before = app.all_proxies().await?;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("proxypool.v1.lease.acquire", serde_json::json!({"consumer": "c"}), "area"),
        ("proxypool.v1.lease.acquire", serde_json::json!({"area": "mars", "consumer": "c"}), "area"),
        ("proxypool.v1.lease.acquire", serde_json::json!({"area": "vn"}), "consumer"),
        (
            "proxypool.v1.lease.release",
            serde_json::json!({"proxy_id": "nope", "key": "65a1b2c3d4e5f60718293a4b"}),
            "proxy_id",
        ),
        ("proxypool.v1.lease.release", serde_json::json!({"proxy_id": "65a1b2c3d4e5f60718293a4b", "key": "x"}), "key"),
        ("proxypool.v1.lease.acquire", serde_json::json!("not an object"), "body"),
    ];
    for (subject, body, field) in cases {
        let reply: Reply<serde_json::Value> = app.nats_request(subject, &body).await?;
        let e = reply.into_result().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(ErrorCode::InvalidInput), "{subject} {body}");
        assert_eq!(e.and_then(|e| e.field).as_deref(), Some(field), "{subject} {body}");
    }
    assert_eq!(before, app.all_proxies().await?, "nothing changed");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_does_not_stop_leasing_and_the_projection_catches_up() -> R {
    let mut app = TestApp::builder().seed(Area::Vn, 2).spawn().await?;
    app.mongo_server.stop();
    // Leases live in the lease service and its log: MongoDB being down does not stop them.
    let started = Instant::now();
    let g = app.nats_acquire("vn", "c").await?.into_result()?;
    let kept = app.nats_acquire("vn", "c").await?.into_result()?;
    app.nats_release(&g.id, &g.key).await?.into_result()?;
    assert!(started.elapsed() < Duration::from_secs(2), "answered in {:?}", started.elapsed());
    app.mongo_server.restart()?;
    // Once it is back, MongoDB shows the state: the returned lease gone, the kept one held.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = app.all_proxies().await.unwrap_or_default();
        let held: Vec<&str> = shown.iter().flat_map(|p| p.proxy_used.iter().map(|u| u.key.as_str())).collect();
        if held == [kept.key.as_str()] {
            break;
        }
        assert!(Instant::now() < deadline, "the projection did not catch up: {held:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.nats_release(&kept.id, &kept.key).await?.into_result()?;
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_not_returned_within_the_ttl_are_taken_back() -> R {
    let app = TestApp::builder().proxy_use_max(2).lease_ttl(Duration::from_secs(2)).seed(Area::Vn, 1).spawn().await?;
    let forgotten = app.nats_acquire("vn", "crashed-consumer").await?.into_result()?;
    assert!(forgotten.expires_at.is_some_and(|t| t > forgotten.leased_at), "the grant says when it expires");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let fresh = app.nats_acquire("vn", "live-consumer").await?.into_result()?;
    // The first lease expires, the second (younger) one is kept.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = app.proxy(&forgotten.id).await?;
        if p.proxy_used.iter().all(|u| u.key != forgotten.key) {
            assert_eq!(p.in_use, 1);
            assert!(p.proxy_used.iter().any(|u| u.key == fresh.key), "the younger lease is kept");
            break;
        }
        assert!(Instant::now() < deadline, "the expired lease was never taken back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = app.nats_release(&forgotten.id, &forgotten.key).await?;
    assert!(matches!(late, Reply::Err(ref e) if e.code == ErrorCode::NotFound), "{late:?}");
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

/// The admin listing's entry for proxy `id`.
async fn listed_proxy(app: &TestApp, id: &str) -> R<serde_json::Value> {
    let page: serde_json::Value = app
        .http
        .get(format!("http://{}/api/proxies?limit=100", app.addr))
        .header("Authorization", proxypool_system_tests::app::API_KEY)
        .send()
        .await?
        .json()
        .await?;
    let found = page
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .filter_map(serde_json::Value::as_array)
        .flatten()
        .find(|p| p["id"] == id)
        .cloned();
    found.ok_or_else(|| anyhow::anyhow!("proxy {id} not in the listing: {page}"))
}

/// `lease.acquire` carrying a caller deadline `ms_from_now` milliseconds away (negative: already passed).
async fn acquire_with_deadline(app: &TestApp, ms_from_now: i64) -> R<Reply<proxypool_contracts::lease::LeaseGrant>> {
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis())?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(proxypool_contracts::subjects::DEADLINE_HEADER, (now + ms_from_now).to_string().as_str());
    let body = serde_json::json!({ "area": "vn", "consumer": "late-caller" });
    let req = async_nats::Request::new()
        .payload(serde_json::to_vec(&body)?.into())
        .headers(headers)
        .timeout(Some(Duration::from_secs(5)));
    let msg = app.client.send_request(proxypool_contracts::subjects::LEASE_ACQUIRE, req).await?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Waits until the store shows `n` leases on the proxy, counted the same in `in_use`, `used_count` and `proxy_used`.
async fn wait_for_leases(app: &TestApp, id: &str, n: i32) -> R {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = app.proxy(id).await?;
        let seen = (p.in_use, p.used_count, p.proxy_used.len());
        if seen == (n, n, usize::try_from(n)?) {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} leases, the store says (in_use, used_count, proxy_used) = {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_past_the_callers_deadline_leaves_no_lease() -> R {
    let app = TestApp::builder().proxy_use_max(100).seed(Area::Vn, 1).spawn().await?;
    let id = app.all_proxies().await?[0].id.to_hex();

    // The caller gave up before the request arrived (as when it was published while NATS was down): not started.
    match acquire_with_deadline(&app, -2_000).await? {
        Reply::Err(e) => assert_eq!(e.code, ErrorCode::ServiceUnavailable, "{e:?}"),
        Reply::Ok(g) => panic!("a request its caller gave up on was granted: {g:?}"),
    }
    wait_for_leases(&app, &id, 0).await?;

    // A grant stored after its caller was answered is withdrawn, the use it counted included; a second withdrawal
    // (or one after a rotation or a release) changes nothing.
    let service = &app.lease_replicas()[0].service;
    let acquire = proxypool_contracts::lease::Acquire {
        area: Area::Vn,
        consumer: "late".into(),
        callback_url: None,
        exclude: Vec::new(),
        package: None,
        door: None,
        session: None,
        request_id: None,
        domain: None,
        provider: None,
        region: None,
        count: 1,
    };
    let grant = service.acquire(&acquire).await?.pop().ok_or_else(|| anyhow::anyhow!("no grant"))?;
    wait_for_leases(&app, &id, 1).await?;
    assert!(service.withdraw(&grant).await?);
    wait_for_leases(&app, &id, 0).await?;
    assert!(!service.withdraw(&grant).await?);
    wait_for_leases(&app, &id, 0).await?;

    // End to end, with deadlines down to a few milliseconds (100 ms are kept back for the reply): whatever each
    // answer is, the store agrees with it once the request's work has ended.
    let mut granted = 0;
    for i in 0..30 {
        match acquire_with_deadline(&app, 100 + i).await? {
            Reply::Ok(_) => granted += 1,
            Reply::Err(e) => assert_eq!(e.code, ErrorCode::ServiceUnavailable, "{e:?}"),
        }
        wait_for_leases(&app, &id, granted).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_for_leases(&app, &id, granted).await?;

    // An ordinary request is still granted, and the index agrees with the store.
    assert!(matches!(app.nats_acquire("vn", "on-time").await?, Reply::Ok(_)));
    wait_for_leases(&app, &id, granted + 1).await?;
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}
