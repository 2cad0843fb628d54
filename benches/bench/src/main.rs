//! `proxypool-bench`: lease round trips over NATS and HTTP, beside the limits of the parts underneath, in one run.
//!
//! Everything runs on this machine: a `nats-server -js`, the MongoDB-protocol server (SecantusDB), the lease service
//! and the gateway in-process. Each figure is measured for a fixed time at a fixed number of concurrent clients.
//!
//! ```text
//! cargo run --release -p proxypool-bench -- [--secs 3] [--sizes 1000,10000] [--out docs/benchmarks.md]
//! cargo run --release -p proxypool-bench -- --suite rotation [--sizes 1000,10000]
//! cargo run --release -p proxypool-bench -- --suite import --sizes 100000
//! cargo build --release -p proxypool-forward && cargo run --release -p proxypool-bench -- --suite forward
//! cargo run --release -p proxypool-bench -- --suite health [--secs 3] [--scenario-secs 300]
//! ```
//!
//! The benchmark sets `PROXY_USE_MAX` very high so that a run never spends the per-rotation budget (`used_count`);
//! the write a lease makes is the same whatever the limit.

mod forward;
mod health;
mod import;
mod measure;
mod rotation;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::StreamExt;
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::LeaseGrant;
use proxypool_contracts::lease::{AcquireRequest, ReleaseRequest};
use proxypool_contracts::Area;
use proxypool_lease::queries::{grant_update, guard_filter, lease_candidates_index, lease_filter, lease_sort};
use proxypool_system_tests::{TestApp, API_KEY};

use crate::measure::{measure, Stats};

/// Publishes in flight at once in the pipelined JetStream baseline.
const PIPELINE: usize = 64;

/// proxypool's benchmarks, each beside the limits of the parts underneath, measured in the same run.
#[derive(Debug, clap::Parser)]
#[command(version, about)]
struct Args {
    /// Which suite to run.
    #[arg(long, value_enum, default_value = "lease")]
    suite: Suite,
    /// Seconds per cell.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Pool sizes (proxies), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
    sizes: Vec<usize>,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    concurrency: Vec<usize>,
    /// Seconds per run of the health suite's site scenario.
    #[arg(long, default_value_t = 300.0)]
    scenario_secs: f64,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    out: Option<String>,
}

/// A benchmark suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Lease acquire+release over NATS and HTTP.
    Lease,
    /// Rotations through the queue.
    Rotation,
    /// Spreadsheet imports.
    Import,
    /// The forward door beside direct, proxy-chain and squid.
    Forward,
    /// Outcomes and per-site bans: their cost on the lease path and a simulated site.
    Health,
}

