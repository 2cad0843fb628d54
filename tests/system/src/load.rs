//! Load judged from the consumers' own records, for the fault tests (chaos, the NATS cluster): HTTP and NATS
//! consumers that lease, hold briefly and return; a probe that times how soon a fault heals; and the check that no
//! proxy was held by more than `PROXY_USE_MAX` at once.
//!
//! A consumer holds a lease from receiving its grant to sending its return, a sub-interval of the service's own, so
//! an over-lease seen here is a real one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxypool_contracts::endpoints::{LeaseAcquire, LeaseRelease};
use proxypool_contracts::lease::{AcquireRequest, ReleaseRequest};
use proxypool_contracts::ErrorCode;

use crate::app::LeaseProcess;
use crate::TestApp;

/// One lease as a consumer lived it.
#[derive(Debug, Clone)]
pub struct Held {
    /// The proxy.
    pub proxy: String,
    /// The lease key.
    pub key: String,
    /// When the grant arrived.
    pub got: Instant,
    /// When the consumer stopped using it (before sending its return).
    pub let_go: Instant,
}

/// A consumer's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `GET /api/get-proxy`.
    HttpAcquire,
    /// `lease.acquire` over NATS.
    NatsAcquire,
    /// A return, over either.
    Return,
}

/// What the consumers and the probe saw.
#[derive(Debug, Default)]
pub struct Records {
    /// Every lease held and returned.
    pub held: Mutex<Vec<Held>>,
    /// What must never happen, as the consumers saw it.
    pub failures: Mutex<Vec<String>>,
    /// The probe's answered requests: (sent, answered), in order.
    pub probe_ok: Mutex<Vec<(Instant, Instant)>>,
    /// `service_unavailable` (or no answer) seen by the consumers, when, and on which [`Call`].
    pub unavailable: Mutex<Vec<(Instant, Call)>>,
    /// How long each HTTP acquire answered `service_unavailable` had waited: the gateway's retries before it gave up.
    pub http_waits: Mutex<Vec<Duration>>,
}

impl Records {
    /// Records a `service_unavailable` (or no answer) seen now.
    pub fn unavailable(&self, call: Call) {
        if let Ok(mut u) = self.unavailable.lock() {
            u.push((Instant::now(), call));
        }
    }

    /// How many `service_unavailable` answers (or none) the consumers saw in `[from, to)`: HTTP acquires, NATS
    /// acquires and returns, as text.
    pub fn unavailable_between(&self, from: Instant, to: Instant) -> String {
        let u = self.unavailable.lock().map(|u| u.clone()).unwrap_or_default();
        let count = |c: Call| u.iter().filter(|(t, k)| *k == c && *t >= from && *t < to).count();
        format!(
            "HTTP acquire {}, NATS acquire {}, returns {}",
            count(Call::HttpAcquire),
            count(Call::NatsAcquire),
            count(Call::Return)
        )
    }

    /// Records a failure.
    pub fn fail(&self, what: String) {
        if let Ok(mut f) = self.failures.lock() {
            f.push(what);
        }
    }
}

/// What a consumer needs: a NATS client, an HTTP client and the gateway.
#[derive(Clone)]
pub struct Ctx {
    /// The consumer's NATS client.
    pub client: async_nats::Client,
    /// The consumer's HTTP client.
    pub http: reqwest::Client,
    /// `http://<gateway>`.
    pub base: String,
}

impl Ctx {
    async fn http_get_proxy(&self, area: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(format!("{}/api/get-proxy", self.base))
            .query(&[("area", area)])
            .header("Authorization", crate::API_KEY)
            .send()
            .await
    }

    async fn http_return(&self, id: &str, key: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}/webhook/return-proxy/{id}", self.base))
            .query(&[("key", key)])
            .header("Authorization", crate::API_KEY)
            .send()
            .await
    }
}

