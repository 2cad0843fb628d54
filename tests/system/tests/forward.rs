//! The forward door with real clients (curl, Python requests and httpx, raw sockets) through both doors, to a local
//! HTTP target and a local HTTPS target (self-signed, through CONNECT), via real upstream proxies with basic auth
//! (tinyproxy), on the real lease service, NATS and the MongoDB-protocol server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use proxypool_contracts::Area;
use proxypool_store::model::ProxyDoc;
use proxypool_system_tests::app::ForwardHandle;
use proxypool_system_tests::servers::Tinyproxy;
use proxypool_system_tests::{TestApp, API_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type R<T = ()> = anyhow::Result<T>;

/// A local HTTP target: answers `target-ok <path> via <Via header>` (tinyproxy adds `Via`, so the answer proves the
/// request went through an upstream proxy), and echoes POST bodies.
async fn http_target() -> R<SocketAddr> {
    use axum::extract::Request;
    async fn answer(req: Request) -> String {
        let via = req.headers().get("via").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let path = req.uri().path().to_owned();
        let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
        format!("target-ok {path} via {via} body {}", String::from_utf8_lossy(&body))
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(answer);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// A local HTTPS target with a self-signed certificate (openssl), served by Python.
struct HttpsTarget {
    addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn https_target() -> R<HttpsTarget> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = tokio::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(made.success(), "openssl could not make a certificate");
    let port = proxypool_system_tests::servers::free_port()?;
    let mut child = tokio::process::Command::new(python())
        .arg(fixture("https_target.py"))
        .arg(port.to_string())
        .arg(&cert)
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut buf = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(20), out.read_exact(&mut buf)).await??;
    anyhow::ensure!(&buf == b"ready\n", "the HTTPS target did not start");
    Ok(HttpsTarget { addr: SocketAddr::from(([127, 0, 0, 1], port)), _child: child, _dir: dir })
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> std::path::PathBuf {
    root().join(".venv/bin/python")
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The app, upstream proxies (tinyproxy) with a proxy document each, and a forward door.
struct World {
    app: TestApp,
    upstreams: Vec<Tinyproxy>,
    ids: Vec<ObjectId>,
    door: ForwardHandle,
}

async fn world(max: u32, proxies: usize, door_env: &[(&str, String)]) -> R<World> {
    let app = TestApp::builder().proxy_use_max(max).spawn().await?;
    let mut upstreams = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..proxies {
        let up = Tinyproxy::start("puser", "ppass")?;
        ids.push(add_proxy(&app, up.addr, "puser", "ppass").await?);
        upstreams.push(up);
    }
    let door = app.start_forward(app.forward_config(door_env)).await?;
    Ok(World { app, upstreams, ids, door })
}

/// A leasable proxy at `addr` with these credentials, not due for rotation.
async fn add_proxy(app: &TestApp, addr: SocketAddr, user: &str, pass: &str) -> R<ObjectId> {
    let later = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 3_600_000);
    app.insert_proxy_with(Area::Vn, |d| {
        d.ip = addr.ip().to_string();
        d.port = i32::from(addr.port());
        d.username = user.to_owned();
        d.password = pass.to_owned();
        d.next_rotate = Some(later);
    })
    .await
}

impl World {
    fn http_proxy(&self, user: &str) -> String {
        self.door.http_url(user, API_KEY)
    }

    fn socks_proxy(&self, user: &str) -> String {
        format!("socks5h://{user}:{API_KEY}@{}", self.door.socks_addr)
    }

    /// Waits until MongoDB shows no lease held on any proxy and the door holds none.
    async fn all_returned(&self) -> R<Vec<ProxyDoc>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let docs = self.app.all_proxies().await?;
            if docs.iter().all(|d| d.in_use == 0 && d.proxy_used.is_empty()) && self.door.shared.book.held() == 0 {
                return Ok(docs);
            }
            let held: Vec<_> = docs.iter().map(|d| (d.in_use, d.proxy_used.len())).collect();
            anyhow::ensure!(
                Instant::now() < deadline,
                "leases still held: {held:?}, door {}",
                self.door.shared.book.held()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs curl; returns (exit code, stdout, stderr).
async fn curl(args: &[&str]) -> R<(i32, String, String)> {
    let out = tokio::process::Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The value of header `name` in curl's verbose output (`< Name: value`) or a dumped head.
fn header(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim_start_matches("< ").trim();
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// A raw CONNECT through the HTTP door: the status line and head, and the stream if it is a tunnel.
async fn raw_connect(door: SocketAddr, user: &str, key: &str, target: SocketAddr) -> R<(u16, String, TcpStream)> {
    use base64::Engine as _;
    let mut s = TcpStream::connect(door).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"));
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "the door closed during the CONNECT answer: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let mut head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // A refusal's JSON body comes with the head, for the failure messages.
    if let Some(n) = header(&head, "content-length").and_then(|n| n.parse::<usize>().ok()) {
        let mut body = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body)).await??;
        head.push_str(&String::from_utf8_lossy(&body));
    }
    Ok((status, head, s))
}

/// Sends a GET over an open tunnel to the plain HTTP target and reads the answer to its end.
async fn get_over(s: &mut TcpStream, path: &str) -> R<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: target\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_requests_and_httpx_work_through_both_doors_to_http_and_https_targets() -> R {
    let w = world(100, 2, &[]).await?;
    let (plain, secure) = (http_target().await?, https_target().await?);
    let plain_url = format!("http://{plain}/hello");
    let secure_url = format!("https://{}/secret", secure.addr);

    // curl, HTTP door, absolute-URI request: the answer names the proxy and came through tinyproxy.
    let (code, out, err) = curl(&["-v", "-x", &w.http_proxy("curl"), &plain_url]).await?;
    anyhow::ensure!(
        code == 0 && out.starts_with("target-ok /hello via") && out.contains("tinyproxy"),
        "{code} {out} {err}"
    );
    let id = header(&err, "x-proxypool-proxy-id").ok_or_else(|| anyhow::anyhow!("no proxy id header: {err}"))?;
    anyhow::ensure!(w.ids.iter().any(|i| i.to_hex() == id), "unknown proxy {id}");
    anyhow::ensure!(!err.contains("ppass") && !out.contains("ppass"), "upstream credentials reached the client");
    // curl, HTTP door, --proxy-user, HTTPS through CONNECT; the CONNECT answer names the proxy.
    let door = format!("http://{}", w.door.http_addr);
    let (code, out, err) =
        curl(&["-v", "-k", "-x", &door, "--proxy-user", &format!("curl:{API_KEY}"), &secure_url]).await?;
    anyhow::ensure!(code == 0 && out == "secure-ok /secret", "{code} {out} {err}");
    anyhow::ensure!(header(&err, "x-proxypool-proxy-id").is_some(), "no proxy id on the CONNECT answer: {err}");
    // curl, SOCKS5 door with remote name resolution, both targets.
    let socks = w.door.socks_addr.to_string();
    let user = format!("curl:{API_KEY}");
    let (code, out, err) = curl(&["--socks5-hostname", &socks, "--proxy-user", &user, &plain_url]).await?;
    anyhow::ensure!(code == 0 && out.starts_with("target-ok /hello"), "{code} {out} {err}");
    let (code, out, err) = curl(&["-k", "--socks5-hostname", &socks, "--proxy-user", &user, &secure_url]).await?;
    anyhow::ensure!(code == 0 && out == "secure-ok /secret", "{code} {out} {err}");
    // POST with a chunked body and Expect: 100-continue, through the HTTP door.
    let (code, out, err) = curl(&[
        "-x",
        &w.http_proxy("curl"),
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "chunked-body",
        &plain_url,
    ])
    .await?;
    anyhow::ensure!(code == 0 && out.ends_with("body chunked-body"), "{code} {out} {err}");
    // Keep-alive: two requests on one client connection.
    let (code, out, err) = curl(&["-v", "-x", &w.http_proxy("curl"), &plain_url, &plain_url]).await?;
    anyhow::ensure!(code == 0 && out.matches("target-ok").count() == 2, "{code} {out}");
    anyhow::ensure!(err.contains("Re-using existing connection"), "curl did not reuse the connection: {err}");

    // Python requests and httpx, both doors, both targets.
    let py = tokio::process::Command::new(python())
        .arg(fixture("door_clients.py"))
        .arg(w.http_proxy("py"))
        .arg(w.socks_proxy("py"))
        .arg(&plain_url)
        .arg(&secure_url)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&py.stdout);
    anyhow::ensure!(py.status.success(), "python clients failed: {stdout} {}", String::from_utf8_lossy(&py.stderr));
    let results: HashMap<String, (u16, String)> = serde_json::from_str(stdout.trim())?;
    anyhow::ensure!(results.len() == 8, "{results:?}");
    for (name, (status, body)) in &results {
        let ok =
            if name.ends_with("https") { body == "secure-ok /secret" } else { body.starts_with("target-ok /hello") };
        anyhow::ensure!(*status == 200 && ok, "{name}: {status} {body}");
    }

    // Every connection returned its lease when it ended; the lease records showed the door.
    let docs = w.all_returned().await?;
    anyhow::ensure!(docs.iter().map(|d| d.used_count).sum::<i32>() >= 13, "{docs:?}");
    // tinyproxy closes its keep-alive connections after each answer: that is no failure of the proxy.
    anyhow::ensure!(docs.iter().all(|d| d.upstream_failures == 0), "healthy upstreams recorded as failing: {docs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socks5_door_takes_ipv4_ipv6_and_domain_targets_and_refuses_what_it_must() -> R {
    // A recording upstream: answers every CONNECT with 200 and notes its target; checks the credentials.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = upstream.local_addr()?;
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or_default().to_owned();
                let authed = text.contains("Proxy-Authorization: Basic cHVzZXI6cHBhc3M=");
                if let Ok(mut l) = log.lock() {
                    l.push(format!("{target} auth={authed}"));
                }
                let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\nhello").await;
            });
        }
    });
    let app = TestApp::builder().proxy_use_max(100).spawn().await?;
    add_proxy(&app, up_addr, "puser", "ppass").await?;
    let door = app.start_forward(app.forward_config(&[])).await?;

    async fn socks(door: SocketAddr, user: &[u8], pass: &[u8], request: &[u8]) -> R<(Vec<u8>, Option<u8>, String)> {
        let mut s = TcpStream::connect(door).await?;
        s.write_all(&[5, 1, 2]).await?;
        let mut method = [0u8; 2];
        s.read_exact(&mut method).await?;
        anyhow::ensure!(method == [5, 2], "method {method:?}");
        let mut auth = vec![1, u8::try_from(user.len())?];
        auth.extend_from_slice(user);
        auth.push(u8::try_from(pass.len())?);
        auth.extend_from_slice(pass);
        s.write_all(&auth).await?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status).await?;
        if status[1] != 0 {
            return Ok((status.to_vec(), None, String::new()));
        }
        s.write_all(request).await?;
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).await?;
        let mut rest = Vec::new();
        if reply[1] == 0 {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            rest.extend_from_slice(&buf);
        }
        Ok((status.to_vec(), Some(reply[1]), String::from_utf8_lossy(&rest).into_owned()))
    }
    let key = API_KEY.as_bytes();
    let v4 = [5, 1, 0, 1, 10, 1, 2, 3, 0x1f, 0x90];
    let mut v6 = vec![5, 1, 0, 4];
    v6.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>()?.octets());
    v6.extend_from_slice(&443u16.to_be_bytes());
    let mut name = vec![5, 1, 0, 3, 11];
    name.extend_from_slice(b"example.com");
    name.extend_from_slice(&80u16.to_be_bytes());
    for req in [&v4[..], &v6[..], &name[..]] {
        let (status, reply, data) = socks(door.socks_addr, b"sock", key, req).await?;
        anyhow::ensure!(status == [1, 0] && reply == Some(0) && data == "hello", "{status:?} {reply:?} {data}");
    }
    let got = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    anyhow::ensure!(
        got == ["10.1.2.3:8080 auth=true", "[2001:db8::7]:443 auth=true", "example.com:80 auth=true"],
        "the upstream saw {got:?}"
    );
    // BIND is refused with "command not supported"; a wrong key and a malformed username fail authentication.
    let bind = [5, 2, 0, 1, 10, 1, 2, 3, 0, 80];
    let (_, reply, _) = socks(door.socks_addr, b"sock", key, &bind).await?;
    anyhow::ensure!(reply == Some(7), "{reply:?}");
    let (status, _, _) = socks(door.socks_addr, b"sock", b"wrong-key-0123456789", &v4).await?;
    anyhow::ensure!(status == [1, 1], "{status:?}");
    let (status, _, _) = socks(door.socks_addr, b"sock-country-vn", key, &v4).await?;
    anyhow::ensure!(status == [1, 1], "{status:?}");
    // A client offering no username/password is refused at the greeting.
    let mut s = TcpStream::connect(door.socks_addr).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await?;
    anyhow::ensure!(method == [5, 0xFF], "{method:?}");
    // Only the three tunnels leased (one each), and all were returned.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let docs = app.all_proxies().await?;
        if docs.iter().all(|d| d.in_use == 0) && door.shared.book.held() == 0 {
            anyhow::ensure!(docs[0].used_count == 3, "{} leases, not 3", docs[0].used_count);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "leases not returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_use_max_holds_across_both_doors_and_get_proxy_in_a_storm() -> R {
    const MAX: usize = 3;
    let w = world(u32::try_from(MAX)?, 4, &[]).await?;
    let target = http_target().await?;
    // Each client holds what it got for a while, so that holders overlap; it records (proxy, from, to).
    let held: Arc<Mutex<Vec<(String, Instant, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for n in 0..30 {
        let (held, door, app_url) = (held.clone(), w.door.http_addr, w.app.url("/api/get-proxy?area=vn"));
        let (socks, book) = (w.door.socks_addr, w.door.shared.book.clone());
        tasks.push(tokio::spawn(async move {
            let hold = Duration::from_millis(300);
            let got: Option<(String, Instant)> = match n % 3 {
                0 => {
                    let (status, head, mut s) = raw_connect(door, "storm", API_KEY, target).await?;
                    if status == 200 {
                        let t0 = Instant::now();
                        tokio::time::sleep(hold).await;
                        let body = get_over(&mut s, "/storm").await?;
                        anyhow::ensure!(body.contains("target-ok /storm"), "{body}");
                        header(&head, "x-proxypool-proxy-id").map(|id| (id, t0))
                    } else {
                        anyhow::ensure!(status == 503 && header(&head, "retry-after").is_some(), "{head}");
                        None
                    }
                }
                1 => {
                    let mut s = TcpStream::connect(socks).await?;
                    s.write_all(&[5, 1, 2]).await?;
                    let mut m = [0u8; 2];
                    s.read_exact(&mut m).await?;
                    let name = format!("storm{n}");
                    let mut auth = vec![1, u8::try_from(name.len())?];
                    auth.extend_from_slice(name.as_bytes());
                    auth.push(u8::try_from(API_KEY.len())?);
                    auth.extend_from_slice(API_KEY.as_bytes());
                    s.write_all(&auth).await?;
                    s.read_exact(&mut m).await?;
                    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
                    req.extend_from_slice(&target.port().to_be_bytes());
                    s.write_all(&req).await?;
                    let mut reply = [0u8; 10];
                    s.read_exact(&mut reply).await?;
                    if reply[1] == 0 {
                        // A SOCKS5 reply names no proxy: the door's book says which this client holds.
                        let t0 = Instant::now();
                        let ids = book.held_by(&format!("{name}@127.0.0.1"));
                        anyhow::ensure!(ids.len() == 1, "{name} holds {ids:?}");
                        tokio::time::sleep(hold).await;
                        let body = get_over(&mut s, "/storm").await?;
                        anyhow::ensure!(body.contains("target-ok"), "{body}");
                        Some((ids[0].clone(), t0))
                    } else {
                        anyhow::ensure!(reply[1] == 1, "reply {}", reply[1]);
                        None
                    }
                }
                _ => {
                    let http = reqwest::Client::new();
                    let res = http.get(&app_url).header("Authorization", API_KEY).send().await?;
                    if res.status() == 200 {
                        let g: serde_json::Value = res.json().await?;
                        let t0 = Instant::now();
                        tokio::time::sleep(hold).await;
                        let (id, key) = (g["id"].as_str().unwrap_or_default(), g["key"].as_str().unwrap_or_default());
                        let url =
                            app_url.replace("/api/get-proxy?area=vn", &format!("/webhook/return-proxy/{id}?key={key}"));
                        let back = http.post(url).header("Authorization", API_KEY).send().await?;
                        anyhow::ensure!(back.status() == 200, "return: {}", back.status());
                        Some((id.to_owned(), t0))
                    } else {
                        anyhow::ensure!(res.status() == 503, "get-proxy: {}", res.status());
                        None
                    }
                }
            };
            if let Some((id, t0)) = got {
                if let Ok(mut h) = held.lock() {
                    h.push((id, t0, Instant::now()));
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let held = held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    // Capacity per rotation cycle is PROXY_USE_MAX per proxy: 4 × 3.
    anyhow::ensure!(held.len() <= 4 * MAX, "{} leases granted, more than 12", held.len());
    anyhow::ensure!(held.len() == 4 * MAX, "only {} of 12 leases granted: capacity was wasted", held.len());
    // From the clients' records, whichever door granted: never more than MAX holders of one proxy at once, and
    // (no rotation in between) never more than MAX grants of one proxy in all.
    let ids: Vec<String> = w.ids.iter().map(|i| i.to_hex()).collect();
    for id in &ids {
        let mut events: Vec<(Instant, i32)> = Vec::new();
        for (_, from, to) in held.iter().filter(|(p, _, _)| p == id) {
            events.push((*from, 1));
            events.push((*to, -1));
        }
        events.sort();
        let (mut now, mut most) = (0, 0);
        for (_, d) in events {
            now += d;
            most = most.max(now);
        }
        anyhow::ensure!(usize::try_from(most)? <= MAX, "proxy {id} held {most} times at once");
        let granted = held.iter().filter(|(p, _, _)| p == id).count();
        anyhow::ensure!(granted <= MAX, "proxy {id} granted {granted} times, more than {MAX}");
    }
    anyhow::ensure!(held.iter().all(|(p, _, _)| ids.contains(p)), "a grant of an unknown proxy: {held:?}");
    // And from MongoDB once projected: every cap respected, every lease returned.
    let docs = w.all_returned().await?;
    for d in &docs {
        anyhow::ensure!(usize::try_from(d.used_count)? <= MAX, "{d:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_upstream_another_session_gets_another_and_an_idle_one_returns_its_lease() -> R {
    // Sessions without a sesstime keep their lease 3 s without a connection.
    let w = world(100, 3, &[("FORWARD_SESSION_DEFAULT", "0.05".into())]).await?;
    let target = http_target().await?;
    let url = format!("http://{target}/s");
    let id_of = |err: &str| header(err, "x-proxypool-proxy-id").unwrap_or_default();
    let mut first = Vec::new();
    for _ in 0..4 {
        let (code, out, err) = curl(&["-v", "-x", &w.http_proxy("app-session-alpha"), &url]).await?;
        anyhow::ensure!(code == 0 && out.starts_with("target-ok"), "{out} {err}");
        anyhow::ensure!(header(&err, "x-proxypool-session").as_deref() == Some("alpha"), "{err}");
        first.push(id_of(&err));
    }
    // A CONNECT of the same session leaves through the same upstream too.
    let (status, head, tunnel) = raw_connect(w.door.http_addr, "app-session-alpha", API_KEY, target).await?;
    anyhow::ensure!(status == 200, "{head}");
    first.push(header(&head, "x-proxypool-proxy-id").unwrap_or_default());
    drop(tunnel);
    anyhow::ensure!(first.iter().all(|i| !i.is_empty() && *i == first[0]), "one session, several upstreams: {first:?}");
    let (_, _, err) = curl(&["-v", "-x", &w.http_proxy("app-session-beta"), &url]).await?;
    let beta = id_of(&err);
    anyhow::ensure!(!beta.is_empty() && beta != first[0], "another session shares the upstream while others are free");
    // While the session lives, its one lease is held between connections, and its record names the door and
    // the session; 3 s after its last connection it is returned.
    let mut held_seen = false;
    for _ in 0..20 {
        let d = w.app.proxy(&first[0]).await?;
        if d.in_use == 1 {
            let u = &d.proxy_used[0];
            anyhow::ensure!(u.door.as_deref() == Some("http") && u.session.as_deref() == Some("alpha"), "{u:?}");
            anyhow::ensure!(u.ip == "app@127.0.0.1", "{u:?}");
            held_seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(held_seen, "the session's lease is not held between its connections");
    let t0 = Instant::now();
    w.all_returned().await?;
    anyhow::ensure!(t0.elapsed() >= Duration::from_millis(1500), "returned before the session went idle");
    // The next connection of the session gets a lease again.
    let (code, _, err) = curl(&["-v", "-x", &w.http_proxy("app-session-alpha"), &url]).await?;
    anyhow::ensure!(code == 0 && !id_of(&err).is_empty(), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_foreign_ips_spoofed_headers_bad_usernames_slowloris_and_huge_headers_lease_nothing() -> R {
    let w = world(100, 1, &[("FORWARD_HANDSHAKE_TIMEOUT", "1".into()), ("FORWARD_HEADER_MAX", "8192".into())]).await?;
    let target = http_target().await?;
    let url = format!("http://{target}/x");
    // Wrong key: 407 with Proxy-Authenticate, on both kinds of request.
    let (_, out, err) = curl(&["-v", "-x", &w.door.http_url("me", "not-the-key-0123456789"), &url]).await?;
    anyhow::ensure!(err.contains("< HTTP/1.1 407") && header(&err, "proxy-authenticate").is_some(), "{out} {err}");
    let (status, head, _) = raw_connect(w.door.http_addr, "me", "wrong", target).await?;
    anyhow::ensure!(status == 407, "{head}");
    // No credentials at all.
    let (_, _, err) = curl(&["-v", "-x", &format!("http://{}", w.door.http_addr), &url]).await?;
    anyhow::ensure!(err.contains("< HTTP/1.1 407"), "{err}");
    // Malformed usernames: 400 naming the option.
    for (user, field) in
        [("me-country-vn", "username"), ("me-area-mars", "username.area"), ("me-sesstime-5", "username.sesstime")]
    {
        let (_, out, err) = curl(&["-v", "-x", &w.http_proxy(user), &url]).await?;
        anyhow::ensure!(err.contains("< HTTP/1.1 400"), "{user}: {err}");
        let body: serde_json::Value = serde_json::from_str(&out)?;
        anyhow::ensure!(body["error"]["field"] == field, "{user}: {body}");
    }
    // Slowloris: a head dribbled out never completes; the door closes it after the handshake timeout.
    let mut slow = TcpStream::connect(w.door.http_addr).await?;
    slow.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n").await?;
    let t0 = Instant::now();
    let mut closed = false;
    for _ in 0..25 {
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 256];
        // Anything but silence (an end, an error, a 408) means the door gave up on this client.
        if tokio::time::timeout(Duration::from_millis(200), slow.read(&mut b)).await.is_ok() {
            closed = true;
            break;
        }
    }
    anyhow::ensure!(
        closed && t0.elapsed() < Duration::from_secs(3),
        "slowloris held the connection {:?}",
        t0.elapsed()
    );
    // A 20 KiB head is refused (431) without being read to its end.
    let mut big = TcpStream::connect(w.door.http_addr).await?;
    let huge = format!("GET {url} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * 1024));
    let _ = big.write_all(huge.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A door that allows only 10.9.9.9: this client is foreign, and a spoofed X-Forwarded-For does not help.
    let strict = w.app.start_forward(w.app.forward_config(&[("IP_ALLOWED", "10.9.9.9".into())])).await?;
    let proxy = strict.http_url("me", API_KEY);
    let (_, _, err) = curl(&["-v", "-x", &proxy, "-H", "X-Forwarded-For: 10.9.9.9", &url]).await?;
    anyhow::ensure!(err.contains("< HTTP/1.1 407"), "{err}");
    let (_, _, err) = curl(&["-v", "-p", "-x", &proxy, "--proxy-header", "X-Forwarded-For: 10.9.9.9", &url]).await?;
    anyhow::ensure!(err.contains("< HTTP/1.1 407"), "{err}");
    let (code, _, _) =
        curl(&["--socks5-hostname", &strict.socks_addr.to_string(), "--proxy-user", &format!("me:{API_KEY}"), &url])
            .await?;
    anyhow::ensure!(code != 0, "the SOCKS5 door let a foreign IP in");
    // Nothing was ever leased.
    w.app.settle().await;
    let docs = w.app.all_proxies().await?;
    anyhow::ensure!(docs.iter().all(|d| d.used_count == 0 && d.in_use == 0), "{docs:?}");
    anyhow::ensure!(w.door.shared.book.held() == 0 && strict.shared.book.held() == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_before_the_first_byte_is_retried_elsewhere_and_recorded() -> R {
    let app = TestApp::builder().proxy_use_max(100).spawn().await?;
    // Inserted first, so picked first (same use count; ties go by id): nothing listens, and wrong credentials.
    let dead =
        add_proxy(&app, SocketAddr::from(([127, 0, 0, 1], proxypool_system_tests::servers::free_port()?)), "u", "p")
            .await?;
    let good_up = Tinyproxy::start("puser", "ppass")?;
    let wrong = add_proxy(&app, good_up.addr, "puser", "not-the-password").await?;
    let good = add_proxy(&app, good_up.addr, "puser", "ppass").await?;
    let door = app.start_forward(app.forward_config(&[("FORWARD_RETRIES", "2".into())])).await?;
    let target = http_target().await?;
    let (status, head, mut s) = raw_connect(door.http_addr, "retry", API_KEY, target).await?;
    anyhow::ensure!(status == 200, "{head}");
    anyhow::ensure!(header(&head, "x-proxypool-proxy-id") == Some(good.to_hex()), "{head}");
    anyhow::ensure!(get_over(&mut s, "/r").await?.contains("target-ok /r"));
    drop(s);
    // Both failures are recorded on their proxies (by the lease service, in the projection).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (d, wr, g) =
            (app.proxy(&dead.to_hex()).await?, app.proxy(&wrong.to_hex()).await?, app.proxy(&good.to_hex()).await?);
        let kind = |d: &ProxyDoc| d.last_upstream_failure.as_ref().map(|f| f.kind.clone());
        if d.upstream_failures == 1 && wr.upstream_failures == 1 && d.in_use == 0 && wr.in_use == 0 && g.in_use == 0 {
            anyhow::ensure!(
                kind(&d).as_deref() == Some("refused") && kind(&wr).as_deref() == Some("auth"),
                "{d:?} {wr:?}"
            );
            anyhow::ensure!(g.upstream_failures == 0);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "failures not recorded: {d:?} {wr:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With no retry allowed and only failing proxies left: 502 with a reason.
    let strict = app.start_forward(app.forward_config(&[("FORWARD_RETRIES", "0".into())])).await?;
    app.update_proxy(good, bson::doc! { "$set": { "is_active": false } }).await?;
    app.announce(good).await?;
    let (status, head, _) = raw_connect(strict.http_addr, "retry", API_KEY, target).await?;
    anyhow::ensure!(
        status == 502 && header(&head, "x-proxypool-reason").is_some_and(|r| r.starts_with("upstream_")),
        "{head}"
    );
    // No free proxy at all: 503 with Retry-After.
    for id in [dead, wrong] {
        app.update_proxy(id, bson::doc! { "$set": { "is_active": false } }).await?;
        app.announce(id).await?;
    }
    let (status, head, _) = raw_connect(strict.http_addr, "retry", API_KEY, target).await?;
    anyhow::ensure!(status == 503 && header(&head, "retry-after").is_some(), "{head}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_drains_door_leases_then_takes_them_closing_the_tunnel_and_a_stop_returns_the_rest() -> R {
    let w = world(100, 1, &[]).await?;
    let fake = proxypool_system_tests::fakes::FakeWorld::start().await?;
    let target = http_target().await?;
    let id = w.ids[0];
    // An open tunnel holds a door lease.
    let (status, head, mut tunnel) = raw_connect(w.door.http_addr, "rot", API_KEY, target).await?;
    anyhow::ensure!(status == 200, "{head}");
    // The proxy is due now; the drain waits 2 s for the holder, then the rotation takes the lease.
    fake.answer("rot", 200, "{}");
    w.app
        .update_proxy(
            id,
            bson::doc! { "$set": { "next_rotate": bson::DateTime::now(), "rotate_url": fake.rotate_url("rot") } },
        )
        .await?;
    w.app.announce(id).await?;
    let mut config = w.app.rotator_config(&fake);
    config.drain_max = Duration::from_secs(2);
    let t0 = Instant::now();
    let rotator = w.app.start_rotator(config).await?;
    // The tunnel stays open through the drain, then is closed by the door when the lease is taken.
    let mut b = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), tunnel.read(&mut b)).await?;
    anyhow::ensure!(matches!(read, Ok(0) | Err(_)), "the tunnel got data instead of closing: {read:?}");
    let closed_after = t0.elapsed();
    anyhow::ensure!(
        closed_after >= Duration::from_millis(1800),
        "closed after {closed_after:?}, before the drain ended"
    );
    anyhow::ensure!(fake.calls("rot") >= 1, "the rotate URL was not called");
    w.all_returned().await?;
    rotator.stop().await;
    // A tunnel and a session open when the door stops: both leases are returned by the stop.
    let (status, _, _open) = raw_connect(w.door.http_addr, "rot", API_KEY, target).await?;
    anyhow::ensure!(status == 200);
    let (code, _, _) = curl(&["-x", &w.http_proxy("rot-session-keep"), &format!("http://{target}/")]).await?;
    anyhow::ensure!(code == 0);
    anyhow::ensure!(w.door.shared.book.held() == 2, "{} door leases, not 2", w.door.shared.book.held());
    let World { app, door, upstreams, .. } = w;
    door.stop().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let docs = app.all_proxies().await?;
        if docs.iter().all(|d| d.in_use == 0) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the stop left leases held: {docs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(upstreams);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_and_a_consumer_over_its_connection_limit_is_refused() -> R {
    let env = [("FORWARD_IDLE_TIMEOUT", "1".to_owned()), ("FORWARD_MAX_CONNS_PER_CONSUMER", "2".to_owned())];
    let w = world(100, 1, &env).await?;
    let target = http_target().await?;
    // Two tunnels of consumer "a" are open; its third connection is refused with 429, consumer "b" is not.
    let (s1, _, mut t1) = raw_connect(w.door.http_addr, "a", API_KEY, target).await?;
    let (s2, _, _t2) = raw_connect(w.door.http_addr, "a", API_KEY, target).await?;
    anyhow::ensure!(s1 == 200 && s2 == 200);
    let (s3, head, _) = raw_connect(w.door.http_addr, "a", API_KEY, target).await?;
    anyhow::ensure!(s3 == 429 && header(&head, "retry-after").is_some(), "{head}");
    let (s4, head, _t4) = raw_connect(w.door.http_addr, "b", API_KEY, target).await?;
    anyhow::ensure!(s4 == 200, "{head}");
    // With no byte either way for the idle timeout (1 s), the door closes the tunnels and returns their leases.
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(10), t1.read(&mut b)).await?;
    anyhow::ensure!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    anyhow::ensure!(
        t0.elapsed() >= Duration::from_millis(700),
        "closed after {:?}, before the idle timeout",
        t0.elapsed()
    );
    w.all_returned().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_lease_is_taken_moves_to_another_proxy_and_says_why() -> R {
    let w = world(100, 2, &[]).await?;
    let target = http_target().await?;
    let url = format!("http://{target}/moved");
    let user = w.http_proxy("app-session-mover");
    let (code, _, err) = curl(&["-v", "-x", &user, &url]).await?;
    let first = header(&err, "x-proxypool-proxy-id").unwrap_or_default();
    anyhow::ensure!(code == 0 && !first.is_empty(), "{err}");
    anyhow::ensure!(header(&err, "x-proxypool-session-changed").is_none(), "a new session reports a change: {err}");
    // An admin disables the session's proxy: the lease service takes the lease and broadcasts it.
    let id = ObjectId::parse_str(&first)?;
    w.app.update_proxy(id, bson::doc! { "$set": { "is_active": false } }).await?;
    w.app.announce(id).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _, err) = curl(&["-v", "-x", &user, &url]).await?;
        anyhow::ensure!(code == 0, "{err}");
        let now = header(&err, "x-proxypool-proxy-id").unwrap_or_default();
        if now != first {
            anyhow::ensure!(
                header(&err, "x-proxypool-session-changed").as_deref() == Some("proxy_disabled"),
                "the answer does not say why the session moved: {err}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the session kept its taken lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The next connection stays on the new proxy and reports no further change.
    let (_, _, err) = curl(&["-v", "-x", &user, &url]).await?;
    anyhow::ensure!(header(&err, "x-proxypool-session-changed").is_none(), "{err}");
    Ok(())
}

/// A door client reports a block with the proxy id the door showed it: the session's next connection to that site
/// leaves through another proxy and says why; other sites keep the proxy. Reports for a proxy never leased to the
/// caller, or with a bad outcome, change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_door_client_reports_a_block_and_its_session_moves_off_that_exit_ip_for_that_site() -> R {
    let w = world(100, 2, &[]).await?;
    // Two exit IPs (both upstreams listen on loopback, so their addresses are the same).
    for (n, id) in w.ids.iter().enumerate() {
        let ip = format!("198.51.100.{}", n + 1);
        w.app.update_proxy(*id, bson::doc! { "$set": { "ip_public": ip, "updatedAt": bson::DateTime::now() } }).await?;
    }
    let target = http_target().await?;
    let url = format!("http://{target}/page");
    let user = w.http_proxy("app-session-blocked");
    let (code, _, err) = curl(&["-v", "-x", &user, &url]).await?;
    let first = header(&err, "x-proxypool-proxy-id").unwrap_or_default();
    anyhow::ensure!(code == 0 && !first.is_empty(), "{err}");
    // The door says when the upstream is next due for rotation (an hour from now here).
    let due = header(&err, "x-proxypool-next-rotate").unwrap_or_default();
    let due = chrono::DateTime::parse_from_rfc3339(&due).map_err(|e| anyhow::anyhow!("{due:?}: {e}: {err}"))?;
    anyhow::ensure!(due > chrono::Utc::now() + chrono::Duration::minutes(50), "{due}");
    let report = |body: serde_json::Value| {
        w.app.http.post(w.app.url("/api/outcomes")).header("Authorization", API_KEY).json(&body).send()
    };
    // Bad input: a 400 naming the field, nothing banned.
    let res = report(serde_json::json!({"proxy_id": first, "outcome": "banned", "domain": "127.0.0.1"})).await?;
    anyhow::ensure!(res.status() == 400, "bad outcome: {}", res.status());
    let body: serde_json::Value = res.json().await?;
    anyhow::ensure!(body["error"]["field"] == "outcome", "{body}");
    let res = report(serde_json::json!({"proxy_id": first, "outcome": "blocked"})).await?;
    anyhow::ensure!(res.status() == 400, "a block without its site: {}", res.status());
    // A proxy never leased to this caller: 404.
    let never = w.app.insert_proxy_with(Area::Vn, |d| d.is_active = false).await?;
    let res =
        report(serde_json::json!({"proxy_id": never.to_hex(), "outcome": "blocked", "domain": "127.0.0.1"})).await?;
    anyhow::ensure!(res.status() == 404, "a stranger's proxy: {}", res.status());
    let (_, _, err) = curl(&["-v", "-x", &user, &url]).await?;
    anyhow::ensure!(
        header(&err, "x-proxypool-proxy-id").as_deref() == Some(first.as_str()),
        "moved without a ban: {err}"
    );
    // The block: the site banned the session's exit IP.
    let res = report(serde_json::json!({"proxy_id": first, "outcome": "blocked", "domain": "127.0.0.1"})).await?;
    anyhow::ensure!(res.status() == 200, "report: {}", res.text().await?);
    let ban: serde_json::Value = res.json().await?;
    anyhow::ensure!(ban["banned_ip"].as_str().is_some_and(|ip| ip.starts_with("198.51.100.")), "{ban}");
    // The next connection of the session to that site leaves through the other proxy and says why.
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let (code, _, err) = curl(&["-v", "-x", &user, &url]).await?;
        anyhow::ensure!(code == 0, "{err}");
        let now = header(&err, "x-proxypool-proxy-id").unwrap_or_default();
        if now != first {
            anyhow::ensure!(
                header(&err, "x-proxypool-session-changed").as_deref() == Some("banned"),
                "the answer does not say why the session moved: {err}"
            );
            break now;
        }
        anyhow::ensure!(Instant::now() < deadline, "the session stayed on the banned exit IP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, _, err) = curl(&["-v", "-x", &user, &url]).await?;
    anyhow::ensure!(header(&err, "x-proxypool-proxy-id").as_deref() == Some(second.as_str()), "{err}");
    anyhow::ensure!(header(&err, "x-proxypool-session-changed").is_none(), "{err}");
    // Another site through a new session may still leave through the banned IP: the ban is per site.
    let other_site = format!("http://localhost:{}/page", target.port());
    let mut seen = std::collections::HashSet::new();
    for n in 0..6 {
        let (code, _, err) = curl(&["-v", "-x", &w.http_proxy(&format!("app-session-other{n}")), &other_site]).await?;
        anyhow::ensure!(code == 0, "{err}");
        seen.insert(header(&err, "x-proxypool-proxy-id").unwrap_or_default());
    }
    anyhow::ensure!(seen.contains(&first), "the banned IP is not leased for other sites: {seen:?}");
    Ok(())
}
