//! A closed-loop load generator: `c` workers each run one operation after another for a fixed time.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one measurement saw.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Successful operations.
    pub ok: u64,
    /// Failed operations (not counted in throughput).
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of successful operations, microseconds.
    pub hist: Histogram<u64>,
    /// Logical operations per measured call (bulk writes).
    pub scale: u64,
}

impl Stats {
    /// Successful logical operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        (self.ok * self.scale) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Median latency of one call, ms.
    pub fn p50_ms(&self) -> f64 {
        self.hist.value_at_quantile(0.5) as f64 / 1000.0
    }

    /// 99th percentile latency of one call, ms.
    pub fn p99_ms(&self) -> f64 {
        self.hist.value_at_quantile(0.99) as f64 / 1000.0
    }

    /// The same stats, each call counting as `n` logical operations.
    pub fn scaled(mut self, n: u64) -> Self {
        self.scale = n;
        self
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>9.0} ops/s  p50 {:>8.2} ms  p99 {:>8.2} ms  errors {}",
            self.ops_per_sec(),
            self.p50_ms(),
            self.p99_ms(),
            self.errors
        )
    }
}

/// Runs `op(worker)` in `clients` concurrent loops for `dur`.
pub async fn measure<F, Fut>(clients: usize, dur: Duration, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static + Clone,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let deadline = start + dur;
    let workers = (0..clients).map(|w| {
        let op = op.clone();
        tokio::spawn(async move {
            let mut hist = Some(new_hist());
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut first_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(w).await {
                    Ok(()) => {
                        ok += 1;
                        if let Some(h) = hist.as_mut() {
                            let _ = h.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (ok, errors, hist, first_error)
        })
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = start.elapsed();
    let mut total = Stats { ok: 0, errors: 0, elapsed, hist: new_hist(), scale: 1 };
    for (ok, errors, hist, first_error) in results.into_iter().flatten() {
        total.ok += ok;
        total.errors += errors;
        if let Some(h) = hist {
            let _ = total.hist.add(h);
        }
        if let Some(e) = first_error {
            eprintln!("  (first error of a worker: {e})");
        }
    }
    total
}

/// A histogram of 1 µs to 120 s at 3 significant digits.
#[allow(clippy::expect_used)] // Constant, valid bounds: the constructor cannot fail.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}
