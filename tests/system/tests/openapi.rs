//! The OpenAPI document matches what the server does.

use std::collections::BTreeSet;

use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::Value;

type R<T = ()> = anyhow::Result<T>;

/// The original design's routes (docs/design.md#http-api), plus ours; every one must be documented.
const EXPECTED: &[(&str, &str)] = &[
    ("get", "/api/get-proxy"),
    ("post", "/webhook/return-proxy/{id}"),
    ("post", "/api/register"),
    ("post", "/api/login"),
    ("get", "/api/me"),
    ("get", "/api/users/users"),
    ("post", "/api/users/users"),
    ("put", "/api/users/users/{id}"),
    ("delete", "/api/users/users/{id}"),
    ("get", "/api/proxies"),
    ("post", "/api/proxies"),
    ("put", "/api/proxies/{id}"),
    ("delete", "/api/proxies/{id}"),
    ("post", "/api/proxies/bulk-delete"),
    ("post", "/api/proxies/drop"),
    ("post", "/api/proxies/{id}/rotate"),
    ("post", "/api/proxies/import"),
    ("post", "/api/proxies/import-kiot"),
    ("post", "/api/proxies/import-zing"),
    ("get", "/api/imports/{id}"),
    ("get", "/api/proxy_packages"),
    ("post", "/api/proxy_packages"),
    ("put", "/api/proxy_packages/{id}"),
    ("delete", "/api/proxy_packages/{id}"),
    ("post", "/api/proxy_packages/bulk-delete"),
    ("get", "/api/proxy_providers"),
    ("post", "/api/proxy_providers"),
    ("put", "/api/proxy_providers/{id}"),
    ("delete", "/api/proxy_providers/{id}"),
    ("post", "/api/proxy_providers/bulk-delete"),
    ("get", "/healthz"),
    ("get", "/readyz"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_the_server_serves_every_documented_one() -> R {
    let app = TestApp::builder().spawn().await?;
    let doc: Value = app.http.get(app.url("/openapi.json")).send().await?.json().await?;
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            documented.insert((method.clone(), path.clone()));
            assert!(
                op.get("responses").is_some_and(|r| r.as_object().is_some_and(|r| !r.is_empty())),
                "{method} {path}"
            );
        }
    }
    let expected: BTreeSet<(String, String)> =
        EXPECTED.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(documented, expected, "documented routes differ from the expected set");

    // Each documented operation exists on the server: never 404-for-unknown-route or 405.
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "65a1b2c3d4e5f60718293a4b");
        let m = Method::from_bytes(method.to_uppercase().as_bytes())?;
        let mut req = app.http.request(m, app.url(&concrete)).header("Authorization", API_KEY);
        if method != "get" && method != "delete" {
            req = req.json(&serde_json::json!({}));
        }
        let res = req.send().await?;
        let status = res.status();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if status == StatusCode::NOT_FOUND {
            // A 404 must be ours (a JSON error naming what was not found), not the router's.
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert_eq!(body["error"]["code"], "not_found", "{method} {path} is not routed");
        }
    }

    // Security schemes and the error schema are declared; the Swagger UI is served.
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let ui = app.http.get(app.url("/swagger/")).send().await?;
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await?.to_lowercase().contains("swagger"));
    app.shutdown().await;
    Ok(())
}
