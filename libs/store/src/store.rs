//! The connected store: typed collections, indexes and a readiness ping.

use bson::doc;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};

use crate::config::StoreConfig;
use crate::error::StoreError;
use crate::model::{collections, PackageDoc, ProviderDoc, ProxyDoc, UserDoc};

/// A handle on the database. Cheap to clone; the driver pools connections.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    db: Database,
}

impl Store {
    /// Builds a client. The driver connects lazily and reconnects by itself, so this succeeds while the database is
    /// down; operations then fail with [`StoreError::Unavailable`] after `config.timeout`.
    pub async fn connect(config: &StoreConfig, app_name: &str) -> Result<Self, StoreError> {
        let mut opts = ClientOptions::parse(config.uri.expose().as_str()).await?;
        opts.app_name = Some(app_name.to_owned());
        opts.server_selection_timeout = Some(config.timeout);
        opts.connect_timeout = Some(config.timeout);
        let client = Client::with_options(opts)?;
        let db = client.database(&config.database);
        Ok(Self { client, db })
    }

    /// The database.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The driver client (sessions, transactions).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `proxies`.
    pub fn proxies(&self) -> Collection<ProxyDoc> {
        self.db.collection(collections::PROXIES)
    }

    /// `proxy_packages`.
    pub fn packages(&self) -> Collection<PackageDoc> {
        self.db.collection(collections::PROXY_PACKAGES)
    }

    /// `proxy_providers`.
    pub fn providers(&self) -> Collection<ProviderDoc> {
        self.db.collection(collections::PROXY_PROVIDERS)
    }

    /// `users`.
    pub fn users(&self) -> Collection<UserDoc> {
        self.db.collection(collections::USERS)
    }

    /// Round trip to the server; used by readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }

    /// Creates the indexes shared by every service. Idempotent; every service calls it at start. (The lease
    /// service adds the index of its own query.)
    ///
    /// - the unique indexes of the original design (`proxy_packages.code`; `proxy_providers.name/account/domain`;
    ///   `users.email/username`);
    /// - `package` on `proxies.proxy_package_id` for reference checks and listings;
    /// - `address` on `proxies.ip, port`: how imports find the proxy a row describes. Not unique: the rotator moves
    ///   proxies to new addresses, and two providers may briefly hand out the same one.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let unique = |keys: bson::Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).name(name.to_owned()).build())
                .build()
        };
        let plain = |keys: bson::Document, name: &str| {
            IndexModel::builder().keys(keys).options(IndexOptions::builder().name(name.to_owned()).build()).build()
        };
        self.packages().create_index(unique(doc! { "code": 1 }, "code_unique")).await?;
        self.providers()
            .create_indexes([
                unique(doc! { "name": 1 }, "name_unique"),
                unique(doc! { "account": 1 }, "account_unique"),
                unique(doc! { "domain": 1 }, "domain_unique"),
            ])
            .await?;
        self.users()
            .create_indexes([
                unique(doc! { "email": 1 }, "email_unique"),
                unique(doc! { "username": 1 }, "username_unique"),
            ])
            .await?;
        self.proxies()
            .create_indexes([
                plain(doc! { "proxy_package_id": 1 }, "package"),
                plain(doc! { "ip": 1, "port": 1 }, "address"),
            ])
            .await?;
        Ok(())
    }
}
