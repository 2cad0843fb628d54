//! Two deployments on one NATS server: each with its own MongoDB database, the second in its own namespace
//! (`PROXYPOOL_NAMESPACE`). Leasing at once, each only ever grants its own proxies; their streams and buckets are
//! apart; and a lease service pointed at the other deployment's lease log refuses to start, naming both databases
//! and the setting to change.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use proxypool_contracts::lease::LeaseGrant;
use proxypool_contracts::{Area, Reply};
use proxypool_store::{Store, StoreConfig};
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

const NS: &str = "staging";

/// One request on `subject`, its reply envelope decoded.
async fn call<T: serde::de::DeserializeOwned>(
    nc: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> R<Reply<T>> {
    let msg = nc.request(subject, serde_json::to_vec(&body)?.into()).await?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Leases and returns `n` times with the subjects of the deployment whose subject prefix is `prefix`, collecting
/// the proxies granted.
async fn lease_many(nc: async_nats::Client, prefix: &str, n: usize) -> R<HashSet<String>> {
    let mut seen = HashSet::new();
    for i in 0..n {
        let body = serde_json::json!({"area": "vn", "consumer": format!("c{i}")});
        let grant = match call::<LeaseGrant>(&nc, format!("{prefix}proxypool.v1.lease.acquire"), body).await? {
            Reply::Ok(g) => g,
            Reply::Err(e) => anyhow::bail!("{prefix}: no lease: {e}"),
        };
        seen.insert(grant.id.clone());
        let back = serde_json::json!({"proxy_id": grant.id, "key": grant.key});
        call::<serde_json::Value>(&nc, format!("{prefix}proxypool.v1.lease.release"), back).await?.into_result()?;
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_on_one_nats_never_meet() -> R {
    // Production: the default namespace, in this process.
    let app = TestApp::builder().seed(Area::Vn, 3).proxy_use_max(1_000).spawn().await?;
    let production: HashSet<String> = app.all_proxies().await?.iter().map(|p| p.id.to_hex()).collect();
    // Staging: its own database on the same MongoDB server, its own namespace on the same NATS server.
    let staging_db = format!("{}_staging", app.store_config.database);
    let staging_store = Store::connect(&StoreConfig::local(app.mongo_server.uri(), staging_db.clone()), "test").await?;
    staging_store.ensure_indexes().await?;
    let mut staging = HashSet::new();
    for i in 0..3 {
        let d = app.new_proxy(Area::Vn, 100 + i);
        staging.insert(d.id.to_hex());
        staging_store.proxies().insert_one(&d).await?;
    }
    let env = [("MONGODB_DATABASE", staging_db.clone()), ("PROXYPOOL_NAMESPACE", NS.to_owned())];
    let mut staging_lease = app.spawn_lease_process("staging-lease", &env, &[]).await?;
    staging_lease.wait_to_lead(&app.http, Duration::from_secs(10)).await?;

    // Both lease at once; each grants only its own proxies.
    let (prod, stag) =
        tokio::join!(lease_many(app.client.clone(), "", 60), lease_many(app.client.clone(), "staging.", 60));
    let (prod, stag) = (prod?, stag?);
    assert!(prod.is_subset(&production), "production granted {prod:?}, it holds {production:?}");
    assert!(stag.is_subset(&staging), "staging granted {stag:?}, it holds {staging:?}");
    assert_eq!((prod.len(), stag.len()), (3, 3), "each spread its leases over its own pool");
    // Their JetStream resources are apart.
    let js = async_nats::jetstream::new(app.client.clone());
    assert!(js.get_stream("PROXYPOOL_LEASES").await.is_ok());
    assert!(js.get_stream(format!("{NS}_PROXYPOOL_LEASES")).await.is_ok());
    assert!(js.get_key_value(format!("{NS}_proxypool_lease_leader")).await.is_ok());

    // A staging lease service that forgot its namespace meets production's log: it refuses to start.
    let bin = proxypool_test_support::process::workspace_binary("proxypool-lease")?;
    let vars = [("MONGODB_DATABASE", staging_db.clone()), ("HOSTNAME", "forgetful".to_owned())];
    let mut env = app.env_pairs_for("lease", &vars);
    env.retain(|(k, _)| k != "PROXYPOOL_NAMESPACE");
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin).envs(env).stdout(std::process::Stdio::null()).kill_on_drop(true).output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started against another deployment's log: {stderr}");
    assert!(
        stderr.contains(&staging_db)
            && stderr.contains(&app.store_config.database)
            && stderr.contains("PROXYPOOL_NAMESPACE"),
        "the refusal names both databases and the setting: {stderr}"
    );
    eprintln!("refused in {:?}", started.elapsed());
    // Production was not disturbed.
    let after = lease_many(app.client.clone(), "", 3).await?;
    assert!(after.is_subset(&production));
    staging_lease.kill().await;
    app.assert_invariants().await?;
    app.shutdown().await;
    Ok(())
}
