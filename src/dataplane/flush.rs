//! The data plane's counter flush: once a second each worker (tokio or completion)
//! publishes its worker-owned counters ([`super::stats`]) and its buffer pool's use as
//! metrics, and records per-hybrid-connection totals for the status pages ([`Totals`]).
//!
//! The data plane owns this; telemetry only reads (it describes the metric names below and
//! serves what the recorder holds). Without a recorder installed the metric updates are
//! no-ops; the totals are kept either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, counter, gauge};

use super::{Workers, pool, stats};

/// Bytes of pooled buffers in use, per role and worker.
pub const POOL_IN_USE: &str = "hyrelay_buffer_pool_in_use_bytes";
/// The buffer budget in bytes, per role and worker.
pub const POOL_BUDGET: &str = "hyrelay_buffer_pool_budget_bytes";
/// `hyrelay_{role}_active_tunnels`.
pub fn active_tunnels(role: &str) -> String {
    format!("hyrelay_{role}_active_tunnels")
}

/// `hyrelay_{role}_bytes_total` (label `direction` = `up`, towards the endpoint, or `down`).
pub fn bytes_total(role: &str) -> String {
    format!("hyrelay_{role}_bytes_total")
}

/// `hyrelay_{role}_tunnels_total`.
pub fn tunnels_total(role: &str) -> String {
    format!("hyrelay_{role}_tunnels_total")
}

/// Per-hybrid-connection totals of one role, summed over workers; for status pages.
#[derive(Debug, Default)]
pub struct Totals {
    by_hc: Mutex<HashMap<String, HashMap<usize, HcTotal>>>,
}

/// Totals of one hybrid connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HcTotal {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub active: i64,
    pub opened: u64,
}

impl Totals {
    fn set(&self, hc: &str, worker: usize, t: HcTotal) {
        let mut m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(hc.to_owned()).or_default().insert(worker, t);
    }

    /// The totals of `hc` (case as recorded), summed over workers.
    pub fn get(&self, hc: &str) -> HcTotal {
        let m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        m.get(hc).map(sum).unwrap_or_default()
    }

    /// Like [`Totals::get`], matching the name case-insensitively.
    pub fn get_ci(&self, hc: &str) -> HcTotal {
        let m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(hc))
            .map(|(_, w)| sum(w))
            .fold(HcTotal::default(), add)
    }
}

fn add(a: HcTotal, t: HcTotal) -> HcTotal {
    HcTotal {
        bytes_up: a.bytes_up + t.bytes_up,
        bytes_down: a.bytes_down + t.bytes_down,
        active: a.active + t.active,
        opened: a.opened + t.opened,
    }
}

fn sum(per_worker: &HashMap<usize, HcTotal>) -> HcTotal {
    per_worker.values().copied().fold(HcTotal::default(), add)
}

/// Metric handles and last published values of one hybrid connection on one worker.
struct Published {
    up: Counter,
    down: Counter,
    opened: Counter,
    active: Gauge,
    last: HcTotal,
}

/// Starts, on every worker, a task that publishes the worker's counters once a second
/// (and on the completion workers, if the data plane has them).
pub fn spawn(workers: &Arc<Workers>, role: &'static str, totals: Arc<Totals>) {
    for i in 0..workers.len() {
        let totals = totals.clone();
        workers.spawn_on(i, move || flush_loop(role, i, totals));
    }
    super::offload::spawn_flush(workers, role, totals);
}

async fn flush_loop(role: &'static str, worker: usize, totals: Arc<Totals>) {
    let mut flush = WorkerFlush::new(role, worker, totals);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        pool::trim();
        flush.flush(pool::stats());
    }
}

/// Publishes one worker thread's counters: call [`WorkerFlush::flush`] on that thread.
pub struct WorkerFlush {
    role: &'static str,
    worker: usize,
    totals: Arc<Totals>,
    published: HashMap<String, Published>,
    pool_in_use: Gauge,
    pool_budget: Gauge,
}

impl WorkerFlush {
    /// For worker `worker` (its index in [`Totals`] and its `worker` label).
    pub fn new(role: &'static str, worker: usize, totals: Arc<Totals>) -> Self {
        let worker_label = worker.to_string();
        Self {
            role,
            worker,
            totals,
            published: HashMap::new(),
            pool_in_use: gauge!(POOL_IN_USE, "role" => role, "worker" => worker_label.clone()),
            pool_budget: gauge!(POOL_BUDGET, "role" => role, "worker" => worker_label),
        }
    }

    /// Publishes this thread's counters and the given buffer counters.
    pub fn flush(&mut self, ps: pool::PoolStats) {
        let (role, worker, totals) = (self.role, self.worker, &self.totals);
        let published = &mut self.published;
        stats::for_each(|hc, c| {
            let now = HcTotal {
                bytes_up: c.bytes_up.get(),
                bytes_down: c.bytes_down.get(),
                active: c.active.get(),
                opened: c.opened.get(),
            };
            totals.set(hc, worker, now);
            let p = published.entry(hc.to_owned()).or_insert_with(|| Published {
                up: counter!(bytes_total(role), "hc" => hc.to_owned(), "direction" => "up"),
                down: counter!(bytes_total(role), "hc" => hc.to_owned(), "direction" => "down"),
                opened: counter!(tunnels_total(role), "hc" => hc.to_owned()),
                active: gauge!(active_tunnels(role), "hc" => hc.to_owned()),
                last: HcTotal::default(),
            });
            p.up.increment(now.bytes_up - p.last.bytes_up);
            p.down.increment(now.bytes_down - p.last.bytes_down);
            p.opened.increment(now.opened - p.last.opened);
            p.active.increment((now.active - p.last.active) as f64);
            p.last = now;
        });
        self.pool_in_use.set((ps.in_use * pool::BUF_SIZE) as f64);
        self.pool_budget.set((ps.budget * pool::BUF_SIZE) as f64);
    }
}
