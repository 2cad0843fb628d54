//! The in-memory index of leasable proxies, per area.
//!
//! Choosing a proxy must not scan the collection per request (on any MongoDB a sorted query over the pool costs
//! more as the pool grows). The index keeps, per area, the leasable proxies ordered as the original's query
//! orders them (`used_count` asc, `last_used_at` asc, nulls first), so a pick is `O(log n)`.
//!
//! It is a secondary structure of the engine's state ([`crate::engine::state`]): every change to a proxy's lease
//! state re-links its entry, so the index always agrees with the state it was derived from.
//!
//! Filters keep a pick `O(log n)`: the same order is kept per (area, package) and per (area, region), so a lease
//! from one package or one region starts at its own first candidate. A provider is a handful of packages: its pick
//! takes the best first candidate of each of its packages' orders (`O(k log n)` for `k` packages). When two filters
//! are combined (a package and a region), the most specific order (the package's) is walked and the other filter
//! checked on each candidate met, so the pick costs `O(log n + s)` with `s` the candidates of that package outside
//! the region ranked ahead of the first match.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bson::oid::ObjectId;
use proxypool_contracts::Area;

/// How long after `next_rotate` a proxy that has been used stays leasable (the original: `next_rotate > now - 4min`).
pub const ROTATE_GRACE_MS: i64 = 4 * 60 * 1000;

/// Lease-relevant state of one proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Area.
    pub area: Area,
    /// `is_active`.
    pub is_active: bool,
    /// `is_rotating`.
    pub is_rotating: bool,
    /// `in_use`.
    pub in_use: u32,
    /// `used_count`.
    pub used_count: u32,
    /// `last_used_at`, epoch ms.
    pub last_used_ms: Option<i64>,
    /// `next_rotate`, epoch ms.
    pub next_rotate_ms: Option<i64>,
    /// `expired_at` (the provider subscription's end), epoch ms.
    pub expired_at_ms: Option<i64>,
    /// `proxy_package_id`, for leases from one package.
    pub package: Option<ObjectId>,
    /// Region label (empty: unknown), for leases from one region.
    pub region: String,
    /// The sites its exit IP is banned for, with each ban's end (epoch ms; ended ones included until they are
    /// forgotten): a pick for a site checks them here, with no lookup beyond the entry's own.
    pub bans: Vec<(String, i64)>,
}

impl Entry {
    /// Whether its exit IP is banned for `domain` at `now_ms`.
    pub fn banned_for(&self, domain: &str, now_ms: i64) -> bool {
        self.bans.iter().any(|(d, until)| d == domain && *until > now_ms)
    }

    fn rank(&self, id: ObjectId) -> Rank {
        (self.used_count, self.last_used_ms.unwrap_or(i64::MIN), id)
    }

    /// The conditions that do not depend on the clock.
    fn leasable_now_or_later(&self, max: u32) -> bool {
        self.is_active && !self.is_rotating && self.in_use < max && self.used_count < max
    }

    /// The original design's time condition: fresh in this rotation cycle, or never used in it.
    fn within_rotation_window(&self, now_ms: i64) -> bool {
        self.used_count == 0 || self.next_rotate_ms.is_some_and(|n| n > now_ms - ROTATE_GRACE_MS)
    }

    /// Whether the provider subscription has ended by `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expired_at_ms.is_some_and(|e| e <= now_ms)
    }
}

/// Sort key matching the lease query's order, with the id as a tie-breaker.
type Rank = (u32, i64, ObjectId);

/// Counts for one area, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AreaStats {
    /// Proxies known in the area.
    pub total: usize,
    /// Proxies that could take a lease (ignoring the rotation window).
    pub leasable: usize,
}

/// The index, owned by the engine's single task.
#[derive(Debug)]
pub struct PoolIndex {
    max: u32,
    entries: HashMap<ObjectId, Slot>,
    order: HashMap<Area, Order>,
    /// The same order per (area, package) and per (area, region), so that a filtered lease is `O(log n)` too.
    by_key: HashMap<(Area, Key), Order>,
    /// Proxies known per (area, region label), leasable or not: a region none has is an unknown name, not a full pool.
    regions: HashMap<(Area, String), usize>,
}

/// A filtered order's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Package(ObjectId),
    Region(String),
}

/// What a pick may hand out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter<'a> {
    /// Only these packages' proxies (one package, or a provider's packages); `None`: any.
    pub packages: Option<&'a [ObjectId]>,
    /// Only proxies with this region label.
    pub region: Option<&'a str>,
    /// Not these (a retry after they failed, or the proxies already picked for a multi-lease). Short lists: checked
    /// by scanning.
    pub exclude: &'a [ObjectId],
}

