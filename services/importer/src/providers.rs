//! The KiotProxy and ZingProxy list APIs: fetching, and parsing their answers defensively.
//!
//! Their shapes are observed, not documented (see `docs/providers.md`), so every field is looked up under the names seen
//! so far and a missing or odd field is a per-item error, never a panic. A transport error, a non-2xx status or an
//! answer that is not the expected JSON fails the whole fetch: nothing is written from a partial answer.

use chrono::{DateTime, TimeZone, Utc};
use proxypool_contracts::import::RowError;
use serde_json::Value;

/// Why a provider could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FetchError {
    /// Which call.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// GETs `url` with `headers` and parses JSON; any failure names `what`. The URL is not in the message: it may
/// carry a key.
pub async fn fetch_json(
    http: &reqwest::Client,
    what: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Value, FetchError> {
    let err = |reason: String| FetchError { what: what.to_owned(), reason };
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.map_err(|e| err(format!("the provider is unreachable ({})", without_url(&e))))?;
    let status = res.status();
    let body = res.bytes().await.map_err(|e| err(format!("the answer was cut off ({})", without_url(&e))))?;
    if !status.is_success() {
        return Err(err(format!("the provider answered HTTP {}", status.as_u16())));
    }
    serde_json::from_slice(&body).map_err(|e| err(format!("the answer is not JSON ({e})")))
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    s
}

/// The list in an answer: the answer itself, or under `data`, `data.items`, `items`, `proxies` or `keys`.
fn list<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>, FetchError> {
    let candidates = [
        Some(v),
        v.get("data"),
        v.get("data").and_then(|d| d.get("items")),
        v.get("items"),
        v.get("proxies"),
        v.get("keys"),
    ];
    candidates.into_iter().flatten().find_map(Value::as_array).ok_or_else(|| FetchError {
        what: what.to_owned(),
        reason: "the answer holds no list (expected an array, or one under data, items or proxies)".into(),
    })
}

/// Refuses answers that say they failed (`success: false`, `status` other than success/ok).
fn check_success(v: &Value, what: &str) -> Result<(), FetchError> {
    let failed = v.get("success").and_then(Value::as_bool) == Some(false)
        || v.get("status").and_then(Value::as_str).is_some_and(|s| !matches!(s, "success" | "ok" | "OK" | "Success"));
    if failed {
        let message = v.get("message").and_then(Value::as_str).unwrap_or("no message");
        return Err(FetchError {
            what: what.to_owned(),
            reason: format!("the provider reported a failure: {message}"),
        });
    }
    Ok(())
}

/// The first of `names` that is a non-empty string (or a number, as text).
fn text(item: &Value, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| match item.get(*n)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn number(item: &Value, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|n| match item.get(*n)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// A time: Unix milliseconds (or seconds, when small), or an RFC 3339 / `YYYY-MM-DD[ HH:MM:SS]` string.
fn time(item: &Value, names: &[&str]) -> Option<Result<DateTime<Utc>, String>> {
    names.iter().find_map(|n| {
        let v = item.get(*n)?;
        Some(match v {
            Value::Number(x) => {
                let x = x.as_f64().unwrap_or(f64::NAN);
                let ms = if x.abs() < 1e11 { x * 1000.0 } else { x };
                Utc.timestamp_millis_opt(ms as i64).single().ok_or_else(|| format!("{n} {v} is not a time"))
            }
            Value::String(s) => parse_time(s.trim()).ok_or_else(|| format!("{n} {s:?} is not a time")),
            Value::Null => return None,
            other => Err(format!("{n} {other} is not a time")),
        })
    })
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&n));
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?.and_hms_opt(0, 0, 0).map(|n| Utc.from_utc_datetime(&n))
}

fn item_error(i: usize, field: &str, reason: impl Into<String>) -> RowError {
    RowError { row: u32::try_from(i + 1).unwrap_or(u32::MAX), field: Some(field.to_owned()), reason: reason.into() }
}

/// A KiotProxy package.
#[derive(Debug, Clone, PartialEq)]
pub struct KiotPackage {
    /// Provider-side code.
    pub code: String,
    /// Display name.
    pub name: String,
    /// Price (0 when not given).
    pub price: f64,
}

/// Parses the package list.
pub fn kiot_packages(v: &Value) -> Result<(Vec<KiotPackage>, Vec<RowError>), FetchError> {
    const WHAT: &str = "KiotProxy package list";
    check_success(v, WHAT)?;
    let mut packages = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in list(v, WHAT)?.iter().enumerate() {
        let Some(code) = text(item, &["code", "packageCode", "package_code", "id"]) else {
            errors.push(item_error(i, "code", "package without a code"));
            continue;
        };
        let name = text(item, &["name", "packageName", "title"]).unwrap_or_else(|| code.clone());
        let price = number(item, &["price", "amount"]).filter(|p| p.is_finite() && *p >= 0.0).unwrap_or(0.0);
        packages.push(KiotPackage { code, name, price });
    }
    Ok((packages, errors))
}

/// A KiotProxy key.
#[derive(Debug, Clone, PartialEq)]
pub struct KiotKey {
    /// Item number in the answer.
    pub item: u32,
    /// The key (goes into the rotate URL).
    pub key: String,
    /// Provider-side package code.
    pub package_code: String,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Current address, when the list gives one.
    pub host: Option<String>,
    /// Current HTTP port, when the list gives one.
    pub port: Option<u16>,
}

/// Parses the key list.
pub fn kiot_keys(v: &Value) -> Result<(Vec<KiotKey>, Vec<RowError>), FetchError> {
    const WHAT: &str = "KiotProxy key list";
    check_success(v, WHAT)?;
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in list(v, WHAT)?.iter().enumerate() {
        let Some(key) = text(item, &["key", "apiKey", "api_key"]) else {
            errors.push(item_error(i, "key", "key item without a key"));
            continue;
        };
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            errors.push(item_error(i, "key", "the key has characters a URL cannot carry as is"));
            continue;
        }
        let Some(package_code) = text(item, &["packageCode", "package_code", "package", "code"]) else {
            errors.push(item_error(i, "packageCode", format!("key {key} has no package code")));
            continue;
        };
        let expires_at = match time(item, &["expirationAt", "expiredAt", "expired_at", "expiration_at"]) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(reason)) => {
                errors.push(item_error(i, "expirationAt", reason));
                continue;
            }
        };
        let port = number(item, &["httpPort", "port"]).filter(|p| p.fract() == 0.0 && (1.0..=65_535.0).contains(p));
        keys.push(KiotKey {
            item: u32::try_from(i + 1).unwrap_or(u32::MAX),
            key,
            package_code,
            expires_at,
            host: text(item, &["host"]),
            port: port.map(|p| p as u16),
        });
    }
    Ok((keys, errors))
}

