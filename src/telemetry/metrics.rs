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

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
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
/// Request heads read on connections kept after a tunnel (the `reuse` extension).
pub const RELAY_KEPT_REQUESTS: &str = "hyrelay_relay_kept_connection_requests_total";
/// Pooled rendezvous connections back in the pool after a tunnel (the `reuse` extension).
pub const RELAY_REPOOLED: &str = "hyrelay_relay_repooled_connections_total";
pub const RELAY_HTTP_REQUESTS: &str = "hyrelay_relay_http_requests_total";
pub const RELAY_HTTP_SECONDS: &str = "hyrelay_relay_http_request_seconds";
pub const RELAY_HTTP_RENDEZVOUS: &str = "hyrelay_relay_http_rendezvous_total";
pub const HCM_HTTP_REQUESTS: &str = "hyrelay_hcm_http_requests_total";
pub const HCM_HTTP_SECONDS: &str = "hyrelay_hcm_http_request_seconds";
pub const HCM_HTTP_RENDEZVOUS_IDLE: &str = "hyrelay_hcm_http_rendezvous_idle_closed_total";
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
/// `hyrelay_{role}_reused_connections_total`: connections to the relay that came back
/// after a tunnel to carry another (the `reuse` extension; hcm and bridge).
pub fn reused_connections(role: &str) -> String {
    format!("hyrelay_{role}_reused_connections_total")
}
/// `result` of [`RELAY_SENDER_CONNECTS`] (`relay/sender.rs`).
pub const SENDER_RESULTS: &[&str] = &[
    "accepted",
    "rejected",
    "no_listener",
    "auth_failed",
    "timeout",
    "not_found",
    "abandoned",
];
/// `reason` of [`RELAY_CONTROL_CLOSED`] (`relay/listener.rs`).
pub const CONTROL_CLOSED_REASONS: &[&str] = &[
    "listener_closed",
    "connection_lost",
    "protocol_error",
    "closed_by_relay",
    "shutdown",
    "dead",
    "token_expired",
    "token_rejected",
    "key_revoked",
    "io_error",
    "stalled",
];
/// `result` of [`RELAY_TOKEN_RENEWALS`].
pub const RENEWAL_RESULTS: &[&str] = &["ok", "rejected"];
/// `reason` of [`HCM_RECONNECTS`] (`hcm/channel.rs`).
pub const RECONNECT_REASONS: &[&str] = &[
    "unreachable",
    "auth_failed",
    "token_expired",
    "closed_by_relay",
    "dead",
    "configuration",
    "error",
];
/// `result` of [`HCM_DIALS`] (`hcm/accept.rs`).
pub const DIAL_RESULTS: &[&str] = &["ok", "refused", "timeout", "dns", "error"];
/// `result` of [`BRIDGE_RELAY_CONNECTS`] (`bridge/mod.rs`).
pub const BRIDGE_RESULTS: &[&str] = &["ok", "no_listener", "auth_failed", "rejected", "unreachable", "error"];
/// `direction` of `hyrelay_{role}_bytes_total`: `up` is towards the endpoint.
pub const DIRECTIONS: &[&str] = &["up", "down"];

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

/// A HELP text that ends by naming every value of its label: `"{text}, by {label}: a, b, c."`.
pub fn help_with(text: &str, label: &str, values: &[&str]) -> String {
    format!("{text}, by {label}: {}.", values.join(", "))
}