impl Filter<'_> {
    fn admits(&self, e: &Entry) -> bool {
        self.region.is_none_or(|r| e.region == r)
            && self.packages.is_none_or(|ps| e.package.is_some_and(|p| ps.contains(&p)))
    }
}

#[derive(Debug)]
struct Slot {
    entry: Arc<Entry>,
}

/// Leasable proxies in pick order, each with its entry: a pick walks the order without a lookup per candidate (a
/// site's pick may walk past every proxy banned for it).
type Order = BTreeMap<Rank, Arc<Entry>>;

impl PoolIndex {
    /// An empty index for `PROXY_USE_MAX = max`.
    pub fn new(max: u32) -> Self {
        Self { max, entries: HashMap::new(), order: HashMap::new(), by_key: HashMap::new(), regions: HashMap::new() }
    }

    fn keys(entry: &Entry) -> impl Iterator<Item = Key> + '_ {
        let package = entry.package.map(Key::Package);
        let region = (!entry.region.is_empty()).then(|| Key::Region(entry.region.clone()));
        package.into_iter().chain(region)
    }

    fn unlink(&mut self, id: ObjectId) -> Option<Slot> {
        let slot = self.entries.remove(&id)?;
        let region = (slot.entry.area, slot.entry.region.clone());
        if let Some(n) = self.regions.get_mut(&region) {
            *n -= 1;
            if *n == 0 {
                self.regions.remove(&region);
            }
        }
        let rank = slot.entry.rank(id);
        if let Some(set) = self.order.get_mut(&slot.entry.area) {
            set.remove(&rank);
        }
        for key in Self::keys(&slot.entry) {
            if let Some(set) = self.by_key.get_mut(&(slot.entry.area, key)) {
                set.remove(&rank);
            }
        }
        Some(slot)
    }

    fn link(&mut self, id: ObjectId, entry: Entry) {
        *self.regions.entry((entry.area, entry.region.clone())).or_default() += 1;
        let entry = Arc::new(entry);
        if entry.leasable_now_or_later(self.max) {
            let rank = entry.rank(id);
            self.order.entry(entry.area).or_default().insert(rank, entry.clone());
            for key in Self::keys(&entry) {
                self.by_key.entry((entry.area, key)).or_default().insert(rank, entry.clone());
            }
        }
        self.entries.insert(id, Slot { entry });
    }

    /// Records the state of a proxy, replacing what was held.
    pub fn set(&mut self, id: ObjectId, entry: Entry) {
        self.unlink(id);
        self.link(id, entry);
    }

    /// Forgets a proxy (deleted).
    pub fn remove(&mut self, id: ObjectId) {
        self.unlink(id);
    }

    /// The best candidate in `area` at `now_ms`, without taking it: the engine decides, logs the grant, then updates
    /// the entry through [`PoolIndex::set`].
    ///
    /// Candidates outside the rotation window or past their subscription are dropped from the order as they are
    /// met: time only moves forward, and they come back only through a change (rotation, catalogue edit), which
    /// re-links them.
    pub fn peek(&mut self, area: Area, now_ms: i64) -> Option<ObjectId> {
        self.pick(area, now_ms, Filter::default())
    }

    /// Like [`PoolIndex::peek`], within `filter`.
    pub fn pick(&mut self, area: Area, now_ms: i64, filter: Filter<'_>) -> Option<ObjectId> {
        self.pick_for(area, now_ms, filter, None)
    }

    /// Like [`PoolIndex::pick`], passing over the proxies whose exit IP is banned for `domain`. They stay in the
    /// order, since they are fine for other sites; a pick walks past them, so it costs `O(log n + s)` with `s` the
    /// skipped proxies ranked ahead of the first usable one (banned proxies are not leased for that site, so they
    /// keep a low `used_count` and rank early: `s` is at most the number banned for it in the area), one hash lookup
    /// each.
    pub fn pick_for(&mut self, area: Area, now_ms: i64, filter: Filter<'_>, domain: Option<&str>) -> Option<ObjectId> {
        let Self { order, by_key, .. } = self;
        // The orders to walk: each package's, else the region's, else the area's.
        let keys: Vec<Option<Key>> = match (filter.packages, filter.region) {
            (Some(ps), _) => ps.iter().map(|p| Some(Key::Package(*p))).collect(),
            (None, Some(r)) => vec![Some(Key::Region(r.to_owned()))],
            (None, None) => vec![None],
        };
        let mut best: Option<Rank> = None;
        for key in keys {
            let set = match key {
                Some(k) => by_key.get_mut(&(area, k)),
                None => order.get_mut(&area),
            };
            let Some(set) = set else { continue };
            if let Some(rank) = first_in(set, now_ms, &filter, domain) {
                best = Some(best.map_or(rank, |b| b.min(rank)));
            }
        }
        best.map(|r| r.2)
    }

    /// Counts for `area`.
    pub fn stats(&self, area: Area) -> AreaStats {
        AreaStats {
            total: self.entries.values().filter(|s| s.entry.area == area).count(),
            leasable: self.order.get(&area).map_or(0, BTreeMap::len),
        }
    }

    /// Proxies in `area`: (known, leasable, leases held, rotating).
    pub fn counts(&self, area: Area) -> (usize, usize, u64, usize) {
        let mut total = 0;
        let mut held = 0u64;
        let mut rotating = 0;
        for s in self.entries.values().filter(|s| s.entry.area == area) {
            total += 1;
            held += u64::from(s.entry.in_use);
            rotating += usize::from(s.entry.is_rotating);
        }
        (total, self.order.get(&area).map_or(0, BTreeMap::len), held, rotating)
    }

    /// Whether any proxy in `area` (leasable or not) has the region label `region`.
    pub fn has_region(&self, area: Area, region: &str) -> bool {
        self.regions.contains_key(&(area, region.to_owned()))
    }

    /// The state held for a proxy.
    pub fn get(&self, id: &ObjectId) -> Option<&Entry> {
        self.entries.get(id).map(|s| &*s.entry)
    }
}

