//! The `proxypool-auth` binary: configured from the environment, ready on its admin port (`AUTH_ADMIN_ADDR`), and on
//! SIGTERM it stops taking work, finishes what it holds, drains NATS and exits 0.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_becomes_ready_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    proxypool_test_support::process::assert_stops_cleanly(env!("CARGO_BIN_EXE_proxypool-auth"), "AUTH_ADMIN_ADDR").await
}
