//! Prometheus metrics: names, descriptions, the process-wide recorder, and the per-worker
//! flush that turns the data plane's plain counters into metric updates once a second.
//!
//! Hot path rule (runtime-notes.md §5): tunnels only add to worker-owned `Cell`s
//! ([`crate::dataplane::stats`]); each worker's flush task publishes the deltas. Control
//! paths (a connect, a dial, a reconnect) update metrics directly; that is once per
//! connection, not per frame. Label values come from bounded sets: hybrid connection names
//! from configuration or the relay's state, and fixed result/reason words.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::dataplane::{Workers, pool, stats};

/// Histogram buckets for `*_seconds` metrics.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Label value for a request whose hybrid connection does not exist (never the peer's string).
pub const UNKNOWN_HC: &str = "(unknown)";

pub const RELAY_LISTENERS: &str = "hyrelay_relay_listeners";
pub const RELAY_SENDER_CONNECTS: &str = "hyrelay_relay_sender_connects_total";
pub const RELAY_RENDEZVOUS_SECONDS: &str = "hyrelay_relay_rendezvous_seconds";
pub const RELAY_CONTROL_CLOSED: &str = "hyrelay_relay_control_channels_closed_total";
pub const RELAY_TOKEN_RENEWALS: &str = "hyrelay_relay_token_renewals_total";
pub const RELAY_HTTP_REQUESTS: &str = "hyrelay_relay_http_requests_total";
pub const RELAY_HTTP_SECONDS: &str = "hyrelay_relay_http_request_seconds";
pub const HCM_HTTP_REQUESTS: &str = "hyrelay_hcm_http_requests_total";
pub const HCM_HTTP_SECONDS: &str = "hyrelay_hcm_http_request_seconds";
pub const HCM_CHANNEL_UP: &str = "hyrelay_hcm_control_channel_up";
pub const HCM_RECONNECTS: &str = "hyrelay_hcm_reconnects_total";
pub const HCM_ACCEPTS: &str = "hyrelay_hcm_accepts_total";
pub const HCM_DIALS: &str = "hyrelay_hcm_endpoint_dials_total";
pub const HCM_DIAL_SECONDS: &str = "hyrelay_hcm_endpoint_dial_seconds";
pub const BRIDGE_LOCAL_CONNECTIONS: &str = "hyrelay_bridge_local_connections_total";
pub const BRIDGE_RELAY_CONNECTS: &str = "hyrelay_bridge_relay_connects_total";
pub const POOL_IN_USE: &str = "hyrelay_buffer_pool_in_use_bytes";
pub const POOL_BUDGET: &str = "hyrelay_buffer_pool_budget_bytes";
pub const WORKERS: &str = "hyrelay_workers";
pub const BUILD_INFO: &str = "hyrelay_build_info";

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

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use; `None` if another
/// recorder was installed first (then metrics go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?;
            let h = builder.install_recorder().ok()?;
            describe();
            Some(h)
        })
        .as_ref()
}

