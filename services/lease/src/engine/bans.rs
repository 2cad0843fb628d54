//! Per-site bans on exit IPs. A consumer that returns a lease with `blocked` or `captcha` for a domain says that
//! the site refused the IP it saw, not the proxy record: the (exit IP, domain) pair is banned for `BAN_BASE`, twice as
//! long on each repeat up to `BAN_MAX`, and any proxy exiting on that IP is skipped for that domain. A rotation that
//! gives the proxy a new public IP leaves the ban behind with the old IP, where it expires on its own; a proxy that
//! later exits on a banned IP inherits the ban.
//!
//! A ban is recorded in the state of the proxy it was reported through ([`super::state::ProxyState::bans`]), so it is
//! logged, undone and projected with that proxy like any of its changes; [`BanIndex`] finds the bans of an IP
//! across proxies, kept in step by [`super::state::State::put`].

use std::collections::HashMap;

use bson::oid::ObjectId;
use proxypool_contracts::health::Outcome;
use serde::{Deserialize, Serialize};

/// One ban of an (exit IP, domain) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    /// The exit IP the site saw.
    pub ip: String,
    /// The site.
    pub domain: String,
    /// When it ends, epoch ms (engine clock).
    pub until_ms: i64,
    /// How many bans of this pair in a row.
    pub count: u32,
    /// `blocked` or `captcha`.
    pub reason: Outcome,
}

/// How long bans last (`BAN_BASE`, `BAN_MAX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanPolicy {
    /// The first ban of a pair, ms.
    pub base_ms: i64,
    /// The longest ban, ms; also how long an expired ban is remembered, so that the next one doubles.
    pub max_ms: i64,
}

impl Default for BanPolicy {
    fn default() -> Self {
        Self { base_ms: 10 * 60 * 1000, max_ms: 24 * 3600 * 1000 }
    }
}

impl BanPolicy {
    /// The ban a new report of `(ip, domain)` earns at `now_ms`, given the latest one of that pair (`previous`:
    /// until, count): a repeat within `max_ms` of the previous ban's end doubles it.
    pub fn next(&self, ip: &str, domain: &str, reason: Outcome, previous: Option<(i64, u32)>, now_ms: i64) -> Ban {
        let count = match previous {
            Some((until, count)) if until.saturating_add(self.max_ms) > now_ms => count.saturating_add(1),
            _ => 1,
        };
        let doubled = self.base_ms.saturating_mul(1_i64 << (count - 1).min(40));
        Ban {
            ip: ip.to_owned(),
            domain: domain.to_owned(),
            until_ms: now_ms.saturating_add(doubled.min(self.max_ms)),
            count,
            reason,
        }
    }
}

/// The reports of one (IP, domain) pair: (proxy reported through, until, count).
type Reports = Vec<(ObjectId, i64, u32)>;

/// Every ban by exit IP and domain, with the proxies it was reported through.
#[derive(Debug, Default)]
pub struct BanIndex {
    by_ip: HashMap<String, HashMap<String, Reports>>,
}

impl BanIndex {
    /// Adds the bans reported through `proxy`.
    pub fn add(&mut self, proxy: ObjectId, bans: &[Ban]) {
        for b in bans {
            self.by_ip
                .entry(b.ip.clone())
                .or_default()
                .entry(b.domain.clone())
                .or_default()
                .push((proxy, b.until_ms, b.count));
        }
    }

    /// Removes the bans reported through `proxy`.
    pub fn remove(&mut self, proxy: ObjectId, bans: &[Ban]) {
        for b in bans {
            let Some(domains) = self.by_ip.get_mut(&b.ip) else { continue };
            if let Some(reporters) = domains.get_mut(&b.domain) {
                reporters.retain(|(p, until, _)| !(*p == proxy && *until == b.until_ms));
                if reporters.is_empty() {
                    domains.remove(&b.domain);
                }
            }
            if domains.is_empty() {
                self.by_ip.remove(&b.ip);
            }
        }
    }

