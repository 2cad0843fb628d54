//! Writing imported proxies: find the proxy each candidate describes, insert the new ones in bulk, update the
//! changed ones field by field, skip the unchanged ones.
//!
//! Writes name only the imported fields, so the lease fields (`in_use`, `used_count`, `proxy_used`) are never
//! touched (the lint in `libs/store` checks that no crate but the lease service names them). New proxies are built
//! with `ProxyDoc::new`, which gives every other field the original design's default.

use std::collections::HashMap;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use futures::TryStreamExt;
use proxypool_contracts::import::{ImportCounts, RowError};
use proxypool_contracts::Area;
use proxypool_store::model::{NewProxy, ProxyDoc, DEFAULT_ROTATE_TIME_SECS};
use proxypool_store::{Store, StoreError};
use serde::Deserialize;

/// How an import recognises a proxy it has seen before.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Host and port, and the username when the row has one (Excel, ZingProxy).
    Address {
        /// Host or IP.
        ip: String,
        /// Port.
        port: i32,
        /// Username, when the source gives one.
        username: Option<String>,
    },
    /// The rotate URL, for providers whose proxies change address at every rotation (KiotProxy: the URL holds the
    /// key).
    RotateUrl(String),
}

/// What an import says about one proxy.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Row (or item) number, for errors.
    pub row: u32,
    /// How to find it.
    pub identity: Identity,
    /// Address for a new proxy (empty when the provider gives none before the first rotation).
    pub ip: String,
    /// Port for a new proxy.
    pub port: i32,
    /// Username, when given.
    pub username: Option<String>,
    /// Password, when given.
    pub password: Option<String>,
    /// Area.
    pub area: Area,
    /// Rotate URL.
    pub rotate_url: String,
    /// Seconds between rotations, when given.
    pub rotate_time: Option<i64>,
    /// Subscription expiry, when given.
    pub expired_at: Option<DateTime>,
    /// Package.
    pub package_id: ObjectId,
    /// Package name (denormalised).
    pub package_name: String,
    /// A new proxy starts in error and due now, so the rotator gives it an address at once (KiotProxy).
    pub rotate_first: bool,
}

/// The fields compared with a candidate.
#[derive(Debug, Clone, Deserialize)]
struct Existing {
    #[serde(rename = "_id")]
    id: ObjectId,
    ip: String,
    port: i32,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    area: Area,
    #[serde(default)]
    rotate_url: String,
    #[serde(default)]
    rotate_time: Option<i64>,
    #[serde(default)]
    expired_at: Option<DateTime>,
    proxy_package_id: ObjectId,
    #[serde(default)]
    package_name: String,
}

fn projection() -> Document {
    doc! {
        "_id": 1, "ip": 1, "port": 1, "username": 1, "password": 1, "area": 1, "rotate_url": 1, "rotate_time": 1,
        "expired_at": 1, "proxy_package_id": 1, "package_name": 1,
    }
}

/// The result of [`apply`].
#[derive(Debug, Default)]
pub struct Applied {
    /// Counts (`failed` covers only rows refused here).
    pub counts: ImportCounts,
    /// Rows refused here.
    pub errors: Vec<RowError>,
    /// Proxies inserted or changed.
    pub changed: Vec<ObjectId>,
}

/// Above this many candidates, existing proxies are read in one pass over the collection instead of by address
/// lookups: one sequential read beats thousands of index probes.
const SCAN_THRESHOLD: usize = 5_000;

/// Finds, inserts and updates. A database error stops the import and is returned with what was already written
/// (what was written stays; a re-run completes it).
pub async fn apply(
    store: &Store,
    candidates: Vec<Candidate>,
    updated_by: Option<ObjectId>,
    batch: usize,
) -> Result<Applied, (Applied, StoreError)> {
    let mut out = Applied::default();
    let candidates = dedupe(candidates, &mut out);
    let existing = match find_existing(store, &candidates, batch).await {
        Ok(e) => e,
        Err(e) => return Err((out, e)),
    };
    let mut inserts = Vec::new();
    let now = DateTime::now();
    for c in candidates {
        match existing_for(&existing, &c) {
            Some(e) => {
                let set = changes(e, &c);
                if set.is_empty() {
                    out.counts.skipped += 1;
                    continue;
                }
                let mut set = set;
                set.insert("updated_by", updated_by);
                set.insert("updatedAt", now);
                if let Err(err) = store.proxies().update_one(doc! { "_id": e.id }, doc! { "$set": set }).await {
                    return Err((out, err.into()));
                }
                out.counts.updated += 1;
                out.changed.push(e.id);
            }
            None => inserts.push(new_doc(&c, updated_by)),
        }
    }
    for chunk in inserts.chunks(batch) {
        if let Err(err) = store.proxies().insert_many(chunk).await {
            return Err((out, err.into()));
        }
        out.counts.created += chunk.len() as u64;
        out.changed.extend(chunk.iter().map(|d| d.id));
    }
    Ok(out)
}

