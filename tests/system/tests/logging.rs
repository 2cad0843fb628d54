//! What the gateway logs about failed requests, read from a capturing subscriber (its own test binary, since the
//! subscriber is global): each internal error once, at `error`, with its cause; an outage at `warn`; a busy pool and
//! client errors not at all.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use proxypool_contracts::{subjects, Area};
use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;

type R<T = ()> = anyhow::Result<T>;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    /// The gateway's "request failed" lines so far.
    fn failures(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned();
        text.lines()
            .filter(|l| l.contains("proxypool_gateway") && l.contains("request failed"))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_are_logged_once_at_error_and_outages_at_warn() -> R {
    let buf = Buf::default();
    let writer = buf.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = TestApp::builder().seed(Area::Vn, 1).spawn().await?;

    // A service that answers garbage: the gateway cannot decode the reply, an internal error.
    let mut sub = app.client.subscribe(subjects::ROTATOR_ROTATE_NOW).await?;
    // Confirmed by the server before the gateway asks: otherwise its request can find no responder yet (a 503).
    app.client.flush().await?;
    let nc = app.client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = nc.publish(reply, "garbage".into()).await;
            }
        }
    });
    let key = |r: reqwest::RequestBuilder| r.header("Authorization", API_KEY);
    let res = key(app.http.post(app.url("/api/proxies/65a1b2c3d4e5f60718293a4b/rotate"))).send().await?;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // No importer runs: an outage.
    let res = key(app.http.post(app.url("/api/proxies/import-kiot"))).send().await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // No global proxy: a busy pool, an answer the API promises.
    let res = app.http_get_proxy("global").await?;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = res.json().await?;
    assert_eq!(body["error"]["code"], "no_proxy_available");
    // Client errors.
    let res = key(app.http.get(app.url("/api/proxies?page=0"))).send().await?;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = app.http.get(app.url("/api/proxies")).send().await?;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    tokio::time::sleep(Duration::from_millis(100)).await;
    let failures = buf.failures();
    let errors: Vec<_> = failures.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "the internal error once: {failures:#?}");
    assert!(errors[0].contains("malformed reply") && errors[0].contains("rotate"), "with its cause: {errors:?}");
    let warnings: Vec<_> = failures.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "the outage, at warn: {failures:#?}");
    assert!(warnings[0].contains("ServiceUnavailable") && warnings[0].contains("import"), "{warnings:?}");
    assert_eq!(failures.len(), 2, "nothing else: {failures:#?}");
    app.shutdown().await;
    Ok(())
}