fn describe() {
    describe_gauge!(
        RELAY_LISTENERS,
        "Listeners (hcm control channels) connected, per hybrid connection."
    );
    describe_counter!(
        RELAY_SENDER_CONNECTS,
        help_with("Sender connects per hybrid connection", "result", SENDER_RESULTS)
    );
    describe_histogram!(
        RELAY_RENDEZVOUS_SECONDS,
        "Time from a sender's connect to the listener's rendezvous, per tunnel."
    );
    describe_counter!(
        RELAY_CONTROL_CLOSED,
        help_with("Listener control channels closed", "reason", CONTROL_CLOSED_REASONS)
    );
    describe_counter!(
        RELAY_TOKEN_RENEWALS,
        help_with("renewToken messages from listeners", "result", RENEWAL_RESULTS)
    );
    describe_counter!(
        RELAY_POOLED,
        "Senders joined to a pooled rendezvous connection (hyrelay extension), per hybrid connection."
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
        RELAY_HTTP_RENDEZVOUS,
        "HTTP-mode rendezvous connections per hybrid connection: how=opened (a listener connected), reused (a request answered on a kept one), closed_by_listener (a kept one closed instead of answering; the request was sent afresh)."
    );
    describe_counter!(
        HCM_HTTP_REQUESTS,
        "HTTP-mode requests forwarded to the endpoint, by hybrid connection and status."
    );
    describe_histogram!(
        HCM_HTTP_SECONDS,
        "HTTP-mode requests: request to the endpoint's response head."
    );
    describe_counter!(
        HCM_HTTP_RENDEZVOUS_IDLE,
        "HTTP-mode rendezvous the hcm closed because no further request came on them within http_rendezvous_idle, per hybrid connection."
    );
    describe_gauge!(
        HCM_CHANNEL_UP,
        "1 while the hcm's control channel for the hybrid connection is up."
    );
    describe_counter!(
        HCM_RECONNECTS,
        help_with(
            "Control channel reconnects per hybrid connection",
            "reason",
            RECONNECT_REASONS
        )
    );
    describe_counter!(HCM_ACCEPTS, "accept notifications received from the relay.");
    describe_counter!(
        HCM_DIALS,
        help_with("Endpoint dials per hybrid connection", "result", DIAL_RESULTS)
    );
    describe_histogram!(HCM_DIAL_SECONDS, "Time to connect to the endpoint, per tunnel.");
    describe_counter!(BRIDGE_LOCAL_CONNECTIONS, "App connections accepted by the bridge.");
    describe_counter!(
        BRIDGE_RELAY_CONNECTS,
        help_with(
            "Bridge connects to the relay per hybrid connection",
            "result",
            BRIDGE_RESULTS
        )
    );
    for role in ["relay", "hcm", "bridge"] {
        describe_gauge!(active_tunnels(role), "Tunnels open now, per hybrid connection.");
        describe_counter!(
            bytes_total(role),
            help_with(
                "Payload bytes relayed per hybrid connection (up = towards the endpoint)",
                "direction",
                DIRECTIONS
            )
        );
        describe_counter!(tunnels_total(role), "Tunnels opened, per hybrid connection.");
        describe_gauge!(
            warm_connections(role),
            "Connections opened ahead of their tunnels, per hybrid connection (relay: pooled rendezvous waiting; hcm: pooled rendezvous open; bridge: relay connections with TCP and TLS done)."
        );
    }
    for role in ["hcm", "bridge"] {
        describe_counter!(
            reused_connections(role),
            "Connections to the relay kept after a tunnel to carry another (hyrelay extension `reuse`), per hybrid connection (hcm: back to waiting in the pool; bridge: back in the warm queue)."
        );
    }
    describe_counter!(
        RELAY_REPOOLED,
        "Pooled rendezvous connections back in the pool after their tunnel ended normally (hyrelay extension `reuse`), per hybrid connection."
    );
    describe_counter!(
        RELAY_KEPT_REQUESTS,
        "Request heads read on connections kept after a tunnel (hyrelay extension `reuse`), by the hybrid connection of the tunnel they carried before."
    );
    describe_gauge!(POOL_IN_USE, "Bytes of pooled data-plane buffers in use, per worker.");
    describe_gauge!(POOL_BUDGET, "Budget of pooled data-plane buffers in bytes, per worker.");
    describe_gauge!(WORKERS, "Data-plane worker threads.");
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the version and the role.");
    describe_cluster();
}

