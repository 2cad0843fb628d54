//! NATS connection settings and connect helper.

use std::time::Duration;

use crate::env::{ConfigError, Env};
use crate::Secret;

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `NATS_URL`, default `nats://127.0.0.1:4222`: one server, or a comma-separated seed list of a cluster's
    /// servers (`nats://a:4222,nats://b:4222,nats://c:4222`), as NATS clients take it.
    pub url: String,
    /// `NATS_USER` / `NATS_PASSWORD`, when the server requires them.
    pub user: Option<(String, Secret<String>)>,
    /// `NATS_CREDS`: path to a `.creds` file (decentralised auth).
    pub creds_file: Option<String>,
    /// `NATS_REQUEST_TIMEOUT` (seconds, default 5): how long a request waits for a reply.
    pub request_timeout: Duration,
    /// `JETSTREAM_REPLICAS` (default 1, at most 5): copies of every stream, bucket and object store this service
    /// creates; 3 on a three-server cluster, so that the loss of a server loses nothing.
    pub replicas: usize,
    /// `PROXYPOOL_NAMESPACE` (default none): keeps this deployment's subjects, streams and buckets apart from another
    /// deployment's on the same NATS (see `proxypool_contracts::subjects`).
    pub namespace: String,
}

impl NatsConfig {
    /// Reads the NATS variables.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let url = env.get("NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        for server in servers(&url) {
            if !(server.starts_with("nats://") || server.starts_with("tls://") || server.starts_with("ws")) {
                return Err(ConfigError::invalid(
                    "NATS_URL",
                    format!("{server:?} must start with nats://, tls:// or ws(s)://"),
                ));
            }
            if let Err(e) = server.parse::<async_nats::ServerAddr>() {
                return Err(ConfigError::invalid("NATS_URL", format!("{server:?} is not a server URL: {e}")));
            }
        }
        if servers(&url).next().is_none() {
            return Err(ConfigError::invalid("NATS_URL", "names no server"));
        }
        let user = match (env.get("NATS_USER"), env.get("NATS_PASSWORD")) {
            (Some(u), Some(p)) => Some((u, Secret::new(p))),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::Missing("NATS_PASSWORD")),
            (None, Some(_)) => return Err(ConfigError::Missing("NATS_USER")),
        };
        let replicas: usize = env.parse_or("JETSTREAM_REPLICAS", 1)?;
        if !(1..=5).contains(&replicas) {
            return Err(ConfigError::invalid("JETSTREAM_REPLICAS", "must be between 1 and 5"));
        }
        let namespace = env.get("PROXYPOOL_NAMESPACE").unwrap_or_default();
        proxypool_contracts::subjects::check_namespace(&namespace)
            .map_err(|why| ConfigError::invalid("PROXYPOOL_NAMESPACE", why))?;
        Ok(Self {
            url,
            user,
            creds_file: env.get("NATS_CREDS"),
            request_timeout: env.seconds_or("NATS_REQUEST_TIMEOUT", Duration::from_secs(5))?,
            replicas,
            namespace,
        })
    }

    /// A config for a local server at `url` (tests, benchmarks).
    pub fn local(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user: None,
            creds_file: None,
            request_timeout: Duration::from_secs(5),
            replicas: 1,
            namespace: String::new(),
        }
    }

    /// Connects. The client reconnects by itself forever, also when the server is down at start, so a service
    /// comes up before NATS does and recovers after a NATS restart without intervention.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
        // Every subject and stream this process uses is in its deployment's namespace from here on.
        proxypool_contracts::subjects::set_namespace(&self.namespace).map_err(|why| {
            async_nats::ConnectError::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("PROXYPOOL_NAMESPACE: {why}"),
            ))
        })?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .request_timeout(Some(self.request_timeout))
            .connection_timeout(Duration::from_secs(3))
            // The client's default back-off grows to several seconds while the server is down, so a service came
            // back 7-9 s after NATS did; a flat, short delay (plus a little jitter, so that a fleet does not
            // reconnect in lockstep) brings it back within about half a second.
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        if let Some((user, password)) = &self.user {
            opts = opts.user_and_password(user.clone(), password.expose().clone());
        }
        if let Some(path) = &self.creds_file {
            opts = opts.credentials_file(path).await.map_err(async_nats::ConnectError::from)?;
        }
        opts.connect(servers(&self.url).collect::<Vec<_>>()).await
    }
}

/// The servers of a `NATS_URL` (one URL, or a comma-separated list).
fn servers(url: &str) -> impl Iterator<Item = &str> {
    url.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Delay before reconnection attempt `attempts`: at once for the first, then 250 ms plus up to 250 ms of jitter.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let jitter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_micros());
    Duration::from_millis(250) + Duration::from_micros(u64::from(jitter % 250_000))
}

/// Drains `client` at shutdown (flushes what is queued, ends subscriptions), waiting at most `limit`: with the server
/// gone the drain cannot complete, and a stopping service must still exit.
pub async fn drain(client: &async_nats::Client, limit: Duration) {
    match tokio::time::timeout(limit, client.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot drain the NATS connection"),
        Err(_) => tracing::warn!(?limit, "the NATS connection did not drain in time; exiting anyway"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_list_is_accepted_and_a_bad_entry_is_named() {
        let list = Env::from_pairs([("NATS_URL", "nats://a:4222, nats://b:4223,nats://c:4224")]);
        let c = NatsConfig::from_env(&list).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| servers(&c.url).count()), Ok(3));
        let bad = Env::from_pairs([("NATS_URL", "nats://a:4222,http://b:80")]);
        let e = NatsConfig::from_env(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("NATS_URL") && e.contains("http://b:80"), "{e}");
        let empty = Env::from_pairs([("NATS_URL", " , ")]);
        assert!(NatsConfig::from_env(&empty).is_err());
    }
}
