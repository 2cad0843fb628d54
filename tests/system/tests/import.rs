//! Imports end to end: spreadsheets generated here, uploaded through the gateway, carried through the JetStream
//! object store to the importer; provider imports against local fake KiotProxy/ZingProxy servers. Real NATS and
//! MongoDB-protocol servers throughout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use bson::doc;
use proxypool_contracts::Area;
use proxypool_importer::config::{KiotConfig, ZingConfig};
use proxypool_settings::Secret;
use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use rust_xlsxwriter::Workbook;
use serde_json::{json, Value};

type R<T = ()> = anyhow::Result<T>;

/// A sheet: header then rows, every cell written as given (numbers as numbers).
fn xlsx(rows: &[Vec<Value>]) -> R<Vec<u8>> {
    let mut book = Workbook::new();
    let sheet = book.add_worksheet();
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (r, c) = (u32::try_from(r)?, u16::try_from(c)?);
            match cell {
                Value::Number(n) => {
                    sheet.write_number(r, c, n.as_f64().unwrap_or_default())?;
                }
                Value::String(s) => {
                    sheet.write_string(r, c, s)?;
                }
                _ => {}
            }
        }
    }
    Ok(book.save_to_buffer()?)
}

/// Header in an unusual order and case, as operators write them.
fn header() -> Vec<Value> {
    ["Provider", "Package_Code", "HOST", "port", "Area", "Rotate URL", "expired_at"].iter().map(|s| json!(s)).collect()
}

fn row(host: &str, port: Value, area: &str, expired: &str) -> Vec<Value> {
    vec![
        json!("TestProvider"),
        json!("TEST_PACK"),
        json!(host),
        port,
        json!(area),
        json!(format!("https://rotate.example/{host}")),
        json!(expired),
    ]
}

async fn upload(app: &TestApp, bytes: Vec<u8>, query: &str) -> R<(StatusCode, Value, Option<String>)> {
    let part = reqwest::multipart::Part::bytes(bytes).file_name("proxies.xlsx");
    let form = reqwest::multipart::Form::new().part("file", part);
    let res = app
        .http
        .post(app.url(&format!("/api/proxies/import{query}")))
        .header("Authorization", API_KEY)
        .multipart(form)
        .send()
        .await?;
    let status = res.status();
    let location = res.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = res.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text)), location))
}

