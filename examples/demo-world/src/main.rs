//! `proxypool-demo-world PROVIDER_ADDR TARGET_ADDR`: what `scripts/run.sh` runs in place of the internet, so that
//! the local pool works offline end to end.
//!
//! - On `PROVIDER_ADDR`, a demo provider: `/rotate/{key}` answers 200 `{}` (the proxy keeps its address, as a 4G
//!   modem that only changes its public IP), `/ip` is the IP echo the rotator checks through each proxy, and
//!   `/region/{ip}` a geo-IP lookup. (It is the fake world of the test suite.)
//! - On `TARGET_ADDR`, a target site: every GET answers `hello from the local target` with the `Via` header the
//!   upstream proxy added, so a request through the door shows that it went through a pool proxy.

use std::net::SocketAddr;

use axum::http::HeaderMap;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || anyhow::anyhow!("usage: proxypool-demo-world PROVIDER_ADDR TARGET_ADDR");
    let provider: SocketAddr = args.next().ok_or_else(usage)?.parse()?;
    let target: SocketAddr = args.next().ok_or_else(usage)?.parse()?;
    let world = proxypool_test_support::fakes::FakeWorld::start_on(provider).await?;
    async fn hello(headers: HeaderMap) -> String {
        let via = headers.get("via").and_then(|v| v.to_str().ok()).unwrap_or("no proxy");
        format!("hello from the local target (via {via})\n")
    }
    let listener = tokio::net::TcpListener::bind(target).await?;
    println!("demo provider on {}, target on http://{target}/", world.base);
    axum::serve(listener, axum::Router::new().fallback(hello)).await?;
    Ok(())
}
