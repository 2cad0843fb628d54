//! The in-memory index of leasable proxies, per area.
//!
//! Choosing a proxy must not scan the collection per request (on any MongoDB a sorted query over the pool costs
//! more as the pool grows). The index keeps, per area, the leasable proxies ordered as the original's query
//! orders them (`used_count` asc, `last_used_at` asc, nulls first), so a pick is `O(log n)`.
//!
//! The index is only a hint: every grant is a guarded write whose filter re-checks all conditions in the database,
//! so a stale index costs a retry, never a wrong lease. It is fed by the results of this replica's own writes, by
//! `proxy.changed` events from other writers, by re-reads after a guard miss and by a periodic full load.
//! `lease_rev` orders the states so that an older one that arrives late does not overwrite a newer one.

use std::collections::{BTreeSet, HashMap};

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
    /// `lease_rev`.
    pub rev: i64,
}

impl Entry {
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

/// The index. Not thread-safe by itself: the service wraps it in a short `std::sync::Mutex` held only for in-memory
/// work, never across I/O.
#[derive(Debug)]
pub struct PoolIndex {
    max: u32,
    entries: HashMap<ObjectId, Slot>,
    order: HashMap<Area, BTreeSet<Rank>>,
    generation: u64,
}

#[derive(Debug)]
struct Slot {
    entry: Entry,
    /// Generation of the last update, so a full reload only drops entries nobody touched while it ran.
    generation: u64,
}

impl PoolIndex {
    /// An empty index for `PROXY_USE_MAX = max`.
    pub fn new(max: u32) -> Self {
        Self { max, entries: HashMap::new(), order: HashMap::new(), generation: 0 }
    }

    fn unlink(&mut self, id: ObjectId) -> Option<Slot> {
        let slot = self.entries.remove(&id)?;
        if let Some(set) = self.order.get_mut(&slot.entry.area) {
            set.remove(&slot.entry.rank(id));
        }
        Some(slot)
    }

    fn link(&mut self, id: ObjectId, entry: Entry) {
        if entry.leasable_now_or_later(self.max) {
            self.order.entry(entry.area).or_default().insert(entry.rank(id));
        }
        self.entries.insert(id, Slot { entry, generation: self.generation });
    }

    /// Records a state unless the index already holds a newer one (higher `rev`). Returns whether it was applied.
    pub fn apply(&mut self, id: ObjectId, entry: Entry) -> bool {
        if let Some(old) = self.entries.get(&id) {
            if old.entry.rev > entry.rev {
                return false;
            }
        }
        self.unlink(id);
        self.link(id, entry);
        true
    }

    /// Forgets a proxy (deleted).
    pub fn remove(&mut self, id: ObjectId) {
        self.unlink(id);
    }

    /// Picks the best candidate in `area` and counts a lease on it optimistically, so that concurrent picks spread
    /// over different proxies instead of racing for the same one. The caller must then either [`apply`] the state
    /// returned by the guarded write or re-read the proxy after a guard miss.
    ///
    /// Candidates outside the rotation window are dropped from the order as they are met: time only moves forward,
    /// and they come back only through a write (rotation), which updates the index.
    ///
    /// [`apply`]: PoolIndex::apply
    pub fn pick(&mut self, area: Area, now_ms: i64) -> Option<(ObjectId, Entry)> {
        let set = self.order.get_mut(&area)?;
        let mut chosen = None;
        while let Some(rank) = set.first().copied() {
            let id = rank.2;
            match self.entries.get(&id) {
                Some(slot) if slot.entry.within_rotation_window(now_ms) => {
                    chosen = Some(id);
                    break;
                }
                _ => {
                    set.pop_first();
                }
            }
        }
        let id = chosen?;
        let mut slot = self.unlink(id)?;
        let before = slot.entry.clone();
        slot.entry.in_use += 1;
        slot.entry.used_count += 1;
        slot.entry.last_used_ms = Some(now_ms);
        self.link(id, slot.entry);
        Some((id, before))
    }

    /// Undoes an optimistic [`PoolIndex::pick`] whose write did not happen (database error, cancelled request),
    /// unless a newer state arrived in the meantime.
    pub fn unpick(&mut self, id: ObjectId, before: Entry) {
        if self.entries.get(&id).is_some_and(|s| s.entry.rev == before.rev) {
            self.unlink(id);
            self.link(id, before);
        }
    }

