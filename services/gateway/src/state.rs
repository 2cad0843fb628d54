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
}
