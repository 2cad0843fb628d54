//! [`TestApp`]: the services in-process against real servers, each built by its own `App::build` from a
//! configuration read by its own `from_env`, exactly as its `main.rs` does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use proxypool_contracts::events::{ChangeReason, ProxyChanged};
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
pub use proxypool_test_support::{API_KEY, JWT_SECRET};

/// Options for [`TestApp`].
#[derive(Debug, Clone)]
pub struct TestAppBuilder {
    proxy_use_max: u32,
    lease_instances: usize,
    ip_allowed: Vec<String>,
    trusted_proxies: Vec<String>,
    seed: Vec<(Area, usize)>,
    allow_registration: bool,
    bcrypt_cost: u32,
    callback_allow_private: bool,
    lease_ttl: Option<Duration>,
    import_max_bytes: usize,
    nats_auth: bool,
}

impl Default for TestAppBuilder {
    fn default() -> Self {
        Self {
            proxy_use_max: 3,
            lease_instances: 1,
            ip_allowed: vec!["127.0.0.1".into()],
            trusted_proxies: Vec::new(),
            seed: Vec::new(),
            allow_registration: false,
            // The minimum, to keep tests fast; production defaults to 12.
            bcrypt_cost: 4,
            callback_allow_private: false,
            lease_ttl: None,
            import_max_bytes: 20 * 1024 * 1024,
            nats_auth: false,
        }
    }
}

impl TestAppBuilder {
    /// `PROXY_USE_MAX`.
    pub fn proxy_use_max(mut self, n: u32) -> Self {
        self.proxy_use_max = n;
        self
    }

    /// How many lease-service replicas to run side by side.
    pub fn lease_instances(mut self, n: usize) -> Self {
        self.lease_instances = n;
        self
    }