/// Acquire, hold 10–40 ms, return (retrying a return until it is acknowledged), record; until `stop`.
pub async fn consumer(app: Ctx, http: bool, n: usize, stop: Arc<AtomicBool>, rec: Arc<Records>) {
    let name = format!("chaos-{}-{n}", if http { "http" } else { "nats" });
    while !stop.load(Ordering::Relaxed) {
        let grant = if http {
            let sent = Instant::now();
            match app.http_get_proxy("vn").await {
                Ok(res) if res.status().is_success() => res
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| Some((v["id"].as_str()?.to_owned(), v["key"].as_str()?.to_owned()))),
                Ok(res) if res.status().as_u16() == 503 => {
                    let body = res.json::<serde_json::Value>().await.unwrap_or_default();
                    if body["error"]["code"] != "no_proxy_available" {
                        rec.unavailable(Call::HttpAcquire);
                        if let Ok(mut w) = rec.http_waits.lock() {
                            w.push(sent.elapsed());
                        }
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
                    rec.unavailable(Call::NatsAcquire);
                    None
                }
            }
        };
        let Some((proxy, key)) = grant else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let got = Instant::now();
        tokio::time::sleep(Duration::from_millis(10 + jitter())).await;
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
                let req = ReleaseRequest {
                    proxy_id: Some(proxy.clone()),
                    key: Some(key.clone()),
                    failure: None,
                    ..Default::default()
                };
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
                    rec.unavailable(Call::Return);
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
pub async fn probe(app: Ctx, proxy: String, stop: Arc<AtomicBool>, rec: Arc<Records>) {
    let req = ReleaseRequest {
        proxy_id: Some(proxy),
        key: Some("000000000000000000000000".into()),
        failure: None,
        ..Default::default()
    };
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
pub fn healed_after(rec: &Records, fault: Instant) -> Option<Duration> {
    let ok = rec.probe_ok.lock().ok()?;
    ok.iter().find(|(sent, _)| *sent > fault).map(|(_, answered)| *answered - fault)
}

/// The most leases held on one proxy at one instant, from the consumers' records.
pub fn most_held_at_once(held: &[Held]) -> HashMap<String, usize> {
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

/// 0–29 ms, different on each call: consumers hold for different times, so returns and grants interleave.
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() % 30
}

/// Which of `replicas` leads (waiting up to 10 s for one to).
pub async fn leader_of(app: &TestApp, replicas: &[LeaseProcess]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if r.leads(&app.http).await {
                return Ok(i);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no lease replica leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops rotation and waits (30 s at most) until MongoDB's projection settles: no proxy locked, `in_use` equal to
/// its holders and at most `max`, and no lease the consumers returned still held. Answers how many proxies have a
/// verified public IP (went through a rotation). On a timeout, says for each locked proxy what the lease service
/// holds for it.
pub async fn settle(app: &TestApp, held: &[Held], max: usize) -> anyhow::Result<usize> {
    // No new rotation is due from now on; those under way finish and unlock. The cycle goes to an hour as well: a job
    // that read the document before this write stores `next_rotate` = now + its `rotate_time`, and with 2 s that
    // proxy would rotate on for ever, so that "all unlocked at once" would be luck. The projection settles:
    // consistent, and no returned lease is still held.
    let later = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 3_600_000);
    let calm = bson::doc! { "$set": { "next_rotate": later, "rotate_time": 3_600 } };
    app.store.proxies().update_many(bson::doc! {}, calm).await?;
    let known: HashSet<&str> = held.iter().map(|h| h.key.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let docs = app.store.proxies().find(bson::doc! {}).await?;
        let docs: Vec<proxypool_store::model::ProxyDoc> = futures::TryStreamExt::try_collect(docs).await?;
        let locked: Vec<_> = docs.iter().filter(|d| d.is_rotating).map(|d| d.id).collect();
        let inconsistent: Vec<_> = docs
            .iter()
            .filter(|d| usize::try_from(d.in_use).ok() != Some(d.proxy_used.len()) || d.proxy_used.len() > max)
            .map(|d| d.id)
            .collect();
        let still_held: Vec<&str> = docs
            .iter()
            .flat_map(|d| d.proxy_used.iter())
            .map(|u| u.key.as_str())
            .filter(|k| known.contains(k))
            .collect();
        if locked.is_empty() && inconsistent.is_empty() && still_held.is_empty() {
            return Ok(docs.iter().filter(|d| d.ip_public.is_some()).count());
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
    }
}

/// Three HTTP and three NATS consumers and the probe, running until [`Load::stop`].
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    /// What they saw.
    pub rec: Arc<Records>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts them against `app`, the probe on `probe_proxy`; HTTP requests give up after `http_timeout`.
    pub fn start(app: &TestApp, probe_proxy: String, http_timeout: Duration) -> anyhow::Result<Self> {
        let ctx = Ctx {
            client: app.client.clone(),
            http: reqwest::Client::builder().timeout(http_timeout).build()?,
            base: format!("http://{}", app.addr),
        };
        let (stop, rec) = (Arc::new(AtomicBool::new(false)), Arc::new(Records::default()));
        let mut tasks = Vec::new();
        for n in 0..3 {
            tasks.push(tokio::spawn(consumer(ctx.clone(), true, n, stop.clone(), rec.clone())));
            tasks.push(tokio::spawn(consumer(ctx.clone(), false, n, stop.clone(), rec.clone())));
        }
        tasks.push(tokio::spawn(probe(ctx, probe_proxy, stop.clone(), rec.clone())));
        Ok(Self { stop, rec, tasks })
    }

    /// Stops them and waits until each has finished (a consumer returns what it holds first).
    pub async fn stop(self) -> anyhow::Result<Arc<Records>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await?;
        }
        Ok(self.rec)
    }
}
