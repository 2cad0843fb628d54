//! The forward door beside its peers, each chaining to the same local upstream (tinyproxy with basic auth), in one
//! run: direct to the upstream (the limit), the door (`proxypool-forward`, a release child process on the real lease
//! service), proxy-chain (npm) and squid with a `cache_peer` parent (Debian).
//!
//! - tunnels per second: a new connection, `CONNECT`, a 1 KiB request and answer through the tunnel, close;
//! - MB/s of one 100 MiB download through one tunnel;
//! - added latency per request on a sticky session (keep-alive absolute-URI requests), against the same requests
//!   sent straight to the upstream;
//! - the door's resident memory with 10,000 idle tunnels open (to a holding upstream, so that only the door is
//!   measured).
//!
//! Needs `scripts/bench-peers.sh install` (squid, proxy-chain) and a release `proxypool-forward`:
//! `cargo build --release -p proxypool-forward -p proxypool-bench`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use bson::oid::ObjectId;
use proxypool_contracts::Area;
use proxypool_system_tests::servers::{free_port, Tinyproxy};
use proxypool_system_tests::{TestApp, API_KEY};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::measure::{measure, Stats};

/// Size of the download.
const BIG: usize = 100 * 1024 * 1024;
/// Idle tunnels held open for the memory figure. The target is 10,000; the door holds two sockets per tunnel, and
/// this machine's hard open-file limit is 20,000 per process (not raisable here), so 9,900 is what fits.
const IDLE_TUNNELS: usize = 9_900;
/// Proxies (all in front of the same upstream), so that `PROXY_USE_MAX` (at most 10,000 leases per proxy per
/// rotation cycle) never runs out during a run.
const PROXIES: usize = 100;