    /// The latest ban of `(ip, domain)`, expired or not: (until, count).
    pub fn latest(&self, ip: &str, domain: &str) -> Option<(i64, u32)> {
        self.by_ip.get(ip)?.get(domain)?.iter().map(|(_, until, count)| (*until, *count)).max()
    }

    /// The proxies a ban of `(ip, domain)` was reported through.
    pub fn reporters(&self, ip: &str, domain: &str) -> Vec<ObjectId> {
        let mut ids: Vec<ObjectId> = self
            .by_ip
            .get(ip)
            .and_then(|d| d.get(domain))
            .map(|r| r.iter().map(|(p, _, _)| *p).collect())
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Every site `ip` has a ban for, with its latest end (ended ones included until they are forgotten).
    pub fn on_ip(&self, ip: &str) -> Vec<(String, i64)> {
        self.by_ip
            .get(ip)
            .map(|domains| {
                domains
                    .iter()
                    .filter_map(|(d, r)| Some((d.clone(), r.iter().map(|(_, until, _)| *until).max()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `ip` is banned for `domain` at `now_ms`.
    pub fn banned(&self, ip: &str, domain: &str, now_ms: i64) -> bool {
        self.latest(ip, domain).is_some_and(|(until, _)| until > now_ms)
    }

    /// Bans in force at `now_ms` (for metrics).
    pub fn active(&self, now_ms: i64) -> usize {
        self.by_ip
            .values()
            .flat_map(HashMap::values)
            .filter(|reporters| reporters.iter().any(|(_, until, _)| *until > now_ms))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn bans_double_on_repeat_up_to_the_max_and_start_over_once_forgotten() {
        let policy = BanPolicy { base_ms: 10 * MIN, max_ms: 60 * MIN };
        let first = policy.next("1.2.3.4", "a.example", Outcome::Blocked, None, 0);
        assert_eq!((first.count, first.until_ms), (1, 10 * MIN));
        let second = policy.next("1.2.3.4", "a.example", Outcome::Captcha, Some((first.until_ms, 1)), 11 * MIN);
        assert_eq!((second.count, second.until_ms), (2, 31 * MIN));
        let capped = policy.next("1.2.3.4", "a.example", Outcome::Blocked, Some((0, 9)), 1);
        assert_eq!(capped.until_ms, 1 + 60 * MIN, "never longer than the max");
        let forgotten = policy.next("1.2.3.4", "a.example", Outcome::Blocked, Some((10 * MIN, 5)), 71 * MIN);
        assert_eq!(forgotten.count, 1, "a max past the last ban's end, it starts over");
    }

    #[test]
    fn the_index_finds_a_ban_through_any_reporter_and_forgets_removed_ones() {
        let (a, b) = (ObjectId::new(), ObjectId::new());
        let ban = |until_ms, count| Ban {
            ip: "1.2.3.4".into(),
            domain: "a.example".into(),
            until_ms,
            count,
            reason: Outcome::Blocked,
        };
        let mut idx = BanIndex::default();
        idx.add(a, &[ban(100, 1)]);
        idx.add(b, &[ban(300, 2)]);
        assert!(idx.banned("1.2.3.4", "a.example", 200));
        assert!(!idx.banned("1.2.3.4", "b.example", 0), "another domain is not banned");
        assert!(!idx.banned("5.6.7.8", "a.example", 0), "another IP is not banned");
        assert_eq!(idx.latest("1.2.3.4", "a.example"), Some((300, 2)));
        idx.remove(b, &[ban(300, 2)]);
        assert!(!idx.banned("1.2.3.4", "a.example", 200));
        assert_eq!(idx.active(50), 1);
        idx.remove(a, &[ban(100, 1)]);
        assert_eq!(idx.latest("1.2.3.4", "a.example"), None);
    }
}