/// Keeps the first candidate of each identity; later ones are errors naming the first row.
fn dedupe(candidates: Vec<Candidate>, out: &mut Applied) -> Vec<Candidate> {
    // Identity → (first row, whether that row had no username).
    let mut first: HashMap<Identity, (u32, bool)> = HashMap::with_capacity(candidates.len());
    let mut kept = Vec::with_capacity(candidates.len());
    for c in candidates {
        // A row with a username collides with that username at the address, and with a row without one there; a
        // row without a username collides with every row at the address.
        let key = loose(&c.identity);
        let without_username = key == c.identity;
        let clash = match first.get(&c.identity) {
            Some(&(row, _)) => Some(row),
            None => first.get(&key).filter(|(_, loose_row)| *loose_row).map(|&(row, _)| row),
        };
        if let Some(prev) = clash {
            out.counts.failed += 1;
            out.errors.push(RowError { row: c.row, field: None, reason: format!("the same proxy as row {prev}") });
            continue;
        }
        first.insert(c.identity.clone(), (c.row, without_username));
        first.entry(key).or_insert((c.row, without_username));
        kept.push(c);
    }
    kept
}

fn loose(id: &Identity) -> Identity {
    match id {
        Identity::Address { ip, port, .. } => Identity::Address { ip: ip.clone(), port: *port, username: None },
        other => other.clone(),
    }
}

/// Existing proxies by address (every username at that address) and by rotate URL (`None` when several proxies
/// share one).
#[derive(Debug, Default)]
struct ExistingIndex {
    by_address: HashMap<(String, i32), Vec<Existing>>,
    by_rotate_url: HashMap<String, Option<Existing>>,
}

/// The proxy a candidate describes: by its identity, or — for an address identity that no longer matches because
/// the rotator moved the proxy to a new address — by its rotate URL when exactly one proxy has it.
fn existing_for<'a>(idx: &'a ExistingIndex, c: &Candidate) -> Option<&'a Existing> {
    let by_url = |url: &str| idx.by_rotate_url.get(url).and_then(Option::as_ref);
    match &c.identity {
        Identity::Address { ip, port, username } => {
            let at = idx.by_address.get(&(ip.clone(), *port));
            let found = at.and_then(|at| match username {
                Some(u) => at.iter().find(|e| &e.username == u),
                None => at.first(),
            });
            found.or_else(|| by_url(&c.rotate_url))
        }
        Identity::RotateUrl(url) => by_url(url),
    }
}

async fn find_existing(store: &Store, candidates: &[Candidate], batch: usize) -> Result<ExistingIndex, StoreError> {
    let mut idx = ExistingIndex::default();
    let coll = store.proxies().clone_with_type::<Existing>();
    let mut seen = std::collections::HashSet::new();
    let mut add = |e: Existing| {
        // The lookups by address and by rotate URL can return the same document.
        if !seen.insert(e.id) {
            return;
        }
        idx.by_rotate_url
            .entry(e.rotate_url.clone())
            .and_modify(|slot| *slot = None)
            .or_insert_with(|| Some(e.clone()));
        idx.by_address.entry((e.ip.clone(), e.port)).or_default().push(e);
    };
    if candidates.len() > SCAN_THRESHOLD {
        let mut cursor = coll.find(doc! {}).projection(projection()).batch_size(5_000).await?;
        while let Some(e) = cursor.try_next().await? {
            add(e);
        }
        return Ok(idx);
    }
    let ips: Vec<&str> = unique(candidates.iter().filter_map(|c| match &c.identity {
        Identity::Address { ip, .. } => Some(ip.as_str()),
        Identity::RotateUrl(_) => None,
    }));
    for chunk in ips.chunks(batch) {
        let mut cursor = coll.find(doc! { "ip": { "$in": chunk } }).projection(projection()).await?;
        while let Some(e) = cursor.try_next().await? {
            add(e);
        }
    }
    // Every candidate's rotate URL: the identity of rotate-URL candidates, the fallback of address candidates.
    let urls: Vec<&str> = unique(candidates.iter().map(|c| c.rotate_url.as_str()));
    for chunk in urls.chunks(batch) {
        let mut cursor = coll.find(doc! { "rotate_url": { "$in": chunk } }).projection(projection()).await?;
        while let Some(e) = cursor.try_next().await? {
            add(e);
        }
    }
    Ok(idx)
}