/// One system under test.
#[derive(Clone)]
struct System {
    name: &'static str,
    addr: SocketAddr,
    /// `Proxy-Authorization` value, when it needs one.
    auth: Option<String>,
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

/// The local target: `/1k` answers 1 KiB, `/big` streams 100 MiB.
async fn target() -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let chunk = bytes::Bytes::from(vec![b'x'; 256 * 1024]);
    let big = move || {
        let chunk = chunk.clone();
        async move {
            let n = BIG / chunk.len();
            let stream = futures::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            axum::response::Response::builder()
                .header("content-length", BIG.to_string())
                .body(axum::body::Body::from_stream(stream))
                .unwrap_or_default()
        }
    };
    let app = axum::Router::new().route("/1k", get(|| async { vec![b'y'; 1024] })).route("/big", get(big));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Opens a tunnel to `target` through `sys`; returns the stream once the proxy answered 200.
async fn open(sys: &System, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(sys.addr).await?;
    s.set_nodelay(true)?;
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = &sys.auth {
        let _ = write!(req, "Proxy-Authorization: {a}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte).await? == 1, "{}: closed during CONNECT", sys.name);
        head.push(byte[0]);
        anyhow::ensure!(head.len() < 16 * 1024, "{}: CONNECT answer too long", sys.name);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        "{}: {}",
        sys.name,
        String::from_utf8_lossy(&head)
    );
    Ok(s)
}

/// One tunnel: connect, CONNECT, a 1 KiB exchange, close.
async fn tunnel_once(sys: &System, target: SocketAddr) -> anyhow::Result<()> {
    let mut s = open(sys, target).await?;
    s.write_all(b"GET /1k HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n").await?;
    let mut out = Vec::with_capacity(2048);
    s.read_to_end(&mut out).await?;
    anyhow::ensure!(out.len() > 1024 && out.starts_with(b"HTTP/1.1 200"), "{}: short answer", sys.name);
    Ok(())
}

/// MB/s of one 100 MiB download through one tunnel.
async fn download(sys: &System, target: SocketAddr) -> anyhow::Result<f64> {
    let mut s = open(sys, target).await?;
    let t0 = Instant::now();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n").await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    anyhow::ensure!(total > BIG, "{}: downloaded only {total} bytes", sys.name);
    Ok(BIG as f64 / 1e6 / t0.elapsed().as_secs_f64())
}

/// A running peer process.
struct Peer {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

async fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn proxy_chain(upstream: SocketAddr) -> anyhow::Result<Peer> {
    let script = root().join("benches/bench/peers/proxy-chain/server.js");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .env("PORT", "0")
        .env("UPSTREAM", format!("http://puser:ppass@{upstream}"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start proxy-chain: run scripts/bench-peers.sh install")?;
    let out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), tokio::io::BufReader::new(out).read_line(&mut line)).await??;
    let port: u16 =
        line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).context("proxy-chain did not start")?;
    Ok(Peer { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _dir: None })
}

async fn squid(upstream: SocketAddr) -> anyhow::Result<Peer> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let template = std::fs::read_to_string(root().join("benches/bench/peers/squid.conf.template"))?;
    let conf = template
        .replace("@PORT@", &port.to_string())
        .replace("@UPPORT@", &upstream.port().to_string())
        .replace("@DIR@", &dir.path().display().to_string());
    let path = dir.path().join("squid.conf");
    std::fs::write(&path, conf)?;
    // Squid runs as `proxy` when started as root, and must write its log here.
    let _ = std::process::Command::new("chown").arg("proxy").arg(dir.path()).status();
    let child = tokio::process::Command::new("/usr/sbin/squid")
        .args(["-N", "-n", "proxypoolbench", "-f"])
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start squid: run scripts/bench-peers.sh install")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(addr, "squid").await?;
    Ok(Peer { child, addr, _dir: Some(dir) })
}

/// The door as a release child process on the app's NATS.
async fn door(app: &TestApp) -> anyhow::Result<(Peer, SocketAddr)> {
    let bin = root().join("target/release/proxypool-forward");
    let bin = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("release/proxypool-forward"),
        None => bin,
    };
    anyhow::ensure!(bin.is_file(), "{} not built: cargo build --release -p proxypool-forward", bin.display());
    let (http, socks) = (free_port()?, free_port()?);
    let env = app.env_pairs_for(
        "forward",
        &[
            ("FORWARD_HTTP_ADDR", format!("127.0.0.1:{http}")),
            ("FORWARD_SOCKS_ADDR", format!("127.0.0.1:{socks}")),
            ("IP_ALLOWED", "127.0.0.1".into()),
            ("FORWARD_MAX_CONNS", "50000".into()),
            ("FORWARD_MAX_CONNS_PER_IP", "50000".into()),
            ("FORWARD_MAX_CONNS_PER_CONSUMER", "50000".into()),
            ("RUST_LOG", "warn".into()),
        ],
    );
    let child = tokio::process::Command::new(bin).envs(env).stdout(Stdio::null()).kill_on_drop(true).spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    wait_port(addr, "proxypool-forward").await?;
    Ok((Peer { child, addr, _dir: None }, SocketAddr::from(([127, 0, 0, 1], socks))))
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// An upstream that answers every CONNECT with 200 and then holds the connection: the idle tunnels' far end, a
/// Python process of its own (`peers/hold_upstream.py`), so that its sockets do not count against this process's
/// open-file limit.
async fn holding_upstream() -> anyhow::Result<Peer> {
    let port = free_port()?;
    let mut child = tokio::process::Command::new("python3")
        .arg(root().join("benches/bench/peers/hold_upstream.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), tokio::io::BufReader::new(out).read_line(&mut line)).await??;
    anyhow::ensure!(line.trim() == "ready", "the holding upstream did not start");
    Ok(Peer { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _dir: None })
}

/// Raises this process's open-file limit (its children inherit it): 10,000 tunnels are 40,000 sockets here.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = 200_000;
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        eprintln!("open-file limit: {soft}");
    }
}

async fn add_proxies(
    app: &TestApp,
    area: Area,
    upstream: SocketAddr,
    user: &str,
    pass: &str,
    n: usize,
) -> anyhow::Result<()> {
    let later = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 24 * 3_600_000);
    let mut ids: Vec<ObjectId> = Vec::new();
    for k in 0..n {
        let mut d = app.new_proxy(area, k);
        d.ip = upstream.ip().to_string();
        d.port = i32::from(upstream.port());
        d.username = user.to_owned();
        d.password = pass.to_owned();
        d.next_rotate = Some(later);
        app.store.proxies().insert_one(&d).await?;
        ids.push(d.id);
    }
    let sync = proxypool_contracts::rotation::SyncRequest { proxy_ids: Vec::new(), full: true };
    proxypool_rpc::call_within::<proxypool_contracts::endpoints::LeaseCtlSync>(&app.client, &sync, None).await?;
    Ok(())
}

