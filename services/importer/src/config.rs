//! Importer configuration.

use std::time::Duration;

use proxypool_settings::env::{ConfigError, Env};
use proxypool_settings::nats::NatsConfig;
use proxypool_settings::Secret;
use proxypool_store::StoreConfig;

/// KiotProxy integration (`KIOT_API_KEY` set).
#[derive(Debug, Clone)]
pub struct KiotConfig {
    /// `API_KIOT_PROXY_PACKAGE`: the package list.
    pub package_url: String,
    /// `API_KIOT_PROXY_KEY`: the key list.
    pub key_url: String,
    /// `KIOT_API_KEY`, sent as `Api-token`.
    pub api_key: Secret<String>,
    /// `KIOT_PROXY_ROTATE_URL`: a key's rotate URL is this followed by the key.
    pub rotate_url_base: String,
}

/// ZingProxy integration (`ZING_PROXY_TOKEN` set).
#[derive(Debug, Clone)]
pub struct ZingConfig {
    /// `API_ZING_PROXY_ALL`: the active proxies.
    pub url: String,
    /// `ZING_PROXY_TOKEN`, sent as a Bearer token.
    pub token: Secret<String>,
    /// `ZING_IMPORT_INTERVAL` (seconds, default 43200 = 12 h; `0` or `off` disables the schedule).
    pub interval: Option<Duration>,
}

/// Everything the importer needs, read once at start.
#[derive(Debug, Clone)]
pub struct ImporterConfig {
    /// KiotProxy, when configured.
    pub kiot: Option<KiotConfig>,
    /// ZingProxy, when configured.
    pub zing: Option<ZingConfig>,
    /// `IMPORT_HTTP_TIMEOUT` (seconds, default 20): timeout of each provider call.
    pub http_timeout: Duration,
    /// `IMPORT_BATCH` (default 1000): documents per `insert_many` and identities per lookup.
    pub batch: usize,
    /// `IMPORT_MAX_ROWS` (default 200,000): most data rows one spreadsheet may have; a larger one is refused whole
    /// (400), before anything is written.
    pub max_rows: usize,
    /// `IMPORTER_ADMIN_ADDR` (default `0.0.0.0:9103`): `/metrics` and `/healthz`.
    pub admin_addr: std::net::SocketAddr,
    /// NATS.
    pub nats: NatsConfig,
    /// MongoDB.
    pub store: StoreConfig,
}

fn http_url(env: &Env, name: &'static str, default: &str) -> Result<String, ConfigError> {
    let v = env.get(name).unwrap_or_else(|| default.to_owned());
    match url::Url::parse(&v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(v),
        _ => Err(ConfigError::invalid(name, "must be an absolute http(s) URL")),
    }
}

impl ImporterConfig {
    /// Reads and validates the environment.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let kiot = match env.get("KIOT_API_KEY").filter(|k| !k.trim().is_empty()) {
            None => None,
            Some(key) => Some(KiotConfig {
                package_url: http_url(env, "API_KIOT_PROXY_PACKAGE", "https://api.kiotproxy.com/api/public/packages")?,
                key_url: http_url(env, "API_KIOT_PROXY_KEY", "https://api.kiotproxy.com/api/public/keys")?,
                api_key: Secret::new(key),
                rotate_url_base: http_url(
                    env,
                    "KIOT_PROXY_ROTATE_URL",
                    "https://api.kiotproxy.com/api/v1/proxies/new?key=",
                )?,
            }),
        };
        let zing = match env.get("ZING_PROXY_TOKEN").filter(|k| !k.trim().is_empty()) {
            None => None,
            Some(token) => {
                let interval = match env.get("ZING_IMPORT_INTERVAL").as_deref().map(str::trim) {
                    Some("0" | "off") => None,
                    _ => Some(env.seconds_or("ZING_IMPORT_INTERVAL", Duration::from_secs(12 * 3600))?),
                };
                Some(ZingConfig {
                    url: http_url(env, "API_ZING_PROXY_ALL", "https://api.zingproxy.com/proxy/get-all-active-proxies")?,
                    token: Secret::new(token),
                    interval,
                })
            }
        };
        let batch: usize = env.parse_or("IMPORT_BATCH", 1_000)?;
        if !(1..=100_000).contains(&batch) {
            return Err(ConfigError::invalid("IMPORT_BATCH", "must be between 1 and 100000"));
        }
        let max_rows: usize = env.parse_or("IMPORT_MAX_ROWS", 200_000)?;
        if !(1..=1_048_576).contains(&max_rows) {
            return Err(ConfigError::invalid("IMPORT_MAX_ROWS", "must be between 1 and 1048576"));
        }
        Ok(Self {
            kiot,
            zing,
            max_rows,
            http_timeout: env.seconds_or("IMPORT_HTTP_TIMEOUT", Duration::from_secs(20))?,
            batch,
            admin_addr: env.parse_or("IMPORTER_ADMIN_ADDR", std::net::SocketAddr::from(([0, 0, 0, 0], 9103)))?,
            nats: NatsConfig::from_env(env)?,
            store: StoreConfig::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrations_are_optional_and_validated() {
        let c = ImporterConfig::from_env(&Env::default()).expect("defaults are valid");
        assert!(c.kiot.is_none() && c.zing.is_none());
        let c = ImporterConfig::from_env(&Env::from_pairs([("ZING_PROXY_TOKEN", "t")])).expect("valid");
        assert_eq!(c.zing.and_then(|z| z.interval), Some(Duration::from_secs(43_200)));
        let c =
            ImporterConfig::from_env(&Env::from_pairs([("ZING_PROXY_TOKEN", "t"), ("ZING_IMPORT_INTERVAL", "off")]))
                .expect("valid");
        assert_eq!(c.zing.map(|z| z.interval), Some(None));
        let e = ImporterConfig::from_env(&Env::from_pairs([("KIOT_API_KEY", "k"), ("API_KIOT_PROXY_KEY", "nope")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("API_KIOT_PROXY_KEY"), "{e}");
    }
}