    /// Starts a full reload; pass the returned token to [`PoolIndex::finish_reload`].
    pub fn begin_reload(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Applies a full load and drops entries that were neither in it nor updated since [`PoolIndex::begin_reload`].
    pub fn finish_reload(&mut self, token: u64, loaded: Vec<(ObjectId, Entry)>) {
        let mut seen = std::collections::HashSet::with_capacity(loaded.len());
        for (id, entry) in loaded {
            seen.insert(id);
            // An entry updated while the load ran holds newer state than the load read.
            if self.entries.get(&id).is_some_and(|s| s.generation >= token) {
                continue;
            }
            self.apply(id, entry);
        }
        let stale: Vec<ObjectId> = self
            .entries
            .iter()
            .filter(|(id, slot)| slot.generation < token && !seen.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.unlink(id);
        }
    }

    /// Counts for `area`.
    pub fn stats(&self, area: Area) -> AreaStats {
        AreaStats {
            total: self.entries.values().filter(|s| s.entry.area == area).count(),
            leasable: self.order.get(&area).map_or(0, BTreeSet::len),
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
        (total, self.order.get(&area).map_or(0, BTreeSet::len), held, rotating)
    }

    /// The state held for a proxy.
    pub fn get(&self, id: &ObjectId) -> Option<&Entry> {
        self.entries.get(id).map(|s| &s.entry)
    }
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
            rev: 0,
        }
    }

    #[test]
    fn picks_in_spec_order_and_spreads() {
        let mut idx = PoolIndex::new(3);
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        idx.apply(a, entry(Area::Vn, 1, Some(NOW - 10)));
        idx.apply(b, entry(Area::Vn, 0, Some(NOW - 5)));
        idx.apply(c, entry(Area::Vn, 0, None));
        // used_count asc, then last_used_at asc with never-used first.
        let pick = |idx: &mut PoolIndex, area| idx.pick(area, NOW).map(|(id, _)| id);
        assert_eq!(pick(&mut idx, Area::Vn), Some(c));
        assert_eq!(pick(&mut idx, Area::Vn), Some(b));
        assert_eq!(pick(&mut idx, Area::Vn), Some(a));
        assert_eq!(pick(&mut idx, Area::Global), None);
    }

    #[test]
    fn never_offers_more_than_max() {
        let mut idx = PoolIndex::new(3);
        let ids: Vec<_> = (0..10).map(|_| ObjectId::new()).collect();
        for id in &ids {
            idx.apply(*id, entry(Area::Global, 0, None));
        }
        let picks = (0..100).filter_map(|_| idx.pick(Area::Global, NOW)).count();
        assert_eq!(picks, 30);
        assert_eq!(idx.stats(Area::Global), AreaStats { total: 10, leasable: 0 });
    }

    #[test]
    fn skips_inactive_rotating_and_expired_window() {
        let mut idx = PoolIndex::new(3);
        let inactive = ObjectId::new();
        idx.apply(inactive, Entry { is_active: false, ..entry(Area::Vn, 0, None) });
        let rotating = ObjectId::new();
        idx.apply(rotating, Entry { is_rotating: true, ..entry(Area::Vn, 0, None) });
        let stale = ObjectId::new();
        idx.apply(stale, Entry { next_rotate_ms: Some(NOW - ROTATE_GRACE_MS - 1), ..entry(Area::Vn, 1, None) });
        assert_eq!(idx.pick(Area::Vn, NOW), None);
        // Never used in this cycle: leasable even when overdue.
        let fresh = ObjectId::new();
        idx.apply(fresh, Entry { next_rotate_ms: Some(NOW - ROTATE_GRACE_MS - 1), ..entry(Area::Vn, 0, None) });
        assert_eq!(idx.pick(Area::Vn, NOW).map(|(id, _)| id), Some(fresh));
    }

    #[test]
    fn unpick_restores_the_slot() {
        let mut idx = PoolIndex::new(1);
        let id = ObjectId::new();
        idx.apply(id, entry(Area::Vn, 0, None));
        let (picked, before) = idx.pick(Area::Vn, NOW).unwrap_or((ObjectId::new(), entry(Area::Vn, 9, None)));
        assert_eq!(picked, id);
        assert!(idx.pick(Area::Vn, NOW).is_none(), "full after the optimistic count");
        idx.unpick(id, before);
        assert_eq!(idx.pick(Area::Vn, NOW).map(|(p, _)| p), Some(id));
    }

    #[test]
    fn older_revisions_do_not_overwrite_newer() {
        let mut idx = PoolIndex::new(3);
        let id = ObjectId::new();
        assert!(idx.apply(id, Entry { rev: 5, ..entry(Area::Vn, 2, None) }));
        assert!(!idx.apply(id, Entry { rev: 4, ..entry(Area::Vn, 3, None) }));
        assert_eq!(idx.get(&id).map(|e| e.in_use), Some(2));
    }

    #[test]
    fn reload_drops_only_untouched_missing_entries() {
        let mut idx = PoolIndex::new(3);
        let (gone, touched, kept) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        idx.apply(gone, entry(Area::Vn, 0, None));
        idx.apply(touched, entry(Area::Vn, 0, None));
        let token = idx.begin_reload();
        idx.apply(touched, Entry { rev: 1, ..entry(Area::Vn, 1, None) });
        idx.finish_reload(token, vec![(kept, entry(Area::Vn, 0, None))]);
        assert!(idx.get(&gone).is_none());
        assert!(idx.get(&touched).is_some());
        assert!(idx.get(&kept).is_some());
    }
}
