//! A rolling update of the lease Deployment, as Kubernetes runs it with the manifests in `k8s/` (`maxSurge` 1,
//! `maxUnavailable` 0): a new pod starts and becomes ready, then an old one gets SIGTERM, and so on. The old pods run
//! the `proxypool-lease` of [`PREVIOUS`], built from that commit's sources; the new ones this checkout's.
//!
//! HTTP and NATS consumers lease and return throughout and are judged from their own records, as in the chaos test:
//! no proxy held by more than `PROXY_USE_MAX`, every acknowledged return applied, nothing left held once it settles,
//! and leases kept flowing in every phase of the update.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxypool_contracts::Area;
use proxypool_system_tests::app::LeaseProcess;
use proxypool_system_tests::load::{leader_of, most_held_at_once, Load, Records};
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

const MAX: usize = 3;

/// The release the update starts from: the last commit whose lease log is format 1 (before batch times, lock
/// deadlines, renewals and request ids), which is what deployments run today. Move it forward when a release with a
/// newer format ships, so that this test always rolls from what operators run to what they will run.
const PREVIOUS: &str = "ae260bb04234a2ff4c50376d16e4acbe44858df5";

/// Leases the consumers have been through so far.
fn leases(rec: &Records) -> usize {
    rec.held.lock().map(|h| h.len()).unwrap_or(0)
}

/// Waits (10 s at most) until the consumers get `more` leases beyond `from`: leasing goes on in this phase.
async fn keeps_leasing(rec: &Records, from: usize, more: usize, phase: &str) -> R<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases(rec) < from + more {
        anyhow::ensure!(Instant::now() < deadline, "{phase}: only {} leases in 10 s", leases(rec) - from);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(leases(rec))
}

/// The consumers' load, checked when it stops.
struct Checked(Load);

impl Checked {
    async fn start(app: &TestApp) -> R<Self> {
        let first = app.store.proxies().find_one(bson::doc! {}).await?;
        let probe_proxy = first.map(|d| d.id.to_hex()).ok_or_else(|| anyhow::anyhow!("no proxy seeded"))?;
        Ok(Self(Load::start(app, probe_proxy, Duration::from_secs(10))?))
    }

