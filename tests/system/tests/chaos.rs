//! Chaos: HTTP and NATS consumers lease, hold briefly and return, while rotation runs against local fakes and the
//! system is hurt: the lease leader is killed with SIGKILL (twice), a standby is killed, and nats-server is killed
//! and restarted. The lease replicas are real `proxypool-lease` processes, so SIGKILL is a real crash.
//!
//! Everything is judged from the consumers' own records: no proxy was ever held by more than `PROXY_USE_MAX` at
//! once (a consumer holds a lease from receiving its grant to sending its return, a sub-interval of the service's
//! own), every acknowledged return is applied, MongoDB's projection is consistent once it settles, no proxy stays
//! locked, and each fault heals in time (a leader's death within 3 s).

use std::time::{Duration, Instant};

use proxypool_contracts::Area;
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::load::{healed_after, leader_of, most_held_at_once, settle, Load};
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

const MAX: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_leader_kills_a_standby_kill_and_a_nats_restart() -> R {
    let started = Instant::now();
    let mut app = TestApp::builder().lease_instances(0).proxy_use_max(u32::try_from(MAX)?).spawn().await?;
    let fake = FakeWorld::start().await?;
    // Each proxy behind an upstream of its own, so each exits on an IP of its own (proxies sharing an exit IP are
    // kept out of the pool as duplicates).
    fake.ip_per_upstream(true);
    let mut upstreams = Vec::new();
    // Every proxy rotates every 2 s (a proxy takes PROXY_USE_MAX leases per rotation cycle), through the fakes.
    for k in 0..12 {
        let key = format!("chaos{k}");
        fake.answer(&key, 200, "{}");
        // Its sync finds no lease replica yet (they start below and load MongoDB): that error is expected.
        let upstream = ForwardProxy::start("puser", "ppass").await?;
        let _ = app.insert_proxy_behind(Area::Vn, &upstream, fake.rotate_url(&key), |d| d.rotate_time = 2).await;
        upstreams.push(upstream);
    }
    let first = app.store.proxies().find_one(bson::doc! {}).await?;
    let probe_proxy = first.map(|d| d.id.to_hex()).ok_or_else(|| anyhow::anyhow!("no proxy inserted"))?;
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(app.spawn_lease_process(&format!("chaos-lease-{n}"), &[], &[]).await?);
    }
    let mut next_replica = 3;
    leader_of(&app, &replicas).await?;
    // Proxies inserted before any replica ran are in MongoDB, which a fresh start loads; the ones behind the
    // upstream were synced above only if a replica already ran, so sync them now.
    app.store
        .proxies()
        .update_many(bson::doc! {}, bson::doc! { "$set": { "updatedAt": bson::DateTime::now() } })
        .await?;
    let full = proxypool_contracts::rotation::SyncRequest { proxy_ids: Vec::new(), full: true };
    proxypool_rpc::call_within::<proxypool_contracts::endpoints::LeaseCtlSync>(&app.client, &full, None).await?;
    let mut rotator_config = app.rotator_config(&fake);
    // A lock whose job was lost in a fault is taken back by the lease service at its deadline, ROTATE_LOCK_TTL after
    // the job last renewed it; short here so that "no proxy stays locked" is checked within the test.
    rotator_config.lock_ttl = Duration::from_secs(8);
    // A grant orphaned by a leader kill (appended, never answered) is held by nobody until LEASE_TTL, so a rotation
    // of its proxy drains for the whole ROTATE_DRAIN_MAX: shorter than the settle window below.
    rotator_config.drain_max = Duration::from_secs(5);
    let rotator = app.start_rotator(rotator_config).await?;

    let load = Load::start(&app, probe_proxy, Duration::from_secs(10))?;

    let mut faults: Vec<(&str, Instant)> = Vec::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for round in 0..2 {
        // The leader dies.
        let i = leader_of(&app, &replicas).await?;
        let mut dead = replicas.remove(i);
        dead.child.start_kill()?;
        faults.push((if round == 0 { "leader SIGKILL 1" } else { "leader SIGKILL 2" }, Instant::now()));
        let _ = dead.child.wait().await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        replicas.push(app.spawn_lease_process(&format!("chaos-lease-{next_replica}"), &[], &[]).await?);
        next_replica += 1;
        if round == 0 {
            // A standby dies.
            let leader = leader_of(&app, &replicas).await?;
            let i = usize::from(leader == 0);
            let mut dead = replicas.remove(i);
            dead.child.start_kill()?;
            faults.push(("standby SIGKILL", Instant::now()));
            let _ = dead.child.wait().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            replicas.push(app.spawn_lease_process(&format!("chaos-lease-{next_replica}"), &[], &[]).await?);
            next_replica += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    // nats-server dies and comes back.
    app.nats_server.kill();
    faults.push(("nats-server SIGKILL + restart", Instant::now()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.nats_server.restart()?;
    tokio::time::sleep(Duration::from_secs(8)).await;

    let rec = load.stop().await?;

    // How long each fault took to heal, and what the consumers saw until the next one: printed before any check,
    // so that a failed run shows it.
    let end = Instant::now();
    let mut report = Vec::new();
    let mut late = Vec::new();
    for (i, (what, at)) in faults.iter().enumerate() {
        let healed = healed_after(&rec, *at);
        let until = faults.get(i + 1).map_or(end, |f| f.1);
        report.push(format!("{what}: healed after {healed:?}, unavailable: {}", rec.unavailable_between(*at, until)));
        let limit = if what.starts_with("nats") { Duration::from_secs(8) } else { Duration::from_secs(3) };
        if healed.is_none_or(|h| h >= limit) {
            late.push(format!("{what} did not heal within {limit:?}: {healed:?}"));
        }
    }
    eprintln!("chaos: {}", report.join("; "));
    anyhow::ensure!(late.is_empty(), "{late:?}");

    let failures = rec.failures.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    anyhow::ensure!(failures.is_empty(), "{} failures: {failures:?}", failures.len());
    let held = rec.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    anyhow::ensure!(held.len() > 200, "only {} leases went through", held.len());
    let over: Vec<_> = most_held_at_once(&held).into_iter().filter(|(_, n)| *n > MAX).collect();
    anyhow::ensure!(over.is_empty(), "held by more than PROXY_USE_MAX at once: {over:?}");

    let rotated = settle(&app, &held, MAX).await?;
    anyhow::ensure!(rotated >= 1, "no rotation went through during the chaos");
    eprintln!(
        "chaos: {} leases, {rotated} proxies rotated, took {:?}; service_unavailable or no answer seen by consumers \
         before the first fault: {}",
        held.len(),
        started.elapsed(),
        rec.unavailable_between(started, faults[0].1),
    );
    rotator.stop().await;
    for mut r in replicas {
        let _ = r.child.start_kill();
        let _ = r.child.wait().await;
    }
    Ok(())
}
