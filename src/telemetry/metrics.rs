//! Prometheus metrics: names, descriptions and the process-wide recorder. The data plane's
//! own metrics (bytes, tunnels, buffer pool) are published by the data plane's per-worker
//! flush ([`crate::dataplane::flush`]); this module only names and describes them.
//!
//! Hot path rule (runtime-notes.md §5): tunnels only add to worker-owned `Cell`s
//! ([`crate::dataplane::stats`]); each worker's flush task publishes the deltas. Control
//! paths (a connect, a dial, a reconnect) update metrics directly; that is once per
//! connection, not per frame. Label values come from bounded sets: hybrid connection names
//! from configuration or the relay's state, and fixed result/reason words.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// The data plane's metrics are its own; these names are re-exported for readers.
pub use crate::dataplane::flush::{
    HcTotal, POOL_BUDGET, POOL_IN_USE, Totals, active_tunnels, bytes_total, tunnels_total,
};

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
pub const RELAY_POOLED: &str = "hyrelay_relay_pooled_rendezvous_total";
pub const HCM_CHANNEL_UP: &str = "hyrelay_hcm_control_channel_up";
pub const HCM_RECONNECTS: &str = "hyrelay_hcm_reconnects_total";
pub const HCM_ACCEPTS: &str = "hyrelay_hcm_accepts_total";
pub const HCM_DIALS: &str = "hyrelay_hcm_endpoint_dials_total";
pub const HCM_DIAL_SECONDS: &str = "hyrelay_hcm_endpoint_dial_seconds";
pub const BRIDGE_LOCAL_CONNECTIONS: &str = "hyrelay_bridge_local_connections_total";
pub const BRIDGE_RELAY_CONNECTS: &str = "hyrelay_bridge_relay_connects_total";
pub const WORKERS: &str = "hyrelay_workers";
pub const BUILD_INFO: &str = "hyrelay_build_info";

/// `hyrelay_{role}_warm_connections`: connections opened ahead of the tunnels that will
/// use them (hyrelay extensions).
pub fn warm_connections(role: &str) -> String {
    format!("hyrelay_{role}_warm_connections")
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
    describe_counter!(RELAY_CONTROL_CLOSED, "Listener control channels closed, by reason.");
    describe_counter!(RELAY_TOKEN_RENEWALS, "renewToken messages from listeners, by result.");
    describe_counter!(
        RELAY_POOLED,
        "Senders joined to a pooled rendezvous connection (hyrelay extension), per hybrid connection."
    );
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
        describe_gauge!(
            warm_connections(role),
            "Connections opened ahead of their tunnels, per hybrid connection (relay: pooled rendezvous waiting; hcm: pooled rendezvous open; bridge: relay connections with TCP and TLS done)."
        );
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

/// Runs the exporter's upkeep (drains histogram buffers) every 5 s; call on a control runtime.
pub async fn upkeep_loop() {
    let Some(h) = handle() else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        h.run_upkeep();
    }
}