/// One row of the report.
struct Row {
    what: String,
    size: String,
    clients: usize,
    stats: Stats,
    per_op: &'static str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if args.suite != Suite::Lease {
        let report = match args.suite {
            Suite::Rotation => rotation::run(&args.sizes).await?,
            Suite::Forward => forward::run(args.secs, &args.concurrency).await?,
            Suite::Health => health::run(args.secs, &args.concurrency, args.scenario_secs).await?,
            _ => import::run(&args.sizes).await?,
        };
        println!("{report}");
        if let Some(path) = &args.out {
            std::fs::write(path, &report).with_context(|| format!("cannot write {path}"))?;
        }
        return Ok(());
    }
    let dur = Duration::from_secs_f64(args.secs);
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut push = |what: &str, size: String, clients: usize, stats: Stats, per_op: &'static str| {
        eprintln!("{what:<48} {size:>7} c={clients:<3} {stats}");
        rows.push(Row { what: what.to_owned(), size, clients, stats, per_op });
    };

    // Bare axum endpoint: the HTTP framework and client on this machine.
    let axum_url = bare_axum().await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    for &c in &args.concurrency {
        let (h, u) = (http.clone(), axum_url.clone());
        let s = measure(c, dur, move |_| {
            let (h, u) = (h.clone(), u.clone());
            async move {
                h.get(&u).send().await?.error_for_status()?.bytes().await?;
                Ok(())
            }
        })
        .await;
        push("baseline: bare axum GET", "-".into(), c, s, "request");
    }

    for &size in &args.sizes {
        eprintln!("--- {size} proxies: seeding");
        let app = TestApp::builder().proxy_use_max(10_000).seed(Area::Vn, size).spawn().await?;
        let label = size.to_string();

        // Bare NATS request-reply echo on the same server.
        let echo_client = app.nats_config.connect("bench-echo").await?;
        let mut sub = echo_client.queue_subscribe("bench.echo", "bench".into()).await?;
        let responder = echo_client.clone();
        let echo = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(r) = m.reply {
                    let _ = responder.publish(r, m.payload).await;
                }
            }
        });
        echo_client.flush().await?;
        for &c in &args.concurrency {
            let client = app.client.clone();
            let s = measure(c, dur, move |_| {
                let client = client.clone();
                async move {
                    client.request("bench.echo", r#"{"area":"vn","consumer":"bench"}"#.into()).await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: bare NATS request-reply echo", label.clone(), c, s, "request");
        }
        echo.abort();

        // Bare JetStream publish with acknowledgement on the same server (file storage, like the lease log): what
        // one durable append costs when awaited, and the stream's rate when appends are pipelined.
        let js = async_nats::jetstream::new(app.client.clone());
        let _ = js.delete_stream("BENCH_JS").await;
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH_JS".into(),
            subjects: vec!["bench.js".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let payload = vec![b'x'; 300];
        for &c in &args.concurrency {
            let (js, payload) = (js.clone(), payload.clone());
            let s = measure(c, dur, move |_| {
                let (js, payload) = (js.clone(), payload.clone());
                async move {
                    js.publish("bench.js", payload.into()).await?.await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: JetStream publish, ack awaited", label.clone(), c, s, "append");
        }
        {
            let (js, payload) = (js.clone(), payload.clone());
            let s = measure(1, dur, move |_| {
                let (js, payload) = (js.clone(), payload.clone());
                async move {
                    let mut acks = Vec::with_capacity(PIPELINE);
                    for _ in 0..PIPELINE {
                        acks.push(js.publish("bench.js", payload.clone().into()).await?);
                    }
                    for ack in acks {
                        ack.await?;
                    }
                    Ok(())
                }
            })
            .await;
            push("baseline: JetStream publish, 64 pipelined", label.clone(), 1, s.scaled(PIPELINE as u64), "append");
        }
        js.delete_stream("BENCH_JS").await?;

        // Bare database operations on a scratch collection of the same size and shape, in the same store.
        let scratch = app.store.db().collection::<Document>("bench_scratch");
        scratch.drop().await?;
        let docs: Vec<Document> =
            (0..size).map(|i| bson::to_document(&app.new_proxy(Area::Vn, i))).collect::<Result<_, _>>()?;
        let ids: Arc<Vec<ObjectId>> = Arc::new(docs.iter().filter_map(|d| d.get_object_id("_id").ok()).collect());
        for chunk in docs.chunks(5_000) {
            scratch.insert_many(chunk).await?;
        }
        // The same secondary index as `proxies`, so that a baseline write pays the same index maintenance.
        scratch.create_index(lease_candidates_index()).await?;
        let next = Arc::new(AtomicUsize::new(0));
        for &c in &args.concurrency {
            let (coll, ids, next) = (scratch.clone(), ids.clone(), next.clone());
            let s = measure(c, dur, move |_| {
                let (coll, ids, next) = (coll.clone(), ids.clone(), next.clone());
                async move {
                    let id = ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                    let now = DateTime::now();
                    let key = ObjectId::new().to_hex();
                    coll.update_one(
                        guard_filter(id, Area::Vn, now, 1_000_000, false),
                        grant_update("bench", &key, now, "x", None),
                    )
                    .await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: guarded update_one by _id", label.clone(), c, s, "update");
        }
        // The read a lease makes after its write.
        for &c in &args.concurrency {
            let (coll, ids, next) = (scratch.clone(), ids.clone(), next.clone());
            let s = measure(c, dur, move |_| {
                let (coll, ids, next) = (coll.clone(), ids.clone(), next.clone());
                async move {
                    let id = ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                    coll.find_one(doc! { "_id": id }).await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: find_one by _id", label.clone(), c, s, "read");
        }
        // findAndModify by `_id` alone, which this store plans as a scan (why a lease writes, then reads).
        {
            let (coll, ids, next) = (scratch.clone(), ids.clone(), next.clone());
            let s = measure(1, dur, move |_| {
                let (coll, ids, next) = (coll.clone(), ids.clone(), next.clone());
                async move {
                    let id = ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                    coll.find_one_and_update(doc! { "_id": id }, doc! { "$set": { "updatedAt": DateTime::now() } })
                        .await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: find_one_and_update by _id", label.clone(), 1, s, "update");
        }
        // The same updates, 64 per bulk write (one `update` command with 64 statements).
        for &c in &args.concurrency {
            let (db, ids, next) = (app.store.db().clone(), ids.clone(), next.clone());
            let s = measure(c, dur, move |_| {
                let (db, ids, next) = (db.clone(), ids.clone(), next.clone());
                async move {
                    let now = DateTime::now();
                    let updates: Vec<Document> = (0..64)
                        .map(|_| {
                            let id = ids[next.fetch_add(1, Ordering::Relaxed) % ids.len()];
                            let key = ObjectId::new().to_hex();
                            doc! { "q": guard_filter(id, Area::Vn, now, 1_000_000, false), "u": grant_update("bench", &key, now, "x", None) }
                        })
                        .collect();
                    db.run_command(doc! { "update": "bench_scratch", "updates": updates, "ordered": false }).await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: guarded updates, 64 per bulk write", label.clone(), c, s.scaled(64), "update");
        }
        // The original design's lease: one sorted find_one_and_update over the collection (a scan: skipped on
        // the largest pools, where one call takes seconds and blocks the store).
        if size <= 10_000 {
            let coll = scratch.clone();
            let s = measure(1, dur, move |_| {
                let coll = coll.clone();
                async move {
                    let now = DateTime::now();
                    let key = ObjectId::new().to_hex();
                    coll.find_one_and_update(
                        lease_filter(Area::Vn, now, 1_000_000),
                        grant_update("bench", &key, now, "x", None),
                    )
                    .sort(lease_sort())
                    .await?;
                    Ok(())
                }
            })
            .await;
            push("baseline: sorted find_one_and_update (original design)", label.clone(), 1, s, "lease");
        }
        scratch.drop().await?;

        // proxypool: acquire + release over NATS.
        for &c in &args.concurrency {
            let client = app.client.clone();
            let s = measure(c, dur, move |w| {
                let client = client.clone();
                async move { nats_round_trip(&client, w).await }
            })
            .await;
            push("proxypool: acquire+release over NATS", label.clone(), c, s, "round trip");
        }
        // How soon MongoDB shows a grant, sampled while 64 clients lease and return (for at least 10 s, to have
        // enough samples for a p99).
        {
            let client = app.client.clone();
            let dur = dur.max(Duration::from_secs(10));
            let load = tokio::spawn(measure(*args.concurrency.iter().max().unwrap_or(&64), dur, move |w| {
                let client = client.clone();
                async move { nats_round_trip(&client, w).await }
            }));
            let (mut seen, mut timed_out) = (Vec::new(), 0usize);
            let until = std::time::Instant::now() + dur;
            while std::time::Instant::now() < until {
                let req = AcquireRequest {
                    area: Some("vn".into()),
                    consumer: Some("sampler".into()),
                    callback_url: None,
                    ..Default::default()
                };
                let g = proxypool_rpc::call::<LeaseAcquire>(&app.client, &req).await?;
                let (t0, id) = (std::time::Instant::now(), ObjectId::parse_str(&g.id)?);
                loop {
                    let d = app.store.proxies().find_one(doc! { "_id": id }).await?;
                    if d.is_some_and(|d| d.proxy_used.iter().any(|u| u.key == g.key)) {
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        // Counted as 30 s: the line below says how many timed out.
                        timed_out += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen.push(t0.elapsed());
                let req =
                    ReleaseRequest { proxy_id: Some(g.id), key: Some(g.key), failure: None, ..Default::default() };
                proxypool_rpc::call::<LeaseRelease>(&app.client, &req).await?;
            }
            load.await?;
            seen.sort();
            let q = |f: f64| seen.get(((seen.len() as f64 - 1.0) * f).round() as usize).copied().unwrap_or_default();
            let line = format!(
                "- {size} proxies, 64 clients leasing: a grant is visible in MongoDB after p50 {:.0} ms, p99 {:.0} ms, \
                 max {:.0} ms ({} samples, {timed_out} not visible within 30 s; polled every 20 ms)",
                q(0.5).as_secs_f64() * 1e3,
                q(0.99).as_secs_f64() * 1e3,
                seen.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                seen.len()
            );
            eprintln!("{line}");
            notes.push(line);
        }
        // proxypool: acquire + release over HTTP (gateway → NATS → lease).
        for &c in &args.concurrency {
            let (h, base) = (http.clone(), app.url(""));
            let s = measure(c, dur, move |_| {
                let (h, base) = (h.clone(), base.clone());
                async move {
                    let g: LeaseGrant = h
                        .get(format!("{base}/api/get-proxy?area=vn"))
                        .header("Authorization", API_KEY)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    h.post(format!("{base}/webhook/return-proxy/{}?key={}", g.id, g.key))
                        .header("Authorization", API_KEY)
                        .send()
                        .await?
                        .error_for_status()?;
                    Ok(())
                }
            })
            .await;
            push("proxypool: acquire+release over HTTP", label.clone(), c, s, "round trip");
        }
        // proxypool: acquire alone (the lease kept), for the latency of a grant.
        for &c in &[1, 64] {
            let client = app.client.clone();
            let s = measure(c, dur, move |w| {
                let client = client.clone();
                async move {
                    let req = AcquireRequest {
                        area: Some("vn".into()),
                        consumer: Some(format!("held-{w}")),
                        callback_url: None,
                        ..Default::default()
                    };
                    proxypool_rpc::call::<LeaseAcquire>(&client, &req).await?;
                    Ok(())
                }
            })
            .await;
            push("proxypool: acquire over NATS (kept)", label.clone(), c, s, "grant");
        }
        app.assert_invariants().await?;
        app.shutdown().await;
    }

    let mut report = render(&rows, &args);
    for n in &notes {
        report.push_str(n);
        report.push('\n');
    }
    println!("{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, &report).with_context(|| format!("cannot write {path}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// One acquire + release over NATS, as consumer `bench-{w}`.
async fn nats_round_trip(client: &async_nats::Client, w: usize) -> anyhow::Result<()> {
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some(format!("bench-{w}")),
        callback_url: None,
        ..Default::default()
    };
    let g = proxypool_rpc::call::<LeaseAcquire>(client, &req).await?;
    let req = ReleaseRequest { proxy_id: Some(g.id), key: Some(g.key), failure: None, ..Default::default() };
    proxypool_rpc::call::<LeaseRelease>(client, &req).await?;
    Ok(())
}

async fn bare_axum() -> anyhow::Result<String> {
    let app =
        axum::Router::new().route("/", axum::routing::get(|| async { axum::Json(serde_json::json!({"ok": true})) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}/"))
}

fn render(rows: &[Row], args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| what | proxies | clients | ops/s | p50 ms | p99 ms | errors | op |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.what,
            r.size,
            r.clients,
            r.stats.ops_per_sec(),
            r.stats.p50_ms(),
            r.stats.p99_ms(),
            r.stats.errors,
            r.per_op
        );
    }
    let _ = writeln!(
        s,
        "\n_{}; {} s per cell; {} logical CPUs; bulk-write rows count updates (64 per command)._",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        args.secs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    s
}