/// An active ZingProxy proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct ZingProxy {
    /// Item number in the answer.
    pub item: u32,
    /// Host or IP.
    pub host: String,
    /// HTTP port.
    pub port: u16,
    /// Username.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// The change-IP URL.
    pub rotate_url: String,
    /// End of the subscription.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Parses the active proxy list.
pub fn zing_proxies(v: &Value) -> Result<(Vec<ZingProxy>, Vec<RowError>), FetchError> {
    const WHAT: &str = "ZingProxy proxy list";
    check_success(v, WHAT)?;
    let mut proxies = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in list(v, WHAT)?.iter().enumerate() {
        let Some(host) = text(item, &["hostIp", "host", "ip"]) else {
            errors.push(item_error(i, "hostIp", "proxy without a host"));
            continue;
        };
        let Some(port) = number(item, &["portHttp", "httpPort", "port"])
            .filter(|p| p.fract() == 0.0 && (1.0..=65_535.0).contains(p))
        else {
            errors.push(item_error(i, "portHttp", format!("proxy {host} has no valid HTTP port")));
            continue;
        };
        let Some(rotate_url) = text(item, &["urlChangeIp", "changeIpUrl", "rotateUrl", "rotate_url"]) else {
            errors.push(item_error(i, "urlChangeIp", format!("proxy {host} has no change-IP URL")));
            continue;
        };
        if !matches!(url::Url::parse(&rotate_url), Ok(u) if matches!(u.scheme(), "http" | "https")) {
            errors.push(item_error(i, "urlChangeIp", format!("proxy {host}: the change-IP URL is not http(s)")));
            continue;
        }
        let expires_at = match time(item, &["dateEnd", "expiredAt", "expired_at"]) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(reason)) => {
                errors.push(item_error(i, "dateEnd", reason));
                continue;
            }
        };
        proxies.push(ZingProxy {
            item: u32::try_from(i + 1).unwrap_or(u32::MAX),
            host,
            port: port as u16,
            username: text(item, &["username", "user"]),
            password: text(item, &["password", "pass"]),
            rotate_url,
            expires_at,
        });
    }
    Ok((proxies, errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kiot_keys_odd_items_are_item_errors() {
        let v = json!({"success": true, "data": [
            {"key": "K1", "packageCode": "VN30", "expirationAt": 4_102_444_800_000_i64},
            {"packageCode": "VN30"},
            {"key": "K3", "packageCode": "VN30", "expirationAt": "soon"},
        ]});
        let (keys, errors) = kiot_keys(&v).expect("a list");
        assert_eq!(keys.len(), 1);
        assert_eq!(errors.iter().map(|e| e.row).collect::<Vec<_>>(), vec![2, 3]);
        assert!(kiot_keys(&json!({"success": false, "message": "bad token"})).is_err());
        assert!(kiot_keys(&json!({"success": true, "data": "nope"})).is_err());
    }

    #[test]
    fn zing_list() {
        let v = json!({"status": "success", "proxies": [
            {"hostIp": "1.2.3.4", "portHttp": 8080, "username": "u", "password": "p",
             "urlChangeIp": "https://api.zingproxy.com/getip/abc", "dateEnd": "2030-01-31T00:00:00Z"},
            {"hostIp": "1.2.3.5", "portHttp": "x", "urlChangeIp": "https://z/getip/b"},
        ]});
        let (ps, errors) = zing_proxies(&v).expect("a list");
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].port, 8080);
        assert_eq!(errors[0].field.as_deref(), Some("portHttp"));
        assert!(zing_proxies(&json!({"status": "error", "message": "token"})).is_err());
    }
}
