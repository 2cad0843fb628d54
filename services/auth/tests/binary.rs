//! The `proxypool-auth` binary: configured from the environment, ready on its admin port, and on SIGTERM it stops
//! taking work, finishes what it holds, drains NATS and exits 0.

use proxypool_test_support::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_becomes_ready_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    let app = TestApp::builder().spawn().await?;
    let admin = format!("127.0.0.1:{}", proxypool_test_support::servers::free_port()?);
    let mut env = app.service_env();
    env.push(("AUTH_ADMIN_ADDR".to_owned(), admin.clone()));
    let status = proxypool_test_support::process::run_until_ready_then_sigterm(
        env!("CARGO_BIN_EXE_proxypool-auth"),
        &env,
        &format!("http://{admin}/readyz"),
    )
    .await?;
    assert_eq!(status.code(), Some(0), "{status:?}");
    app.shutdown().await;
    Ok(())
}