fn unique<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = std::collections::HashSet::new();
    it.filter(|s| seen.insert(*s)).collect()
}

/// The `$set` that brings `e` to what `c` says; empty when nothing differs. Address and lease fields are left
/// alone: the address is the identity (or, for rotate-URL identities, the rotator's to change).
fn changes(e: &Existing, c: &Candidate) -> Document {
    let mut set = Document::new();
    if e.area != c.area {
        set.insert("area", c.area.as_str());
    }
    if e.rotate_url != c.rotate_url {
        set.insert("rotate_url", &c.rotate_url);
    }
    if let Some(u) = &c.username {
        if &e.username != u {
            set.insert("username", u);
        }
    }
    if let Some(p) = &c.password {
        if &e.password != p {
            set.insert("password", p);
        }
    }
    if let Some(t) = c.rotate_time {
        if e.rotate_time != Some(t) {
            set.insert("rotate_time", t);
        }
    }
    if c.expired_at.is_some() && e.expired_at != c.expired_at {
        set.insert("expired_at", c.expired_at);
    }
    if e.proxy_package_id != c.package_id || e.package_name != c.package_name {
        set.insert("proxy_package_id", c.package_id);
        set.insert("package_name", &c.package_name);
    }
    set
}

fn new_doc(c: &Candidate, created_by: Option<ObjectId>) -> ProxyDoc {
    let mut d = ProxyDoc::new(NewProxy {
        ip: c.ip.clone(),
        port: u16::try_from(c.port).unwrap_or(0),
        username: c.username.clone().unwrap_or_default(),
        password: c.password.clone().unwrap_or_default(),
        area: c.area,
        rotate_url: c.rotate_url.clone(),
        rotate_time: c.rotate_time.unwrap_or(DEFAULT_ROTATE_TIME_SECS),
        auth_token: None,
        is_active: true,
        disable_auto_rotate: false,
        expired_at: c.expired_at,
        proxy_package_id: c.package_id,
        package_name: c.package_name.clone(),
        created_by,
    });
    if c.rotate_first {
        d.is_error = true;
        d.next_rotate = Some(DateTime::now());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(row: u32, ip: &str, user: Option<&str>) -> Candidate {
        Candidate {
            row,
            identity: Identity::Address { ip: ip.into(), port: 80, username: user.map(Into::into) },
            ip: ip.into(),
            port: 80,
            username: user.map(Into::into),
            password: None,
            area: Area::Vn,
            rotate_url: "http://r.test/x".into(),
            rotate_time: None,
            expired_at: None,
            package_id: ObjectId::new(),
            package_name: "p".into(),
            rotate_first: false,
        }
    }

    #[test]
    fn duplicates_in_one_import_name_the_first_row() {
        let mut out = Applied::default();
        let kept = dedupe(
            vec![
                cand(2, "1.1.1.1", Some("a")),
                cand(3, "1.1.1.1", Some("b")),
                cand(4, "1.1.1.1", Some("a")),
                cand(5, "1.1.1.1", None),
            ],
            &mut out,
        );
        assert_eq!(kept.iter().map(|c| c.row).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(out.counts.failed, 2);
        assert_eq!(out.errors[0].reason, "the same proxy as row 2");

        // The other order: a row without a username first claims the whole address.
        let mut out = Applied::default();
        let kept = dedupe(vec![cand(2, "2.2.2.2", None), cand(3, "2.2.2.2", Some("a"))], &mut out);
        assert_eq!(kept.iter().map(|c| c.row).collect::<Vec<_>>(), vec![2]);
        assert_eq!(out.errors[0].row, 3);
    }
}
