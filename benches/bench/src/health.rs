//! The health suite: what outcomes and per-site bans cost on the lease path, and what they buy.
//!
//! - Acquire+release naming a site and reporting an outcome, on 1,000 proxies of which half exit on IPs that site
//!   has banned, beside the plain acquire+release in the same run (alternating, three runs of each cell).
//! - Outcomes per second: the release-with-outcome round trip at the highest concurrency.
//! - A simulated site that blocks a fifth of all exit IPs, 200 proxies rotated by a simulated provider that hands
//!   out a fresh IP on every rotation: the share of requests that meet a blocking IP, with health off (no site named,
//!   no outcome reported: today's consumer) and on.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, DateTime};
use proxypool_contracts::endpoints::{LeaseAcquire, LeaseCtlLock, LeaseCtlRotated, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, ReleaseRequest};
use proxypool_contracts::rotation::{LockRequest, RotatedRequest};
use proxypool_contracts::Area;
use proxypool_system_tests::TestApp;

use crate::measure::{measure, Stats};

/// The site whose bans the suite measures.
const SITE: &str = "shop.example";

/// One acquire (for `domain`, if any) and its release (with `outcome` for `domain`, if any).
async fn round_trip(
    client: &async_nats::Client,
    w: usize,
    domain: Option<&str>,
    outcome: Option<&str>,
) -> anyhow::Result<()> {
    round_trip_parts(client, w, domain, outcome.zip(domain)).await
}

/// One acquire (for `site`, if any) and its release (with `report`: an outcome for a site).
async fn round_trip_parts(
    client: &async_nats::Client,
    w: usize,
    site: Option<&str>,
    report: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let (domain, outcome) = (site, report.map(|r| r.0));
    let req = AcquireRequest {
        area: Some("vn".into()),
        consumer: Some(format!("bench-{w}")),
        domain: domain.map(str::to_owned),
        ..Default::default()
    };
    let g = proxypool_rpc::call::<LeaseAcquire>(client, &req).await?;
    let req = ReleaseRequest {
        proxy_id: Some(g.id),
        key: Some(g.key),
        outcome: outcome.map(str::to_owned),
        domain: report.map(|r| r.1.to_owned()),
        ..Default::default()
    };
    proxypool_rpc::call::<LeaseRelease>(client, &req).await?;
    Ok(())
}

