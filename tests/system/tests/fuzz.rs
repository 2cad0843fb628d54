//! Schema-driven fuzzing of the whole HTTP API: the full system (gateway, lease, auth, importer, rotator) on real
//! servers, and `schemathesis` (installed into `.venv` by `scripts/bootstrap.sh`) generating requests from the live
//! `/openapi.json`, valid and invalid, for every operation. It fails on any 5xx and on any status an operation does
//! not document.
//!
//! Bounded: a few examples per operation (`FUZZ_EXAMPLES`, default 10), one worker, a fixed seed (`FUZZ_SEED`,
//! default 1, so that a failure reproduces), and a hard timeout on the subprocess. The command is printed with
//! its output.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use proxypool_contracts::Area;
use proxypool_system_tests::app::API_KEY;
use proxypool_system_tests::fakes::FakeWorld;
use proxypool_system_tests::TestApp;

type R<T = ()> = anyhow::Result<T>;

/// The longest the fuzzer may run before the test fails.
const FUZZ_TIMEOUT: Duration = Duration::from_secs(300);

fn schemathesis() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_status() -> R {
    let bin = schemathesis();
    anyhow::ensure!(bin.exists(), "{} is missing: run scripts/bootstrap.sh", bin.display());
    // Room for every lease the fuzzer takes and never returns (`count` takes up to 10 at once): an exhausted pool
    // answers 503 no_proxy_available, which is documented but reads as a server error to the fuzzer.
    let app = TestApp::builder().proxy_use_max(10_000).seed(Area::Vn, 20).seed(Area::Global, 20).spawn().await?;
    let importer = app.start_importer(app.importer_config()).await?;
    let world = FakeWorld::start().await?;
    let rotator = app.start_rotator(app.rotator_config(&world)).await?;

    let schema = app.url("/openapi.json");
    // FUZZ_EXAMPLES and FUZZ_SEED widen or vary a run by hand; the defaults keep it to seconds.
    let examples = std::env::var("FUZZ_EXAMPLES").unwrap_or_else(|_| "10".to_owned());
    let seed = std::env::var("FUZZ_SEED").unwrap_or_else(|_| "1".to_owned());
    let auth = format!("Authorization: {API_KEY}");
    let args = [
        "run",
        schema.as_str(),
        "--header",
        auth.as_str(),
        "--checks",
        "not_a_server_error,status_code_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        examples.as_str(),
        "--workers",
        "1",
        "--seed",
        seed.as_str(),
        "--request-timeout",
        "20",
        // The key is sent on every request above; generated values for the security schemes would only be
        // refused with a 401.
        "--generation-with-security-parameters",
        "false",
        "--generation-database",
        "none",
        "--no-color",
    ];
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let child = tokio::process::Command::new(&bin)
        .args(args)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(FUZZ_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("schemathesis did not finish within {FUZZ_TIMEOUT:?}"))??;
    let elapsed = started.elapsed();
    let report = format!(
        "{} {}\n--- stdout\n{}\n--- stderr\n{}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Shown with --nocapture, or by cargo when the test fails.
    eprintln!("{report}\nschemathesis ran for {elapsed:.1?}");
    rotator.stop().await;
    importer.stop().await;
    app.shutdown().await;
    anyhow::ensure!(out.status.success(), "schemathesis reported failures ({}):\n{report}", out.status);
    Ok(())
}
