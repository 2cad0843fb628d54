//! Acquire filters: a provider (by name), a package (by code), a region, excluded ids, and `count` distinct proxies
//! in one commit, all or none. Black box over HTTP and NATS against the real lease service, NATS and the store.

use bson::oid::ObjectId;
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseAcquireMany};
use proxypool_contracts::lease::AcquireRequest;
use proxypool_contracts::{Area, ErrorCode, Reply};
use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::Value;

type R<T = ()> = anyhow::Result<T>;

/// Three proxies: `a` (the seeded provider's package, region HCM), `b` (same package, HN), `c` (package OTHER_PACK
/// of provider OtherProvider, HCM).
async fn three(max: u32) -> R<(TestApp, ObjectId, ObjectId, ObjectId)> {
    let app = TestApp::builder().proxy_use_max(max).spawn().await?;
    let package = app.insert_provider_package("OtherProvider", "OTHER_PACK", "Other package").await?;
    let a = app.insert_proxy_with(Area::Vn, |d| d.region = "HCM".into()).await?;
    let b = app.insert_proxy_with(Area::Vn, |d| d.region = "HN".into()).await?;
    let c = app
        .insert_proxy_with(Area::Vn, |d| {
            d.region = "HCM".into();
            d.proxy_package_id = package;
        })
        .await?;
    Ok((app, a, b, c))
}

/// `GET /api/get-proxy?area=vn&<query>`: status and body.
async fn get(app: &TestApp, query: &[(&str, &str)]) -> R<(StatusCode, Value)> {
    let mut q = vec![("area", "vn")];
    q.extend_from_slice(query);
    let res = app.http.get(app.url("/api/get-proxy")).query(&q).header("Authorization", API_KEY).send().await?;
    Ok((res.status(), res.json().await?))
}

/// Leases with `query` and returns at once: the proxy handed out.
async fn one(app: &TestApp, query: &[(&str, &str)]) -> R<String> {
    let (status, g) = get(app, query).await?;
    anyhow::ensure!(status == StatusCode::OK, "get-proxy {query:?}: {status} {g}");
    let (id, key) = (g["id"].as_str().unwrap_or_default(), g["key"].as_str().unwrap_or_default());
    let res = app.http_return(id, key).await?;
    anyhow::ensure!(res.status() == StatusCode::OK, "return: {}", res.text().await?);
    Ok(id.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_narrows_the_pick() -> R {
    let (app, a, b, c) = three(1_000).await?;
    let (a, b, c) = (a.to_hex(), b.to_hex(), c.to_hex());
    for _ in 0..3 {
        assert_eq!(one(&app, &[("provider", "OtherProvider")]).await?, c, "the provider's only proxy");
        assert_eq!(one(&app, &[("package", "TEST_PACK"), ("region", "HN")]).await?, b);
        assert_eq!(one(&app, &[("provider", "TestProvider"), ("region", "HCM")]).await?, a);
        let hcm = one(&app, &[("region", "HCM")]).await?;
        assert!(hcm == a || hcm == c, "{hcm}");
        assert_eq!(one(&app, &[("exclude", &format!("{a}, {c}"))]).await?, b);
    }
    // Nothing matches: the usual answer, naming the filters.
    let (status, body) = get(&app, &[("provider", "OtherProvider"), ("region", "HN")]).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "no_proxy_available");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("provider OtherProvider") && message.contains("region HN"), "{message}");
    // A package of another provider: nothing.
    let (status, _) = get(&app, &[("provider", "OtherProvider"), ("package", "TEST_PACK")]).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Unknown names are a 404, bad values a 400 naming the field.
    for (field, name) in [("provider", "Nobody"), ("package", "NOPE"), ("region", "Nowhere")] {
        let (status, body) = get(&app, &[(field, name)]).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{body}");
    }
    for (field, value) in [("exclude", "nope"), ("count", "11"), ("count", "0"), ("count", "x"), ("region", "\u{7}")] {
        let (status, body) = get(&app, &[(field, value)]).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}={value}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    // The same filters over NATS.
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some("svc".into()),
        provider: Some("OtherProvider".into()),
        ..Default::default()
    };
    match app.call::<LeaseAcquire>(&req).await? {
        Reply::Ok(g) => assert_eq!(g.id, c),
        Reply::Err(e) => anyhow::bail!("{e:?}"),
    }
    // lease.acquire grants one: a count is for lease.acquire_many.
    let many = AcquireRequest { count: Some(2), provider: None, ..req };
    match app.call::<LeaseAcquire>(&many).await? {
        Reply::Err(e) => assert_eq!(e.field.as_deref(), Some("count"), "{e:?}"),
        Reply::Ok(g) => anyhow::bail!("granted {g:?}"),
    }
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_leases_distinct_proxies_all_or_none() -> R {
    // One lease per proxy per cycle: a partial grant would show as a proxy that can no longer be leased.
    let (app, a, b, c) = three(1).await?;
    let (status, body) = get(&app, &[("count", "4")]).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "no_proxy_available");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("3 of the 4"), "{body}");
    // Nothing was taken by the refusal: three distinct proxies in one answer.
    let (status, body) = get(&app, &[("count", "3")]).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let proxies = body["proxies"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<String> = proxies.iter().map(|g| g["id"].as_str().unwrap_or_default().to_owned()).collect();
    ids.sort();
    let mut want = vec![a.to_hex(), b.to_hex(), c.to_hex()];
    want.sort();
    assert_eq!(ids, want);
    for g in &proxies {
        let res = app.http_return(g["id"].as_str().unwrap_or_default(), g["key"].as_str().unwrap_or_default()).await?;
        assert_eq!(res.status(), StatusCode::OK);
    }
    let (status, _) = get(&app, &[]).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "each proxy was used once in this cycle");
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_multi_lease_request_gets_the_same_grants() -> R {
    let (app, ..) = three(5).await?;
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some("svc".into()),
        count: Some(2),
        request_id: Some("batch-1".into()),
        ..Default::default()
    };
    let first = match app.call::<LeaseAcquireMany>(&req).await? {
        Reply::Ok(g) => g.proxies,
        Reply::Err(e) => anyhow::bail!("{e:?}"),
    };
    assert_eq!(first.len(), 2);
    assert_ne!(first[0].id, first[1].id, "distinct proxies");
    let again = match app.call::<LeaseAcquireMany>(&req).await? {
        Reply::Ok(g) => g.proxies,
        Reply::Err(e) => anyhow::bail!("{e:?}"),
    };
    let keys = |gs: &[proxypool_contracts::lease::LeaseGrant]| gs.iter().map(|g| g.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&again), keys(&first), "the same leases, not two more");
    // Without a count, lease.acquire_many refuses and names the field.
    let bare = AcquireRequest { count: None, request_id: None, ..req };
    match app.call::<LeaseAcquireMany>(&bare).await? {
        Reply::Err(e) => assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidInput, Some("count"))),
        Reply::Ok(g) => anyhow::bail!("granted {g:?}"),
    }
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}