/// Runs the suite: `secs` per lease cell, `scenario_secs` per scenario run.
pub async fn run(secs: f64, concurrency: &[usize], scenario_secs: f64) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let dur = Duration::from_secs_f64(secs);
    let app = TestApp::builder().proxy_use_max(10_000).seed(Area::Vn, 1_000).spawn().await?;
    // Half of the pool banned for the site: each ban goes to the proxy the next lease for the site would get.
    for _ in 0..500 {
        round_trip(&app.client, 0, Some(SITE), Some("blocked")).await?;
    }
    let _ = writeln!(out, "| cell | clients | plain (round trips/s) | with site + outcome, half banned | ratio |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let mut outcomes_64 = None;
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let mut decomposition: Vec<(&str, usize, Vec<f64>, f64)> = Vec::new();
    for &c in concurrency {
        let (mut plain, mut with) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let client = app.client.clone();
            let p: Stats = measure(c, dur, move |w| {
                let client = client.clone();
                async move { round_trip(&client, w, None, None).await }
            })
            .await;
            let client = app.client.clone();
            let h: Stats = measure(c, dur, move |w| {
                let client = client.clone();
                async move { round_trip(&client, w, Some(SITE), Some("ok")).await }
            })
            .await;
            eprintln!("health c={c}: plain {p}; with site+outcome {h}");
            anyhow::ensure!(p.errors == 0 && h.errors == 0, "errors in a cell: plain {}, with {}", p.errors, h.errors);
            plain.push(p.ops_per_sec());
            with.push(h.ops_per_sec());
        }
        // Where the difference goes, at the highest concurrency: the site on the acquire alone, the outcome (with
        // its site) on the release alone.
        if Some(&c) == concurrency.iter().max() {
            let parts: [(&'static str, Option<&'static str>, Option<&'static str>); 2] =
                [("site on the acquire only", Some(SITE), None), ("outcome on the release only", None, Some("ok"))];
            for (label, site, outcome) in parts {
                let mut rates = Vec::new();
                for _ in 0..3 {
                    let client = app.client.clone();
                    let s: Stats = measure(c, dur, move |w| {
                        let client = client.clone();
                        async move { round_trip_parts(&client, w, site, outcome.map(|o| (o, SITE))).await }
                    })
                    .await;
                    eprintln!("health c={c}: {label} {s}");
                    rates.push(s.ops_per_sec());
                }
                decomposition.push((label, c, rates, med(&plain)));
            }
        }
        let ratios: Vec<f64> = plain.iter().zip(&with).map(|(p, h)| h / p).collect();
        let spread = |v: &[f64]| {
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            100.0 * (hi - lo) / med(v)
        };
        let _ = writeln!(
            out,
            "| acquire+release over NATS, 1,000 proxies | {c} | {:.0} (spread {:.0} %) | {:.0} (spread {:.0} %) | {:.2} (runs {}) |",
            med(&plain),
            spread(&plain),
            med(&with),
            spread(&with),
            med(&ratios),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ")
        );
        outcomes_64 = Some((c, med(&with)));
    }
    for (label, c, rates, plain) in &decomposition {
        let _ = writeln!(
            out,
            "| {label} | {c} | {plain:.0} | {:.0} | {:.2} (runs {}) |",
            med(rates),
            med(rates) / plain,
            rates.iter().map(|r| format!("{:.2}", r / plain)).collect::<Vec<_>>().join(", ")
        );
    }
    if let Some((c, rate)) = outcomes_64 {
        let _ = writeln!(
            out,
            "\nOutcomes reported per second over NATS (release with outcome `ok` and a site), {c} clients: {rate:.0}."
        );
    }
    app.assert_invariants().await?;
    app.shutdown().await;

    let _ = writeln!(out, "\n| scenario: 200 proxies, a site blocking 20 % of exit IPs, a new IP per rotation | requests | met a blocking IP | share |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for health in [false, true].into_iter().filter(|_| scenario_secs > 0.0) {
        let (requests, blocked, rotations) = scenario(health, Duration::from_secs_f64(scenario_secs)).await?;
        let label = if health { "health on (site named, outcome reported)" } else { "health off (today's consumer)" };
        let _ = writeln!(
            out,
            "| {label}, {scenario_secs:.0} s, {rotations} rotations | {requests} | {blocked} | {:.2} % |",
            100.0 * blocked as f64 / requests.max(1) as f64
        );
    }
    Ok(out)
}

/// Whether the simulated site blocks `ip`: a fixed fifth of all addresses.
fn site_blocks(ip: &str) -> bool {
    let mut h = DefaultHasher::new();
    ip.hash(&mut h);
    h.finish().is_multiple_of(5)
}

/// A fresh public IP from the simulated provider.
fn fresh_ip(n: u64) -> String {
    format!("100.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
}

/// Runs the site scenario for `dur`: 16 consumers lease, "request" the site through the exit IP and return (with the
/// site and the outcome when `health`), while every proxy is rotated to a fresh IP every 30 s. Answers (requests,
/// requests that met a blocking IP, rotations).
async fn scenario(health: bool, dur: Duration) -> anyhow::Result<(u64, u64, u64)> {
    const PROXIES: usize = 200;
    const EVERY: Duration = Duration::from_secs(30);
    let app = TestApp::builder().proxy_use_max(10_000).spawn().await?;
    let next_ip = Arc::new(AtomicU64::new(1));
    let mut ids = Vec::new();
    for n in 0..PROXIES {
        let mut d = app.new_proxy(Area::Vn, n);
        d.ip_public = Some(fresh_ip(next_ip.fetch_add(1, Ordering::Relaxed)));
        app.store.proxies().insert_one(&d).await?;
        ids.push(d.id);
    }
    app.store.proxies().update_many(doc! {}, doc! { "$set": { "updatedAt": DateTime::now() } }).await?;
    let req = proxypool_contracts::rotation::SyncRequest { proxy_ids: Vec::new(), full: true };
    proxypool_rpc::call::<proxypool_contracts::endpoints::LeaseCtlSync>(&app.client, &req).await?;
    let (requests, blocked, rotations) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + dur;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (client, requests, blocked) = (app.client.clone(), requests.clone(), blocked.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = AcquireRequest {
                    area: Some("vn".into()),
                    consumer: Some(format!("site-{w}")),
                    domain: health.then(|| SITE.to_owned()),
                    ..Default::default()
                };
                let Ok(g) = proxypool_rpc::call::<LeaseAcquire>(&client, &req).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let refused = site_blocks(g.ip_public.as_deref().unwrap_or_default());
                requests.fetch_add(1, Ordering::Relaxed);
                if refused {
                    blocked.fetch_add(1, Ordering::Relaxed);
                }
                let outcome = if refused { "blocked" } else { "ok" };
                let req = ReleaseRequest {
                    proxy_id: Some(g.id),
                    key: Some(g.key),
                    outcome: health.then(|| outcome.to_owned()),
                    domain: health.then(|| SITE.to_owned()),
                    ..Default::default()
                };
                // A rotation may have taken the lease already.
                let _ = proxypool_rpc::call::<LeaseRelease>(&client, &req).await;
            }
        }));
    }
    // The simulated provider: each proxy rotates every 30 s (staggered), the way the rotator does it: lock, drain
    // (1 s at most here), store the new IP, report the rotation.
    let rotator = {
        let (client, store, rotations) = (app.client.clone(), app.store.clone(), rotations.clone());
        tokio::spawn(async move {
            let step = EVERY / u32::try_from(PROXIES).unwrap_or(1);
            let mut tick = tokio::time::interval(step);
            for n in 0u64.. {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                let id: ObjectId = ids[usize::try_from(n).unwrap_or(0) % PROXIES];
                let job = format!("sim-{n}");
                let claim = LockRequest { claim: true, ..LockRequest::check(&id.to_hex(), &job, Some(10_000)) };
                if proxypool_rpc::call::<LeaseCtlLock>(&client, &claim).await.is_err() {
                    continue;
                }
                let (client, store, rotations, next_ip) =
                    (client.clone(), store.clone(), rotations.clone(), next_ip.clone());
                tokio::spawn(async move {
                    let check = LockRequest::check(&id.to_hex(), &job, Some(10_000));
                    for _ in 0..20 {
                        match proxypool_rpc::call::<LeaseCtlLock>(&client, &check).await {
                            Ok(l) if l.in_use > 0 => tokio::time::sleep(Duration::from_millis(50)).await,
                            _ => break,
                        }
                    }
                    let ip = fresh_ip(next_ip.fetch_add(1, Ordering::Relaxed));
                    let set = doc! { "$set": { "ip_public": ip, "updatedAt": DateTime::now() } };
                    if store.proxies().update_one(doc! { "_id": id }, set).await.is_ok() {
                        let req = RotatedRequest { proxy_id: id.to_hex(), job_id: job, reset: true };
                        if proxypool_rpc::call::<LeaseCtlRotated>(&client, &req).await.is_ok() {
                            rotations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        })
    };
    for t in tasks {
        t.await?;
    }
    rotator.await?;
    app.shutdown().await;
    Ok((requests.load(Ordering::Relaxed), blocked.load(Ordering::Relaxed), rotations.load(Ordering::Relaxed)))
}
