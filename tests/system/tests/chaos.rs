//! Chaos: HTTP and NATS consumers lease, hold briefly and return, while rotation runs against local fakes and the
//! system is hurt: the lease leader is killed with SIGKILL (twice), a standby is killed, and nats-server is killed
//! and restarted. The lease replicas are real `proxypool-lease` processes, so SIGKILL is a real crash.
//!
//! Everything is judged from the consumers' own records: no proxy was ever held by more than `PROXY_USE_MAX` at
//! once (a consumer holds a lease from receiving its grant to sending its return, a sub-interval of the service's
//! own), every acknowledged return is applied, MongoDB's projection is consistent once it settles, no proxy stays
//! locked, and each fault heals in time (a leader's death within 3 s).

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, ReleaseRequest};
use proxypool_contracts::{Area, ErrorCode};
use proxypool_system_tests::fakes::{FakeWorld, ForwardProxy};
use proxypool_system_tests::TestApp;
use tokio::process::{Child, Command};

type R<T = ()> = anyhow::Result<T>;

const MAX: usize = 3;

/// One lease as a consumer lived it.
#[derive(Debug, Clone)]
struct Held {
    proxy: String,
    key: String,
    got: Instant,
    let_go: Instant,
}

#[derive(Debug, Default)]
struct Records {
    held: Mutex<Vec<Held>>,
    failures: Mutex<Vec<String>>,
    /// The probe's answered requests: (sent, answered), in order.
    probe_ok: Mutex<Vec<(Instant, Instant)>>,
    /// `service_unavailable` (or no answer) seen by the consumers: [HTTP acquire, NATS acquire, any return].
    unavailable: [std::sync::atomic::AtomicUsize; 3],
}

impl Records {
    fn fail(&self, what: String) {
        if let Ok(mut f) = self.failures.lock() {
            f.push(what);
        }
    }
}

/// A `proxypool-lease` process.
struct Replica {
    child: Child,
    admin: String,
}

