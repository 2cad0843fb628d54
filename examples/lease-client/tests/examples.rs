//! The consumer examples, run as a consumer would run them: against the system under its NATS identities, connected
//! as the `consumer` user, which may only lease and return.

use std::process::Command;

use proxypool_contracts::Area;
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

fn check(what: &str, out: &std::process::Output) -> R<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "{what} failed: {}\n{stdout}\n{stderr}", out.status);
    anyhow::ensure!(stdout.contains("leased ") && stdout.contains("returned"), "{what}: {stdout}\n{stderr}");
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_and_python_examples_lease_and_return_a_proxy() -> R {
    let app = TestApp::builder().nats_auth(true).seed(Area::Vn, 1).spawn().await?;
    let url = app.nats_server.url();
    let env = [("NATS_URL", url.as_str()), ("NATS_USER", "consumer"), ("NATS_PASSWORD", "consumer-test-password")];

    let rust = tokio::task::spawn_blocking({
        let env = env.map(|(k, v)| (k, v.to_owned()));
        move || Command::new(env!("CARGO_BIN_EXE_lease-client")).arg("vn").envs(env).output()
    })
    .await??;
    check("the Rust example", &rust)?;

    // The Python example needs nats-py, which scripts/bootstrap.sh installs into .venv/.
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/lease_client.py");
    let py = tokio::task::spawn_blocking({
        let env = env.map(|(k, v)| (k, v.to_owned()));
        move || Command::new(python).arg(script).arg("vn").envs(env).output()
    })
    .await??;
    check("the Python example", &py)?;

    // Both returned their lease.
    app.assert_invariants().await?;
    let held: i32 = app.all_proxies().await?.iter().map(|p| p.in_use).sum();
    assert_eq!(held, 0);
    app.shutdown().await;
    Ok(())
}