    /// Stops the consumers and checks their records: no failure, nothing held by more than `PROXY_USE_MAX`, and,
    /// once the projection settles, `in_use` equal to the holders and no returned lease still held.
    async fn finish(self, app: &TestApp) -> R<Arc<Records>> {
        let rec = self.0.stop().await?;
        let failures = rec.failures.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        anyhow::ensure!(failures.is_empty(), "{} failures: {failures:?}", failures.len());
        let held = rec.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        let over: Vec<_> = most_held_at_once(&held).into_iter().filter(|(_, n)| *n > MAX).collect();
        anyhow::ensure!(over.is_empty(), "held by more than PROXY_USE_MAX at once: {over:?}");
        let returned: std::collections::HashSet<&str> = held.iter().map(|h| h.key.as_str()).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let docs = app.store.proxies().find(bson::doc! {}).await?;
            let docs: Vec<proxypool_store::model::ProxyDoc> = futures::TryStreamExt::try_collect(docs).await?;
            // A grant the crashed leader stored and never answered (a NATS consumer without a request id) is held by
            // nobody until LEASE_TTL; every lease a consumer returned must be gone.
            let busy: Vec<_> = docs
                .iter()
                .filter(|d| usize::try_from(d.in_use).ok() != Some(d.proxy_used.len()) || d.proxy_used.len() > MAX)
                .map(|d| d.id)
                .chain(
                    docs.iter()
                        .filter(|d| d.proxy_used.iter().any(|u| returned.contains(u.key.as_str())))
                        .map(|d| d.id),
                )
                .collect();
            if busy.is_empty() {
                return Ok(rec);
            }
            anyhow::ensure!(Instant::now() < deadline, "inconsistent or returned but held: {busy:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The replica of `group` that leads, if one does now.
async fn leading(app: &TestApp, group: &[LeaseProcess]) -> Option<usize> {
    for (i, r) in group.iter().enumerate() {
        if r.leads(&app.http).await {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_lease_replicas_from_the_previous_release_keeps_leasing() -> R {
    // No rotator runs (it is rolled after the lease Deployment), so every proxy takes PROXY_USE_MAX leases and no
    // more: enough proxies for the whole update.
    let app =
        TestApp::builder().lease_instances(0).proxy_use_max(u32::try_from(MAX)?).seed(Area::Vn, 400).spawn().await?;
    let old_bin = tokio::task::spawn_blocking(|| proxypool_test_support::process::lease_binary_at(PREVIOUS)).await??;
    let mut old = Vec::new();
    for n in 0..2 {
        old.push(app.spawn_lease_binary(&old_bin, &format!("old-lease-{n}"), &[], &[]).await?);
    }
    leader_of(&app, &old).await?;

    let load = Checked::start(&app).await?;
    let rec = load.0.rec.clone();
    let mut seen = keeps_leasing(&rec, 0, 50, "old replicas only").await?;
    let began = Instant::now();

    // Kubernetes stops old pods in no particular order: the old leader goes first here, so the lead passes during
    // the update, to the other old replica or to the new one, whichever wins the election.
    let (mut new, mut leaders) = (Vec::new(), Vec::new());
    for n in 0..2 {
        new.push(app.spawn_lease_process(&format!("new-lease-{n}"), &[], &[]).await?);
        seen = keeps_leasing(&rec, seen, 50, &format!("new replica {n} started")).await?;
        let leader = leading(&app, &old).await.unwrap_or(0);
        let mut going = old.remove(leader);
        let status = going.terminate().await?;
        anyhow::ensure!(status.success(), "old replica stopped with {status}");
        seen = keeps_leasing(&rec, seen, 50, &format!("old replica {n} stopped")).await?;
        let lead = match (leading(&app, &old).await, leading(&app, &new).await) {
            (Some(i), _) => format!("old {i}"),
            (_, Some(i)) => format!("new {i}"),
            _ => "none".to_owned(),
        };
        leaders.push(lead);
    }
    let leader = leader_of(&app, &new).await?;
    seen = keeps_leasing(&rec, seen, 50, "new replicas only").await?;

    let rec = load.finish(&app).await?;
    eprintln!(
        "upgrade: {seen} leases; leading after each old replica stopped: {leaders:?}, at the end: new {leader}; \
         service_unavailable or no answer seen by consumers during the update: {}",
        rec.unavailable_between(began, Instant::now())
    );
    for mut r in new {
        let status = r.terminate().await?;
        anyhow::ensure!(status.success(), "new replica stopped with {status}");
    }
    Ok(())
}

/// The mixed moment of an update the first test may not reach (which replica wins a hand-over is the election's
/// choice): a new replica leads, writing the new format, while an old one follows it. The new leader then crashes
/// (SIGKILL), so the old replica, having followed batches of a newer format, takes over and keeps leasing; a new
/// replica started after it follows the old format and takes the lead back at the old one's stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_replica_following_a_new_leader_can_take_over_and_hand_back() -> R {
    let app =
        TestApp::builder().lease_instances(0).proxy_use_max(u32::try_from(MAX)?).seed(Area::Vn, 400).spawn().await?;
    let old_bin = tokio::task::spawn_blocking(|| proxypool_test_support::process::lease_binary_at(PREVIOUS)).await??;
    let mut first_new = app.spawn_lease_process("new-lease-0", &[], &[]).await?;
    first_new.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    let mut old = app.spawn_lease_binary(&old_bin, "old-lease-0", &[], &[]).await?;

    let load = Checked::start(&app).await?;
    let rec = load.0.rec.clone();
    let mut seen = keeps_leasing(&rec, 0, 50, "a new leader, an old follower").await?;
    let crash = Instant::now();
    first_new.kill().await;
    old.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    seen = keeps_leasing(&rec, seen, 50, "the old replica leads").await?;
    let mut second_new = app.spawn_lease_process("new-lease-1", &[], &[]).await?;
    seen = keeps_leasing(&rec, seen, 50, "a new replica follows the old leader").await?;
    let status = old.terminate().await?;
    anyhow::ensure!(status.success(), "old replica stopped with {status}");
    second_new.wait_to_lead(&app.http, Duration::from_secs(10)).await?;
    seen = keeps_leasing(&rec, seen, 50, "the new replica leads again").await?;

    let rec = load.finish(&app).await?;
    eprintln!(
        "upgrade, mixed: {seen} leases; service_unavailable or no answer seen by consumers from the new leader's crash \
         on: {}",
        rec.unavailable_between(crash, Instant::now())
    );
    let status = second_new.terminate().await?;
    anyhow::ensure!(status.success(), "new replica stopped with {status}");
    Ok(())
}
