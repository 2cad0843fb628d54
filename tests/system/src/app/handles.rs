//! Handles on services a test starts on its own (rotator, importer, extra gateways, lease replicas).

use super::*;

/// A running rotator.
#[derive(Debug)]
pub struct RotatorHandle {
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    pub(super) trigger: ShutdownTrigger,
    pub(super) kill: tokio::sync::oneshot::Sender<()>,
    pub(super) thread: std::thread::JoinHandle<()>,
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
    pub(super) trigger: ShutdownTrigger,
    pub(super) handle: JoinHandle<()>,
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
    pub(super) trigger: ShutdownTrigger,
    pub(super) handle: JoinHandle<()>,
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
    pub(super) trigger: ShutdownTrigger,
    pub(super) handle: JoinHandle<()>,
}

/// A running forward door (see [`TestApp::start_forward`]).
#[derive(Debug)]
pub struct ForwardHandle {
    /// The HTTP door.
    pub http_addr: SocketAddr,
    /// The SOCKS5 door.
    pub socks_addr: SocketAddr,
    /// Its admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    /// Its shared state (the lease book, metrics).
    pub shared: std::sync::Arc<proxypool_forward::Shared>,
    pub(super) trigger: ShutdownTrigger,
    pub(super) handle: JoinHandle<()>,
}

impl ForwardHandle {
    /// Graceful stop, as on SIGTERM: connections closed, every lease returned.
    pub async fn stop(self) {
        self.trigger.fire();
        let _ = self.handle.await;
    }

    /// `http://<user>:<key>@<http door>`.
    pub fn http_url(&self, user: &str, key: &str) -> String {
        format!("http://{user}:{key}@{}", self.http_addr)
    }
}

/// A `proxypool-lease` process (see [`TestApp::spawn_lease_process`]): SIGKILL is a real crash.
#[derive(Debug)]
pub struct LeaseProcess {
    /// The child.
    pub child: tokio::process::Child,
    /// Its admin endpoint (`/metrics`, `/readyz`).
    pub admin: String,
}

impl LeaseProcess {
    /// Whether it reports that it leads.
    pub async fn leads(&self, http: &reqwest::Client) -> bool {
        let url = format!("http://{}/metrics", self.admin);
        let Ok(res) = http.get(url).timeout(Duration::from_secs(1)).send().await else { return false };
        res.text().await.unwrap_or_default().lines().any(|l| l.trim() == "proxypool_lease_leader 1")
    }

    /// Waits (at most `within`) until it leads.
    pub async fn wait_to_lead(&self, http: &reqwest::Client, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        while !self.leads(http).await {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "lease process {} did not lead", self.admin);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGTERM, as Kubernetes stops a pod, and waits (45 s at most, its grace period) for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid =
            self.child.id().and_then(|p| i32::try_from(p).ok()).ok_or_else(|| anyhow::anyhow!("already reaped"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)?;
        Ok(tokio::time::timeout(Duration::from_secs(45), self.child.wait()).await??)
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