/// The relay cluster's families (`relay::cluster::metric`), which only a clustered relay has.
fn describe_cluster() {
    use crate::relay::cluster::metric;
    describe_gauge!(metric::REDIS_UP, "1 while this relay node reaches the cluster's Redis.");
    describe_gauge!(
        metric::CATALOG_VERSION,
        "Version of the cluster catalog (hybrid connections, rules, keys) this node serves."
    );
    describe_gauge!(metric::NODES, "Relay nodes in the cluster, this one included.");
    describe_counter!(
        metric::ROUTED,
        help_with(
            help_with(
                "Listener commands routed to or from another node",
                "direction",
                &["to", "from"]
            )
            .trim_end_matches('.'),
            "result",
            &["ok", "failed"]
        )
    );
    describe_histogram!(
        metric::ROUTE_SECONDS,
        "Time to hand a command to a listener on another node."
    );
}

/// Makes every per-hybrid-connection series of `role` exist for `hc` (at zero when it had
/// none): a configured but idle hybrid connection then shows in `/metrics` with zeros, so
/// rates and alerts see it before its first tunnel. Only registers; a value already
/// counted is not touched. Histograms are left out (they show once something was timed).
pub fn register_hc(role: &str, hc: &str) {
    if handle().is_none() {
        return;
    }
    let hc = hc.to_owned();
    let each = |name: &'static str, label: &'static str, values: &[&'static str]| {
        for v in values {
            counter!(name, "hc" => hc.clone(), label => *v).increment(0);
        }
    };
    for d in DIRECTIONS {
        counter!(bytes_total(role), "hc" => hc.clone(), "direction" => *d).increment(0);
    }
    counter!(tunnels_total(role), "hc" => hc.clone()).increment(0);
    gauge!(active_tunnels(role), "hc" => hc.clone()).increment(0.0);
    match role {
        "relay" => {
            gauge!(RELAY_LISTENERS, "hc" => hc.clone()).increment(0.0);
            each(RELAY_SENDER_CONNECTS, "result", SENDER_RESULTS);
        }
        "hcm" => {
            gauge!(HCM_CHANNEL_UP, "hc" => hc.clone()).increment(0.0);
            counter!(HCM_ACCEPTS, "hc" => hc.clone()).increment(0);
            each(HCM_DIALS, "result", DIAL_RESULTS);
            each(HCM_RECONNECTS, "reason", RECONNECT_REASONS);
        }
        "bridge" => {
            counter!(BRIDGE_LOCAL_CONNECTIONS, "hc" => hc.clone()).increment(0);
            each(BRIDGE_RELAY_CONNECTS, "result", BRIDGE_RESULTS);
        }
        _ => {}
    }
}

/// Makes the process-wide series exist at zero: control channels closed by every reason,
/// token renewals by every result.
fn register_process_wide() {
    for r in CONTROL_CLOSED_REASONS {
        counter!(RELAY_CONTROL_CLOSED, "reason" => *r).increment(0);
    }
    for r in RENEWAL_RESULTS {
        counter!(RELAY_TOKEN_RENEWALS, "result" => *r).increment(0);
    }
}

/// The `/metrics` page: the recorder's families (after making `hcs`' series exist, as
/// `(role, hybrid connection)`) followed by the standard process metrics.
pub fn render(hcs: &[(&'static str, String)]) -> String {
    let Some(h) = handle() else {
        return super::process::render();
    };
    for (role, hc) in hcs {
        register_hc(role, hc);
    }
    let mut out = h.render();
    out.push_str(&super::process::render());
    out
}

/// Sets the static gauges of a role: build info and worker count.
pub fn announce(role: &'static str, workers: usize) {
    if handle().is_none() {
        return;
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "role" => role).set(1.0);
    gauge!(WORKERS, "role" => role).set(workers as f64);
    if role == "relay" {
        register_process_wide();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Families registered outside this file (the relay cluster's) have HELP too, naming
    /// their label values.
    #[test]
    fn cluster_families_have_help() {
        let h = handle().expect("the recorder installs");
        use crate::relay::cluster::metric;
        counter!(metric::ROUTED, "direction" => "from", "result" => "failed").increment(1);
        gauge!(metric::REDIS_UP).set(1.0);
        let text = h.render();
        assert!(
            text.contains("# HELP hyrelay_cluster_accepts_routed_total Listener commands routed to or from another node, by direction: to, from, by result: ok, failed.\n"),
            "{text}"
        );
        assert!(text.contains("# HELP hyrelay_cluster_redis_up 1 while"), "{text}");
    }
}
