//! Public-IP check through the proxy, and the region of that IP.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::providers::Address;

/// Reads an IP from an echo service's answer: plain text (`api.ipify.org`) or JSON with an `ip` field
/// (`api.myip.com`, `?format=json`).
pub fn parse_ip(body: &str) -> Option<IpAddr> {
    let t = body.trim();
    if let Ok(ip) = t.parse() {
        return Some(ip);
    }
    serde_json::from_str::<Value>(t).ok()?.get("ip")?.as_str()?.trim().parse().ok()
}

/// Fetches each of `urls` through the proxy at `addr` (HTTP proxy, basic auth when it has credentials), up to
/// `tries` rounds `delay` apart, and returns the first public IP seen. `Err` holds the last reason.
pub async fn public_ip(
    addr: &Address,
    urls: &[String],
    tries: u32,
    delay: Duration,
    timeout: Duration,
) -> Result<IpAddr, IpCheckError> {
    check(addr, urls, tries, delay, timeout).await.map_err(IpCheckError)
}

/// The public IP could not be read through the proxy; the text (the last reason) is stored as its `response`.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IpCheckError(pub String);

async fn check(
    addr: &Address,
    urls: &[String],
    tries: u32,
    delay: Duration,
    timeout: Duration,
) -> Result<IpAddr, String> {
    let mut proxy = reqwest::Proxy::all(format!("http://{}:{}", addr.ip, addr.port))
        .map_err(|e| format!("bad proxy address: {e}"))?;
    if !addr.username.is_empty() {
        proxy = proxy.basic_auth(&addr.username, &addr.password);
    }
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let mut last = String::from("no IP check URL configured");
    for attempt in 0..tries {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
        }
        for url in urls {
            match client.get(url).send().await {
                Ok(res) if res.status().is_success() => match res.text().await {
                    Ok(body) => match parse_ip(&body) {
                        Some(ip) => return Ok(ip),
                        None => last = format!("{url} answered without an IP"),
                    },
                    Err(e) => last = format!("{url}: {e}"),
                },
                Ok(res) => last = format!("{url} through the proxy answered HTTP {}", res.status().as_u16()),
                Err(e) => last = format!("{url} through the proxy failed: {}", without_url(&e)),
            }
        }
    }
    Err(format!("IP check failed after {tries} tries: {last}"))
}

/// A reqwest error without the URL (which may carry credentials), for storing in `response`.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request error"
    };
    kind.to_owned()
}

/// Looks up the region of `ip` at `template` (`{ip}` replaced). Reads `region`, `regionName`, `city` or `country`
/// from a JSON answer, or a plain-text answer as is. `None` on any failure: the region is informative only.
pub async fn region(template: &str, ip: IpAddr, timeout: Duration) -> Option<String> {
    let url = template.replace("{ip}", &ip.to_string());
    let client = reqwest::Client::builder().timeout(timeout).build().ok()?;
    let res = client.get(&url).send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    let body = res.text().await.ok()?;
    let region = match serde_json::from_str::<Value>(&body) {
        Ok(v) => ["region", "regionName", "city", "country"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str).map(str::to_owned))?,
        Err(_) => body.trim().to_owned(),
    };
    let region: String = region.chars().take(100).collect();
    (!region.is_empty()).then_some(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_echo_answers() {
        assert_eq!(parse_ip("203.0.113.9\n"), "203.0.113.9".parse().ok());
        assert_eq!(parse_ip(r#"{"ip":"203.0.113.9","country":"Viet Nam","cc":"VN"}"#), "203.0.113.9".parse().ok());
        assert_eq!(parse_ip("<html>blocked</html>"), None);
    }
}
