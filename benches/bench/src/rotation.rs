//! Rotations per second through the JetStream queue, beside a bare JetStream publish/consume/ack baseline.
//!
//! N proxies are made due at once, all rotated through the local fake provider and IP-checked through a local
//! forward proxy against the local IP echo. The clock runs from the rotator's start until every proxy is back to
//! `status = COMPLETED` and unlocked (leases reset by the lease service), so it covers scan, claim, queue, drain
//! check, rotate call, IP check, result write and lease reset.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::Publish};
use bson::{doc, DateTime};
use futures::StreamExt;
use proxypool_contracts::Area;
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::TestApp;

async fn bare_jetstream(app: &TestApp, n: usize) -> anyhow::Result<(f64, f64)> {
    let js = jetstream::new(app.client.clone());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.jobs".into()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"proxy_id":"{i:024x}","job_id":"{i}"}}"#);
        acks.push(
            js.send_publish("bench.jobs", Publish::build().payload(body.into()).message_id(i.to_string())).await?,
        );
    }
    for a in acks {
        a.await?;
    }
    let publish = n as f64 / t.elapsed().as_secs_f64();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "bench",
            jetstream::consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let t = Instant::now();
    let mut messages = consumer.messages().await?;
    let mut done = 0;
    while done < n {
        let Some(m) = messages.next().await else { break };
        m.map_err(|e| anyhow::anyhow!("{e}"))?.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        done += 1;
    }
    Ok((publish, n as f64 / t.elapsed().as_secs_f64()))
}

/// Runs the suite and renders a Markdown table.
pub async fn run(sizes: &[usize]) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| proxies due | rotations/s | total s | bare JetStream publish+ack msgs/s | bare consume+ack msgs/s |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
    for &n in sizes {
        eprintln!("--- {n} due proxies: seeding");
        let app = TestApp::builder().seed(Area::Vn, n).spawn().await?;
        let fake = FakeWorld::start().await?;
        let proxy = ForwardProxy::start("puser", "ppass").await?;
        fake.answer("bench", 200, "{}");
        let (publish, consume) = bare_jetstream(&app, n).await?;
        eprintln!("bare JetStream: publish {publish:.0}/s, consume {consume:.0}/s");
        app.store
            .proxies()
            .update_many(
                doc! {},
                doc! { "$set": {
                    "ip": proxy.addr.ip().to_string(), "port": i32::from(proxy.addr.port()),
                    "username": "puser", "password": "ppass", "rotate_url": fake.rotate_url("bench"),
                    "next_rotate": DateTime::now(),
                }},
            )
            .await?;
        // Written behind the lease service's back: have it re-read the catalogue, as an import would.
        let full = proxypool_contracts::rotation::SyncRequest { proxy_ids: Vec::new(), full: true };
        proxypool_rpc::call_within::<proxypool_contracts::endpoints::LeaseCtlSync>(&app.client, &full, None).await?;
        let mut config = app.rotator_config(&fake);
        config.workers = 64;
        config.scan_batch = i64::try_from(n).unwrap_or(i64::MAX);
        config.ack_wait = Duration::from_secs(60);
        config.ip_region_url = None;
        // Production's interval: every scan reads the collection, which on the local store costs more than the
        // rotations it finds once they are all claimed by the first scan.
        config.scan_interval = Duration::from_secs(10);
        let started = Instant::now();
        let rotator = app.start_rotator(config).await?;
        let completed = doc! { "status": 2, "is_rotating": false };
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let done = app.store.proxies().count_documents(completed.clone()).await?;
            eprintln!("  {done}/{n} rotated after {:.0} s", started.elapsed().as_secs_f64());
            if done as usize >= n {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "rotations did not finish in 30 min");
        }
        let secs = started.elapsed().as_secs_f64();
        rotator.stop().await;
        let _ = writeln!(out, "| {n} | {:.1} | {secs:.1} | {publish:.0} | {consume:.0} |", n as f64 / secs);
        app.shutdown().await;
    }
    let _ = writeln!(
        out,
        "\n_{}; 64 workers; completion polled every 3 s, scheduler scan every 10 s (so short runs read slightly slow)._",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    Ok(out)
}
