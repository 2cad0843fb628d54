//! Shared handler state and the typed NATS calls of the handlers.

use std::sync::Arc;

use async_nats::Client;
use proxypool_contracts::{ApiError, Endpoint};
use proxypool_store::Store;

use crate::config::GatewayConfig;

/// State every handler sees. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<GatewayConfig>,
    /// NATS connection (requests to the services, events).
    pub nats: Client,
    /// MongoDB (admin reads and writes of non-lease fields).
    pub store: Store,
    /// Prometheus metrics.
    pub metrics: crate::metrics::GatewayMetrics,
}

impl AppState {
    /// Calls endpoint `E` on its service. A NATS outage or a missing service is a retryable `service_unavailable`,
    /// answered within `NATS_REQUEST_TIMEOUT` at most.
    pub async fn call<E: Endpoint>(&self, req: &E::Request) -> Result<E::Reply, ApiError> {
        self.call_within::<E>(req, None).await
    }

    /// [`AppState::call`] with its own timeout instead of `NATS_REQUEST_TIMEOUT` (for requests that wait for work,
    /// such as small imports).
    pub async fn call_within<E: Endpoint>(
        &self,
        req: &E::Request,
        timeout: Option<std::time::Duration>,
    ) -> Result<E::Reply, ApiError> {
        // Always an explicit timeout, so that it travels as the request's deadline.
        let timeout = Some(timeout.unwrap_or(self.config.nats.request_timeout));
        Ok(proxypool_rpc::call_within::<E>(&self.nats, req, timeout).await?)
    }

    /// Calls `E` with a request that carries its own id (an acquire), asking again with the same request while the
    /// lease service is between leaders (no responder, no answer in time, `service_unavailable`), for at most
    /// [`RETRY_WINDOW`](proxypool_contracts::lease::RETRY_WINDOW). The service answers a repeated id with the grant
    /// it already made, so a failover that heals within the window shows the consumer no error and leaves no lease
    /// held by nobody. A gateway cut off from NATS asks again only for [`RECONNECT_GRACE`] (the NATS client moves to
    /// another server of a cluster in that time), then answers.
    pub async fn call_retrying<E: Endpoint>(&self, req: &E::Request) -> Result<E::Reply, ApiError> {
        use proxypool_rpc::CallError;
        let started = std::time::Instant::now();
        let give_up = started + proxypool_contracts::lease::RETRY_WINDOW;
        // One attempt must not eat the window: a leader that died holding the request never answers it.
        let attempt = self.config.nats.request_timeout.min(ATTEMPT_TIMEOUT);
        let (mut cut_off_since, mut nobody_since) = (None::<std::time::Instant>, None::<std::time::Instant>);
        loop {
            let e = match proxypool_rpc::call_within::<E>(&self.nats, req, Some(attempt)).await {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            let between_leaders = match &e {
                CallError::NoResponders { .. } => {
                    nobody_since.get_or_insert_with(std::time::Instant::now).elapsed()
                        < proxypool_contracts::lease::NO_RESPONDER_GRACE
                }
                CallError::TimedOut { .. } | CallError::Transport { .. } => true,
                CallError::Remote(r) => r.code == proxypool_contracts::ErrorCode::ServiceUnavailable,
                // The loss of one server of a cluster: the client reconnects to another within moments. A NATS that
                // is down altogether is answered as such once the grace is over.
                CallError::Disconnected => {
                    cut_off_since.get_or_insert_with(std::time::Instant::now).elapsed() < RECONNECT_GRACE
                }
                _ => false,
            };
            if !between_leaders || std::time::Instant::now() + RETRY_PAUSE >= give_up {
                return Err(e.into());
            }
            tracing::debug!(error = %e, "the lease service is between leaders; asking again with the same request id");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Longest one attempt of [`AppState::call_retrying`] waits.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long [`AppState::call_retrying`] waits for a lost NATS connection to come back (on another server).
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause between its attempts.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
