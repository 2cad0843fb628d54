//! Fault points, as TiKV uses `fail-rs`: a named place in the code where a test stops a process or pauses a task at
//! an exact line, so that "a crash between A and B" is tested on every run instead of found by a soak.
//!
//! A service marks the place with `proxypool_faults::point("lease.grant.appended").await`. Unless the `enabled`
//! feature is on, that is an empty inline function. With it on (the system tests' builds only), a point does what
//! a test armed it to do:
//! - **abort** the process on the spot, like SIGKILL (armed in a child process through the environment:
//!   `PROXYPOOL_FAULTS=lease.grant.appended=abort,other.point=abort`);
//! - **pause** the task that reaches it until the test releases it ([`pause`], in-process);
//! - **fail**: the point answers `true` and the code takes its failure path ([`fail`], in-process).
//!
//! An armed pause fires once, a failure the times it was armed for, an abort at the first hit.

#[cfg(feature = "enabled")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use tokio::sync::Notify;

    /// A pause in progress: reached by the code, released by the test.
    #[derive(Debug, Default)]
    pub struct Gate {
        reached: Notify,
        released: Notify,
        state: Mutex<(bool, bool)>,
    }

    impl Gate {
        /// Waits until the code reached the point.
        pub async fn reached(&self) {
            loop {
                let notified = self.reached.notified();
                if self.state.lock().map(|s| s.0).unwrap_or(true) {
                    return;
                }
                notified.await;
            }
        }

        /// Lets the paused code go on.
        pub fn release(&self) {
            if let Ok(mut s) = self.state.lock() {
                s.1 = true;
            }
            self.released.notify_waiters();
        }

        async fn hold(&self) {
            if let Ok(mut s) = self.state.lock() {
                s.0 = true;
            }
            self.reached.notify_waiters();
            loop {
                let notified = self.released.notified();
                if self.state.lock().map(|s| s.1).unwrap_or(true) {
                    return;
                }
                notified.await;
            }
        }
    }

    #[derive(Debug)]
    enum Armed {
        Abort,
        Fail(u32),
        Pause(Arc<Gate>),
    }

    fn points() -> &'static Mutex<HashMap<String, Armed>> {
        static POINTS: OnceLock<Mutex<HashMap<String, Armed>>> = OnceLock::new();
        POINTS.get_or_init(|| {
            let mut armed = HashMap::new();
            for item in std::env::var("PROXYPOOL_FAULTS").unwrap_or_default().split(',') {
                if let Some((name, "abort")) = item.trim().split_once('=') {
                    armed.insert(name.to_owned(), Armed::Abort);
                }
            }
            Mutex::new(armed)
        })
    }

    pub async fn point(name: &str) -> bool {
        // Decided under the lock, acted on after it (a pause must not hold it).
        let hit = match points().lock() {
            Ok(mut points) => match points.remove(name) {
                Some(Armed::Abort) => Some(Armed::Abort),
                Some(Armed::Fail(n)) => {
                    if n > 1 {
                        points.insert(name.to_owned(), Armed::Fail(n - 1));
                    }
                    Some(Armed::Fail(n))
                }
                other => other,
            },
            Err(_) => None,
        };
        match hit {
            Some(Armed::Abort) => {
                tracing::error!(point = name, "fault point: aborting the process");
                std::process::abort();
            }
            Some(Armed::Fail(_)) => {
                tracing::warn!(point = name, "fault point: failing");
                true
            }
            Some(Armed::Pause(gate)) => {
                tracing::warn!(point = name, "fault point: paused");
                gate.hold().await;
                false
            }
            None => false,
        }
    }

    pub fn pause(name: &str) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        if let Ok(mut points) = points().lock() {
            points.insert(name.to_owned(), Armed::Pause(gate.clone()));
        }
        gate
    }

    pub fn fail(name: &str, times: u32) {
        if let Ok(mut points) = points().lock() {
            points.insert(name.to_owned(), Armed::Fail(times));
        }
    }

    pub fn disarm(name: &str) {
        if let Ok(mut points) = points().lock() {
            points.remove(name);
        }
    }
}

#[cfg(feature = "enabled")]
pub use imp::Gate;

/// Marks a fault point. `true`: a test armed it to fail here, take the failure path.
#[inline]
pub async fn point(name: &str) -> bool {
    #[cfg(feature = "enabled")]
    {
        imp::point(name).await
    }
    #[cfg(not(feature = "enabled"))]
    {
        let _ = name;
        false
    }
}

/// Marks a fault point about one thing (a proxy): armed as `name` it fires for any, armed as `name:key` only for
/// that one, so that tests running side by side in one process do not trip each other's points.
#[inline]
pub async fn point_at(name: &str, key: impl std::fmt::Display) -> bool {
    #[cfg(feature = "enabled")]
    {
        imp::point(&format!("{name}:{key}")).await || imp::point(name).await
    }
    #[cfg(not(feature = "enabled"))]
    {
        let _ = (name, &key);
        false
    }
}

/// Arms `name` to pause the next task that reaches it; the returned gate tells when it did and releases it.
#[cfg(feature = "enabled")]
pub fn pause(name: &str) -> std::sync::Arc<Gate> {
    imp::pause(name)
}

/// Arms `name` to fail the next `times` times it is reached.
#[cfg(feature = "enabled")]
pub fn fail(name: &str, times: u32) {
    imp::fail(name, times)
}

/// Disarms `name`.
#[cfg(feature = "enabled")]
pub fn disarm(name: &str) {
    imp::disarm(name)
}

/// The environment that makes a child process abort at each of `names`.
pub fn abort_env(names: &[&str]) -> (&'static str, String) {
    ("PROXYPOOL_FAULTS", names.iter().map(|n| format!("{n}=abort")).collect::<Vec<_>>().join(","))
}

#[cfg(all(test, feature = "enabled"))]
mod tests {
    #[tokio::test]
    async fn pause_fail_and_quiet_points() {
        assert!(!super::point("quiet").await);
        super::fail("f", 2);
        assert!(super::point("f").await);
        assert!(super::point("f").await);
        assert!(!super::point("f").await, "fires the times it was armed for");
        let gate = super::pause("p");
        let task = tokio::spawn(async { super::point("p").await });
        gate.reached().await;
        assert!(!task.is_finished());
        gate.release();
        assert_eq!(task.await.ok(), Some(false));
    }
}
