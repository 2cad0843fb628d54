//! Traces and metrics across the services, in one process with an in-memory span exporter: a lease through the
//! gateway and a rotation through JetStream are each one trace, joined through W3C trace context in NATS headers;
//! every service answers `/metrics`, `/healthz` and `/readyz`.

use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use proxypool_contracts::Area;
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::TestApp;
use reqwest::StatusCode;

type R<T = ()> = anyhow::Result<T>;

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

/// Waits until `pick` finds what it wants among the exported spans.
async fn spans_until<T>(exporter: &InMemorySpanExporter, what: &str, pick: impl Fn(&[SpanData]) -> Option<T>) -> R<T> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans = exporter.get_finished_spans()?;
        if let Some(t) = pick(&spans) {
            return Ok(t);
        }
        anyhow::ensure!(Instant::now() < deadline, "no {what} among {} spans: {:?}", spans.len(), names(&spans));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| format!("{}({:?})", s.name, attr(s, "subject"))).collect()
}

fn in_trace(spans: &[SpanData], trace: TraceId) -> Vec<&SpanData> {
    spans.iter().filter(|s| s.span_context.trace_id() == trace).collect()
}

fn child_of<'a>(spans: &[&'a SpanData], parent: SpanId, name: &str) -> Option<&'a SpanData> {
    spans.iter().copied().find(|s| s.parent_span_id == parent && s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_and_a_rotation_are_each_one_trace_and_every_service_serves_metrics() -> R {
    let exporter = proxypool_telemetry::init_for_tests().ok_or_else(|| anyhow::anyhow!("subscriber already set"))?;
    let app = TestApp::builder().seed(Area::Vn, 3).spawn().await?;

    // A lease over HTTP: gateway span → NATS client span → lease service's server span → the grant.
    let res = app.http_get_proxy("vn").await?;
    assert_eq!(res.status(), StatusCode::OK);
    let (trace, http_id) = spans_until(&exporter, "HTTP span of the lease", |spans| {
        spans
            .iter()
            .find(|s| s.name == "http" && attr(s, "http.route").as_deref() == Some("/api/get-proxy"))
            .map(|s| (s.span_context.trace_id(), s.span_context.span_id()))
    })
    .await?;
    let handled = spans_until(&exporter, "lease handling in the same trace", |spans| {
        let t = in_trace(spans, trace);
        // The handler's own span sits between the HTTP span and the NATS request.
        let handler = t.iter().find(|s| s.parent_span_id == http_id)?;
        let request = child_of(&t, handler.span_context.span_id(), "nats.request")?;
        let handle = child_of(&t, request.span_context.span_id(), "nats.handle")?;
        let acquire = child_of(&t, handle.span_context.span_id(), "lease.acquire")?;
        Some((handle.clone(), acquire.clone()))
    })
    .await?;
    assert_eq!(attr(&handled.0, "subject").as_deref(), Some("proxypool.v1.lease.acquire"));
    assert_eq!(attr(&handled.1, "area").as_deref(), Some("vn"));

    // A rotation: the scheduler's claim → the JetStream job → the worker → the lease reset over NATS.
    let fake = FakeWorld::start().await?;
    let proxy = ForwardProxy::start("puser", "ppass").await?;
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    let id = app.insert_proxy_behind(Area::Vn, &proxy, fake.rotate_url("t1"), |_| {}).await?;
    let proxy_label = id.to_hex();
    spans_until(&exporter, "a rotation trace from claim to lease reset", |spans| {
        let claim =
            spans.iter().find(|s| s.name == "rotation.claim" && attr(s, "proxy").as_deref() == Some(&proxy_label))?;
        let t = in_trace(spans, claim.span_context.trace_id());
        let job = child_of(&t, claim.span_context.span_id(), "rotation.job")?;
        let reset = t.iter().find(|s| {
            s.name == "nats.request" && attr(s, "subject").as_deref() == Some("proxypool.v1.leasectl.rotated")
        })?;
        // The lease service handled the reset in the same trace, as a child of the rotator's request.
        let handled = child_of(&t, reset.span_context.span_id(), "nats.handle")?;
        Some((job.name.clone(), handled.name.clone()))
    })
    .await?;
    rotator.stop().await;

    // Metrics on every service, with the numbers of what just happened.
    let importer = app.start_importer(app.importer_config()).await?;
    let get = |url: String| {
        let http = app.http.clone();
        async move {
            let res = http.get(&url).send().await?;
            anyhow::Ok((res.status(), res.text().await?))
        }
    };
    let (s, gateway) = get(app.url("/metrics")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(
        gateway
            .contains(r#"proxypool_gateway_http_requests_total{method="GET",route="/api/get-proxy",status="200"} 1"#),
        "{gateway}"
    );
    assert!(gateway.contains("proxypool_gateway_http_request_duration_seconds_bucket"), "{gateway}");
    let lease_admin = app.lease_replicas()[0].admin_addr;
    let (s, lease) = get(format!("http://{lease_admin}/metrics")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(lease.contains(r#"proxypool_lease_leases_total{result="granted"} 1"#), "{lease}");
    assert!(lease.contains("proxypool_lease_lease_duration_seconds_count 1"), "{lease}");
    assert!(
        lease.contains(r#"proxypool_lease_nats_requests_total{subject="proxypool.v1.lease.acquire",outcome="ok"} 1"#),
        "{lease}"
    );
    // The pool gauges are refreshed every 5 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, lease) = get(format!("http://{lease_admin}/metrics")).await?;
        if lease.contains(r#"proxypool_lease_pool_proxies{area="vn",state="total"} 4"#) {
            assert!(lease.contains(r#"proxypool_lease_pool_proxies{area="vn",state="in_use"} 1"#), "{lease}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "pool gauges not updated: {lease}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let auth_admin = app.auth_admin.ok_or_else(|| anyhow::anyhow!("no auth admin endpoint"))?;
    for (name, addr, metric) in [
        ("lease", lease_admin, "proxypool_lease_dependency_errors"),
        ("auth", auth_admin, "proxypool_auth_nats_requests"),
        ("importer", importer.admin_addr, "proxypool_importer_jobs"),
    ] {
        let (s, body) = get(format!("http://{addr}/metrics")).await?;
        assert_eq!(s, StatusCode::OK, "{name}");
        assert!(body.contains(metric), "{name}: {body}");
        assert_eq!(get(format!("http://{addr}/healthz")).await?.0, StatusCode::OK, "{name}");
        assert_eq!(get(format!("http://{addr}/readyz")).await?.0, StatusCode::OK, "{name}");
    }
    let rotator = app.start_rotator(app.rotator_config(&fake)).await?;
    let rotator_admin = rotator.admin_addr;
    let (s, body) = get(format!("http://{rotator_admin}/metrics")).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("# TYPE proxypool_rotator_rotations counter"), "{body}");
    assert_eq!(get(format!("http://{rotator_admin}/readyz")).await?.0, StatusCode::OK);
    rotator.stop().await;
    app.shutdown().await;
    Ok(())
}
