//! The engine's one clock: every time-based decision (lease expiry, lock deadlines, the drain's wait, forgetting
//! request ids) is measured on it, never on a replica's own wall clock.
//!
//! Its readings come from the log. Each batch carries the time its leader decided it (`at_ms`), and a replica that
//! takes over first appends a barrier and reads the time the NATS server stored it. The clock is the latest of
//! those readings carried forward on this process's monotonic clock, so it never runs backwards across a
//! hand-over, and a replica whose wall clock is minutes off expires nothing early or late: the wall clock is read
//! nowhere here.

use std::time::Instant;

/// A clock that only moves forward, set from the log's timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The latest reading, epoch ms.
    base_ms: i64,
    /// When it was taken, on the monotonic clock.
    at: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::starting_at(0)
    }
}

impl Clock {
    /// A clock that reads `ms` now.
    pub fn starting_at(ms: i64) -> Self {
        Self { base_ms: ms, at: Instant::now() }
    }

    /// Now, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.base_ms.saturating_add(i64::try_from(self.at.elapsed().as_millis()).unwrap_or(i64::MAX / 2))
    }

    /// Takes a reading from the log: moves forward to `ms` if that is later than now, never back.
    pub fn observe(&mut self, ms: i64) {
        if ms > self.now_ms() {
            *self = Self::starting_at(ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_forward_only() {
        let mut c = Clock::starting_at(1_000);
        c.observe(500);
        assert!(c.now_ms() >= 1_000, "an older reading does not set it back");
        c.observe(10_000);
        assert!(c.now_ms() >= 10_000);
        assert!(c.now_ms() < 11_000);
    }
}