async fn post(app: &TestApp, path: &str) -> R<(StatusCode, Value)> {
    let res = app.http.post(app.url(path)).header("Authorization", API_KEY).send().await?;
    let status = res.status();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

async fn get_json(app: &TestApp, path: &str) -> R<(StatusCode, Value)> {
    let res = app.http.get(app.url(path)).header("Authorization", API_KEY).send().await?;
    let status = res.status();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

async fn proxy_count(app: &TestApp) -> R<u64> {
    Ok(app.store.proxies().count_documents(doc! {}).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_file_is_imported_listed_and_leasable() -> R {
    let app = TestApp::builder().spawn().await?;
    let _importer = app.start_importer(app.importer_config()).await?;
    let mut rows = vec![header()];
    for i in 0..5 {
        rows.push(row(&format!("198.51.100.{i}"), json!(8000 + i), "vn", "2030-01-31"));
    }
    let (s, job, location) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["counts"], json!({"created": 5, "updated": 0, "skipped": 0, "failed": 0}));
    assert_eq!(job["file_name"], "proxies.xlsx");
    assert_eq!(location.as_deref(), Some(format!("/api/imports/{}", job["id"].as_str().unwrap_or("")).as_str()));

    let (s, listed) = get_json(&app, "/api/proxies?limit=50").await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(listed["total"], 5, "{listed}");
    let d = app.all_proxies().await?;
    let p = d.iter().find(|p| p.ip == "198.51.100.3").ok_or_else(|| anyhow::anyhow!("row 5 not imported"))?;
    assert_eq!(p.port, 8003);
    assert_eq!(p.area, Area::Vn);
    assert_eq!(p.package_name, "Test package");
    assert_eq!(
        p.expired_at.map(|t| t.try_to_rfc3339_string().unwrap_or_default()).as_deref(),
        Some("2030-01-31T00:00:00Z")
    );

    // The lease replicas heard of the new proxies.
    let grant = app.nats_acquire_eventually("vn", "consumer-1").await?;
    assert!(grant.ip.starts_with("198.51.100."), "{grant:?}");

    // The job can be read back.
    let (s, again) = get_json(&app, &format!("/api/imports/{}", job["id"].as_str().unwrap_or(""))).await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["counts"], job["counts"]);
    let (s, missing) = get_json(&app, "/api/imports/0123456789abcdef01234567").await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "{missing}");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_listed_with_their_number_and_reason_and_good_rows_imported() -> R {
    let app = TestApp::builder().spawn().await?;
    let _importer = app.start_importer(app.importer_config()).await?;
    let mut unknown_package = row("198.51.100.12", json!(8012), "vn", "");
    unknown_package[1] = json!("NO_SUCH_PACK");
    let mut missing_host = row("", json!(8013), "vn", "");
    missing_host[2] = json!("");
    let rows = vec![
        header(),
        row("198.51.100.10", json!(8010), "vn", "2030-01-31"), // row 2: good
        row("198.51.100.11", json!(70000), "vn", ""),          // row 3: bad port
        unknown_package,                                       // row 4
        row("198.51.100.14", json!(8014), "vn", "someday"),    // row 5: bad date
        missing_host,                                          // row 6
        row("198.51.100.16", json!(8016), "mars", ""),         // row 7: bad area
        row("198.51.100.10", json!(8010), "global", ""),       // row 8: same proxy as row 2
        row("198.51.100.17", json!("8017"), "global", ""),     // row 9: good (port as text)
    ];
    let (s, job, _) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["counts"], json!({"created": 2, "updated": 0, "skipped": 0, "failed": 6}), "{job}");
    let errors: Vec<(u64, String)> = job["errors"]
        .as_array()
        .map(|a| {
            a.iter().map(|e| (e["row"].as_u64().unwrap_or(0), e["field"].as_str().unwrap_or("").to_owned())).collect()
        })
        .unwrap_or_default();
    assert_eq!(
        errors,
        vec![
            (3, "port".into()),
            (4, "package_code".into()),
            (5, "expired_at".into()),
            (6, "host".into()),
            (7, "area".into()),
            (8, String::new()),
        ],
        "{job}"
    );
    assert!(job["errors"][0]["reason"].as_str().unwrap_or("").contains("70000"), "{job}");
    assert!(job["errors"][5]["reason"].as_str().unwrap_or("").contains("row 2"), "{job}");
    assert_eq!(proxy_count(&app).await?, 2);

    // A sheet without a required column is refused as a whole.
    let no_rotate: Vec<Vec<Value>> = vec![
        vec![json!("host"), json!("port"), json!("area"), json!("provider"), json!("package_code")],
        vec![json!("198.51.100.30"), json!(80), json!("vn"), json!("TestProvider"), json!("TEST_PACK")],
    ];
    let (s, body, _) = upload(&app, xlsx(&no_rotate)?, "").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "file");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("rotate_url"), "{body}");
    assert_eq!(proxy_count(&app).await?, 2);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_file_types_and_oversized_uploads_are_refused() -> R {
    let app = TestApp::builder().import_max_bytes(16 * 1024).spawn().await?;
    let _importer = app.start_importer(app.importer_config()).await?;
    let (s, body, _) = upload(&app, b"host,port,area\n1.2.3.4,80,vn\n".to_vec(), "").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "file");
    // A ZIP that is not a workbook gets past the gateway's sniffing and is refused by the importer.
    let (s, body, _) = upload(&app, b"PK\x03\x04 definitely not a workbook".to_vec(), "").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("not a spreadsheet"), "{body}");
    // Over the limit.
    let mut big = b"PK\x03\x04".to_vec();
    big.resize(40 * 1024, b'x');
    let (s, body, _) = upload(&app, big, "").await?;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    // No file at all.
    let res = app
        .http
        .post(app.url("/api/proxies/import"))
        .header("Authorization", API_KEY)
        .multipart(reqwest::multipart::Form::new().text("other", "x"))
        .send()
        .await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Without credentials.
    let res = app.http.post(app.url("/api/proxies/import")).send().await?;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(proxy_count(&app).await?, 0);
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheet_over_the_row_limit_is_refused_whole() -> R {
    let app = TestApp::builder().spawn().await?;
    let _importer =
        app.start_importer(proxypool_importer::ImporterConfig { max_rows: 2, ..app.importer_config() }).await?;
    let mut rows = vec![header()];
    for i in 1..=2 {
        rows.push(row(&format!("198.51.100.{i}"), json!(8000 + i), "vn", "2030-01-31"));
    }
    let (s, body, _) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(s, StatusCode::OK, "two rows are within the limit: {body}");
    rows.push(row("198.51.100.3", json!(8003), "vn", "2030-01-31"));
    let (s, body, _) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "file");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("IMPORT_MAX_ROWS"), "{body}");
    assert_eq!(proxy_count(&app).await?, 2, "nothing of the refused file is written");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reimporting_updates_in_place_and_never_touches_leases() -> R {
    let app = TestApp::builder().spawn().await?;
    let _importer = app.start_importer(app.importer_config()).await?;
    let mut rows = vec![header()];
    for i in 0..4 {
        rows.push(row(&format!("198.51.100.{}", 40 + i), json!(8040 + i), "vn", "2030-01-31"));
    }
    let (_, first, _) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(first["counts"]["created"], 4, "{first}");
    let grant = app.nats_acquire_eventually("vn", "holder").await?;

    // The same file again: nothing new, nothing changed.
    let (_, second, _) = upload(&app, xlsx(&rows)?, "").await?;
    assert_eq!(second["counts"], json!({"created": 0, "updated": 0, "skipped": 4, "failed": 0}), "{second}");
    assert_eq!(proxy_count(&app).await?, 4);

    // A changed file (every proxy moves area and expiry): updated in place, the lease intact.
    for r in rows.iter_mut().skip(1) {
        r[4] = json!("global");
        r[6] = json!("2031-06-30");
    }
    let (_, third, _) = upload(&app, xlsx(&rows)?, "?wait=false").await?;
    let id = third["id"].as_str().unwrap_or_default().to_owned();
    let mut job = third;
    for _ in 0..100 {
        if job["status"] == "succeeded" || job["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = get_json(&app, &format!("/api/imports/{id}")).await?.1;
    }
    assert_eq!(job["counts"], json!({"created": 0, "updated": 4, "skipped": 0, "failed": 0}), "{job}");
    assert_eq!(proxy_count(&app).await?, 4);
    let held = app.proxy(&grant.id).await?;
    assert_eq!(held.area, Area::Global);
    assert_eq!(held.in_use, 1, "the import must not touch the lease fields");
    assert_eq!(held.proxy_used.len(), 1);
    assert_eq!(held.proxy_used[0].key, grant.key);
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}

/// A fake provider API: answers `path` with `body` when the `header` carries `expected`, counting calls.
async fn fake_provider(
    routes: Vec<(&'static str, Value)>,
    header: &'static str,
    expected: &'static str,
) -> R<(String, Arc<AtomicUsize>)> {
    let hits = Arc::new(AtomicUsize::new(0));
    let mut app = Router::new();
    for (path, body) in routes {
        let hits = hits.clone();
        app = app.route(
            path,
            get(move |headers: HeaderMap| {
                let (hits, body) = (hits.clone(), body.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if headers.get(header).and_then(|v| v.to_str().ok()) != Some(expected) {
                        return (axum::http::StatusCode::UNAUTHORIZED, "bad token".to_owned());
                    }
                    match body {
                        Value::String(raw) => (axum::http::StatusCode::OK, raw),
                        other => (axum::http::StatusCode::OK, other.to_string()),
                    }
                }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), hits))
}

fn kiot(base: &str) -> KiotConfig {
    KiotConfig {
        package_url: format!("{base}/packages"),
        key_url: format!("{base}/keys"),
        api_key: Secret::new("kiot-token".into()),
        rotate_url_base: "https://api.kiotproxy.test/api/v1/proxies/new?key=".into(),
    }
}

fn ms(days_from_now: i64) -> i64 {
    chrono::Utc::now().timestamp_millis() + days_from_now * 86_400_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiot_keys_are_imported_expired_ones_skipped_and_rerun_is_idempotent() -> R {
    let app = TestApp::builder().spawn().await?;
    let (base, _) = fake_provider(
        vec![
            (
                "/packages",
                json!({"success": true, "data": [{"code": "VN30", "name": "4G VN 30 days", "price": 300000}]}),
            ),
            (
                "/keys",
                json!({"success": true, "data": [
                    {"key": "KEYA1", "packageCode": "VN30", "expirationAt": ms(30)},
                    {"key": "KEYB2", "packageCode": "VN30", "expirationAt": ms(10)},
                    {"key": "KEYOLD", "packageCode": "VN30", "expirationAt": ms(-1)},
                    {"packageCode": "VN30"},
                ]}),
            ),
        ],
        "Api-token",
        "kiot-token",
    )
    .await?;
    let mut config = app.importer_config();
    config.kiot = Some(kiot(&base));
    let _importer = app.start_importer(config).await?;
    let (s, job) = post(&app, "/api/proxies/import-kiot").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "kiot");
    assert_eq!(job["counts"], json!({"created": 2, "updated": 0, "skipped": 1, "failed": 1}), "{job}");
    assert_eq!(job["errors"][0]["row"], 4);

    let provider = app.store.providers().find_one(doc! {"name": "KiotProxy"}).await?;
    let provider = provider.ok_or_else(|| anyhow::anyhow!("KiotProxy provider not created"))?;
    let package = app.store.packages().find_one(doc! {"code": "KiotProxy_VN30"}).await?;
    let package = package.ok_or_else(|| anyhow::anyhow!("KiotProxy_VN30 not created"))?;
    assert_eq!(package.proxy_provider_id, provider.id);
    assert_eq!(package.name, "4G VN 30 days");
    let proxies = app.all_proxies().await?;
    assert_eq!(proxies.len(), 2);
    for p in &proxies {
        assert!(p.is_error, "a new KiotProxy proxy waits for its first rotation");
        assert!(p.next_rotate.is_some_and(|t| t.timestamp_millis() <= chrono::Utc::now().timestamp_millis()));
        assert!(p.rotate_url.starts_with("https://api.kiotproxy.test/api/v1/proxies/new?key=KEY"));
        assert_eq!(p.proxy_package_id, package.id);
    }
    // Without an address yet, they are not leasable.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = app.nats_acquire("vn", "c").await?.into_result();
    assert!(refused.is_err(), "{refused:?}");
    // Once the rotator has given one an address, it is.
    app.update_proxy(proxies[0].id, doc! {"$set": {"ip": "192.0.2.77", "port": 31000, "is_error": false}}).await?;
    let grant = app.nats_acquire_eventually("vn", "c").await?;
    assert_eq!((grant.ip.as_str(), grant.port), ("192.0.2.77", 31000));

    let (_, again) = post(&app, "/api/proxies/import-kiot").await?;
    assert_eq!(again["counts"], json!({"created": 0, "updated": 0, "skipped": 3, "failed": 1}), "{again}");
    assert_eq!(proxy_count(&app).await?, 2);
    assert_eq!(app.store.packages().count_documents(doc! {"code": "KiotProxy_VN30"}).await?, 1);
    app.shutdown().await;
    Ok(())
}

fn zing(base: &str, interval: Option<Duration>) -> ZingConfig {
    ZingConfig { url: format!("{base}/proxies"), token: Secret::new("zing-token".into()), interval }
}

fn zing_list() -> Value {
    json!({"status": "success", "proxies": [
        {"hostIp": "203.0.113.1", "portHttp": 8080, "username": "u1", "password": "p1",
         "urlChangeIp": "https://api.zingproxy.test/getip/k1", "dateEnd": "2030-01-31T00:00:00Z"},
        {"hostIp": "203.0.113.2", "portHttp": 8081, "username": "u2", "password": "p2",
         "urlChangeIp": "https://api.zingproxy.test/getip/k2", "dateEnd": "2030-01-31T00:00:00Z"},
        {"hostIp": "203.0.113.3", "portHttp": 8082, "username": "u3", "password": "p3",
         "urlChangeIp": "https://api.zingproxy.test/getip/k3", "dateEnd": "2020-01-31T00:00:00Z"},
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zing_proxies_are_imported_with_their_provider_and_package() -> R {
    let app = TestApp::builder().spawn().await?;
    let (base, _) = fake_provider(vec![("/proxies", zing_list())], "Authorization", "Bearer zing-token").await?;
    let mut config = app.importer_config();
    config.zing = Some(zing(&base, None));
    let _importer = app.start_importer(config).await?;
    let (s, job) = post(&app, "/api/proxies/import-zing").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["counts"], json!({"created": 2, "updated": 0, "skipped": 1, "failed": 0}), "{job}");
    let package = app.store.packages().find_one(doc! {"code": "ZingProxy_Pack"}).await?;
    assert!(package.is_some(), "ZingProxy_Pack not created");
    assert!(app.store.providers().find_one(doc! {"name": "ZingProxy"}).await?.is_some());
    let p = app.all_proxies().await?.into_iter().find(|p| p.ip == "203.0.113.2");
    let p = p.ok_or_else(|| anyhow::anyhow!("proxy not imported"))?;
    assert_eq!((p.port, p.username.as_str(), p.password.as_str()), (8081, "u2", "p2"));
    assert_eq!(p.rotate_url, "https://api.zingproxy.test/getip/k2");
    // They are leasable right away: ZingProxy proxies keep their address.
    let grant = app.nats_acquire_eventually("vn", "c").await?;
    assert!(grant.ip.starts_with("203.0.113."), "{grant:?}");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_or_garbled_fails_the_job_and_changes_nothing() -> R {
    let app = TestApp::builder().spawn().await?;
    let (garbled, _) =
        fake_provider(vec![("/proxies", json!("<html>maintenance</html>"))], "Authorization", "Bearer zing-token")
            .await?;
    let closed = format!("http://127.0.0.1:{}", proxypool_system_tests::servers::free_port()?);
    let mut config = app.importer_config();
    config.kiot = Some(kiot(&closed));
    config.zing = Some(zing(&garbled, None));
    let _importer = app.start_importer(config).await?;
    let (s, job) = post(&app, "/api/proxies/import-kiot").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("KiotProxy package list") && reason.contains("unreachable"), "{reason}");
    assert!(!reason.contains("127.0.0.1"), "the URL stays out of the reason: {reason}");

    let (_, job) = post(&app, "/api/proxies/import-zing").await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["reason"].as_str().unwrap_or_default().contains("not JSON"), "{job}");

    assert_eq!(proxy_count(&app).await?, 0);
    assert!(app.store.providers().find_one(doc! {"name": "KiotProxy"}).await?.is_none());
    assert!(app.store.providers().find_one(doc! {"name": "ZingProxy"}).await?.is_none());
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zing_schedule_runs_once_per_interval_across_two_importers() -> R {
    let app = TestApp::builder().spawn().await?;
    let (base, hits) = fake_provider(vec![("/proxies", zing_list())], "Authorization", "Bearer zing-token").await?;
    let mut config = app.importer_config();
    // Ticks every 200 ms, so both replicas look many times within the test.
    config.zing = Some(zing(&base, Some(Duration::from_secs(2))));
    let a = app.start_importer(config.clone()).await?;
    let b = app
        .start_importer(proxypool_importer::ImporterConfig {
            admin_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    // Runs at about 0 s, 2 s and 4 s: three, however many replicas looked.
    let n = hits.load(Ordering::SeqCst);
    assert!((2..=3).contains(&n), "{n} scheduled imports in 4.9 s with a 2 s interval");
    // Both stop promptly: their subscriptions drain at once, not at the drain timeout.
    let t = std::time::Instant::now();
    a.stop().await;
    b.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5), "two importers took {:?} to stop", t.elapsed());
    assert_eq!(proxy_count(&app).await?, 2, "scheduled re-imports create no duplicates");
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_spreadsheet_in_docs_imports_and_lists() -> R {
    let app = TestApp::builder().spawn().await?;
    let _importer = app.start_importer(app.importer_config()).await?;
    // The provider and package scripts/run.sh seeds, created through the admin API as a newcomer would.
    let res = app
        .http
        .post(app.url("/api/proxy_providers"))
        .header("Authorization", API_KEY)
        .json(&json!({"name": "Demo", "account": "demo", "domain": "https://demo.invalid"}))
        .send()
        .await?;
    let provider: Value = res.json().await?;
    let res = app
        .http
        .post(app.url("/api/proxy_packages"))
        .header("Authorization", API_KEY)
        .json(&json!({"code": "DEMO", "name": "Demo package", "price": 0, "proxy_provider_id": provider["id"]}))
        .send()
        .await?;
    assert_eq!(res.status(), StatusCode::CREATED);
    let sample = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/sample-import.xlsx"))?;
    let (s, job, _) = upload(&app, sample, "").await?;
    assert_eq!(s, StatusCode::OK, "{job}");
    assert_eq!(job["counts"], json!({"created": 5, "updated": 0, "skipped": 0, "failed": 0}), "{job}");
    let (_, all) = get_json(&app, "/api/proxies?limit=50&get_full=true").await?;
    let with_credentials = all["data"].as_array().and_then(|a| a.iter().find(|p| p["ip"] == "203.0.113.12")).cloned();
    assert_eq!(all["total"], 5, "{all}");
    let p = with_credentials.ok_or_else(|| anyhow::anyhow!("203.0.113.12 not listed: {all}"))?;
    assert_eq!(
        (p["username"].as_str(), p["password"].as_str(), p["area"].as_str()),
        (Some("user12"), Some("secret12"), Some("vn"))
    );
    app.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_import_without_its_token_is_a_409_not_configured_without_retry_after() -> R {
    let app = TestApp::builder().spawn().await?;
    // The test importer has neither KIOT_API_KEY nor ZING_PROXY_TOKEN.
    let _importer = app.start_importer(app.importer_config()).await?;
    for (path, var) in [("/api/proxies/import-kiot", "KIOT_API_KEY"), ("/api/proxies/import-zing", "ZING_PROXY_TOKEN")]
    {
        let res = app.http.post(app.url(path)).header("Authorization", API_KEY).send().await?;
        let status = res.status();
        // Retrying cannot help until an operator sets the token, so nothing may suggest a retry.
        assert!(res.headers().get("retry-after").is_none(), "{path}");
        let body: Value = res.json().await?;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_configured", "{path}: {body}");
        assert!(body["error"].get("retry_after_secs").is_none(), "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains(var), "{path}: {body}");
    }
    app.shutdown().await;
    Ok(())
}
