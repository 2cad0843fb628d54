//! [`TestAppBuilder`]: the options of a test system, and starting it.

use super::*;

/// Options for [`TestApp`].
#[derive(Debug, Clone)]
pub struct TestAppBuilder {
    proxy_use_max: u32,
    lease_instances: usize,
    nats_cluster: usize,
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
            nats_cluster: 1,
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
    /// Runs NATS as a cluster of `n` servers (every service given all of them, `JETSTREAM_REPLICAS=n`).
    pub fn nats_cluster(mut self, n: usize) -> Self {
        self.nats_cluster = n;
        self
    }

    /// Lease replicas started in-process.
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
        let mut nats_peers = Vec::new();
        let nats_server = if self.nats_cluster > 1 {
            nats_peers = NatsServer::start_cluster(self.nats_cluster)?;
            nats_peers.remove(0)
        } else if self.nats_auth {
            NatsServer::start_with_config(Some(&test_auth_conf()?))?
        } else {
            NatsServer::start()?
        };
        let urls: Vec<String> = std::iter::once(&nats_server).chain(&nats_peers).map(NatsServer::url).collect();
        let mongo_server = MongoServer::start()?;
        let db_name = format!("proxypool_test_{}", ObjectId::new().to_hex());
        let store_config = StoreConfig::local(mongo_server.uri(), db_name);
        let store = Store::connect(&store_config, "test").await?;
        store.ensure_indexes().await.context("ensure_indexes")?;
        let mut nats_config = NatsConfig::local(urls.join(","));
        nats_config.replicas = self.nats_cluster.max(1);
        if self.nats_auth {
            nats_config.user = Some(("test".to_owned(), Secret::new("test-test-password".to_owned())));
        }
        let client = nats_config.connect("test-client").await?;
        if self.nats_cluster > 1 {
            wait_for_jetstream(&client, self.nats_cluster).await?;
        }

        let mut app = TestApp {
            nats_server,
            nats_peers,
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
    for name in ["gateway", "lease", "auth", "rotator", "importer", "consumer", "forward"] {
        let var = format!("${}_NATS_PASSWORD", name.to_uppercase());
        anyhow::ensure!(text.contains(&var), "{} has no {var}", path.display());
        text = text.replace(&var, &format!("\"{name}-test-password\""));
    }
    let at = text.find("users = [").ok_or_else(|| anyhow::anyhow!("no users list in auth.conf"))? + "users = [".len();
    text.insert_str(at, "\n    { user: test, password: \"test-test-password\" }");
    Ok(text)
}

/// Waits until a JetStream cluster has elected its meta leader and can place a stream of `replicas` copies.
async fn wait_for_jetstream(client: &async_nats::Client, replicas: usize) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = async_nats::jetstream::stream::Config {
            name: "TEST_CLUSTER_READY".to_owned(),
            subjects: vec!["test.cluster.ready".to_owned()],
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        match js.get_or_create_stream(probe).await {
            Ok(_) => {
                let _ = js.delete_stream("TEST_CLUSTER_READY").await;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "JetStream cluster not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("the JetStream cluster did not become ready: {e}"),
        }
    }
}