/// The first candidate of one order that `filter` admits and whose exit IP is not banned for `domain`.
///
/// Candidates outside the rotation window or past their subscription are dropped from the front of the order as they
/// are met: time only moves forward, and they come back only through a change (rotation, catalogue edit), which
/// re-links them. Excluded, banned and filtered-out proxies stay (they are fine for others); unusable ones past
/// them are left for the next plain pick to drop.
fn first_in(set: &mut Order, now_ms: i64, filter: &Filter<'_>, domain: Option<&str>) -> Option<Rank> {
    let usable = |e: &Entry| e.within_rotation_window(now_ms) && !e.expired(now_ms);
    while let Some((_, e)) = set.first_key_value() {
        if usable(e) {
            break;
        }
        set.pop_first();
    }
    // No lookup per candidate walked: the window, the filters and the site's bans are all in its entry.
    set.iter()
        .filter(|(r, _)| !filter.exclude.contains(&r.2))
        .find(|(_, e)| usable(e) && filter.admits(e) && !domain.is_some_and(|d| e.banned_for(d, now_ms)))
        .map(|(r, _)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn entry(area: Area, used: u32, last: Option<i64>) -> Entry {
        Entry {
            area,
            is_active: true,
            is_rotating: false,
            in_use: used,
            used_count: used,
            last_used_ms: last,
            next_rotate_ms: Some(NOW + 60_000),
            expired_at_ms: None,
            package: None,
            region: String::new(),
            bans: Vec::new(),
        }
    }

    /// Takes the best candidate as the engine does: peek, then count the lease.
    fn take(idx: &mut PoolIndex, area: Area) -> Option<ObjectId> {
        let id = idx.peek(area, NOW)?;
        let mut e = idx.get(&id)?.clone();
        e.in_use += 1;
        e.used_count += 1;
        e.last_used_ms = Some(NOW);
        idx.set(id, e);
        Some(id)
    }

    #[test]
    fn picks_in_spec_order_and_spreads() {
        let mut idx = PoolIndex::new(3);
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        idx.set(a, entry(Area::Vn, 1, Some(NOW - 10)));
        idx.set(b, entry(Area::Vn, 0, Some(NOW - 5)));
        idx.set(c, entry(Area::Vn, 0, None));
        // used_count asc, then last_used_at asc with never-used first.
        assert_eq!(take(&mut idx, Area::Vn), Some(c));
        assert_eq!(take(&mut idx, Area::Vn), Some(b));
        assert_eq!(take(&mut idx, Area::Vn), Some(a));
        assert_eq!(take(&mut idx, Area::Global), None);
    }

    #[test]
    fn never_offers_more_than_max() {
        let mut idx = PoolIndex::new(3);
        let ids: Vec<_> = (0..10).map(|_| ObjectId::new()).collect();
        for id in &ids {
            idx.set(*id, entry(Area::Global, 0, None));
        }
        let picks = (0..100).filter_map(|_| take(&mut idx, Area::Global)).count();
        assert_eq!(picks, 30);
        assert_eq!(idx.stats(Area::Global), AreaStats { total: 10, leasable: 0 });
    }

    #[test]
    fn skips_inactive_rotating_expired_and_stale_window() {
        let mut idx = PoolIndex::new(3);
        idx.set(ObjectId::new(), Entry { is_active: false, ..entry(Area::Vn, 0, None) });
        idx.set(ObjectId::new(), Entry { is_rotating: true, ..entry(Area::Vn, 0, None) });
        idx.set(ObjectId::new(), Entry { expired_at_ms: Some(NOW - 1), ..entry(Area::Vn, 0, None) });
        idx.set(ObjectId::new(), Entry { next_rotate_ms: Some(NOW - ROTATE_GRACE_MS - 1), ..entry(Area::Vn, 1, None) });
        assert_eq!(idx.peek(Area::Vn, NOW), None);
        // Never used in this cycle: leasable even when overdue; a subscription ending later does not gate.
        let fresh = ObjectId::new();
        idx.set(
            fresh,
            Entry {
                next_rotate_ms: Some(NOW - ROTATE_GRACE_MS - 1),
                expired_at_ms: Some(NOW + 1),
                ..entry(Area::Vn, 0, None)
            },
        );
        assert_eq!(idx.peek(Area::Vn, NOW), Some(fresh));
    }

    #[test]
    fn remove_forgets() {
        let mut idx = PoolIndex::new(1);
        let id = ObjectId::new();
        idx.set(id, entry(Area::Vn, 0, None));
        idx.remove(id);
        assert!(idx.peek(Area::Vn, NOW).is_none());
        assert!(idx.get(&id).is_none());
    }

    #[test]
    fn picks_within_a_package_and_past_excluded_proxies() {
        let mut idx = PoolIndex::new(3);
        let (pa, pb) = (ObjectId::new(), ObjectId::new());
        let (a1, a2, b1) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        idx.set(b1, Entry { package: Some(pb), ..entry(Area::Vn, 0, None) });
        idx.set(a1, Entry { package: Some(pa), ..entry(Area::Vn, 1, Some(NOW - 10)) });
        idx.set(a2, Entry { package: Some(pa), ..entry(Area::Vn, 2, Some(NOW - 5)) });
        assert_eq!(idx.peek(Area::Vn, NOW), Some(b1), "the least used of all");
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { packages: Some(&[pa]), ..Filter::default() }), Some(a1));
        assert_eq!(
            idx.pick(Area::Vn, NOW, Filter { packages: Some(&[pa]), exclude: &[a1], ..Filter::default() }),
            Some(a2)
        );
        assert_eq!(
            idx.pick(Area::Vn, NOW, Filter { packages: Some(&[pa]), exclude: &[a1, a2], ..Filter::default() }),
            None
        );
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { exclude: &[b1], ..Filter::default() }), Some(a1));
        assert_eq!(idx.pick(Area::Global, NOW, Filter { packages: Some(&[pa]), ..Filter::default() }), None);
        // A package's proxy that is taken to the cap leaves both orders.
        idx.set(a1, Entry { package: Some(pa), in_use: 3, ..entry(Area::Vn, 3, Some(NOW)) });
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { packages: Some(&[pa]), ..Filter::default() }), Some(a2));
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { exclude: &[b1, a2], ..Filter::default() }), None);
    }

    #[test]
    fn picks_across_a_providers_packages_and_within_a_region() {
        let mut idx = PoolIndex::new(3);
        let (pa, pb, pc) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        let (a, b, c, hn) = (ObjectId::new(), ObjectId::new(), ObjectId::new(), ObjectId::new());
        let at = |pkg, used, region: &str| Entry {
            package: Some(pkg),
            region: region.into(),
            ..entry(Area::Vn, used, Some(NOW - 10))
        };
        idx.set(a, at(pa, 2, "HCM"));
        idx.set(b, at(pb, 1, "HCM"));
        idx.set(c, at(pc, 0, "HCM"));
        idx.set(hn, at(pa, 0, "HN"));
        // A provider of packages a and b: the least used of both, never c's.
        let provider = [pa, pb];
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { packages: Some(&provider), ..Filter::default() }), Some(hn));
        let hcm = Filter { region: Some("HCM"), ..Filter::default() };
        assert_eq!(idx.pick(Area::Vn, NOW, hcm), Some(c));
        let both = Filter { packages: Some(&provider), region: Some("HCM"), ..Filter::default() };
        assert_eq!(idx.pick(Area::Vn, NOW, both), Some(b));
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { exclude: &[b], ..both }), Some(a));
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { region: Some("DN"), ..Filter::default() }), None);
        // A region that changes (a rotation's new IP) moves the proxy between orders.
        idx.set(c, at(pc, 0, "DN"));
        assert_eq!(idx.pick(Area::Vn, NOW, hcm), Some(b));
        assert_eq!(idx.pick(Area::Vn, NOW, Filter { region: Some("DN"), ..Filter::default() }), Some(c));
    }
}
