//! The gateway over HTTP, with the lease service behind it on a real NATS and MongoDB-protocol server.

use std::time::{Duration, Instant};

use futures::future::join_all;
use proxypool_contracts::lease::{LeaseGrant, ReleaseOutcome};
use proxypool_contracts::{Area, ErrorCode, Reply};
use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};

type R<T = ()> = anyhow::Result<T>;

async fn error_of(res: reqwest::Response) -> R<(StatusCode, Value)> {
    let status = res.status();
    let body: Value = res.json().await?;
    Ok((status, body["error"].clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_and_return_over_http() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await?;
    for field in ["id", "ip", "port", "username", "password", "auth_token", "webhook_url", "key", "area"] {
        assert!(body.get(field).is_some(), "reply lacks {field}: {body}");
    }
    let grant: LeaseGrant = serde_json::from_value(body)?;
    let held = app.proxy(&grant.id).await?;
    assert_eq!(held.in_use, 1);
    assert_eq!(held.proxy_used[0].ip, "127.0.0.1", "the lease records the client IP");

    let res = app.http_return(&grant.id, &grant.key).await?;
    assert_eq!(res.status(), StatusCode::OK);
    let out: ReleaseOutcome = res.json().await?;
    assert_eq!(out.in_use, 0);
    let (status, err) = error_of(app.http_return(&grant.id, &grant.key).await?).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "a second return changes nothing");
    assert_eq!(err["code"], "not_found");
    assert_eq!(app.proxy(&grant.id).await?.in_use, 0);
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_storm_grants_exactly_the_capacity() -> R {
    let app = TestApp::builder().proxy_use_max(3).seed(Area::Global, 10).spawn().await?;
    let statuses = join_all((0..200).map(|_| app.http_get_proxy("global"))).await;
    let mut ok = 0;
    let mut busy = 0;
    for r in statuses {
        let r = r?;
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(r.headers().contains_key("retry-after"));
                let (_, e) = error_of(r).await?;
                assert_eq!(e["code"], "no_proxy_available");
                busy += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, busy), (30, 170));
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_http_give_the_same_answers() -> R {
    // PROXY_USE_MAX=2: one grant over HTTP, one over NATS, then the rotation cycle's budget is spent.
    let app = TestApp::builder().proxy_use_max(2).seed(Area::Vn, 1).spawn().await?;
    // Success: same shape and fields.
    let http: Value = app.http_get_proxy("vn").await?.json().await?;
    let h: LeaseGrant = serde_json::from_value(http.clone()).map_err(|e| anyhow::anyhow!("{e}: {http}"))?;
    app.http_return(&h.id, &h.key).await?;
    let nats = app.nats_acquire("vn", "127.0.0.1").await?.into_result()?;
    let n = serde_json::to_value(&nats)?;
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(keys(&http), keys(&n));
    assert_eq!(
        (h.id.as_str(), h.ip.as_str(), h.port, h.area),
        (nats.id.as_str(), nats.ip.as_str(), nats.port, nats.area)
    );
    // Pool exhausted: same code.
    let (status, e) = error_of(app.http_get_proxy("vn").await?).await?;
    let Reply::Err(ne) = app.nats_acquire("vn", "c").await? else { panic!("expected a refusal") };
    assert_eq!(status.as_u16(), ne.code.http_status());
    assert_eq!(e["code"], serde_json::to_value(ne.code)?);
    assert_eq!(ne.code, ErrorCode::NoProxyAvailable);
    // Bad area: same code and field.
    let (status, e) = error_of(app.http_get_proxy("mars").await?).await?;
    let Reply::Err(ne) = app.nats_acquire("mars", "c").await? else { panic!("expected a refusal") };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "invalid_input");
    assert_eq!((e["field"].as_str(), ne.field.as_deref()), (Some("area"), Some("area")));
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_auth_refuses_wrong_key_foreign_ip_and_spoofing() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let get = |key: Option<&str>, xff: Option<&str>| {
        let mut r = app.http.get(app.url("/api/get-proxy")).query(&[("area", "vn")]);
        if let Some(k) = key {
            r = r.header("Authorization", k);
        }
        if let Some(x) = xff {
            r = r.header("X-Forwarded-For", x);
        }
        r.send()
    };
    let (s, e) = error_of(get(None, None).await?).await?;
    assert_eq!((s, e["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (s, _) = error_of(get(Some("wrong-key-wrong-key-wrong"), None).await?).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = error_of(get(Some(&format!("{API_KEY}x")), None).await?).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a longer key is not the key");
    let (s, _) = error_of(
        app.http
            .post(app.url("/webhook/return-proxy/65a1b2c3d4e5f60718293a4b?key=65a1b2c3d4e5f60718293a4b"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(app.proxy(&app.all_proxies().await?[0].id.to_hex()).await?.in_use, 0, "nothing leased");
    app.shutdown().await;

    // Only 10.9.9.9 is allowed; the test connects from 127.0.0.1 and claims to be 10.9.9.9.
    let app = TestApp::builder().ip_allowed(&["10.9.9.9"]).seed(Area::Vn, 1).spawn().await?;
    let res = app
        .http
        .get(app.url("/api/get-proxy"))
        .query(&[("area", "vn")])
        .header("Authorization", API_KEY)
        .header("X-Forwarded-For", "10.9.9.9")
        .send()
        .await?;
    let (s, e) = error_of(res).await?;
    assert_eq!((s, e["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "spoofed XFF must not help");
    let (s, _) = error_of(app.http_get_proxy("vn").await?).await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "foreign IP");
    assert_eq!(app.all_proxies().await?[0].in_use, 0, "nothing leased");
    app.shutdown().await;

    // Behind a trusted reverse proxy (127.0.0.1), the forwarded address is the client.
    let app =
        TestApp::builder().ip_allowed(&["10.9.9.9"]).trusted_proxies(&["127.0.0.1"]).seed(Area::Vn, 1).spawn().await?;
    let fwd = |xff: &'static str| {
        app.http
            .get(app.url("/api/get-proxy"))
            .query(&[("area", "vn")])
            .header("Authorization", API_KEY)
            .header("X-Forwarded-For", xff)
            .send()
    };
    assert_eq!(fwd("10.9.9.9").await?.status(), StatusCode::OK);
    // The client forged the left-most entry; the proxy appended the real one.
    assert_eq!(fwd("10.9.9.9, 203.0.113.5").await?.status(), StatusCode::FORBIDDEN);
    let p = &app.all_proxies().await?[0];
    assert_eq!(p.proxy_used.len(), 1);
    assert_eq!(p.proxy_used[0].ip, "10.9.9.9");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let before = app.all_proxies().await?;
    let (s, e) =
        error_of(app.http.get(app.url("/api/get-proxy")).header("Authorization", API_KEY).send().await?).await?;
    assert_eq!((s, e["field"].as_str()), (StatusCode::BAD_REQUEST, Some("area")));
    let (s, e) = error_of(app.http_get_proxy("").await?).await?;
    assert_eq!((s, e["field"].as_str()), (StatusCode::BAD_REQUEST, Some("area")));
    let (s, e) = error_of(app.http_return("not-an-id", "65a1b2c3d4e5f60718293a4b").await?).await?;
    assert_eq!((s, e["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));
    let (s, e) = error_of(app.http_return("65a1b2c3d4e5f60718293a4b", "short").await?).await?;
    assert_eq!((s, e["field"].as_str()), (StatusCode::BAD_REQUEST, Some("key")));
    let (s, e) = error_of(app.http_return(&before[0].id.to_hex(), "65a1b2c3d4e5f60718293a4b").await?).await?;
    assert_eq!((s, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(before, app.all_proxies().await?, "nothing changed");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_creates_a_proxy_that_can_be_leased() -> R {
    let app = TestApp::builder().spawn().await?;
    let post = |path: &str, body: Value, key: &str| {
        app.http.post(app.url(path)).header("Authorization", key).json(&body).send()
    };
    // Unauthenticated.
    let (s, _) = error_of(post("/api/proxies", json!({}), "nope").await?).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let provider: Value = post(
        "/api/proxy_providers",
        json!({"name": "Acme", "account": "acme-1", "domain": "https://acme.example"}),
        API_KEY,
    )
    .await?
    .json()
    .await?;
    let package: Value = post(
        "/api/proxy_packages",
        json!({"code": "ACME_4G", "name": "Acme 4G", "price": 10.5, "proxy_provider_id": provider["id"]}),
        API_KEY,
    )
    .await?
    .json()
    .await?;
    let good = json!({
        "ip": "192.0.2.10", "port": 8080, "username": "u", "password": "p", "area": "global",
        "rotate_url": "http://rotate.example/x", "proxy_package_id": package["id"],
    });
    let bad_cases = [
        ("port", json!(70000)),
        ("port", json!(0)),
        ("area", json!("mars")),
        ("rotate_url", json!("not a url")),
        ("proxy_package_id", json!("xyz")),
        ("proxy_package_id", json!("65a1b2c3d4e5f60718293a4b")),
        ("in_use", json!(0)),
        ("used_count", json!(0)),
        ("proxy_used", json!([])),
    ];
    for (field, value) in bad_cases {
        let mut body = good.clone();
        body[field] = value.clone();
        let (s, e) = error_of(post("/api/proxies", body, API_KEY).await?).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field}={value}");
        assert_eq!(e["field"].as_str(), Some(field), "{field}={value}: {e}");
    }
    assert!(app.all_proxies().await?.is_empty(), "no bad request wrote anything");

    let res = post("/api/proxies", good, API_KEY).await?;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = res.json().await?;
    assert_eq!(created["package_name"], "Acme 4G");
    assert_eq!(created["in_use"], 0);

    // Listing hides secrets unless get_full=true.
    let list: Value =
        app.http.get(app.url("/api/proxies")).header("Authorization", API_KEY).send().await?.json().await?;
    assert_eq!(list["total"], 1);
    assert!(list["data"][0].get("password").is_none());
    let full: Value = app
        .http
        .get(app.url("/api/proxies?get_full=true"))
        .header("Authorization", API_KEY)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(full["data"][0]["password"], "p");

    // The lease service learned of it before the admin was answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = app.http_get_proxy("global").await?;
        if res.status() == StatusCode::OK {
            let g: LeaseGrant = res.json().await?;
            assert_eq!(g.id, created["id"].as_str().unwrap_or_default());
            break;
        }
        assert!(Instant::now() < deadline, "the new proxy never became leasable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.shutdown().await;
    Ok(())
}

/// Asks for a lease until one is granted, within 30 s of `dependency` coming back; every refusal meanwhile must be a
/// retryable 503.
/// Regression: after nats-server was killed and restarted on the same port, the first lease came 7-9 s after NATS was
/// back (the client's reconnect back-off had grown while the server was down). Now within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasing_resumes_within_2_s_of_nats_coming_back_after_sigkill() -> R {
    let mut app = TestApp::builder().seed(Area::Vn, 1).proxy_use_max(50).spawn().await?;
    assert_eq!(app.http_get_proxy("vn").await?.status(), StatusCode::OK);
    app.nats_server.kill();
    // Long enough for a growing back-off to pass several seconds.
    tokio::time::sleep(Duration::from_secs(8)).await;
    app.nats_server.restart()?;
    let back = Instant::now();
    loop {
        if app.http_get_proxy("vn").await?.status() == StatusCode::OK {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(2), "no lease within 2 s of NATS being back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("first lease {:?} after NATS was back", back.elapsed());
    app.shutdown().await;
    Ok(())
}

async fn wait_for_lease(app: &TestApp, dependency: &str) -> R {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = app.http_get_proxy("vn").await?;
        if res.status() == StatusCode::OK {
            return Ok(());
        }
        let (status, e) = error_of(res).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{e}");
        assert!(Instant::now() < deadline, "no recovery after {dependency} came back; last answer: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_down_give_fast_503_and_readyz_says_so() -> R {
    // Room for more leases than the test takes: recovery is what it checks, not capacity (that a 503 leaves no
    // lease behind is checked by the lease service's tests; a reply lost as NATS goes down can still leave one).
    let mut app = TestApp::builder().seed(Area::Vn, 1).proxy_use_max(10).spawn().await?;
    assert_eq!(app.http.get(app.url("/healthz")).send().await?.status(), StatusCode::OK);
    assert_eq!(app.http.get(app.url("/readyz")).send().await?.status(), StatusCode::OK);

    // Lease service gone: no responders, answered at once.
    app.stop_lease(0).await?;
    let t = Instant::now();
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    let (_, e) = error_of(res).await?;
    assert_eq!(e["code"], "service_unavailable");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    app.start_lease().await?;
    assert_eq!(app.http_get_proxy("vn").await?.status(), StatusCode::OK);

    // MongoDB down: leasing goes on (lease state lives in the lease service and its log); the admin side, which
    // needs the database, is not ready.
    app.mongo_server.stop();
    let t = Instant::now();
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let ready = app.http.get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await?;
    assert_eq!(body["mongodb"], "unavailable");
    app.mongo_server.restart()?;
    wait_for_lease(&app, "MongoDB").await?;

    // NATS down: the gateway answers 503 without waiting, and recovers when NATS is back.
    app.nats_server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let body: Value = app.http.get(app.url("/readyz")).send().await?.json().await?;
    assert_eq!(body["nats"], "unavailable");
    app.nats_server.restart()?;
    wait_for_lease(&app, "NATS").await?;
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

/// Status and `error` object of a request, asserting that the body is the JSON error envelope.
async fn envelope(req: reqwest::RequestBuilder) -> R<(StatusCode, Value)> {
    let res = req.send().await?;
    let status = res.status();
    let ctype = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let text = res.text().await?;
    assert!(ctype.starts_with("application/json"), "{status} {ctype}: {text}");
    let body: Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{e}: {text}"))?;
    let e = body["error"].clone();
    assert!(e["code"].is_string() && e["message"].is_string(), "{status}: {text}");
    Ok((status, e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_queries_paths_and_bodies_are_json_errors_naming_the_field() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let get = |path: &str| app.http.get(app.url(path)).header("Authorization", API_KEY);
    let post = |path: &str| app.http.post(app.url(path)).header("Authorization", API_KEY);
    for (req, field) in [
        (get("/api/proxies?page=abc"), "page"),
        (get("/api/proxies?page=18446744073709551616"), "page"),
        (get("/api/proxies?active=maybe"), "active"),
        (get("/api/proxy_providers?limit=1.5"), "limit"),
        (get("/api/users/users?page=-1"), "page"),
        (get("/api/get-proxy?area=vn&area=global"), "area"),
        (post("/api/proxies/import-kiot?wait=null"), "wait"),
        (post("/api/proxies/import-zing?wait=yes"), "wait"),
        (post("/webhook/return-proxy/65a1b2c3d4e5f60718293a4b?key=a&key=b"), "key"),
        (post("/api/proxies").body("{\"ip\": 5}"), "ip"),
        (post("/api/proxies").body("not json"), "body"),
        // Not a multipart form.
        (post("/api/proxies/import").json(&json!({"file": "x"})), "file"),
    ] {
        let (status, e) = envelope(req).await?;
        assert_eq!((status, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_input")), "{e}");
        assert_eq!(e["field"], field, "{e}");
    }
    // A body over the 2 MB limit is a 413 in the envelope, not axum's plain text.
    let big = format!("{{\"ip\": \"{}\"}}", "a".repeat(3 << 20));
    // On a client of its own: the server answers before reading the whole body and then closes the connection, which
    // a pooled connection would carry into the next request.
    let own = reqwest::Client::new();
    let (status, e) = envelope(own.post(app.url("/api/proxies")).header("Authorization", API_KEY).body(big)).await?;
    assert_eq!((status, e["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")), "{e}");
    // Unknown routes and wrong methods too.
    let (status, e) = envelope(get("/api/nowhere")).await?;
    assert_eq!((status, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{e}");
    let (status, e) = envelope(app.http.patch(app.url("/api/proxies")).header("Authorization", API_KEY)).await?;
    assert_eq!((status, e["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")), "{e}");
    // Authentication is still checked before the query is read.
    let (status, _) = envelope(app.http.get(app.url("/api/proxies?page=abc"))).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_ids_are_parsed_by_the_extractor_and_consumers_are_authenticated_first() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let routes = [
        ("POST", "/webhook/return-proxy/{id}?key=65a1b2c3d4e5f60718293a4b"),
        ("PUT", "/api/proxies/{id}"),
        ("DELETE", "/api/proxies/{id}"),
        ("POST", "/api/proxies/{id}/rotate"),
        ("PUT", "/api/proxy_packages/{id}"),
        ("DELETE", "/api/proxy_packages/{id}"),
        ("PUT", "/api/proxy_providers/{id}"),
        ("DELETE", "/api/proxy_providers/{id}"),
        ("PUT", "/api/users/users/{id}"),
        ("DELETE", "/api/users/users/{id}"),
        ("GET", "/api/imports/{id}"),
    ];
    for (method, route) in routes {
        for bad in ["xyz", "65a1b2c3d4e5f60718293a4", "65a1b2c3d4e5f60718293a4z", "%FF%FE"] {
            let m = reqwest::Method::from_bytes(method.as_bytes())?;
            // A malformed body too: the id is refused first, before the body is read.
            let req = app.http.request(m, app.url(&route.replace("{id}", bad))).header("Authorization", API_KEY);
            let (status, e) = envelope(req.body("{")).await?;
            assert_eq!(
                (status, e["field"].as_str()),
                (StatusCode::BAD_REQUEST, Some("id")),
                "{method} {route} {bad}: {e}"
            );
        }
    }
    // A well-formed id that names nothing gets past the extractor to the handler.
    let res = app.http_return("65a1b2c3d4e5f60718293a4b", "65a1b2c3d4e5f60718293a4b").await?;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    // Consumer credentials are checked before anything else is read: no key is a 401 whatever the input.
    let (status, e) = envelope(app.http.get(app.url("/api/get-proxy?area=mars&area=vn"))).await?;
    assert_eq!((status, e["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{e}");
    let (status, _) = envelope(app.http.post(app.url("/webhook/return-proxy/xyz"))).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.shutdown().await;

    // And a client outside IP_ALLOWED is a 403 whatever the input.
    let app = TestApp::builder().ip_allowed(&["10.0.0.0/8"]).seed(Area::Vn, 1).spawn().await?;
    let key = |r: reqwest::RequestBuilder| r.header("Authorization", API_KEY);
    for req in [
        key(app.http.get(app.url("/api/get-proxy?area=vn"))),
        key(app.http.get(app.url("/api/get-proxy?area=mars&area=vn"))),
        key(app.http.post(app.url("/webhook/return-proxy/xyz"))),
    ] {
        let (status, e) = envelope(req).await?;
        assert_eq!((status, e["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{e}");
    }
    app.shutdown().await;
    Ok(())
}
