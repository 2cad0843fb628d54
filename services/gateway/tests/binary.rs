//! The `proxypool-gateway` binary: configured from the environment, ready on `PORT`, and on SIGTERM it stops taking
//! connections, finishes what it holds, drains NATS and exits 0 (also when NATS went away just before).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_becomes_ready_and_exits_0_on_sigterm() -> anyhow::Result<()> {
    proxypool_test_support::process::assert_stops_cleanly(env!("CARGO_BIN_EXE_proxypool-gateway"), "PORT").await
}