    /// `IP_ALLOWED`.
    pub fn ip_allowed(mut self, nets: &[&str]) -> Self {
        self.ip_allowed = nets.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `TRUSTED_PROXIES`.
    pub fn trusted_proxies(mut self, nets: &[&str]) -> Self {
        self.trusted_proxies = nets.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `CALLBACK_ALLOW_PRIVATE` (the fakes listen on 127.0.0.1).
    pub fn callback_allow_private(mut self, yes: bool) -> Self {
        self.callback_allow_private = yes;
        self
    }

    /// `LEASE_TTL` (off by default in tests).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// `IMPORT_MAX_BYTES` of the gateway.
    pub fn import_max_bytes(mut self, n: usize) -> Self {
        self.import_max_bytes = n;
        self
    }

    /// Runs NATS with the identities and permissions of `deploy/nats/auth.conf`, each service connecting as its own
    /// user (passwords `<name>-test-password`). The test client connects as an extra unrestricted `test` user.
    pub fn nats_auth(mut self, yes: bool) -> Self {
        self.nats_auth = yes;
        self
    }

    /// `ALLOW_REGISTRATION`.
    pub fn allow_registration(mut self, yes: bool) -> Self {
        self.allow_registration = yes;
        self
    }

    /// Proxies to insert before the services start.
    pub fn seed(mut self, area: Area, n: usize) -> Self {
        self.seed.push((area, n));
        self
    }

    /// Starts the servers and the services.
    pub async fn spawn(self) -> anyhow::Result<TestApp> {
        proxypool_test_support::init_logs();
        let nats_server = if self.nats_auth {
            NatsServer::start_with_config(Some(&test_auth_conf()?))?
        } else {
            NatsServer::start()?
        };
        let mongo_server = MongoServer::start()?;
        let db_name = format!("proxypool_test_{}", ObjectId::new().to_hex());
        let store_config = StoreConfig::local(mongo_server.uri(), db_name);
        let store = Store::connect(&store_config, "test").await?;
        store.ensure_indexes().await.context("ensure_indexes")?;
        let mut nats_config = NatsConfig::local(nats_server.url());
        if self.nats_auth {
            nats_config.user = Some(("test".to_owned(), Secret::new("test-test-password".to_owned())));
        }
        let client = nats_config.connect("test-client").await?;

        let mut app = TestApp {
            nats_server,
            mongo_server,
            store,
            store_config,
            nats_config,
            client,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            package_id: ObjectId::new(),
            proxy_use_max: self.proxy_use_max,
            callback_allow_private: self.callback_allow_private,
            lease_ttl: self.lease_ttl,
            nats_auth: self.nats_auth,
            leases: Vec::new(),
            gateway: None,
            auth: None,
            auth_admin: None,
            gateway_config: None,
            next_instance: 0,
        };
        app.package_id = app.insert_package().await?;
        for (area, n) in &self.seed {
            app.insert_proxies(*area, *n).await?;
        }
        for _ in 0..self.lease_instances {
            app.start_lease().await?;
        }
        app.start_auth(self.allow_registration, self.bcrypt_cost).await?;
        let env = app.env_for(
            "gateway",
            &[
                ("PORT", "0".into()),
                ("IP_ALLOWED", self.ip_allowed.join(",")),
                ("TRUSTED_PROXIES", self.trusted_proxies.join(",")),
                ("IMPORT_MAX_BYTES", self.import_max_bytes.to_string()),
            ],
        );
        let gateway_config = GatewayConfig::from_env(&env)?;
        app.start_gateway(gateway_config).await?;
        Ok(app)
    }
}

/// `deploy/nats/auth.conf` with test passwords in place of the environment references, plus an unrestricted `test`
/// user for the test's own client.
fn test_auth_conf() -> anyhow::Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/auth.conf");
    let mut text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    for name in ["gateway", "lease", "auth", "rotator", "importer", "consumer"] {
        let var = format!("${}_NATS_PASSWORD", name.to_uppercase());
        anyhow::ensure!(text.contains(&var), "{} has no {var}", path.display());
        text = text.replace(&var, &format!("\"{name}-test-password\""));
    }
    let at = text.find("users = [").ok_or_else(|| anyhow::anyhow!("no users list in auth.conf"))? + "users = [".len();
    text.insert_str(at, "\n    { user: test, password: \"test-test-password\" }");
    Ok(text)
}

/// A raw NATS request from `nc` (any identity), decoded as a reply envelope.
pub async fn nats_call<T: serde::de::DeserializeOwned>(
    nc: &async_nats::Client,
    subject: &'static str,
    body: &impl serde::Serialize,
) -> anyhow::Result<Reply<T>> {
    let msg = nc.request(subject, serde_json::to_vec(body)?.into()).await?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// A running rotator.
#[derive(Debug)]
pub struct RotatorHandle {
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    trigger: ShutdownTrigger,
    kill: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RotatorHandle {
    /// Graceful stop: no new jobs, those in hand finished.
    pub async fn stop(self) {
        self.trigger.fire();
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }

    /// Kills it mid-work, as a crash would: nothing in hand is acknowledged.
    pub async fn kill(self) {
        let _ = self.kill.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// An extra gateway (see [`TestApp::spawn_gateway`]).
#[derive(Debug)]
pub struct GatewayHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    trigger: ShutdownTrigger,
    handle: JoinHandle<()>,
}

impl GatewayHandle {
    /// Graceful stop, as on SIGTERM: no new connections, in-flight requests finished.
    pub async fn stop(self) {
        self.trigger.fire();
        let _ = self.handle.await;
    }
}

/// A running importer.
#[derive(Debug)]
pub struct ImporterHandle {
    /// The importer (metrics, config).
    pub importer: proxypool_importer::Importer,
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    trigger: ShutdownTrigger,
    handle: JoinHandle<()>,
}

impl ImporterHandle {
    /// Graceful stop.
    pub async fn stop(self) {
        self.trigger.fire();
        let _ = self.handle.await;
    }
}

/// A running lease replica.
#[derive(Debug)]
pub struct LeaseReplica {
    /// The service (index inspection).
    pub service: LeaseService,
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    trigger: ShutdownTrigger,
    handle: JoinHandle<()>,
}

/// The whole system for one test.
#[derive(Debug)]
pub struct TestApp {
    /// NATS server (stop/restart for fault tests).
    pub nats_server: NatsServer,
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
    /// The NATS settings of `service` (its own identity when the app runs with [`TestAppBuilder::nats_auth`]).
    pub fn nats_config_for(&self, service: &str) -> NatsConfig {
        let mut c = self.nats_config.clone();
        if self.nats_auth {
            c.user = Some((service.to_owned(), Secret::new(format!("{service}-test-password"))));
        }
        c
    }

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
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Env::from_pairs(env)
    }

    /// A builder with defaults: `PROXY_USE_MAX=3`, one lease replica, `IP_ALLOWED=127.0.0.1`.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
    }

    async fn insert_package(&self) -> anyhow::Result<ObjectId> {
        let now = DateTime::now();
        let provider = ProviderDoc {
            id: ObjectId::new(),
            name: "TestProvider".into(),
            account: "test".into(),
            domain: "https://provider.test".into(),
            rotate_fields: None,
            is_active: true,
            created_by: None,
            updated_by: None,
            created_at: now,
            updated_at: now,
        };
        self.store.providers().insert_one(&provider).await?;
        let package = PackageDoc {
            id: ObjectId::new(),
            code: "TEST_PACK".into(),
            name: "Test package".into(),
            price: 1.0,
            note: String::new(),
            proxy_provider_id: provider.id,
            is_active: true,
            created_by: None,
            updated_by: None,
            created_at: now,
            updated_at: now,
        };
        self.store.packages().insert_one(&package).await?;
        Ok(package.id)
    }

    /// A proxy document in `area` with the original design's defaults.
    pub fn new_proxy(&self, area: Area, n: usize) -> ProxyDoc {
        ProxyDoc::new(NewProxy {
            ip: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
            port: 8000 + u16::try_from(n % 1000).unwrap_or(0),
            username: format!("user{n}"),
            password: format!("pass{n}"),
            area,
            rotate_url: format!("http://provider.test/rotate/{n}"),
            rotate_time: 600,
            auth_token: None,
            is_active: true,
            disable_auto_rotate: false,
            expired_at: None,
            proxy_package_id: self.package_id,
            package_name: "Test package".into(),
            created_by: None,
        })
    }

    /// Inserts `n` proxies (directly; call before the services start or announce them with [`TestApp::announce`]).
    pub async fn insert_proxies(&self, area: Area, n: usize) -> anyhow::Result<Vec<ObjectId>> {
        let docs: Vec<ProxyDoc> = (0..n).map(|i| self.new_proxy(area, i)).collect();
        let ids = docs.iter().map(|d| d.id).collect();
        for chunk in docs.chunks(5_000) {
            self.store.proxies().insert_many(chunk).await?;
        }
        Ok(ids)
    }

    /// Applies a raw update to a proxy, as an admin or the rotator would, and announces it on `proxy.changed`.
    pub async fn update_proxy(&self, id: ObjectId, update: Document) -> anyhow::Result<()> {
        self.store.proxies().update_one(doc! { "_id": id }, update).await?;
        self.announce(id).await
    }

    /// Publishes `proxy.changed` for `id` without a snapshot.
    pub async fn announce(&self, id: ObjectId) -> anyhow::Result<()> {
        let event = ProxyChanged { proxy_id: id.to_hex(), reason: ChangeReason::Updated, origin: None, snapshot: None };
        self.client.publish(subjects::PROXY_CHANGED, serde_json::to_vec(&event)?.into()).await?;
        self.client.flush().await?;
        Ok(())
    }

    /// Starts one more lease replica and waits until its index is loaded.
    pub async fn start_lease(&mut self) -> anyhow::Result<()> {
        self.next_instance += 1;
        let env = self.env_for(
            "lease",
            &[
                ("HOSTNAME", format!("lease-test-{}", self.next_instance)),
                // Events keep the index fresh; the periodic full reload is a safety net the tests do not lean on.
                ("LEASE_INDEX_REFRESH", "3600".into()),
            ],
        );
        let config = proxypool_lease::LeaseConfig::from_env(&env)?;
        let client = config.nats.connect("test-lease").await?;
        let store = Store::connect(&config.store, "test-lease").await?;
        let app = proxypool_lease::App::build(config, client, store).await?;
        let (service, admin_addr) = (app.service().clone(), app.admin_addr());
        let (trigger, shutdown) = Shutdown::new();
        let handle = tokio::spawn(async move {
            if let Err(e) = app.run(shutdown).await {
                tracing::error!(error = %e, "lease replica failed");
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !service.is_loaded() {
            if tokio::time::Instant::now() > deadline {
                bail!("lease replica did not load its index within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.leases.push(LeaseReplica { service, admin_addr, trigger, handle });
        Ok(())
    }

    async fn start_auth(&mut self, allow_registration: bool, cost: u32) -> anyhow::Result<()> {
        let env = self.env_for(
            "auth",
            &[("ALLOW_REGISTRATION", allow_registration.to_string()), ("BCRYPT_COST", cost.to_string())],
        );
        let config = proxypool_auth::AuthConfig::from_env(&env)?;
        let client = config.nats.connect("test-auth").await?;
        let store = Store::connect(&config.store, "test-auth").await?;
        let app = proxypool_auth::App::build(config, client, store).await?;
        self.auth_admin = Some(app.admin_addr());
        let (trigger, shutdown) = Shutdown::new();
        let handle = tokio::spawn(async move {
            if let Err(e) = app.run(shutdown).await {
                tracing::error!(error = %e, "auth service failed");
            }
        });
        self.auth = Some((trigger, handle));
        // Ready once it answers (any answer: an empty login is refused, which proves the subscription).
        self.wait_for_answer(subjects::AUTH_LOGIN, "the auth service").await
    }

    /// Waits until some service answers on `subject` (any answer proves the subscription).
    async fn wait_for_answer(&self, subject: &'static str, what: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.client.request(subject, "{}".into()).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("{what} did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// A rotator configuration for tests, read by `RotatorConfig::from_env`: fast scans, short waits, the IP check
    /// and region lookup on `world`.
    pub fn rotator_config(&self, world: &proxypool_test_support::fakes::FakeWorld) -> proxypool_rotator::RotatorConfig {
        let env = self.env_for(
            "rotator",
            &[
                ("ROTATE_SCAN_INTERVAL", "0.2".into()),
                ("ROTATE_SCAN_BATCH", "500".into()),
                ("ROTATE_DRAIN_MAX", "30".into()),
                ("ROTATE_LOCK_TTL", "60".into()),
                ("ROTATE_TIMEOUT", "3".into()),
                ("IP_CHECK_URLS", world.ip_url()),
                ("IP_CHECK_TRIES", "2".into()),
                ("IP_CHECK_DELAY", "0.1".into()),
                ("IP_REGION_URL", world.region_url()),
                ("ROTATE_ERROR_BACKOFF", "60".into()),
                ("ROTATOR_WORKERS", "8".into()),
                ("ROTATE_ACK_WAIT", "2".into()),
                ("ROTATE_MAX_DELIVER", "10".into()),
                ("CALLBACK_TIMEOUT", "2".into()),
                ("CALLBACK_MAX_ATTEMPTS", "5".into()),
                ("CALLBACK_RETRY_BASE", "0.1".into()),
                ("CALLBACK_ALLOW_PRIVATE", "true".into()),
            ],
        );
        match proxypool_rotator::RotatorConfig::from_env(&env) {
            Ok(c) => c,
            Err(e) => panic!("the test rotator configuration is invalid: {e}"),
        }
    }

    /// Starts a rotator "process": its own Tokio runtime on its own thread, so that [`RotatorHandle::kill`] can end
    /// it the way a crash would, with every task and the NATS connection gone and nothing acknowledged.
    pub async fn start_rotator(&self, config: proxypool_rotator::RotatorConfig) -> anyhow::Result<RotatorHandle> {
        let store_config = self.store_config.clone();
        let role = config.role;
        let admin_addr = config.admin_addr;
        let (trigger, shutdown) = Shutdown::new();
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let setup = async {
                    let client = config.nats.connect("test-rotator").await?;
                    let store = Store::connect(&store_config, "test-rotator").await?;
                    let app = proxypool_rotator::App::build(config, client, store).await?;
                    app.rotator().ensure_queue().await?;
                    anyhow::Ok(app)
                };
                let app = match setup.await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    res = app.run(shutdown) => {
                        if let Err(e) = res {
                            tracing::error!(error = %e, "rotator failed");
                        }
                    }
                    _ = kill_rx => {}
                }
            });
            // A kill drops every task where it stands.
            rt.shutdown_background();
        });
        ready_rx.await??;
        if matches!(role, proxypool_rotator::Role::All | proxypool_rotator::Role::Scheduler) {
            // Ready once the rotate-now handler answers (an empty request is refused, which proves the subscription).
            self.wait_for_answer(subjects::ROTATOR_ROTATE_NOW, "the rotator").await?;
        }
        Ok(RotatorHandle { admin_addr, trigger, kill: kill_tx, thread })
    }

    /// An importer configuration for tests, read by `ImporterConfig::from_env`: no provider integrations (set
    /// `kiot`/`zing` to point at fakes), a free admin port.
    pub fn importer_config(&self) -> proxypool_importer::ImporterConfig {
        let env = self.env_for("importer", &[("IMPORT_HTTP_TIMEOUT", "3".into())]);
        match proxypool_importer::ImporterConfig::from_env(&env) {
            Ok(c) => c,
            Err(e) => panic!("the test importer configuration is invalid: {e}"),
        }
    }

    /// Starts an importer and waits until it answers.
    pub async fn start_importer(&self, config: proxypool_importer::ImporterConfig) -> anyhow::Result<ImporterHandle> {
        let client = config.nats.connect("test-importer").await?;
        let store = Store::connect(&config.store, "test-importer").await?;
        let app = proxypool_importer::App::build(config, client, store).await?;
        let (importer, admin_addr) = (app.importer().clone(), app.admin_addr());
        let (trigger, shutdown) = Shutdown::new();
        let handle = tokio::spawn(async move {
            if let Err(e) = app.run(shutdown).await {
                tracing::error!(error = %e, "importer failed");
            }
        });
        // Ready once it answers (an unknown job is refused, which proves the subscription).
        self.wait_for_answer(subjects::IMPORT_STATUS, "the importer").await?;
        Ok(ImporterHandle { importer, admin_addr, trigger, handle })
    }

    /// Inserts one proxy shaped by `f` and announces it.
    pub async fn insert_proxy_with(&self, area: Area, f: impl FnOnce(&mut ProxyDoc)) -> anyhow::Result<ObjectId> {
        let mut d = self.new_proxy(area, 0);
        f(&mut d);
        self.store.proxies().insert_one(&d).await?;
        self.announce(d.id).await?;
        Ok(d.id)
    }

    /// Inserts a proxy served by `proxy` (its address and credentials), due for rotation now through `rotate_url`,
    /// shaped further by `f`, and announces it.
    pub async fn insert_proxy_behind(
        &self,
        area: Area,
        proxy: &proxypool_test_support::fakes::ForwardProxy,
        rotate_url: String,
        f: impl FnOnce(&mut ProxyDoc),
    ) -> anyhow::Result<ObjectId> {
        self.insert_proxy_with(area, |d| {
            d.ip = proxy.addr.ip().to_string();
            d.port = i32::from(proxy.addr.port());
            d.username.clone_from(&proxy.user);
            d.password.clone_from(&proxy.password);
            d.rotate_url = rotate_url;
            d.next_rotate = Some(DateTime::now());
            f(d);
        })
        .await
    }

    /// Renames the seeded provider (choosing its rotate adapter: `KiotProxy`, `ZingProxy`, other).
    pub async fn set_provider_name(&self, name: &str) -> anyhow::Result<()> {
        self.store.providers().update_many(doc! {}, doc! { "$set": { "name": name } }).await?;
        Ok(())
    }

    /// Stops lease replica `i` gracefully and waits for it.
    pub async fn stop_lease(&mut self, i: usize) -> anyhow::Result<()> {
        let r = self.leases.remove(i);
        r.trigger.fire();
        r.handle.await?;
        Ok(())
    }

    /// The running lease replicas.
    pub fn lease_replicas(&self) -> &[LeaseReplica] {
        &self.leases
    }

    /// Starts one more gateway with the same settings (a second replica behind a load balancer) and waits until it
    /// is ready.
    pub async fn spawn_gateway(&self) -> anyhow::Result<GatewayHandle> {
        let config = self.gateway_config.clone().ok_or_else(|| anyhow::anyhow!("no gateway configuration"))?;
        self.launch_gateway(config).await
    }

    async fn start_gateway(&mut self, config: GatewayConfig) -> anyhow::Result<()> {
        self.gateway_config = Some(config.clone());
        let g = self.launch_gateway(config).await?;
        self.addr = g.addr;
        self.gateway = Some((g.trigger, g.handle));
        Ok(())
    }

    /// Starts a gateway and waits until it says it is ready, as a load balancer would (its NATS client connects in
    /// the background).
    async fn launch_gateway(&self, config: GatewayConfig) -> anyhow::Result<GatewayHandle> {
        let nats = config.nats.connect("test-gateway").await?;
        let store = Store::connect(&config.store, "test-gateway").await?;
        let app = proxypool_gateway::App::build(config, nats, store).await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], app.local_addr()?.port()));
        let (trigger, shutdown) = Shutdown::new();
        let handle = tokio::spawn(async move {
            if let Err(e) = app.run(shutdown).await {
                tracing::error!(error = %e, "gateway failed");
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.http.get(format!("http://{addr}/readyz")).send().await.map(|r| r.status().is_success());
            if matches!(ready, Ok(true)) {
                return Ok(GatewayHandle { addr, trigger, handle });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the gateway did not become ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

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

    /// A raw NATS request on a subject, decoded as a reply envelope.
    pub async fn nats_request<T: serde::de::DeserializeOwned>(
        &self,
        subject: &'static str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<Reply<T>> {
        nats_call(&self.client, subject, body).await
    }

    /// `lease.acquire` over NATS.
    pub async fn nats_acquire(&self, area: &str, consumer: &str) -> anyhow::Result<Reply<LeaseGrant>> {
        let req = AcquireRequest { area: Some(area.into()), consumer: Some(consumer.into()), callback_url: None };
        self.nats_request(subjects::LEASE_ACQUIRE, &req).await
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
        };
        self.nats_request(subjects::LEASE_ACQUIRE, &req).await
    }

    /// `lease.acquire` over NATS, retried while the pool has nothing (e.g. until a just-inserted proxy reaches the
    /// lease index through `proxy.changed`).
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
        let req = ReleaseRequest { proxy_id: Some(id.into()), key: Some(key.into()) };
        self.nats_request(subjects::LEASE_RELEASE, &req).await
    }

    /// A proxy document.
    pub async fn proxy(&self, id: &str) -> anyhow::Result<ProxyDoc> {
        let id = ObjectId::parse_str(id)?;
        self.store.proxies().find_one(doc! { "_id": id }).await?.context("proxy not found")
    }

    /// Every proxy document.
    pub async fn all_proxies(&self) -> anyhow::Result<Vec<ProxyDoc>> {
        Ok(self.store.proxies().find(doc! {}).await?.try_collect().await?)
    }

    /// Asserts the lease invariant on every proxy: `in_use == len(proxy_used) <= max` and `used_count >= in_use`.
    pub async fn assert_invariants(&self) -> anyhow::Result<()> {
        for p in self.all_proxies().await? {
            let held = i32::try_from(p.proxy_used.len())?;
            let max = i32::try_from(self.proxy_use_max)?;
            if p.in_use != held || p.in_use > max || p.in_use < 0 || p.used_count < p.in_use || p.used_count > max {
                bail!(
                    "invariant broken on {}: in_use={} len(proxy_used)={} used_count={} max={}",
                    p.id,
                    p.in_use,
                    held,
                    p.used_count,
                    max
                );
            }
            let mut keys: Vec<&str> = p.proxy_used.iter().map(|u| u.key.as_str()).collect();
            keys.sort_unstable();
            keys.dedup();
            if keys.len() != p.proxy_used.len() {
                bail!("duplicate lease keys on {}", p.id);
            }
        }
        Ok(())
    }

    /// Stops every service gracefully.
    pub async fn shutdown(mut self) {
        if let Some((t, h)) = self.auth.take() {
            t.fire();
            let _ = h.await;
        }
        if let Some((t, h)) = self.gateway.take() {
            t.fire();
            let _ = h.await;
        }
        for r in self.leases.drain(..) {
            r.trigger.fire();
            let _ = r.handle.await;
        }
    }
}
