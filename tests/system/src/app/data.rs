//! Test data: the seeded provider and package, proxies written straight to the database and announced as an admin's
//! write would be, and the lease invariants read back from MongoDB.

use super::*;

impl TestApp {
    pub(super) async fn insert_package(&self) -> anyhow::Result<ObjectId> {
        self.insert_provider_package("TestProvider", "TEST_PACK", "Test package").await
    }

    /// Inserts a provider named `provider` with one package (`code`, `name`); answers the package's id.
    pub async fn insert_provider_package(&self, provider: &str, code: &str, name: &str) -> anyhow::Result<ObjectId> {
        let now = DateTime::now();
        let provider = ProviderDoc {
            id: ObjectId::new(),
            name: provider.into(),
            account: provider.to_lowercase(),
            domain: format!("https://{}.test", provider.to_lowercase()),
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
            code: code.into(),
            name: name.into(),
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

    /// Applies a raw update to a proxy, as an admin would, and syncs it to the lease service.
    pub async fn update_proxy(&self, id: ObjectId, update: Document) -> anyhow::Result<()> {
        self.store.proxies().update_one(doc! { "_id": id }, update).await?;
        self.announce(id).await
    }

    /// Announces a change of `id` the way every writer but the lease service does: a sync request to the lease
    /// service, answered once the next lease sees the change.
    pub async fn announce(&self, id: ObjectId) -> anyhow::Result<()> {
        let req = proxypool_contracts::rotation::SyncRequest { proxy_ids: vec![id.to_hex()], full: false };
        proxypool_rpc::call::<proxypool_contracts::endpoints::LeaseCtlSync>(&self.client, &req).await?;
        Ok(())
    }

    /// Waits until MongoDB shows the lease state (the projection trails the lease service by up to a second).
    pub async fn settle(&self) {
        for r in &self.leases {
            if *r.service.engine().serving().borrow() {
                r.service.engine().wait_projected(Duration::from_secs(10)).await;
            }
        }
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

    /// A proxy document, once the lease state is projected.
    pub async fn proxy(&self, id: &str) -> anyhow::Result<ProxyDoc> {
        self.settle().await;
        let id = ObjectId::parse_str(id)?;
        self.store.proxies().find_one(doc! { "_id": id }).await?.context("proxy not found")
    }

    /// Every proxy document, once the lease state is projected.
    pub async fn all_proxies(&self) -> anyhow::Result<Vec<ProxyDoc>> {
        self.settle().await;
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
}