/// Runs the suite; returns the Markdown report.
pub async fn run(secs: f64, concurrency: &[usize]) -> anyhow::Result<String> {
    raise_nofile();
    let dur = Duration::from_secs_f64(secs);
    let app = TestApp::builder().proxy_use_max(10_000).spawn().await?;
    let upstream = Tinyproxy::start("puser", "ppass")?;
    add_proxies(&app, Area::Vn, upstream.addr, "puser", "ppass", PROXIES).await?;
    let target = target().await?;
    let (door, _socks) = door(&app).await?;
    let chain = proxy_chain(upstream.addr).await?;
    let squid = squid(upstream.addr).await?;
    let systems = [
        System { name: "direct to the upstream (tinyproxy)", addr: upstream.addr, auth: Some(basic("puser", "ppass")) },
        System { name: "proxypool forward door", addr: door.addr, auth: Some(basic("bench", API_KEY)) },
        System { name: "proxy-chain 3.0.1", addr: chain.addr, auth: None },
        System { name: "squid 5 (cache_peer parent)", addr: squid.addr, auth: None },
    ];
    for sys in &systems {
        tunnel_once(sys, target).await.with_context(|| format!("{} does not work", sys.name))?;
    }
    // `BENCH_ONLY=door` measures the door's cells alone (for a profile).
    let only = std::env::var("BENCH_ONLY").ok();
    let measured: Vec<&System> =
        systems.iter().filter(|s| only.as_deref().is_none_or(|o| s.name.contains(o))).collect();

    let mut out = String::new();
    let _ = writeln!(out, "| system | clients | tunnels/s | p50 ms | p99 ms | errors | door ÷ this |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for &c in concurrency {
        let mut cells: Vec<(&System, Stats)> = Vec::new();
        for sys in measured.iter().copied() {
            let s = {
                let sys = Arc::new(sys.clone());
                measure(c, dur, move |_| {
                    let sys = sys.clone();
                    async move { tunnel_once(&sys, target).await }
                })
                .await
            };
            eprintln!("tunnels {:<36} c={c:<3} {s}", sys.name);
            cells.push((sys, s));
        }
        let door_rate = cells.iter().find(|(s, _)| s.name.contains("door")).map_or(0.0, |(_, s)| s.ops_per_sec());
        for (sys, s) in &cells {
            let _ = writeln!(
                out,
                "| {} | {c} | {:.0} | {:.2} | {:.2} | {} | {:.2} |",
                sys.name,
                s.ops_per_sec(),
                s.p50_ms(),
                s.p99_ms(),
                s.errors,
                door_rate / s.ops_per_sec().max(1e-9)
            );
        }
    }

    let _ = writeln!(out, "\n| system | 100 MiB download, MB/s (median of 3) | door ÷ this |");
    let _ = writeln!(out, "|---|---:|---:|");
    let mut rates = Vec::new();
    for sys in &systems {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(download(sys, target).await?);
        }
        runs.sort_by(f64::total_cmp);
        eprintln!("download {:<36} {:.0} MB/s (runs {runs:.0?})", sys.name, runs[1]);
        rates.push((sys.name, runs[1]));
    }
    let door_mbs = rates[1].1;
    for (name, r) in &rates {
        let _ = writeln!(out, "| {name} | {r:.0} | {:.2} |", door_mbs / r);
    }

    // A sticky session's keep-alive requests, against the same requests straight to the upstream.
    let mut lat = Vec::new();
    for (name, url, user, pass) in [
        ("direct to the upstream", format!("http://{}", upstream.addr), "puser", "ppass"),
        ("door, sticky session", format!("http://{}", door.addr), "bench-session-sticky", API_KEY),
    ] {
        let client = reqwest::Client::builder().proxy(reqwest::Proxy::http(&url)?.basic_auth(user, pass)).build()?;
        let url = format!("http://{target}/1k");
        let s = measure(1, dur, move |_| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client.get(&url).send().await?.error_for_status()?.bytes().await?;
                Ok(())
            }
        })
        .await;
        eprintln!("sticky {name:<36} {s}");
        lat.push((name, s));
    }
    let _ = writeln!(out, "\n| keep-alive requests, 1 client | req/s | p50 ms | p99 ms | errors |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (name, s) in &lat {
        let _ =
            writeln!(out, "| {name} | {:.0} | {:.3} | {:.3} | {} |", s.ops_per_sec(), s.p50_ms(), s.p99_ms(), s.errors);
    }
    let _ = writeln!(
        out,
        "\nAdded latency of the door on a sticky session: p50 {:.3} ms, p99 {:.3} ms.",
        lat[1].1.p50_ms() - lat[0].1.p50_ms(),
        lat[1].1.p99_ms() - lat[0].1.p99_ms()
    );

    // 10,000 idle tunnels through the door, to an upstream that holds them: the door's memory.
    let holder = holding_upstream().await?;
    let hold = holder.addr;
    add_proxies(&app, Area::Global, hold, "", "", PROXIES).await?;
    let pid = door.child.id().unwrap_or(0);
    let idle_sys = System { name: "door", addr: door.addr, auth: Some(basic("idle-area-global", API_KEY)) };
    tunnel_once(&systems[1], target).await?;
    let before = rss_mb(pid);
    let t0 = Instant::now();
    let mut open_tunnels = Vec::with_capacity(IDLE_TUNNELS);
    let mut batch = Vec::new();
    for i in 0..IDLE_TUNNELS {
        let sys = idle_sys.clone();
        batch.push(tokio::spawn(async move { open(&sys, hold).await }));
        if batch.len() == 64 || i + 1 == IDLE_TUNNELS {
            for t in batch.drain(..) {
                let opened = t.await?.with_context(|| format!("after {} idle tunnels", open_tunnels.len()))?;
                open_tunnels.push(opened);
            }
        }
    }
    let opened = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mb(pid);
    eprintln!("idle: {} tunnels open in {opened:?}; door RSS {before:.1} MB -> {after:.1} MB", open_tunnels.len());
    let _ = writeln!(
        out,
        "\n{} idle tunnels open through the door (opened in {:.1} s): its resident memory {before:.1} MB before, \
         {after:.1} MB with them open ({:.1} KB per tunnel).",
        open_tunnels.len(),
        opened.as_secs_f64(),
        (after - before) * 1024.0 / open_tunnels.len().max(1) as f64
    );
    drop(open_tunnels);
    let _ = writeln!(
        out,
        "\n_{}; {secs} s per cell; {} logical CPUs; every system on this machine, chaining to one tinyproxy; the door \
         is a release child process on the lease service, NATS and SecantusDB of this run._",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    drop((door, chain, squid, holder));
    Ok(out)
}
