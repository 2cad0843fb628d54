//! Catalogue get-or-create: the provider and packages an import needs, created when missing, with an insert race
//! settled by the unique indexes.

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use proxypool_store::model::{PackageDoc, ProviderDoc};
use proxypool_store::StoreError;

use crate::service::{Importer, JobFailure};

impl Importer {
    /// The provider named `name`, created when missing (an insert race is settled by the unique index).
    pub(crate) async fn provider(
        &self,
        name: &str,
        account: &str,
        domain: &str,
        by: Option<ObjectId>,
    ) -> Result<ObjectId, JobFailure> {
        let providers = self.inner.store.providers();
        if let Some(p) = providers.find_one(doc! { "name": name }).await? {
            return Ok(p.id);
        }
        let now = DateTime::now();
        let doc = ProviderDoc {
            id: ObjectId::new(),
            name: name.to_owned(),
            account: account.to_owned(),
            domain: domain.to_owned(),
            rotate_fields: None,
            is_active: true,
            created_by: by,
            updated_by: by,
            created_at: now,
            updated_at: now,
        };
        match providers.insert_one(&doc).await.map_err(StoreError::from) {
            Ok(_) => Ok(doc.id),
            Err(StoreError::Duplicate(_)) => match providers.find_one(doc! { "name": name }).await? {
                Some(p) => Ok(p.id),
                None => Err(JobFailure::Dependency(format!(
                    "cannot create the {name} provider: another provider already uses account {account:?} or \
                     domain {domain:?}"
                ))),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The package with `code`, created under `provider` when missing.
    pub(crate) async fn package(
        &self,
        code: &str,
        name: &str,
        price: f64,
        provider: ObjectId,
        by: Option<ObjectId>,
    ) -> Result<PackageDoc, JobFailure> {
        let packages = self.inner.store.packages();
        if let Some(p) = packages.find_one(doc! { "code": code }).await? {
            return Ok(p);
        }
        let now = DateTime::now();
        let doc = PackageDoc {
            id: ObjectId::new(),
            code: code.to_owned(),
            name: name.to_owned(),
            price,
            note: "created by the importer".to_owned(),
            proxy_provider_id: provider,
            is_active: true,
            created_by: by,
            updated_by: by,
            created_at: now,
            updated_at: now,
        };
        match packages.insert_one(&doc).await.map_err(StoreError::from) {
            Ok(_) => Ok(doc),
            Err(StoreError::Duplicate(_)) => packages
                .find_one(doc! { "code": code })
                .await?
                .ok_or_else(|| JobFailure::Dependency(format!("package {code} vanished while being created"))),
            Err(e) => Err(e.into()),
        }
    }
}
