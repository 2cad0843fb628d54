//! Provider adapters: how to read a rotate response. Kept in one place so that a provider changing its API is a
//! one-file fix (see docs/providers.md for what was observed of each).

use proxypool_store::model::RotateFields;
use serde_json::Value;

/// A proxy's connection details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// IP or host.
    pub ip: String,
    /// Port.
    pub port: u16,
    /// Username (empty when none).
    pub username: String,
    /// Password (empty when none).
    pub password: String,
}

/// How a provider answers its rotate URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Adapter {
    /// `{"success": true, "data": {"host", "httpPort" | "http": "ip:port"}}`; no credentials.
    Kiot,
    /// Any 2xx; the proxy keeps host, port and credentials (only the public IP changes).
    Zing,
    /// JSON fields at configured paths, or (without settings) "keep the current address" on any 2xx.
    Generic(Option<RotateFields>),
}

/// A rotate answer the adapter could not accept; the text is stored as the proxy's `response`.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RotateAnswerError(pub String);

impl Adapter {
    /// The adapter for a provider, by its name (`KiotProxy`, `ZingProxy`, anything else).
    pub fn for_provider(name: &str, fields: Option<RotateFields>) -> Self {
        match name.trim().to_ascii_lowercase().as_str() {
            "kiotproxy" | "kiot" => Adapter::Kiot,
            "zingproxy" | "zing" => Adapter::Zing,
            _ => Adapter::Generic(fields),
        }
    }

    /// Reads the new address from a rotate response. `Err` holds a reason fit for the admin API.
    pub fn parse(&self, status: u16, body: &str, current: &Address) -> Result<Address, RotateAnswerError> {
        self.read(status, body, current).map_err(RotateAnswerError)
    }

    fn read(&self, status: u16, body: &str, current: &Address) -> Result<Address, String> {
        if !(200..300).contains(&status) {
            return Err(format!("rotate URL answered HTTP {status}"));
        }
        match self {
            Adapter::Zing | Adapter::Generic(None) => Ok(current.clone()),
            Adapter::Kiot => {
                let v: Value = serde_json::from_str(body).map_err(|e| format!("KiotProxy answer is not JSON: {e}"))?;
                if v.get("success").and_then(Value::as_bool) != Some(true) {
                    let msg = v.get("message").and_then(Value::as_str).unwrap_or("no message");
                    return Err(format!("KiotProxy refused the rotation: {msg}"));
                }
                let data = v.get("data").ok_or("KiotProxy answer has no data")?;
                let (ip, port) =
                    match (data.get("host").and_then(Value::as_str), data.get("httpPort").and_then(port_of)) {
                        (Some(h), Some(p)) => (h.to_owned(), p),
                        _ => {
                            let http = data
                                .get("http")
                                .and_then(Value::as_str)
                                .ok_or("KiotProxy data has no host/httpPort or http")?;
                            let (h, p) = http.rsplit_once(':').ok_or("KiotProxy data.http is not host:port")?;
                            (h.to_owned(), p.parse().map_err(|_| "KiotProxy data.http has a bad port".to_owned())?)
                        }
                    };
                Ok(Address { ip, port, username: String::new(), password: String::new() })
            }
            Adapter::Generic(Some(f)) => {
                let v: Value = serde_json::from_str(body).map_err(|e| format!("rotate answer is not JSON: {e}"))?;
                let ip = at(&v, &f.ip).and_then(Value::as_str).ok_or_else(|| format!("no string at {}", f.ip))?;
                let port = at(&v, &f.port).and_then(port_of).ok_or_else(|| format!("no port at {}", f.port))?;
                let text = |path: &Option<String>, old: &str| -> Result<String, String> {
                    match path {
                        None => Ok(old.to_owned()),
                        Some(p) => at(&v, p)
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .ok_or_else(|| format!("no string at {p}")),
                    }
                };
                Ok(Address {
                    ip: ip.to_owned(),
                    port,
                    username: text(&f.username, &current.username)?,
                    password: text(&f.password, &current.password)?,
                })
            }
        }
    }
}

/// A port as a JSON number or numeric string, 1–65535.
fn port_of(v: &Value) -> Option<u16> {
    let n = v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))?;
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// The value at a dotted path (`data.proxy.host`, `items.0.ip`).
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| match v {
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => v.get(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> Address {
        Address { ip: "10.0.0.1".into(), port: 8000, username: "u".into(), password: "p".into() }
    }

    #[test]
    fn kiot_shapes() {
        let ok = r#"{"success":true,"code":200,"message":"ok","data":{"http":"1.2.3.4:12345","socks5":"1.2.3.4:12346",
            "host":"1.2.3.4","httpPort":12345,"realIpAddress":"5.6.7.8","ttc":59,"nextRequestAt":1700000000000,
            "expirationAt":1700000000000}}"#;
        let a = Adapter::for_provider("KiotProxy", None).parse(200, ok, &current());
        assert_eq!(
            a,
            Ok(Address { ip: "1.2.3.4".into(), port: 12345, username: String::new(), password: String::new() })
        );
        let only_http = r#"{"success":true,"data":{"http":"9.9.9.9:8080"}}"#;
        assert_eq!(
            Adapter::Kiot.parse(200, only_http, &current()).map(|a| (a.ip, a.port)),
            Ok(("9.9.9.9".into(), 8080))
        );
        let refused = r#"{"success":false,"code":429,"message":"wait 59s"}"#;
        assert!(Adapter::Kiot.parse(200, refused, &current()).err().unwrap_or_default().0.contains("wait 59s"));
        assert!(Adapter::Kiot.parse(200, "<html>", &current()).is_err());
        assert!(Adapter::Kiot.parse(502, ok, &current()).is_err());
    }

    #[test]
    fn zing_keeps_the_address() {
        let a = Adapter::for_provider("ZingProxy", None);
        assert_eq!(a.parse(200, r#"{"status":"success"}"#, &current()), Ok(current()));
        assert!(a.parse(401, "", &current()).is_err());
    }

    #[test]
    fn generic_with_and_without_fields() {
        assert_eq!(Adapter::for_provider("Other", None).parse(204, "", &current()), Ok(current()));
        let f = RotateFields {
            ip: "proxy.host".into(),
            port: "proxy.port".into(),
            username: Some("proxy.auth.0".into()),
            password: None,
        };
        let body = r#"{"proxy":{"host":"7.7.7.7","port":"3128","auth":["new-user"]}}"#;
        let a = Adapter::for_provider("Other", Some(f.clone())).parse(200, body, &current());
        assert_eq!(
            a,
            Ok(Address { ip: "7.7.7.7".into(), port: 3128, username: "new-user".into(), password: "p".into() })
        );
        assert!(Adapter::Generic(Some(f)).parse(200, r#"{"proxy":{"host":"x"}}"#, &current()).is_err());
    }
}
