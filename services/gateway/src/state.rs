//! Shared handler state and the NATS request helper.

use std::sync::Arc;

use async_nats::client::RequestErrorKind;
use async_nats::Client;
use bytes::Bytes;
use proxypool_contracts::{ApiError, Reply};
use proxypool_store::Store;
use serde::de::DeserializeOwned;
use serde::Serialize;

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
    /// Sends a request to a service and decodes its [`Reply`]. A NATS outage or a missing service is a retryable
    /// `service_unavailable`, answered within the NATS request timeout at most.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &'static str,
        req: &Req,
    ) -> Result<Resp, ApiError> {
        self.request_within(subject, req, None).await
    }

    /// [`AppState::request`] with its own timeout instead of `NATS_REQUEST_TIMEOUT` (for requests that wait for
    /// work, such as small imports).
    pub async fn request_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &'static str,
        req: &Req,
        timeout: Option<std::time::Duration>,
    ) -> Result<Resp, ApiError> {
        if self.nats.connection_state() != async_nats::connection::State::Connected {
            return Err(ApiError::unavailable("the message bus is unreachable; retry shortly"));
        }
        let body = serde_json::to_vec(req).map_err(|e| ApiError::internal(format!("cannot encode request: {e}")))?;
        // Carries the trace context, so the service's work joins this request's trace.
        // Always an explicit timeout, so that it travels as the request's deadline.
        let timeout = Some(timeout.unwrap_or(self.config.nats.request_timeout));
        let msg = proxypool_rpc::request(&self.nats, subject, Bytes::from(body), timeout).await.map_err(|e| match e
            .kind()
        {
            RequestErrorKind::NoResponders => {
                ApiError::unavailable(format!("no service answers {subject}; retry shortly"))
            }
            RequestErrorKind::TimedOut => {
                ApiError::unavailable(format!("{subject} did not answer in time; retry shortly"))
            }
            RequestErrorKind::Other => ApiError::unavailable(format!("cannot reach the service behind {subject}: {e}")),
        })?;
        serde_json::from_slice::<Reply<Resp>>(&msg.payload)
            .map_err(|e| ApiError::internal(format!("malformed reply on {subject}: {e}")))?
            .into_result()
    }

    /// Publishes an event; a failure is logged, not returned, because the write it reports is already durable and
    /// the lease index heals on its next reload.
    pub async fn publish<T: Serialize>(&self, subject: &'static str, event: &T) {
        match serde_json::to_vec(event) {
            Ok(body) => {
                if let Err(e) = self.nats.publish(subject, Bytes::from(body)).await {
                    tracing::warn!(error = %e, subject, "cannot publish an event");
                }
            }
            Err(e) => tracing::error!(error = %e, subject, "cannot encode an event"),
        }
    }
}
