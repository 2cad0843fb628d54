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
    ("post", "/webhook/renew-proxy/{id}"),
    ("post", "/webhook/rotate-proxy/{id}"),
    ("post", "/api/outcomes"),
    ("post", "/api/register"),
    ("post", "/api/login"),
    ("get", "/api/me"),
    ("get", "/api/users/users"),
    ("post", "/api/users/users"),
    ("put", "/api/users/users/{id}"),
    ("delete", "/api/users/users/{id}"),
    ("get", "/api/proxies"),
    ("post", "/api/proxies"),
    ("get", "/api/proxies/{id}"),
    ("put", "/api/proxies/{id}"),
    ("delete", "/api/proxies/{id}"),
    ("post", "/api/proxies/bulk-delete"),
    ("post", "/api/proxies/drop"),
    ("post", "/api/proxies/{id}/rotate"),
    ("delete", "/api/proxies/{id}/bans/{domain}"),
    ("delete", "/api/proxies/{id}/quarantine"),
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

/// The statuses an operation documents.
fn documented_statuses(op: &Value) -> BTreeSet<u16> {
    op["responses"].as_object().into_iter().flatten().filter_map(|(k, _)| k.parse().ok()).collect()
}

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

    // Every status an operation can answer is documented. What it can answer follows from its shape: a path id
    // can be malformed (400) or unknown (404); a query can fail to parse (400); a JSON body can be malformed (400)
    // or over the 2 MB limit (413); a required credential can be missing (401); consumers can be outside
    // IP_ALLOWED (403); every route but the liveness probe is bounded in time and depends on NATS or MongoDB (503);
    // any route can fail with a bug (500).
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let documented = documented_statuses(op);
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let mut required = vec![500];
            if path.contains('{') {
                required.extend([400, 404]);
            }
            if params.iter().any(|p| p["in"] == "query") {
                required.push(400);
            }
            if let Some(body) = op.get("requestBody") {
                required.push(400);
                if body["content"].get("application/json").is_some() {
                    required.push(413);
                }
            }
            let security = op["security"].as_array().cloned().unwrap_or_default();
            let optional = security.iter().any(|s| s.as_object().is_some_and(|o| o.is_empty()));
            if !security.is_empty() && !optional {
                required.push(401);
            }
            if op["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "consumer")) {
                required.push(403);
            }
            if path != "/healthz" {
                required.push(503);
            }
            for status in required {
                assert!(documented.contains(&status), "{method} {path} can answer {status} but does not document it");
            }
        }
    }

    // Probes: what the server answers to a bad id, no credentials, a bad query value or an oversized body is
    // documented for that operation, and is the JSON error envelope.
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let documented = documented_statuses(op);
            let m = Method::from_bytes(method.to_uppercase().as_bytes())?;
            let good = path.replace("{id}", "65a1b2c3d4e5f60718293a4b");
            let json_body = op["requestBody"]["content"].get("application/json").is_some();
            let query: Vec<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str().map(|n| format!("{n}=not-valid")))
                .collect();
            let mut probes = vec![
                ("no credentials", app.http.request(m.clone(), app.url(&good))),
                ("bad id", app.http.request(m.clone(), app.url(&path.replace("{id}", "not-an-id")))),
                ("bad query", app.http.request(m.clone(), app.url(&format!("{good}?{}", query.join("&"))))),
            ];
            if json_body {
                let big = format!("{{\"x\": \"{}\"}}", "a".repeat(3 << 20));
                // A client of its own: the server answers before reading the whole body and closes the connection,
                // which a pooled connection would carry into the next probe.
                let own = reqwest::Client::new();
                probes.push(("oversized body", own.request(m.clone(), app.url(&good)).body(big)));
            }
            for (what, req) in probes {
                let req = if what == "no credentials" { req } else { req.header("Authorization", API_KEY) };
                let res = match req.send().await {
                    Ok(res) => res,
                    // The server may answer 413 and close before the client has written the whole body: the write
                    // then fails (broken pipe) and the answer is lost with it. Read that answer over a raw socket.
                    Err(e) if what == "oversized body" && e.is_request() => {
                        let status = oversized_status(app.addr, method, &good).await?;
                        assert_eq!(status, 413, "{method} {path} ({what}) answered {status}");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let status = res.status().as_u16();
                assert!(documented.contains(&status), "{method} {path} ({what}) answered {status}, not documented");
                if status >= 400 && path != "/readyz" {
                    let body: Value = res.json().await.unwrap_or(Value::Null);
                    assert!(body["error"]["code"].is_string(), "{method} {path} ({what}): {status} {body}");
                }
            }
        }
    }

    // The raw-socket reading of an oversized body's answer (used when the race above loses the answer) works.
    assert_eq!(oversized_status(app.addr, "post", "/api/proxies").await?, 413);
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

/// The status a request with a body over the limit gets, read from a raw socket that keeps reading the answer even
/// when the server closes before the body is written.
async fn oversized_status(addr: std::net::SocketAddr, method: &str, path: &str) -> R<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {API_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        method.to_uppercase(),
        3 << 20
    );
    s.write_all(head.as_bytes()).await?;
    let _ = s.write_all(&vec![b'a'; 3 << 20]).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    status.ok_or_else(|| anyhow::anyhow!("no HTTP answer: {text:?}"))
}
