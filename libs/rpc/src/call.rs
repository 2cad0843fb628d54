//! The one client side of request-reply: [`call`] sends an [`Endpoint`]'s request and decodes its reply.
//!
//! Every request carries the current span's trace context (W3C `traceparent` in the NATS headers) and, when the
//! caller gives a timeout, that timeout as its deadline ([`DEADLINE_HEADER`]), so the server neither starts work
//! its caller has given up on nor answers after it.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::Client;
use bytes::Bytes;
use proxypool_contracts::subjects::DEADLINE_HEADER;
use proxypool_contracts::{ApiError, Endpoint, Reply};
use tracing::Instrument;

/// Why a call did not produce the service's answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The client is not connected to NATS (answered at once instead of waiting for the request timeout).
    #[error("the message bus is unreachable")]
    Disconnected,
    /// No replica of the service is subscribed.
    #[error("no service answers {subject}")]
    NoResponders {
        /// The subject.
        subject: &'static str,
    },
    /// No answer within the timeout.
    #[error("{subject} did not answer in time")]
    TimedOut {
        /// The subject.
        subject: &'static str,
    },
    /// Any other transport failure.
    #[error("cannot reach the service behind {subject}")]
    Transport {
        /// The subject.
        subject: &'static str,
        /// Why.
        #[source]
        source: async_nats::RequestError,
    },
    /// The request could not be encoded (a bug).
    #[error("cannot encode the request on {subject}")]
    Encode {
        /// The subject.
        subject: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The answer is not the endpoint's reply envelope (a version mismatch or a bug).
    #[error("malformed reply on {subject}")]
    Malformed {
        /// The subject.
        subject: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The service answered with an error.
    #[error(transparent)]
    Remote(ApiError),
}

impl CallError {
    /// Whether the call may succeed if retried (the service was not reached, or it said so).
    pub fn is_retryable(&self) -> bool {
        match self {
            CallError::Disconnected
            | CallError::NoResponders { .. }
            | CallError::TimedOut { .. }
            | CallError::Transport { .. } => true,
            CallError::Encode { .. } | CallError::Malformed { .. } => false,
            CallError::Remote(e) => e.code.is_retryable(),
        }
    }
}

impl From<CallError> for ApiError {
    /// Transport failures become the retryable `service_unavailable`; a remote error passes through unchanged.
    fn from(e: CallError) -> Self {
        match e {
            CallError::Remote(e) => e,
            CallError::Encode { .. } | CallError::Malformed { .. } => ApiError::internal(error_chain(&e)),
            CallError::Disconnected
            | CallError::NoResponders { .. }
            | CallError::TimedOut { .. }
            | CallError::Transport { .. } => ApiError::unavailable(format!("{e}; retry shortly")),
        }
    }
}

/// `error: cause: cause…`, for messages that must carry the whole chain.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Calls `E` with the client's request timeout (no deadline header).
pub async fn call<E: Endpoint>(client: &Client, request: &E::Request) -> Result<E::Reply, CallError> {
    call_within::<E>(client, request, None).await
}

/// Calls `E`; `timeout` overrides the client's request timeout and travels as the request's deadline.
pub async fn call_within<E: Endpoint>(
    client: &Client,
    request: &E::Request,
    timeout: Option<Duration>,
) -> Result<E::Reply, CallError> {
    let subject = E::SUBJECT;
    if client.connection_state() != async_nats::connection::State::Connected {
        proxypool_telemetry::metrics::dependency_error("nats");
        return Err(CallError::Disconnected);
    }
    let body = serde_json::to_vec(request).map_err(|source| CallError::Encode { subject, source })?;
    let msg = send(client, subject, Bytes::from(body), timeout).await.map_err(|source| match source.kind() {
        RequestErrorKind::NoResponders => CallError::NoResponders { subject },
        RequestErrorKind::TimedOut => CallError::TimedOut { subject },
        RequestErrorKind::Other => CallError::Transport { subject, source },
    })?;
    serde_json::from_slice::<Reply<E::Reply>>(&msg.payload)
        .map_err(|source| CallError::Malformed { subject, source })?
        .into_result()
        .map_err(CallError::Remote)
}

/// Sends a raw request in a client span with the trace context and, with a timeout, the deadline header.
async fn send(
    client: &Client,
    subject: &'static str,
    payload: Bytes,
    timeout: Option<Duration>,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let span = tracing::info_span!("nats.request", subject, otel.kind = "client");
    async {
        let mut headers = proxypool_telemetry::propagation::nats_headers();
        if let Some(t) = timeout {
            let give_up = crate::unix_millis() + i64::try_from(t.as_millis()).unwrap_or(i64::MAX / 2);
            headers.insert(DEADLINE_HEADER, give_up.to_string().as_str());
        }
        let mut req = async_nats::Request::new().payload(payload).headers(headers);
        if timeout.is_some() {
            req = req.timeout(timeout);
        }
        let res = client.send_request(proxypool_contracts::subjects::subject(subject).into_owned(), req).await;
        if res.is_err() {
            proxypool_telemetry::metrics::dependency_error("nats");
        }
        res
    }
    .instrument(span)
    .await
}