fn describe() {
    describe_gauge!(
        RELAY_LISTENERS,
        "Listeners (hcm control channels) connected, per hybrid connection."
    );
    describe_counter!(
        RELAY_SENDER_CONNECTS,
        "Sender connects by result: accepted, rejected, no_listener, auth_failed, timeout, not_found."
    );
    describe_histogram!(
        RELAY_RENDEZVOUS_SECONDS,
        "Time from a sender's connect to the listener's rendezvous, per tunnel."
    );
    describe_counter!(
        RELAY_HTTP_REQUESTS,
        "HTTP-mode requests by hybrid connection and status (common codes by number, others by class)."
    );
    describe_histogram!(
        RELAY_HTTP_SECONDS,
        "HTTP-mode requests: arrival to the response head, per hybrid connection."
    );
    describe_counter!(
        HCM_HTTP_REQUESTS,
        "HTTP-mode requests forwarded to the endpoint, by hybrid connection and status."
    );
    describe_histogram!(
        HCM_HTTP_SECONDS,
        "HTTP-mode requests: request to the endpoint's response head."
    );
    describe_counter!(RELAY_CONTROL_CLOSED, "Listener control channels closed, by reason.");
    describe_counter!(RELAY_TOKEN_RENEWALS, "renewToken messages from listeners, by result.");
    describe_gauge!(
        HCM_CHANNEL_UP,
        "1 while the hcm's control channel for the hybrid connection is up."
    );
    describe_counter!(HCM_RECONNECTS, "Control channel reconnects, by reason.");
    describe_counter!(HCM_ACCEPTS, "accept notifications received from the relay.");
    describe_counter!(HCM_DIALS, "Endpoint dials by result: ok, refused, timeout, dns, error.");
    describe_histogram!(HCM_DIAL_SECONDS, "Time to connect to the endpoint, per tunnel.");
    describe_counter!(BRIDGE_LOCAL_CONNECTIONS, "App connections accepted by the bridge.");
    describe_counter!(
        BRIDGE_RELAY_CONNECTS,
        "Bridge connects to the relay by result: ok, no_listener, auth_failed, rejected, unreachable, error."
    );
    for role in ["relay", "hcm", "bridge"] {
        describe_gauge!(active_tunnels(role), "Tunnels open now, per hybrid connection.");
        describe_counter!(
            bytes_total(role),
            "Payload bytes relayed, per hybrid connection and direction (up = towards the endpoint)."
        );
        describe_counter!(tunnels_total(role), "Tunnels opened, per hybrid connection.");
    }
    describe_gauge!(POOL_IN_USE, "Bytes of pooled data-plane buffers in use, per worker.");
    describe_gauge!(POOL_BUDGET, "Budget of pooled data-plane buffers in bytes, per worker.");
    describe_gauge!(WORKERS, "Data-plane worker threads.");
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the version and the role.");
}

/// Sets the static gauges of a role: build info and worker count.
pub fn announce(role: &'static str, workers: usize) {
    if handle().is_none() {
        return;
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "role" => role).set(1.0);
    gauge!(WORKERS, "role" => role).set(workers as f64);
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
pub fn spawn_worker_flush(workers: &Arc<Workers>, role: &'static str, totals: Arc<Totals>) {
    for i in 0..workers.len() {
        let totals = totals.clone();
        workers.spawn_on(i, move || flush_loop(role, i, totals));
    }
    crate::dataplane::offload::spawn_flush(workers, role, totals);
}

async fn flush_loop(role: &'static str, worker: usize, totals: Arc<Totals>) {
    let mut flush = WorkerFlush::new(role, worker, totals);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        flush.flush(pool::stats());
    }
}

/// Publishes one worker thread's counters: call [`WorkerFlush::flush`] on that thread.
pub struct WorkerFlush {
    role: &'static str,
    worker: usize,
    totals: Arc<Totals>,
    metrics_on: bool,
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
            metrics_on: handle().is_some(),
            published: HashMap::new(),
            pool_in_use: gauge!(POOL_IN_USE, "role" => role, "worker" => worker_label.clone()),
            pool_budget: gauge!(POOL_BUDGET, "role" => role, "worker" => worker_label),
        }
    }

    /// Publishes this thread's counters and the given buffer counters.
    pub fn flush(&mut self, ps: pool::PoolStats) {
        let (role, worker, totals, metrics_on) = (self.role, self.worker, &self.totals, self.metrics_on);
        let published = &mut self.published;
        stats::for_each(|hc, c| {
            let now = HcTotal {
                bytes_up: c.bytes_up.get(),
                bytes_down: c.bytes_down.get(),
                active: c.active.get(),
                opened: c.opened.get(),
            };
            totals.set(hc, worker, now);
            if !metrics_on {
                return;
            }
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

/// Runs the exporter's upkeep (drains histogram buffers) every 5 s; call on a control runtime.
pub async fn upkeep_loop() {
    let Some(h) = handle() else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        h.run_upkeep();
    }
}
