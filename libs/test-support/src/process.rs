//! Service binaries run as an operator runs them: configuration from the environment, ready when `/readyz` says
//! so, stopped with SIGTERM.

use std::time::Duration;

use anyhow::Context;

/// Starts `bin` with exactly `env`, waits until `ready_url` answers 200, runs `before_sigterm`, sends SIGTERM, and
/// returns the exit status (bounded waits throughout).
pub async fn run_until_ready_then_sigterm(
    bin: &str,
    env: &[(String, String)],
    ready_url: &str,
    before_sigterm: impl FnOnce(),
) -> anyhow::Result<std::process::ExitStatus> {
    let mut child = tokio::process::Command::new(bin)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {bin}"))?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if matches!(http.get(ready_url).send().await, Ok(r) if r.status().is_success()) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{bin} exited before it was ready: {status}");
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{bin} was not ready at {ready_url} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    before_sigterm();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap_or(0))?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    tokio::time::timeout(Duration::from_secs(45), child.wait())
        .await
        .context("no exit within 45 s of SIGTERM")?
        .context("cannot wait for the process")
}

/// Starts NATS and a database, runs `bin` against them with its admin endpoint on a free port (`admin_var`), and checks that it
/// becomes ready and exits 0 on SIGTERM — also when NATS went away just before (a node drain that takes NATS and
/// the service together), where the drain cannot complete and must not hold the exit.
pub async fn assert_stops_cleanly(bin: &str, admin_var: &str) -> anyhow::Result<()> {
    crate::init_logs();
    let mut nats = crate::NatsServer::start()?;
    let mongo = crate::MongoServer::start()?;
    for nats_down in [false, true] {
        let port = crate::servers::free_port()?;
        let admin = format!("127.0.0.1:{port}");
        let mut env = crate::service_env(&nats.url(), &mongo.uri(), "proxypool_binary_test");
        // The gateway's `PORT` is a port (it serves /readyz with the API); the others' admin variables an address.
        env.push((admin_var.to_owned(), if admin_var == "PORT" { port.to_string() } else { admin.clone() }));
        let started = std::time::Instant::now();
        let nats = &mut nats;
        let status = run_until_ready_then_sigterm(bin, &env, &format!("http://{admin}/readyz"), || {
            if nats_down {
                nats.stop();
            }
        })
        .await?;
        anyhow::ensure!(status.code() == Some(0), "{bin} after SIGTERM (NATS down: {nats_down}): {status:?}");
        tracing::info!(bin, nats_down, took = ?started.elapsed(), "stopped cleanly");
    }
    Ok(())
}

/// The path of a workspace binary (`proxypool-gateway`, …) built beside the running test: `cargo test --workspace`
/// builds every service binary, since each service crate has a binary test. Tests outside the binary's own crate
/// cannot use `CARGO_BIN_EXE_*`.
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(std::path::Path::parent).ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let bin = dir.join(name);
    anyhow::ensure!(bin.is_file(), "{} not built: run the tests with `cargo test --workspace`", bin.display());
    Ok(bin)
}

/// `proxypool-lease` as built from the commit `rev` of this repository, for the rolling-upgrade test: its sources
/// are exported with `git archive` into `target/previous/<rev>/src` and built there, in a target directory of their
/// own (so this checkout's binaries are never replaced), once; later runs reuse the binary. The build takes a few
/// minutes on a fresh machine. Needs the repository's history (a full clone).
pub fn lease_binary_at(rev: &str) -> anyhow::Result<std::path::PathBuf> {
    // Tests of one binary run side by side: one exports and builds, the others wait and reuse.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = crate::servers::workspace_root();
    let out = root.join("target/previous").join(rev);
    let bin = out.join("target/debug/proxypool-lease");
    if bin.is_file() {
        return Ok(bin);
    }
    let src = out.join("src");
    if !src.join("Cargo.toml").is_file() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src)?;
        let tar = out.join("src.tar");
        let archive = std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(rev)
            .status()
            .context("cannot run git")?;
        anyhow::ensure!(
            archive.success(),
            "git cannot export {rev}: the rolling-upgrade test needs the repository's history (a full clone, not a \
             shallow one)"
        );
        let untar = std::process::Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src).status()?;
        anyhow::ensure!(untar.success(), "cannot unpack the sources of {rev}");
    }
    tracing::warn!(rev, "building proxypool-lease of an earlier commit for the rolling-upgrade test (once)");
    let build = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&src)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--locked", "-p", "proxypool-lease", "--bin", "proxypool-lease", "--target-dir"])
        .arg(out.join("target"))
        .status()
        .context("cannot run cargo")?;
    anyhow::ensure!(build.success() && bin.is_file(), "cannot build proxypool-lease at {rev}");
    Ok(bin)
}
