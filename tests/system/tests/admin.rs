//! Auth and the admin API through the gateway, with the auth service behind it, on real NATS and MongoDB-protocol
//! servers.

use std::time::Duration;

use proxypool_contracts::Area;
use proxypool_system_tests::app::{API_KEY, JWT_SECRET};
use proxypool_system_tests::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

type R<T = ()> = anyhow::Result<T>;

/// Sends a request with an optional `Authorization` value and returns status and JSON body.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> R<(StatusCode, Value)> {
    let mut req = app.http.request(method, app.url(path));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status();
    let text = res.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn register_and_login(app: &TestApp, email: &str, auth: Option<&str>) -> R<String> {
    let (s, body) = call(
        app,
        Method::POST,
        "/api/register",
        auth,
        Some(json!({"email": email, "username": format!("user-{}", email.split('@').next().unwrap_or("u")), "password": "correct horse"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let (s, body) =
        call(app, Method::POST, "/api/login", None, Some(json!({"email": email, "password": "correct horse"}))).await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    Ok(body["token"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_me_and_the_bootstrap_policy() -> R {
    let app = TestApp::builder().spawn().await?;
    // The first user registers freely.
    let (s, first) = call(
        &app,
        Method::POST,
        "/api/register",
        None,
        Some(json!({"email": "Admin@Example.com", "username": "admin", "password": "correct horse"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["email"], "admin@example.com");
    assert!(first.get("password").is_none());
    // Stored as a bcrypt hash.
    let stored = app.store.users().find_one(bson::doc! {}).await?.expect("user");
    assert!(stored.password.starts_with("$2"), "bcrypt hash");
    assert_ne!(stored.password, "correct horse");

    // Wrong password and unknown email give the same 401.
    for (email, pw) in [("admin@example.com", "wrong password"), ("nobody@example.com", "correct horse")] {
        let (s, e) =
            call(&app, Method::POST, "/api/login", None, Some(json!({"email": email, "password": pw}))).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(e["error"]["message"], "invalid email or password");
    }
    let (s, login) = call(
        &app,
        Method::POST,
        "/api/login",
        None,
        Some(json!({"email": "admin@example.com", "password": "correct horse"})),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(login["token_type"], "Bearer");
    assert!(login["user"].get("password").is_none());
    let token = login["token"].as_str().unwrap_or_default().to_owned();
    let claims = proxypool_authn::verify(JWT_SECRET, &token)?;
    assert_eq!(claims.sub, first["id"].as_str().unwrap_or_default());
    let days = (claims.exp - claims.iat) / 86_400;
    assert_eq!(days, 14);

    let (s, me) = call(&app, Method::GET, "/api/me", Some(&bearer(&token)), None).await?;
    assert_eq!((s, me["username"].as_str()), (StatusCode::OK, Some("admin")));
    let (s, _) = call(&app, Method::GET, "/api/me", Some(API_KEY), None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the static key has no user");

    // After the first user, registration needs an admin.
    let second = json!({"email": "second@example.com", "username": "second", "password": "correct horse"});
    let (s, e) = call(&app, Method::POST, "/api/register", None, Some(second.clone())).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, _) = call(&app, Method::POST, "/api/register", Some("Bearer garbage"), Some(second.clone())).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&app, Method::POST, "/api/register", Some(&bearer(&token)), Some(second)).await?;
    assert_eq!(s, StatusCode::CREATED);
    app.shutdown().await;

    // ALLOW_REGISTRATION=true opens it.
    let app = TestApp::builder().allow_registration(true).spawn().await?;
    register_and_login(&app, "a@example.com", None).await?;
    register_and_login(&app, "b@example.com", None).await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_and_refuses_duplicates() -> R {
    let app = TestApp::builder().allow_registration(true).spawn().await?;
    let cases = [
        (json!({"email": "not-an-email", "username": "abc", "password": "long enough"}), "email"),
        (json!({"email": "a@example.com", "username": "x", "password": "long enough"}), "username"),
        (json!({"email": "a@example.com", "username": "abc", "password": "short"}), "password"),
        (json!({"email": "a@example.com", "username": "abc", "password": "long enough", "role": "root"}), "role"),
        (json!({"username": "abc", "password": "long enough"}), "email"),
    ];
    for (body, field) in cases {
        let (s, e) = call(&app, Method::POST, "/api/register", None, Some(body.clone())).await?;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(e["error"]["field"].as_str(), Some(field), "{body}: {e}");
    }
    assert_eq!(app.store.users().count_documents(bson::doc! {}).await?, 0, "nothing written");
    register_and_login(&app, "a@example.com", None).await?;
    let dup_email = json!({"email": "A@example.com", "username": "other", "password": "long enough"});
    let (s, e) = call(&app, Method::POST, "/api/register", None, Some(dup_email)).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::CONFLICT, Some("email")));
    let dup_name = json!({"email": "other@example.com", "username": "a", "password": "long enough"});
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/register",
        None,
        Some(json!({"email": "x@example.com", "username": "aaa", "password": "long enough"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    let (s, e) = call(
        &app,
        Method::POST,
        "/api/register",
        None,
        Some(json!({"email": "y@example.com", "username": "aaa", "password": "long enough"})),
    )
    .await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::CONFLICT, Some("username")), "{dup_name}");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tampered_and_foreign_tokens_are_refused() -> R {
    let app = TestApp::builder().spawn().await?;
    let token = register_and_login(&app, "admin@example.com", None).await?;
    let (s, _) = call(&app, Method::GET, "/api/proxies", Some(&bearer(&token)), None).await?;
    assert_eq!(s, StatusCode::OK);
    let user = proxypool_authn::verify(JWT_SECRET, &token)?.sub;

    let (expired, _) = proxypool_authn::issue(JWT_SECRET, &user, Duration::ZERO)?;
    let (foreign, _) = proxypool_authn::issue("another-secret-0123456789abcdef", &user, Duration::from_secs(600))?;
    let mut tampered = token.clone();
    let mid = tampered.len() - 10;
    tampered.replace_range(mid..mid + 1, if &token[mid..mid + 1] == "A" { "B" } else { "A" });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (what, auth) in [
        ("expired", bearer(&expired)),
        ("foreign secret", bearer(&foreign)),
        ("tampered", bearer(&tampered)),
        ("not a token", "Bearer x.y.z".to_owned()),
        ("wrong static key", "not-the-key-0123456789".to_owned()),
    ] {
        let (s, e) = call(&app, Method::GET, "/api/proxies", Some(&auth), None).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {e}");
        assert_eq!(e["error"]["code"], "unauthorized");
    }
    let (s, _) = call(&app, Method::GET, "/api/proxies", None, None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_crud() -> R {
    let app = TestApp::builder().spawn().await?;
    let token = register_and_login(&app, "admin@example.com", None).await?;
    let auth = bearer(&token);
    let (s, u) = call(
        &app,
        Method::POST,
        "/api/users/users",
        Some(&auth),
        Some(json!({"email": "ops@example.com", "username": "ops", "password": "long enough"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    let id = u["id"].as_str().unwrap_or_default().to_owned();
    let (s, list) = call(&app, Method::GET, "/api/users/users?limit=10", Some(&auth), None).await?;
    assert_eq!((s, list["total"].as_u64()), (StatusCode::OK, Some(2)));
    assert!(list["data"].as_array().is_some_and(|a| a.iter().all(|u| u.get("password").is_none())));
    let (s, _) = call(&app, Method::GET, "/api/users/users", None, None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let path = format!("/api/users/users/{id}");
    let (s, u) = call(&app, Method::PUT, &path, Some(&auth), Some(json!({"username": "operator"}))).await?;
    assert_eq!((s, u["username"].as_str()), (StatusCode::OK, Some("operator")));
    let (s, e) = call(&app, Method::PUT, &path, Some(&auth), Some(json!({"email": "admin@example.com"}))).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::CONFLICT, Some("email")));
    let (s, _) = call(&app, Method::PUT, &path, Some(&auth), Some(json!({"password": "a new long one"}))).await?;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/login",
        None,
        Some(json!({"email": "ops@example.com", "password": "a new long one"})),
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "the new password works");
    let (s, e) =
        call(&app, Method::PUT, "/api/users/users/nope", Some(&auth), Some(json!({"username": "zzz"}))).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));
    let (s, _) = call(&app, Method::DELETE, &path, Some(&auth), None).await?;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, Method::DELETE, &path, Some(&auth), None).await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_of_another_cost_still_verifies() -> R {
    let app = TestApp::builder().spawn().await?;
    let now = bson::DateTime::now();
    let hash = bcrypt::hash("legacy password", 5)?;
    app.store
        .users()
        .insert_one(proxypool_store::model::UserDoc {
            id: bson::oid::ObjectId::new(),
            email: "legacy@example.com".into(),
            username: "legacy".into(),
            password: hash,
            created_at: now,
            updated_at: now,
        })
        .await?;
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/login",
        None,
        Some(json!({"email": "legacy@example.com", "password": "legacy password"})),
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_packages_proxies_crud_with_reference_checks() -> R {
    let app = TestApp::builder().spawn().await?;
    let token = register_and_login(&app, "admin@example.com", None).await?;
    let auth = bearer(&token);
    let user_id = proxypool_authn::verify(JWT_SECRET, &token)?.sub;
    let a = Some(auth.as_str());

    let (s, prov) = call(
        &app,
        Method::POST,
        "/api/proxy_providers",
        a,
        Some(json!({"name": "Acme", "account": "acme", "domain": "https://acme.example"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED, "{prov}");
    assert_eq!(prov["created_by"].as_str(), Some(user_id.as_str()), "created_by from the JWT");
    let prov_id = prov["id"].as_str().unwrap_or_default().to_owned();
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/proxy_providers",
        a,
        Some(json!({"name": "Acme", "account": "other", "domain": "https://o.example"})),
    )
    .await?;
    assert_eq!(s, StatusCode::CONFLICT, "duplicate name");
    let (s, e) = call(
        &app,
        Method::POST,
        "/api/proxy_providers",
        None,
        Some(json!({"name": "X", "account": "x", "domain": "x"})),
    )
    .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");

    // A package needs an existing provider.
    let (s, e) = call(
        &app,
        Method::POST,
        "/api/proxy_packages",
        a,
        Some(json!({"code": "P1", "name": "Pack", "price": 1, "proxy_provider_id": "65a1b2c3d4e5f60718293a4b"})),
    )
    .await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("proxy_provider_id")));
    let (s, e) = call(
        &app,
        Method::POST,
        "/api/proxy_packages",
        a,
        Some(json!({"code": "P1", "name": "Pack", "price": -1, "proxy_provider_id": prov_id})),
    )
    .await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("price")));
    let (s, pack) = call(
        &app,
        Method::POST,
        "/api/proxy_packages",
        a,
        Some(json!({"code": "P1", "name": "Pack", "price": 1, "proxy_provider_id": prov_id})),
    )
    .await?;
    assert_eq!(s, StatusCode::CREATED);
    let pack_id = pack["id"].as_str().unwrap_or_default().to_owned();

    // A proxy needs an existing package; its name is copied.
    let proxy = json!({"ip": "192.0.2.1", "port": 8080, "username": "u", "password": "secret-pw", "area": "vn",
        "rotate_url": "http://rotate.example/1", "auth_token": "tok", "proxy_package_id": pack_id});
    let (s, p) = call(&app, Method::POST, "/api/proxies", a, Some(proxy.clone())).await?;
    assert_eq!((s, p["package_name"].as_str()), (StatusCode::CREATED, Some("Pack")), "{p}");
    let proxy_id = p["id"].as_str().unwrap_or_default().to_owned();
    let (s, p2) = call(&app, Method::POST, "/api/proxies", Some(API_KEY), Some(json!({"ip": "192.0.2.2", "port": 8081, "area": "global", "rotate_url": "https://rotate.example/2", "proxy_package_id": pack_id}))).await?;
    assert_eq!(s, StatusCode::CREATED);
    assert!(p2["created_by"].is_null(), "the static key has no user");

    // Deleting a provider or package with children is a 409 and changes nothing.
    let (s, _) = call(&app, Method::DELETE, &format!("/api/proxy_providers/{prov_id}"), a, None).await?;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) =
        call(&app, Method::POST, "/api/proxy_packages/bulk-delete", a, Some(json!({"ids": [pack_id]}))).await?;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(app.store.packages().count_documents(bson::doc! {}).await?, 2, "the seed package and ours remain");

    // Listing: secrets hidden unless get_full; filters.
    let (_, list) = call(&app, Method::GET, &format!("/api/proxies?package={pack_id}"), a, None).await?;
    assert_eq!(list["total"], 2);
    assert!(list["data"][0].get("password").is_none() && list["data"][0].get("auth_token").is_none());
    let (_, full) = call(&app, Method::GET, &format!("/api/proxies?package={pack_id}&get_full=true"), a, None).await?;
    assert_eq!(full["data"][0]["password"], "secret-pw");
    assert_eq!(full["data"][0]["auth_token"], "tok");
    for (q, n) in [
        ("area=global", 1),
        (&format!("provider={prov_id}") as &str, 2),
        ("active=false", 0),
        ("error=false", 2),
        ("limit=1&page=2", 2),
    ] {
        let (s, l) = call(&app, Method::GET, &format!("/api/proxies?{q}"), a, None).await?;
        assert_eq!(s, StatusCode::OK, "{q}");
        assert_eq!(l["total"], n, "{q}");
    }
    let (s, e) = call(&app, Method::GET, "/api/proxies?area=mars", a, None).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("area")));
    let (s, _) = call(&app, Method::GET, "/api/proxies?limit=0", a, None).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Update: validated, updated_by set; unknown id 404; malformed id 400.
    let path = format!("/api/proxies/{proxy_id}");
    let (s, u) = call(&app, Method::PUT, &path, a, Some(json!({"port": 9090, "rotate_time": 120}))).await?;
    assert_eq!((s, u["port"].as_i64(), u["rotate_time"].as_i64()), (StatusCode::OK, Some(9090), Some(120)));
    assert_eq!(u["updated_by"].as_str(), Some(user_id.as_str()));
    for (body, field) in [
        (json!({"port": 0}), "port"),
        (json!({"rotate_url": "ftp://x"}), "rotate_url"),
        (json!({"area": "moon"}), "area"),
        (json!({"proxy_package_id": "65a1b2c3d4e5f60718293a4b"}), "proxy_package_id"),
    ] {
        let (s, e) = call(&app, Method::PUT, &path, a, Some(body.clone())).await?;
        assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{body}");
    }
    let (s, _) = call(&app, Method::PUT, "/api/proxies/65a1b2c3d4e5f60718293a4b", a, Some(json!({"port": 1}))).await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, e) = call(&app, Method::PUT, "/api/proxies/xyz", a, Some(json!({"port": 1}))).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));

    // Renaming the package renames it on its proxies.
    let (s, _) =
        call(&app, Method::PUT, &format!("/api/proxy_packages/{pack_id}"), a, Some(json!({"name": "Pack 2"}))).await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(app.proxy(&proxy_id).await?.package_name, "Pack 2");

    // Drop needs the exact confirmation.
    let (s, e) = call(&app, Method::POST, "/api/proxies/drop", a, Some(json!({"confirm": "yes"}))).await?;
    assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("confirm")));
    let (s, _) = call(&app, Method::POST, "/api/proxies/drop", a, Some(json!({}))).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(app.all_proxies().await?.len(), 2);
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/proxies/bulk-delete",
        a,
        Some(json!({"ids": [proxy_id, "65a1b2c3d4e5f60718293a4b"]})),
    )
    .await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "all or nothing");
    assert_eq!(app.all_proxies().await?.len(), 2);
    let (s, d) =
        call(&app, Method::POST, "/api/proxies/drop", a, Some(json!({"confirm": "DELETE ALL PROXIES"}))).await?;
    assert_eq!((s, d["deleted"].as_u64()), (StatusCode::OK, Some(2)));

    // Now the package and then the provider can go.
    let (s, _) = call(&app, Method::DELETE, &format!("/api/proxy_packages/{pack_id}"), a, None).await?;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, Method::DELETE, &format!("/api/proxy_providers/{prov_id}"), a, None).await?;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, Method::DELETE, &format!("/api/proxy_providers/{prov_id}"), a, None).await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_fields_cannot_be_written_and_disabling_stops_leases() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let id = app.all_proxies().await?[0].id.to_hex();
    let grant = app.nats_acquire("vn", "c").await?.into_result()?;
    let before = app.proxy(&id).await?;
    assert_eq!(before.in_use, 1);
    let path = format!("/api/proxies/{id}");
    for field in ["in_use", "used_count", "proxy_used", "lease_rev", "last_used_at", "is_rotating"] {
        let (s, e) = call(&app, Method::PUT, &path, Some(API_KEY), Some(json!({ field: 0 }))).await?;
        assert_eq!((s, e["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{e}");
    }
    assert_eq!(app.proxy(&id).await?, before, "nothing changed");

    // Disabling stops new leases at once (the guard re-checks is_active), and the index catches up.
    let (s, _) = call(&app, Method::PUT, &path, Some(API_KEY), Some(json!({"is_active": false}))).await?;
    assert_eq!(s, StatusCode::OK);
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Disabling takes the proxy from its holder: the lease service drops the lease (the admin write itself never
    // touches lease fields) and keeps used_count, so the key no longer returns anything.
    let after = app.proxy(&id).await?;
    assert_eq!((after.in_use, after.used_count, after.proxy_used.len()), (0, 1, 0));
    let back = app.nats_release(&grant.id, &grant.key).await?;
    assert!(
        matches!(back, proxypool_contracts::Reply::Err(ref e) if e.code == proxypool_contracts::ErrorCode::NotFound)
    );
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

/// Regression: an admin created a proxy (201) and a consumer leased at once: 5 of 20 such leases answered 503
/// `no_proxy_available` while the lease replicas had not yet applied the change. Once a create or an enable has
/// answered, the next lease sees it, whichever of two replicas serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_or_enabled_proxy_can_be_leased_at_once_on_any_replica() -> R {
    // One lease per proxy, and no other proxy in the area: each lease can only be the proxy just written.
    let app = TestApp::builder().proxy_use_max(1).lease_instances(2).spawn().await?;
    let a = Some(API_KEY);
    let pack = app.package_id.to_hex();
    for i in 0..20 {
        let disabled = i % 4 == 3;
        let body = json!({"ip": format!("192.0.2.{}", i + 1), "port": 8080, "area": "global", "is_active": !disabled,
            "rotate_url": format!("http://rotate.example/{i}"), "proxy_package_id": pack});
        let (s, p) = call(&app, Method::POST, "/api/proxies", a, Some(body)).await?;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        let id = p["id"].as_str().unwrap_or_default().to_owned();
        if disabled {
            let path = format!("/api/proxies/{id}");
            let (s, p) = call(&app, Method::PUT, &path, a, Some(json!({"is_active": true}))).await?;
            assert_eq!(s, StatusCode::OK, "{p}");
        }
        let res = app.http_get_proxy("global").await?;
        let status = res.status();
        let lease: Value = res.json().await?;
        assert_eq!(
            status,
            StatusCode::OK,
            "lease {i} right after the {} answered: {lease}",
            if disabled { "enable" } else { "create" }
        );
        assert_eq!(lease["id"], id.as_str());
    }
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_out_of_range_are_400_naming_the_field() -> R {
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;
    let lists = ["/api/proxies", "/api/proxy_providers", "/api/proxy_packages", "/api/users/users"];
    for list in lists {
        // A page whose skip does not fit MongoDB's i64 used to reach the driver and come back as a 500.
        for (query, field) in [
            ("page=9223372036854775808", "page"),
            ("page=1000001", "page"),
            ("page=0", "page"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=-3", "limit"),
        ] {
            let (s, e) = call(&app, Method::GET, &format!("{list}?{query}"), Some(API_KEY), None).await?;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{list}?{query}: {e}");
            assert_eq!(e["error"]["code"], "invalid_input", "{list}?{query}: {e}");
            assert_eq!(e["error"]["field"], field, "{list}?{query}: {e}");
        }
        // The largest page is served (empty), with its number echoed.
        let (s, body) = call(&app, Method::GET, &format!("{list}?page=1000000&limit=500"), Some(API_KEY), None).await?;
        assert_eq!(s, StatusCode::OK, "{list}: {body}");
        assert_eq!(body["data"], json!([]), "{list}: {body}");
        assert_eq!(body["page"], 1_000_000, "{list}: {body}");
    }
    // Filters and the page are read from the same query string.
    let (s, body) = call(&app, Method::GET, "/api/proxies?area=vn&page=1&limit=1", Some(API_KEY), None).await?;
    assert_eq!((s, body["data"].as_array().map(Vec::len), body["total"].as_u64()), (StatusCode::OK, Some(1), Some(1)));
    app.shutdown().await;
    Ok(())
}
