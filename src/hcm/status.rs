//! The hcm's status for the admin listener, split by segment: relay ↔ hcm (control
//! channel state, since when, reconnects) and hcm ↔ endpoint (last dial), plus traffic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::json;

use super::Shared;
use super::state::{ChannelState, HcStatus, Segment};
use crate::telemetry::admin::{Cell, Health, Report, Row, Section, StatusSource, human_bytes};
use crate::telemetry::history::{History, Sample};
use crate::telemetry::metrics::{HcTotal, Totals};

pub(crate) struct HcmStatus {
    pub shared: Arc<Shared>,
    pub totals: Arc<Totals>,
    pub history: Arc<History>,
}

/// The status word and its colour: green only when the control channel is up and the last
/// endpoint dial (if any) worked.
pub fn health(s: &HcStatus) -> (Health, &'static str) {
    match (s.state, &s.last_dial) {
        (ChannelState::Connected, Some(d)) if !d.ok => (Health::Degraded, "Endpoint failing"),
        (ChannelState::Connected, _) => (Health::Ok, "Connected"),
        (ChannelState::Connecting, _) if s.reconnects == 0 => (Health::Unknown, "Connecting"),
        (ChannelState::Stopped, _) => (Health::Unknown, "Stopped"),
        _ => (Health::Broken, "Disconnected"),
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

fn row(s: &HcStatus, t: HcTotal, history: &History) -> Row {
    let (health, word) = health(s);
    let dial = match &s.last_dial {
        Some(d) if d.ok => Cell::ago_rfc3339(&d.at, format!("ok in {} ms", d.millis)),
        Some(d) => Cell::ago_rfc3339(&d.at, format!("failed: {}", d.detail)),
        None => Cell::text("no dial yet"),
    };
    Row {
        name: s.name.clone(),
        health,
        status: word.into(),
        cells: vec![
            Cell::text(&s.relay),
            Cell::text(s.endpoint.clone().unwrap_or_else(|| "-".into())),
            Cell::ago_rfc3339(&s.since, format!("{:?} ({} reconnects)", s.state, s.reconnects)),
            dial,
            Cell::text(t.active.max(0).to_string()),
            Cell::text(format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down))),
            match &s.last_http {
                Some(l) => Cell::text(format!("{}, last {l}", s.http_requests)),
                None => Cell::text("-"),
            },
        ],
        last_error: s.latest_error().and_then(|e| {
            let at = humantime::parse_rfc3339(&e.at).ok()?;
            let seg = match e.segment {
                Segment::Relay => "relay ⇄ hcm",
                Segment::Endpoint => "hcm ⇄ endpoint",
            };
            Some((at, format!("{seg}: {}", e.detail)))
        }),
        history: history.series_with(&s.name, sample_of(s, t, std::time::SystemTime::now())),
    }
}

fn sample_of(s: &HcStatus, t: HcTotal, at: std::time::SystemTime) -> Sample {
    let failed = s
        .recent_errors
        .iter()
        .filter(|e| e.segment == Segment::Endpoint)
        .count() as u64;
    Sample {
        at,
        active: t.active,
        bytes: t.bytes_up + t.bytes_down,
        ok: s.accepts,
        failed,
    }
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
                .map(|s| row(s, self.totals.get(&s.name), &self.history))
                .collect();
            let detail: Vec<_> = list
                .iter()
                .map(|s| {
                    let t = self.totals.get(&s.name);
                    let mut v = serde_json::to_value(s).unwrap_or_default();
                    v["bytesToEndpoint"] = json!(t.bytes_up);
                    v["bytesFromEndpoint"] = json!(t.bytes_down);
                    v["health"] = json!(health(s).1);
                    v
                })
                .collect();
            Report {
                ready,
                status: json!({ "role": "hcm", "hybridConnections": detail }),
                sections: vec![Section {
                    role: "hcm",
                    columns: vec![
                        "Relay",
                        "Endpoint",
                        "Relay ⇄ hcm",
                        "hcm ⇄ endpoint",
                        "Active tunnels",
                        "Bytes to / from endpoint",
                        "HTTP requests",
                    ],
                    rows,
                }],
            }
        })
    }

    fn sample(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let at = std::time::SystemTime::now();
            let round = self
                .shared
                .snapshot()
                .iter()
                .map(|s| (s.name.clone(), sample_of(s, self.totals.get(&s.name), at)))
                .collect();
            self.history.record(round);
        })
    }

    fn hybrid_connections(&self) -> Pin<Box<dyn Future<Output = Vec<(&'static str, String)>> + Send + '_>> {
        let names = self.shared.snapshot().into_iter().map(|s| ("hcm", s.name)).collect();
        Box::pin(std::future::ready(names))
    }
}
