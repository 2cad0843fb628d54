//! The system under the NATS identities of `deploy/nats/auth.conf`: every service connects as its own user, and a
//! consumer identity may lease and return but not reset leases, forge events, serve lease requests or read
//! JetStream. The permission lists are the real file's; only the passwords are test values.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxypool_contracts::lease::{LeaseGrant, ReleaseOutcome};
use proxypool_contracts::{subjects, Area};
use proxypool_system_tests::app::{nats_call, API_KEY};
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};

type R<T = ()> = anyhow::Result<T>;

/// A consumer connection that records the server's errors (permission violations arrive asynchronously).
async fn consumer(app: &TestApp) -> R<(async_nats::Client, Arc<Mutex<Vec<String>>>)> {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .user_and_password("consumer".into(), "consumer-test-password".into())
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e.to_string());
                }
            }
        })
        .connect(app.nats_server.url())
        .await?;
    Ok((client, errors))
}

async fn violation(errors: &Arc<Mutex<Vec<String>>>, subject: &str) -> R {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = errors.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        if seen.iter().any(|e| e.contains("Permissions Violation") && e.contains(subject)) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no permissions violation for {subject}; saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_works_under_its_identity_and_a_consumer_may_only_lease() -> R {
    let app = TestApp::builder().nats_auth(true).seed(Area::Vn, 2).callback_allow_private(true).spawn().await?;

    // Gateway → lease service, each as itself.
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::OK);
    let lease: Value = res.json().await?;
    let res = app.http_return(lease["id"].as_str().unwrap_or(""), lease["key"].as_str().unwrap_or("")).await?;
    assert_eq!(res.status(), StatusCode::OK);

    // The consumer identity leases and returns over NATS.
    let (nc, errors) = consumer(&app).await?;
    let grant =
        nats_call::<LeaseGrant>(&nc, subjects::LEASE_ACQUIRE, &json!({"area": "vn", "consumer": "svc-a"})).await?;
    let grant = grant.into_result().map_err(|e| anyhow::anyhow!("{e}"))?;
    let back =
        nats_call::<ReleaseOutcome>(&nc, subjects::LEASE_RELEASE, &json!({"proxy_id": grant.id, "key": grant.key}))
            .await?;
    assert!(back.into_result().is_ok());

    // It may not reset leases, forge events, import, or rotate.
    for subject in [
        subjects::LEASECTL_ROTATED,
        subjects::LEASECTL_SYNC,
        subjects::LEASECTL_LOCK,
        subjects::LEASE_LOG,
        subjects::IMPORT_KIOT,
    ] {
        nc.publish(subject, "{}".into()).await?;
        nc.flush().await?;
        violation(&errors, subject).await?;
    }
    // Nor serve lease requests itself (stealing them from the lease service)…
    let _stolen = nc.queue_subscribe(subjects::LEASE_ACQUIRE, "proxypool-lease".into()).await?;
    nc.flush().await?;
    violation(&errors, subjects::LEASE_ACQUIRE).await?;
    // …nor read the JetStream queues.
    let js = async_nats::jetstream::new(nc.clone());
    assert!(js.get_stream(subjects::ROTATION_STREAM).await.is_err(), "a consumer read the rotation stream");
    // Requests still reach the real lease service.
    let again =
        nats_call::<LeaseGrant>(&nc, subjects::LEASE_ACQUIRE, &json!({"area": "vn", "consumer": "svc-a"})).await?;
    assert!(again.into_result().is_ok());

    // The rotator (JetStream queue, lease reset) and the importer (object store, KV lock) under their identities.
    let fake = FakeWorld::start().await?;
    let proxy = ForwardProxy::start("puser", "ppass").await?;
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    let id = app.insert_proxy_behind(Area::Global, &proxy, fake.rotate_url("perm"), |_| {}).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = app.proxy(&id.to_hex()).await?;
        if d.ip_public.is_some() && !d.is_rotating {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no rotation under the rotator identity: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gateway → rotator: rotate now.
    let res = app
        .http
        .post(app.url(&format!("/api/proxies/{}/rotate", id.to_hex())))
        .header("Authorization", API_KEY)
        .send()
        .await?;
    assert_eq!(res.status(), StatusCode::ACCEPTED, "{}", res.text().await.unwrap_or_default());
    rotator.stop().await;

    let _importer = app.start_importer(app.importer_config()).await?;
    let mut book = rust_xlsxwriter::Workbook::new();
    let sheet = book.add_worksheet();
    for (c, v) in ["host", "port", "area", "rotate_url", "provider", "package_code"].iter().enumerate() {
        sheet.write_string(0, u16::try_from(c)?, *v)?;
    }
    for (c, v) in
        ["192.0.2.50", "8050", "vn", "https://rotate.example/50", "TestProvider", "TEST_PACK"].iter().enumerate()
    {
        sheet.write_string(1, u16::try_from(c)?, *v)?;
    }
    let form = reqwest::multipart::Form::new()
        .part("file", reqwest::multipart::Part::bytes(book.save_to_buffer()?).file_name("one.xlsx"));
    let res =
        app.http.post(app.url("/api/proxies/import")).header("Authorization", API_KEY).multipart(form).send().await?;
    let job: Value = res.json().await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["counts"]["created"], 1, "{job}");
    app.shutdown().await;
    Ok(())
}
