//! The sources of an import: the uploaded spreadsheet, the KiotProxy key list and the ZingProxy proxy list, each
//! read and validated into [`Prepared`] rows before anything is written.

use std::collections::HashMap;

use bson::oid::ObjectId;
use bson::{doc, DateTime};
use futures::TryStreamExt;
use proxypool_contracts::import::RowError;
use proxypool_contracts::Area;
use proxypool_store::model::ProviderDoc;
use tokio::io::AsyncReadExt;

use crate::excel::{self, SheetRow};
use crate::providers;
use crate::service::{Importer, JobFailure};
use crate::upsert::{Candidate, Identity};

/// Rows ready to write, and those already refused.
pub(crate) struct Prepared {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) errors: Vec<RowError>,
    pub(crate) skipped: u64,
}

impl Importer {
    pub(crate) async fn read_upload(&self, id: &str) -> Result<Vec<Result<SheetRow, RowError>>, JobFailure> {
        let bucket =
            proxypool_rpc::jetstream::ensure_import_uploads(&self.inner.js, self.inner.config.nats.replicas).await?;
        let mut object = bucket
            .get(id)
            .await
            .map_err(|e| JobFailure::Dependency(format!("cannot read the upload from the object store: {e}")))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| JobFailure::Dependency(format!("cannot read the upload from the object store: {e}")))?;
        if let Err(e) = bucket.delete(id).await {
            tracing::warn!(error = %e, upload = id, "cannot delete a read upload; it expires by itself");
        }
        let limits =
            excel::Limits { max_rows: self.inner.config.max_rows, max_unpacked_bytes: excel::MAX_UNPACKED_BYTES };
        let parsed = tokio::task::spawn_blocking(move || excel::read(bytes, limits))
            .await
            .map_err(|e| JobFailure::Dependency(format!("the spreadsheet reader failed: {e}")))?;
        parsed.map_err(|e| JobFailure::BadFile(e.to_string()))
    }

    pub(crate) async fn prepare_excel(&self, rows: Vec<Result<SheetRow, RowError>>) -> Result<Prepared, JobFailure> {
        let providers: Vec<ProviderDoc> = self.inner.store.providers().find(doc! {}).await?.try_collect().await?;
        let by_name: HashMap<String, ObjectId> = providers.iter().map(|p| (p.name.to_lowercase(), p.id)).collect();
        let mut codes: Vec<&str> =
            rows.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.package_code.as_str()).collect();
        codes.sort_unstable();
        codes.dedup();
        let mut packages: HashMap<(ObjectId, String), (ObjectId, String)> = HashMap::new();
        for chunk in codes.chunks(self.inner.config.batch) {
            let mut cursor = self.inner.store.packages().find(doc! { "code": { "$in": chunk } }).await?;
            while let Some(p) = cursor.try_next().await? {
                packages.insert((p.proxy_provider_id, p.code.clone()), (p.id, p.name.clone()));
            }
        }
        let mut out = Prepared { candidates: Vec::with_capacity(rows.len()), errors: Vec::new(), skipped: 0 };
        for row in rows {
            let r = match row {
                Ok(r) => r,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
            let Some(provider_id) = by_name.get(&r.provider.to_lowercase()) else {
                out.errors.push(RowError {
                    row: r.row,
                    field: Some("provider".into()),
                    reason: format!("no provider named {:?}", r.provider),
                });
                continue;
            };
            let Some((package_id, package_name)) = packages.get(&(*provider_id, r.package_code.clone())) else {
                out.errors.push(RowError {
                    row: r.row,
                    field: Some("package_code".into()),
                    reason: format!("provider {:?} has no package {:?}", r.provider, r.package_code),
                });
                continue;
            };
            out.candidates.push(Candidate {
                row: r.row,
                identity: Identity::Address {
                    ip: r.host.clone(),
                    port: i32::from(r.port),
                    username: r.username.clone(),
                },
                ip: r.host,
                port: i32::from(r.port),
                username: r.username,
                password: r.password,
                area: r.area,
                rotate_url: r.rotate_url,
                rotate_time: r.rotate_time,
                expired_at: r.expired_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: *package_id,
                package_name: package_name.clone(),
                rotate_first: false,
            });
        }
        Ok(out)
    }

    pub(crate) async fn prepare_kiot(&self, by: Option<ObjectId>) -> Result<Prepared, JobFailure> {
        let kiot = self.inner.config.kiot.as_ref().ok_or(JobFailure::NotConfigured("KiotProxy is not configured"))?;
        let headers = [("Api-token", kiot.api_key.expose().as_str())];
        let http = &self.inner.http;
        let packages_json = providers::fetch_json(http, "KiotProxy package list", &kiot.package_url, &headers).await?;
        let keys_json = providers::fetch_json(http, "KiotProxy key list", &kiot.key_url, &headers).await?;
        let (packages, mut errors) = providers::kiot_packages(&packages_json)?;
        let (keys, key_errors) = providers::kiot_keys(&keys_json)?;
        // Package errors are about the package list, key errors about keys; both are numbered by item, so they are
        // reported under the key list's numbering only when they are key errors.
        for e in &mut errors {
            e.reason = format!("package list: {}", e.reason);
        }
        errors.extend(key_errors);

        let provider = self.provider("KiotProxy", "kiotproxy", "https://kiotproxy.com", by).await?;
        let mut package_ids: HashMap<String, (ObjectId, String)> = HashMap::new();
        let now = chrono::Utc::now();
        let mut out = Prepared { candidates: Vec::new(), errors, skipped: 0 };
        for k in keys {
            if k.expires_at.is_some_and(|t| t < now) {
                out.skipped += 1;
                continue;
            }
            let package = match package_ids.get(&k.package_code) {
                Some(p) => p.clone(),
                None => {
                    let listed = packages.iter().find(|p| p.code == k.package_code);
                    let (name, price) = match listed {
                        Some(p) => (p.name.clone(), p.price),
                        None => (format!("KiotProxy {}", k.package_code), 0.0),
                    };
                    let code = format!("KiotProxy_{}", k.package_code);
                    let p = self.package(&code, &name, price, provider, by).await?;
                    package_ids.insert(k.package_code.clone(), (p.id, p.name.clone()));
                    (p.id, p.name)
                }
            };
            let rotate_url = format!("{}{}", kiot.rotate_url_base, k.key);
            // An address only when the list gives both parts; otherwise the first rotation provides it.
            let (ip, port) = match (k.host, k.port) {
                (Some(h), Some(p)) => (h, i32::from(p)),
                _ => (String::new(), 0),
            };
            out.candidates.push(Candidate {
                row: k.item,
                identity: Identity::RotateUrl(rotate_url.clone()),
                ip,
                port,
                username: None,
                password: None,
                area: Area::Vn,
                rotate_url,
                rotate_time: None,
                expired_at: k.expires_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: package.0,
                package_name: package.1,
                rotate_first: true,
            });
        }
        Ok(out)
    }

    pub(crate) async fn prepare_zing(&self, by: Option<ObjectId>) -> Result<Prepared, JobFailure> {
        let zing = self.inner.config.zing.as_ref().ok_or(JobFailure::NotConfigured("ZingProxy is not configured"))?;
        let auth = format!("Bearer {}", zing.token.expose());
        let json =
            providers::fetch_json(&self.inner.http, "ZingProxy proxy list", &zing.url, &[("Authorization", &auth)])
                .await?;
        let (proxies, errors) = providers::zing_proxies(&json)?;
        let provider = self.provider("ZingProxy", "zingproxy", "https://zingproxy.com", by).await?;
        let package = self.package("ZingProxy_Pack", "ZingProxy Pack", 0.0, provider, by).await?;
        let now = chrono::Utc::now();
        let mut out = Prepared { candidates: Vec::new(), errors, skipped: 0 };
        for p in proxies {
            if p.expires_at.is_some_and(|t| t < now) {
                out.skipped += 1;
                continue;
            }
            out.candidates.push(Candidate {
                row: p.item,
                identity: Identity::Address {
                    ip: p.host.clone(),
                    port: i32::from(p.port),
                    username: p.username.clone(),
                },
                ip: p.host,
                port: i32::from(p.port),
                username: p.username,
                password: p.password,
                area: Area::Vn,
                rotate_url: p.rotate_url,
                rotate_time: None,
                expired_at: p.expires_at.map(|t| DateTime::from_millis(t.timestamp_millis())),
                package_id: package.id,
                package_name: package.name.clone(),
                rotate_first: false,
            });
        }
        Ok(out)
    }
}
