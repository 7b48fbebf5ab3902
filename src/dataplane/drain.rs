//! Graceful drain, shared by the three roles: stop taking new work, let what is running
//! finish up to a deadline, then stop hard.
//!
//! A role cancels its *drain* token (accept loops and control channels end; tunnels keep
//! going), waits with [`wait_idle`] until its in-flight count reaches zero, the timeout
//! passes or someone forces the end, then cancels its *shutdown* token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How a drain went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Work still running when the drain ended (0 = everything finished).
    pub remaining: usize,
    pub waited: Duration,
    /// Ended by [`Force`] rather than by finishing or timing out.
    pub forced: bool,
}

impl DrainReport {
    /// Logs the `drain_finished` event of `role` and hands the report on.
    pub fn logged(self, role: &'static str) -> Self {
        tracing::info!(
            event = "drain_finished",
            role,
            remaining = self.remaining,
            waited_ms = self.waited.as_millis() as u64,
            "drain finished"
        );
        self
    }
}

/// Lets another thread (a second Ctrl-C) cut a drain short.
#[derive(Debug, Clone, Default)]
pub struct Force(Arc<AtomicBool>);

impl Force {
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Blocks until `inflight()` is 0, `timeout` passes or `force` is set; polls every 50 ms.
pub fn wait_idle(inflight: impl Fn() -> usize, timeout: Duration, force: &Force) -> DrainReport {
    let started = Instant::now();
    loop {
        let n = inflight();
        if n == 0 || started.elapsed() >= timeout || force.is_set() {
            return DrainReport {
                remaining: n,
                waited: started.elapsed(),
                forced: force.is_set() && n > 0,
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A count of running things with RAII guards.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Counts one running thing while it lives.
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_guards_or_timeout_or_force() {
        let f = InFlight::default();
        let g = f.enter();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(g);
        });
        let c = f.clone();
        let r = wait_idle(move || c.count(), Duration::from_secs(5), &Force::default());
        assert_eq!(r.remaining, 0);
        t.join().unwrap();
        let _g = f.enter();
        let c = f.clone();
        let r = wait_idle(move || c.count(), Duration::from_millis(100), &Force::default());
        assert_eq!((r.remaining, r.forced), (1, false));
        let force = Force::default();
        force.trigger();
        let c = f.clone();
        let r = wait_idle(move || c.count(), Duration::from_secs(60), &force);
        assert!(r.forced && r.waited < Duration::from_secs(1));
    }
}