async fn start_replica(app: &TestApp, n: usize) -> R<Replica> {
    let bin = proxypool_test_support::process::workspace_binary("proxypool-lease")?;
    let env = app.env_pairs_for("lease", &[("HOSTNAME", format!("chaos-lease-{n}")), ("LOG_LEVEL", "warn".into())]);
    let admin = env.iter().rev().find(|(k, _)| k == "LEASE_ADMIN_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
    let child =
        Command::new(bin).envs(env).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true).spawn()?;
    let replica = Replica { child, admin };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(app.http.get(format!("http://{}/readyz", replica.admin)).send().await, Ok(r) if r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "lease replica {n} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(replica)
}

/// Whether a replica reports that it leads.
async fn leads(app: &TestApp, r: &Replica) -> bool {
    let Ok(res) = app.http.get(format!("http://{}/metrics", r.admin)).timeout(Duration::from_secs(1)).send().await
    else {
        return false;
    };
    res.text().await.unwrap_or_default().lines().any(|l| l.trim() == "proxypool_lease_leader 1")
}

async fn leader_index(app: &TestApp, replicas: &[Replica]) -> R<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if leads(app, r).await {
                return Ok(i);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no lease replica leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a consumer needs: a NATS client, an HTTP client and the gateway.
#[derive(Clone)]
struct Ctx {
    client: async_nats::Client,
    http: reqwest::Client,
    base: String,
}

impl Ctx {
    async fn http_get_proxy(&self, area: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(format!("{}/api/get-proxy", self.base))
            .query(&[("area", area)])
            .header("Authorization", proxypool_system_tests::app::API_KEY)
            .send()
            .await
    }

    async fn http_return(&self, id: &str, key: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}/webhook/return-proxy/{id}", self.base))
            .query(&[("key", key)])
            .header("Authorization", proxypool_system_tests::app::API_KEY)
            .send()
            .await
    }
}

/// Acquire, hold 10–40 ms, return (retrying a return until it is acknowledged), record; until `stop`.
async fn consumer(app: Ctx, http: bool, n: usize, stop: Arc<AtomicBool>, rec: Arc<Records>) {
    let name = format!("chaos-{}-{n}", if http { "http" } else { "nats" });
    while !stop.load(Ordering::Relaxed) {
        let grant = if http {
            match app.http_get_proxy("vn").await {
                Ok(res) if res.status().is_success() => res
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| Some((v["id"].as_str()?.to_owned(), v["key"].as_str()?.to_owned()))),
                Ok(res) if res.status().as_u16() == 503 => {
                    let body = res.json::<serde_json::Value>().await.unwrap_or_default();
                    if body["error"]["code"] != "no_proxy_available" {
                        rec.unavailable[0].fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                Ok(res) => {
                    rec.fail(format!("{name}: get-proxy answered {}", res.status()));
                    None
                }
                Err(_) => None,
            }
        } else {
            let req = AcquireRequest {
                area: Some("vn".into()),
                consumer: Some(name.clone()),
                callback_url: None,
                ..Default::default()
            };
            match proxypool_rpc::call::<LeaseAcquire>(&app.client, &req).await {
                Ok(g) => Some((g.id, g.key)),
                Err(proxypool_rpc::CallError::Remote(e)) if !e.code.is_retryable() => {
                    rec.fail(format!("{name}: acquire refused for good: {e:?}"));
                    None
                }
                Err(proxypool_rpc::CallError::Remote(e)) if e.code == ErrorCode::NoProxyAvailable => None,
                Err(_) => {
                    rec.unavailable[1].fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        };
        let Some((proxy, key)) = grant else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let got = Instant::now();
        tokio::time::sleep(Duration::from_millis(10 + (rand::random::<u64>() % 30))).await;
        let let_go = Instant::now();
        let mut retried = false;
        let until = Instant::now() + Duration::from_secs(40);
        loop {
            let answer: Result<(), Option<ErrorCode>> = if http {
                match app.http_return(&proxy, &key).await {
                    Ok(res) if res.status().is_success() => Ok(()),
                    Ok(res) if res.status().as_u16() == 404 => Err(Some(ErrorCode::NotFound)),
                    _ => Err(None),
                }
            } else {
                let req = ReleaseRequest { proxy_id: Some(proxy.clone()), key: Some(key.clone()), failure: None };
                match proxypool_rpc::call::<LeaseRelease>(&app.client, &req).await {
                    Ok(_) => Ok(()),
                    Err(proxypool_rpc::CallError::Remote(e)) if e.code == ErrorCode::NotFound => {
                        Err(Some(ErrorCode::NotFound))
                    }
                    Err(_) => Err(None),
                }
            };
            match answer {
                Ok(()) => break,
                // Returned by an earlier attempt whose answer was lost (the leader died after storing it).
                Err(Some(ErrorCode::NotFound)) if retried => break,
                Err(Some(_)) => {
                    rec.fail(format!("{name}: the lease {key} on {proxy} was gone at its first return"));
                    break;
                }
                Err(None) if Instant::now() < until => {
                    rec.unavailable[2].fetch_add(1, Ordering::Relaxed);
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(None) => {
                    rec.fail(format!("{name}: the return of {key} was never acknowledged"));
                    break;
                }
            }
        }
        if let Ok(mut h) = rec.held.lock() {
            h.push(Held { proxy, key, got, let_go });
        }
    }
}

/// Every 20 ms, asks the lease service to return a lease that does not exist, recording when it answered
/// `not_found`. That answer comes only from a leader that has proved, through the log's fence, that it leads and
/// is up to date, and it uses no capacity: it times each fault's healing without competing with the consumers.
async fn probe(app: Ctx, proxy: String, stop: Arc<AtomicBool>, rec: Arc<Records>) {
    let req = ReleaseRequest { proxy_id: Some(proxy), key: Some("000000000000000000000000".into()), failure: None };
    while !stop.load(Ordering::Relaxed) {
        // A short timeout: a request lost with a killed leader must not hide how soon the next one is answered.
        let sent = Instant::now();
        let answer =
            proxypool_rpc::call_within::<LeaseRelease>(&app.client, &req, Some(Duration::from_millis(300))).await;
        if let Err(proxypool_rpc::CallError::Remote(e)) = answer {
            if e.code == ErrorCode::NotFound {
                if let Ok(mut ok) = rec.probe_ok.lock() {
                    ok.push((sent, Instant::now()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long after `fault` a request sent after it was first answered.
fn healed_after(rec: &Records, fault: Instant) -> Option<Duration> {
    let ok = rec.probe_ok.lock().ok()?;
    ok.iter().find(|(sent, _)| *sent > fault).map(|(_, answered)| *answered - fault)
}

/// The most leases held on one proxy at one instant, from the consumers' records.
fn most_held_at_once(held: &[Held]) -> HashMap<String, usize> {
    let mut by_proxy: HashMap<&str, Vec<(Instant, i32)>> = HashMap::new();
    for h in held {
        by_proxy.entry(&h.proxy).or_default().extend([(h.got, 1), (h.let_go, -1)]);
    }
    by_proxy
        .into_iter()
        .map(|(p, mut ev)| {
            // At the same instant, a return counts before a grant.
            ev.sort();
            let (mut now, mut most) = (0i32, 0i32);
            for (_, d) in ev {
                now += d;
                most = most.max(now);
            }
            (p.to_owned(), usize::try_from(most).unwrap_or(0))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_leader_kills_a_standby_kill_and_a_nats_restart() -> R {
    let started = Instant::now();
    let mut app = TestApp::builder().lease_instances(0).proxy_use_max(u32::try_from(MAX)?).spawn().await?;
    let fake = FakeWorld::start().await?;
    let upstream = ForwardProxy::start("puser", "ppass").await?;
    // Every proxy rotates every 2 s (a proxy takes PROXY_USE_MAX leases per rotation cycle), through the fakes.
    for k in 0..12 {
        let key = format!("chaos{k}");
        fake.answer(&key, 200, "{}");
        // Its sync finds no lease replica yet (they start below and load MongoDB): that error is expected.
        let _ = app.insert_proxy_behind(Area::Vn, &upstream, fake.rotate_url(&key), |d| d.rotate_time = 2).await;
    }
    let first = app.store.proxies().find_one(bson::doc! {}).await?;
    let probe_proxy = first.map(|d| d.id.to_hex()).ok_or_else(|| anyhow::anyhow!("no proxy inserted"))?;
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(start_replica(&app, n).await?);
    }
    let mut next_replica = 3;
    leader_index(&app, &replicas).await?;
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

    let ctx = Ctx {
        client: app.client.clone(),
        http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        base: format!("http://{}", app.addr),
    };
    let (stop, rec) = (Arc::new(AtomicBool::new(false)), Arc::new(Records::default()));
    let mut tasks = Vec::new();
    for n in 0..3 {
        tasks.push(tokio::spawn(consumer(ctx.clone(), true, n, stop.clone(), rec.clone())));
        tasks.push(tokio::spawn(consumer(ctx.clone(), false, n, stop.clone(), rec.clone())));
    }
    let probe_task = tokio::spawn(probe(ctx.clone(), probe_proxy.clone(), stop.clone(), rec.clone()));

    let mut faults: Vec<(&str, Instant)> = Vec::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for round in 0..2 {
        // The leader dies.
        let i = leader_index(&app, &replicas).await?;
        let mut dead = replicas.remove(i);
        dead.child.start_kill()?;
        faults.push((if round == 0 { "leader SIGKILL 1" } else { "leader SIGKILL 2" }, Instant::now()));
        let _ = dead.child.wait().await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        replicas.push(start_replica(&app, next_replica).await?);
        next_replica += 1;
        if round == 0 {
            // A standby dies.
            let leader = leader_index(&app, &replicas).await?;
            let i = usize::from(leader == 0);
            let mut dead = replicas.remove(i);
            dead.child.start_kill()?;
            faults.push(("standby SIGKILL", Instant::now()));
            let _ = dead.child.wait().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            replicas.push(start_replica(&app, next_replica).await?);
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

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    probe_task.await?;

    // How long each fault took to heal.
    let mut report = Vec::new();
    for (what, at) in &faults {
        let healed = healed_after(&rec, *at);
        report.push(format!("{what}: healed after {healed:?}"));
        let limit = if what.starts_with("nats") { Duration::from_secs(8) } else { Duration::from_secs(3) };
        anyhow::ensure!(healed.is_some_and(|h| h < limit), "{what} did not heal within {limit:?}: {healed:?}");
    }
    eprintln!("chaos: {}", report.join("; "));

    let failures = rec.failures.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    anyhow::ensure!(failures.is_empty(), "{} failures: {failures:?}", failures.len());
    let held = rec.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    anyhow::ensure!(held.len() > 200, "only {} leases went through", held.len());
    let over: Vec<_> = most_held_at_once(&held).into_iter().filter(|(_, n)| *n > MAX).collect();
    anyhow::ensure!(over.is_empty(), "held by more than PROXY_USE_MAX at once: {over:?}");

    // No new rotation is due from now on; those under way finish and unlock. The cycle goes to an hour as well: a job
    // that read the document before this write stores `next_rotate` = now + its `rotate_time`, and with 2 s that
    // proxy would rotate on for ever, so that "all unlocked at once" would be luck. The projection settles:
    // consistent, and no returned lease is still held.
    let later = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 3_600_000);
    let calm = bson::doc! { "$set": { "next_rotate": later, "rotate_time": 3_600 } };
    app.store.proxies().update_many(bson::doc! {}, calm).await?;
    let known: HashSet<&str> = held.iter().map(|h| h.key.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let docs = app.store.proxies().find(bson::doc! {}).await?;
        let docs: Vec<proxypool_store::model::ProxyDoc> = futures::TryStreamExt::try_collect(docs).await?;
        let locked: Vec<_> = docs.iter().filter(|d| d.is_rotating).map(|d| d.id).collect();
        let inconsistent: Vec<_> = docs
            .iter()
            .filter(|d| usize::try_from(d.in_use).ok() != Some(d.proxy_used.len()) || d.proxy_used.len() > MAX)
            .map(|d| d.id)
            .collect();
        let still_held: Vec<&str> = docs
            .iter()
            .flat_map(|d| d.proxy_used.iter())
            .map(|u| u.key.as_str())
            .filter(|k| known.contains(k))
            .collect();
        if locked.is_empty() && inconsistent.is_empty() && still_held.is_empty() {
            break docs.iter().filter(|d| d.ip_public.is_some()).count();
        }
        if Instant::now() >= deadline {
            let mut why = Vec::new();
            for d in docs.iter().filter(|d| d.is_rotating) {
                // Asked with the job MongoDB names: the lease service answers its lock's age and holders if that job
                // holds it, and a conflict if another one does (the projection then trails the lease service).
                let ask = proxypool_contracts::rotation::LockRequest::check(
                    &d.id.to_hex(),
                    d.rotation_job.as_deref().unwrap_or_default(),
                    None,
                );
                let held = proxypool_rpc::call::<proxypool_contracts::endpoints::LeaseCtlLock>(&app.client, &ask).await;
                why.push(format!(
                    "{}: job {:?} status {:?} since {:?} in_use {} held by {:?} lease_rev {}; lease service: {held:?}",
                    d.id,
                    d.rotation_job,
                    d.status,
                    d.rotating_since,
                    d.in_use,
                    d.proxy_used.iter().map(|u| u.ip.as_str()).collect::<Vec<_>>(),
                    d.lease_rev
                ));
            }
            anyhow::bail!(
                "did not settle: locked {why:?}, inconsistent {inconsistent:?}, returned but held {still_held:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    anyhow::ensure!(rotated >= 1, "no rotation went through during the chaos");
    let seen: Vec<usize> = rec.unavailable.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    eprintln!(
        "chaos: {} leases, {rotated} proxies rotated, took {:?}; service_unavailable or no answer seen by consumers: \
         HTTP acquire {}, NATS acquire {}, returns {}",
        held.len(),
        started.elapsed(),
        seen[0],
        seen[1],
        seen[2]
    );
    rotator.stop().await;
    for mut r in replicas {
        let _ = r.child.start_kill();
        let _ = r.child.wait().await;
    }
    Ok(())
}
