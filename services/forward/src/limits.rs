//! Connection limits: in all (`FORWARD_MAX_CONNS`), per client IP (`FORWARD_MAX_CONNS_PER_IP`) and per consumer name
//! (`FORWARD_MAX_CONNS_PER_CONSUMER`). A permit is held for the life of the connection and its tunnel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The counters, shared by both doors.
#[derive(Debug)]
pub struct Limits {
    total: Arc<tokio::sync::Semaphore>,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// A held connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    key: Option<String>,
    open: Arc<Mutex<HashMap<String, usize>>>,
    _total: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        if let Ok(mut open) = self.open.lock() {
            if let Some(n) = open.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

impl Limits {
    /// `total` connections in all.
    pub fn new(total: usize) -> Self {
        Self { total: Arc::new(tokio::sync::Semaphore::new(total)), open: Arc::default() }
    }

    /// A slot among all connections, `None` when full.
    pub fn connection(&self) -> Option<Permit> {
        let p = self.total.clone().try_acquire_owned().ok()?;
        Some(Permit { key: None, open: self.open.clone(), _total: Some(p) })
    }

    /// A slot for `key` (`ip:…`, `consumer:…`), `None` when that key has `limit` open.
    pub fn enter(&self, key: String, limit: usize) -> Option<Permit> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Permit { key: Some(key), open: self.open.clone(), _total: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_in_all() {
        let l = Limits::new(3);
        let a = l.enter("ip:1".into(), 2);
        let b = l.enter("ip:1".into(), 2);
        assert!(a.is_some() && b.is_some());
        assert!(l.enter("ip:1".into(), 2).is_none(), "the third from one IP");
        assert!(l.enter("ip:2".into(), 2).is_some());
        drop(a);
        assert!(l.enter("ip:1".into(), 2).is_some(), "a slot freed");
        let all: Vec<_> = (0..3).filter_map(|_| l.connection()).collect();
        assert_eq!(all.len(), 3);
        assert!(l.connection().is_none());
    }
}
