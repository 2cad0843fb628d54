//! [`TestApp`]: the services in-process against real servers, each built by its own `App::build` from a
//! configuration read by its own `from_env`, exactly as its `main.rs` does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use proxypool_contracts::lease::{AcquireRequest, LeaseGrant, ReleaseOutcome, ReleaseRequest};
use proxypool_contracts::{subjects, Area, Reply};
use proxypool_gateway::GatewayConfig;
use proxypool_lease::LeaseService;
use proxypool_settings::env::Env;
use proxypool_settings::nats::NatsConfig;
use proxypool_settings::shutdown::{Shutdown, ShutdownTrigger};
use proxypool_settings::Secret;
use proxypool_store::model::{NewProxy, PackageDoc, ProviderDoc, ProxyDoc};
use proxypool_store::{Store, StoreConfig};
use tokio::task::JoinHandle;

use proxypool_test_support::servers::{MongoServer, NatsServer};

mod builder;
mod consumer;
mod data;
mod handles;
mod launch;

pub use builder::TestAppBuilder;
pub use consumer::nats_call;
pub use handles::{ForwardHandle, GatewayHandle, ImporterHandle, LeaseProcess, LeaseReplica, RotatorHandle};
pub use proxypool_test_support::{API_KEY, JWT_SECRET};

/// The whole system for one test.
#[derive(Debug)]
pub struct TestApp {
    /// NATS server (stop/restart for fault tests); the first node of a cluster.
    pub nats_server: NatsServer,
    /// The other nodes of a NATS cluster ([`TestAppBuilder::nats_cluster`]).
    pub nats_peers: Vec<NatsServer>,
    /// MongoDB-protocol server (stop/restart for fault tests).
    pub mongo_server: MongoServer,
    /// Direct database access for assertions.
    pub store: Store,
    /// Database settings the services use.
    pub store_config: StoreConfig,
    /// NATS settings the services use.
    pub nats_config: NatsConfig,
    /// A NATS client acting as a consumer.
    pub client: async_nats::Client,
    /// HTTP client.
    pub http: reqwest::Client,
    /// Gateway address.
    pub addr: SocketAddr,
    /// The package seeded proxies belong to.
    pub package_id: ObjectId,
    proxy_use_max: u32,
    callback_allow_private: bool,
    lease_ttl: Option<Duration>,
    nats_auth: bool,
    leases: Vec<LeaseReplica>,
    gateway: Option<(ShutdownTrigger, JoinHandle<()>)>,
    auth: Option<(ShutdownTrigger, JoinHandle<()>)>,
    /// The auth service's admin endpoint.
    pub auth_admin: Option<SocketAddr>,
    gateway_config: Option<GatewayConfig>,
    next_instance: usize,
}
impl TestApp {
    /// The environment a service binary needs to join this app (NATS, MongoDB, keys), as an operator would set it.
    pub fn service_env(&self) -> Vec<(String, String)> {
        proxypool_test_support::service_env(
            &self.nats_config.url,
            self.store_config.uri.expose(),
            &self.store_config.database,
        )
    }

    /// The environment of `service` in this app: [`TestApp::service_env`], its own NATS identity when the app runs
    /// with [`TestAppBuilder::nats_auth`], the app's lease settings, an admin endpoint on a free port, then `extra`.
    pub fn env_for(&self, service: &str, extra: &[(&str, String)]) -> Env {
        Env::from_pairs(self.env_pairs_for(service, extra))
    }

    /// [`TestApp::env_for`] as variable pairs, for a service started as a child process.
    pub fn env_pairs_for(&self, service: &str, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env = self.service_env();
        if self.nats_auth {
            env.push(("NATS_USER".into(), service.to_owned()));
            env.push(("NATS_PASSWORD".into(), format!("{service}-test-password")));
        }
        let admin = format!("127.0.0.1:{}", proxypool_test_support::servers::free_port().unwrap_or(0));
        env.push((format!("{}_ADMIN_ADDR", service.to_uppercase()), admin));
        env.push(("PROXY_USE_MAX".into(), self.proxy_use_max.to_string()));
        env.push(("CALLBACK_ALLOW_PRIVATE".into(), self.callback_allow_private.to_string()));
        env.push(("LEASE_TTL".into(), self.lease_ttl.map_or(0.0, |t| t.as_secs_f64()).to_string()));
        env.push(("JETSTREAM_REPLICAS".into(), self.nats_config.replicas.to_string()));
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    }

    /// A builder with defaults: `PROXY_USE_MAX=3`, one lease replica, `IP_ALLOWED=127.0.0.1`.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
    }
}
