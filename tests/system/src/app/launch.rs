//! Starting and stopping the services of a [`TestApp`], each through its own `App::build` and `run`, configured by
//! its own `from_env` from [`TestApp::env_for`].

use super::*;

impl TestApp {
    /// Starts one more lease replica and waits until its state is loaded and some replica leads.
    pub async fn start_lease(&mut self) -> anyhow::Result<()> {
        self.next_instance += 1;
        let env = self.env_for(
            "lease",
            &[
                ("HOSTNAME", format!("lease-test-{}", self.next_instance)),
                // Writers sync their changes; the leader's periodic re-read is a safety net the tests do not lean on.
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
        // The first load reads the whole collection: 100,000 proxies take about a minute on the local store.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while !service.is_loaded() {
            if tokio::time::Instant::now() > deadline {
                bail!("lease replica did not load its state within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.leases.push(LeaseReplica { service, admin_addr, trigger, handle });
        self.wait_for_answer(subjects::LEASE_RELEASE, "the lease leader").await
    }

    pub(super) async fn start_auth(&mut self, allow_registration: bool, cost: u32) -> anyhow::Result<()> {
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

    /// A forward door configuration for tests: both doors and the admin endpoint on free local ports, the test key,
    /// `IP_ALLOWED=127.0.0.1`; `extra` adds or overrides variables.
    pub fn forward_config(&self, extra: &[(&str, String)]) -> proxypool_forward::ForwardConfig {
        let mut vars = vec![
            ("FORWARD_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("FORWARD_SOCKS_ADDR", "127.0.0.1:0".to_owned()),
            ("IP_ALLOWED", "127.0.0.1".to_owned()),
        ];
        vars.extend(extra.iter().cloned());
        match proxypool_forward::ForwardConfig::from_env(&self.env_for("forward", &vars)) {
            Ok(c) => c,
            Err(e) => panic!("the test forward configuration is invalid: {e}"),
        }
    }

    /// Starts a forward door on this app's NATS, built and run as `main.rs` does.
    pub async fn start_forward(&self, config: proxypool_forward::ForwardConfig) -> anyhow::Result<ForwardHandle> {
        let client = config.nats.connect("test-forward").await?;
        // Ready as its probe says: once connected to NATS.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the forward door did not connect to NATS");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let app = proxypool_forward::App::build(config, client).await?;
        let (http_addr, socks_addr, admin_addr) = (app.http_addr(), app.socks_addr(), app.admin_addr());
        let shared = app.shared().clone();
        let (trigger, shutdown) = Shutdown::new();
        let handle = tokio::spawn(async move {
            if let Err(e) = app.run(shutdown).await {
                tracing::error!(error = %e, "forward door failed");
            }
        });
        Ok(ForwardHandle { http_addr, socks_addr, admin_addr, shared, trigger, handle })
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

    /// Starts a `proxypool-lease` process (the workspace's binary) named `name` with `extra` variables, optionally
    /// under a `wrapper` command (such as `faketime`), and waits until it is ready (state loaded).
    pub async fn spawn_lease_process(
        &self,
        name: &str,
        extra: &[(&str, String)],
        wrapper: &[&str],
    ) -> anyhow::Result<LeaseProcess> {
        let bin = proxypool_test_support::process::workspace_binary("proxypool-lease")?;
        self.spawn_lease_binary(&bin, name, extra, wrapper).await
    }

    /// [`TestApp::spawn_lease_process`] with another build of `proxypool-lease` (an earlier commit's, for the
    /// rolling-upgrade test).
    pub async fn spawn_lease_binary(
        &self,
        bin: &std::path::Path,
        name: &str,
        extra: &[(&str, String)],
        wrapper: &[&str],
    ) -> anyhow::Result<LeaseProcess> {
        let mut vars = vec![("HOSTNAME", name.to_owned()), ("LOG_LEVEL", "warn".to_owned())];
        vars.extend(extra.iter().cloned());
        let env = self.env_pairs_for("lease", &vars);
        let admin = env.iter().rev().find(|(k, _)| k == "LEASE_ADMIN_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        let child = command
            .envs(env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let process = LeaseProcess { child, admin };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.http.get(format!("http://{}/readyz", process.admin)).send().await;
            if matches!(ready, Ok(r) if r.status().is_success()) {
                return Ok(process);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "lease process {name} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    pub(super) async fn start_gateway(&mut self, config: GatewayConfig) -> anyhow::Result<()> {
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
