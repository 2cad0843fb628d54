//! A consumer's view of a [`TestApp`]: leases over HTTP and over NATS (typed calls).

use super::*;

impl TestApp {
    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /api/get-proxy?area=` with the right key.
    pub async fn http_get_proxy(&self, area: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(self.url("/api/get-proxy"))
            .query(&[("area", area)])
            .header("Authorization", API_KEY)
            .send()
            .await?)
    }

    /// `POST /webhook/return-proxy/{id}?key=` with the right key.
    pub async fn http_return(&self, id: &str, key: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .post(self.url(&format!("/webhook/return-proxy/{id}")))
            .query(&[("key", key)])
            .header("Authorization", API_KEY)
            .send()
            .await?)
    }

    /// A raw NATS request on a subject, decoded as a reply envelope: the wire contract as a foreign client (any
    /// language, any JSON) speaks it, for tests of that contract. Everything else uses [`TestApp::call`].
    pub async fn nats_request<T: serde::de::DeserializeOwned>(
        &self,
        subject: &'static str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<Reply<T>> {
        nats_call(&self.client, subject, body).await
    }

    /// Calls endpoint `E` with the one typed client (`proxypool_rpc::call`); the service's error answer is
    /// `Reply::Err`, a transport failure an error.
    pub async fn call<E: proxypool_contracts::Endpoint>(&self, req: &E::Request) -> anyhow::Result<Reply<E::Reply>> {
        match proxypool_rpc::call::<E>(&self.client, req).await {
            Ok(reply) => Ok(Reply::Ok(reply)),
            Err(proxypool_rpc::CallError::Remote(e)) => Ok(Reply::Err(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// `lease.acquire` over NATS.
    pub async fn nats_acquire(&self, area: &str, consumer: &str) -> anyhow::Result<Reply<LeaseGrant>> {
        let req = AcquireRequest {
            area: Some(area.into()),
            consumer: Some(consumer.into()),
            callback_url: None,
            ..Default::default()
        };
        self.call::<proxypool_contracts::endpoints::LeaseAcquire>(&req).await
    }

    /// `lease.acquire` over NATS with a callback URL.
    pub async fn nats_acquire_with_callback(
        &self,
        area: &str,
        consumer: &str,
        callback_url: &str,
    ) -> anyhow::Result<Reply<LeaseGrant>> {
        let req = AcquireRequest {
            area: Some(area.into()),
            consumer: Some(consumer.into()),
            callback_url: Some(callback_url.into()),
            ..Default::default()
        };
        self.call::<proxypool_contracts::endpoints::LeaseAcquire>(&req).await
    }

    /// `lease.acquire` over NATS, retried while the pool has nothing (e.g. until a rotation gives a proxy its
    /// address).
    pub async fn nats_acquire_eventually(&self, area: &str, consumer: &str) -> anyhow::Result<LeaseGrant> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.nats_acquire(area, consumer).await? {
                Reply::Ok(g) => return Ok(g),
                Reply::Err(e) if e.code.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Reply::Err(e) => bail!("no lease: {e}"),
            }
        }
    }

    /// `lease.release` over NATS.
    pub async fn nats_release(&self, id: &str, key: &str) -> anyhow::Result<Reply<ReleaseOutcome>> {
        let req =
            ReleaseRequest { proxy_id: Some(id.into()), key: Some(key.into()), failure: None, ..Default::default() };
        self.call::<proxypool_contracts::endpoints::LeaseRelease>(&req).await
    }
}
/// A raw NATS request from `nc` (any identity), decoded as a reply envelope: the public wire contract as a foreign
/// client speaks it (the permission and restart tests use it with JSON bodies of their own).
pub async fn nats_call<T: serde::de::DeserializeOwned>(
    nc: &async_nats::Client,
    subject: &'static str,
    body: &impl serde::Serialize,
) -> anyhow::Result<Reply<T>> {
    let msg = nc.request(subject, serde_json::to_vec(body)?.into()).await?;
    Ok(serde_json::from_slice(&msg.payload)?)
}
