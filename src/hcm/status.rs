//! The hcm's status for the admin listener, split by segment: relay ↔ hcm (control
//! channel state, since when, reconnects) and hcm ↔ endpoint (last dial), plus traffic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::json;

use super::Shared;
use super::state::{ChannelState, HcStatus};
use crate::telemetry::admin::{Health, Report, Row, StatusSource, human_bytes};
use crate::telemetry::metrics::Totals;

pub(crate) struct HcmStatus {
    pub shared: Arc<Shared>,
    pub totals: Arc<Totals>,
}

/// Healthy when the control channel is up and the last endpoint dial (if any) worked.
pub fn health(s: &HcStatus) -> Health {
    match (s.state, &s.last_dial) {
        (ChannelState::Connected, Some(d)) if !d.ok => Health::Broken,
        (ChannelState::Connected, _) => Health::Ok,
        (ChannelState::Connecting, None) if s.reconnects == 0 => Health::Unknown,
        _ => Health::Broken,
    }
}

/// One status line per segment, for tables.
pub fn segments(s: &HcStatus) -> (String, String) {
    let channel = format!("{:?} since {} ({} reconnects)", s.state, s.since, s.reconnects);
    let dial = match &s.last_dial {
        Some(d) if d.ok => format!("ok in {} ms at {}", d.millis, d.at),
        Some(d) => format!("failed at {}: {}", d.at, d.detail),
        None => "no dial yet".into(),
    };
    (channel, dial)
}

impl StatusSource for HcmStatus {
    fn role(&self) -> &'static str {
        "hcm"
    }

    fn report(&self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        Box::pin(async move {
            let list: Vec<HcStatus> = self.shared.snapshot();
            let ready = list.iter().all(|s| s.state == ChannelState::Connected);
            let rows = list
                .iter()
                .map(|s| {
                    let t = self.totals.get(&s.name);
                    let (channel, dial) = segments(s);
                    Row {
                        name: s.name.clone(),
                        cells: vec![
                            s.name.clone(),
                            format!("{:?}", s.state),
                            s.relay.clone(),
                            s.endpoint.clone().unwrap_or_else(|| "-".into()),
                            channel,
                            dial,
                            s.active_tunnels.to_string(),
                            format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down)),
                            s.last_error.clone().unwrap_or_default(),
                        ],
                        health: health(s),
                    }
                })
                .collect();
            let detail: Vec<_> = list
                .iter()
                .map(|s| {
                    let t = self.totals.get(&s.name);
                    let mut v = serde_json::to_value(s).unwrap_or_default();
                    v["bytesToEndpoint"] = json!(t.bytes_up);
                    v["bytesFromEndpoint"] = json!(t.bytes_down);
                    v
                })
                .collect();
            Report {
                ready,
                status: json!({ "role": "hcm", "hybridConnections": detail }),
                columns: vec![
                    "Hybrid connection",
                    "Status",
                    "Relay",
                    "Endpoint",
                    "Relay ⇄ hcm",
                    "hcm ⇄ endpoint",
                    "Active tunnels",
                    "Bytes to / from endpoint",
                    "Last error",
                ],
                rows,
            }
        })
    }
}
