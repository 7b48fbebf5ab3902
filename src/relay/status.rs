//! The relay's status for the admin listener: hybrid connections with their listeners
//! (relay ↔ hcm), sender connects (sender ↔ relay) and traffic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::control::{Ctl, EntityView, MgmtOp, MgmtReply};
use crate::telemetry::admin::{Health, Report, Row, StatusSource, human_bytes, rfc3339};
use crate::telemetry::metrics::Totals;

pub(crate) struct RelayStatus {
    pub ctl: Ctl,
    pub totals: Arc<Totals>,
    pub draining: CancellationToken,
    pub listen: std::net::SocketAddr,
}

fn entity_json(v: &EntityView, totals: &Totals) -> Value {
    let t = totals.get(&v.entity.name);
    json!({
        "name": v.entity.name,
        "endpoint": v.entity.endpoint().map(|e| e.to_string()),
        "status": if v.listeners.is_empty() { "Not connected" } else { "Connected" },
        "listeners": v.listeners.iter().map(|l| json!({
            "id": l.id,
            "remoteAddress": l.remote.map(|a| a.to_string()),
            "connectedAt": rfc3339(l.connected_at),
            "activeTunnels": l.active_tunnels,
        })).collect::<Vec<_>>(),
        "activeTunnels": v.active_tunnels,
        "bytesUp": t.bytes_up,
        "bytesDown": t.bytes_down,
        "lastSenderConnect": v.last_connect.as_ref().map(|c| json!({
            "at": rfc3339(c.at), "result": c.result, "detail": c.detail,
        })),
        "senderConnects": v.connects.iter().map(|(r, n)| (r.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
    })
}

impl StatusSource for RelayStatus {
    fn role(&self) -> &'static str {
        "relay"
    }

    fn report(&self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        Box::pin(async move {
            let views = match self.ctl.manage(MgmtOp::List).await {
                Ok(MgmtReply::List(v)) => v,
                _ => Vec::new(),
            };
            let accepting = !self.draining.is_cancelled();
            let rows = views
                .iter()
                .map(|v| {
                    let t = self.totals.get(&v.entity.name);
                    let last = v
                        .last_connect
                        .as_ref()
                        .map(|c| {
                            format!("{} {} {}", rfc3339(c.at), c.result, c.detail)
                                .trim_end()
                                .to_owned()
                        })
                        .unwrap_or_else(|| "-".into());
                    Row {
                        name: v.entity.name.clone(),
                        cells: vec![
                            v.entity.name.clone(),
                            if v.listeners.is_empty() {
                                "Not connected".into()
                            } else {
                                "Connected".into()
                            },
                            v.entity.endpoint().map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
                            v.listeners.len().to_string(),
                            v.active_tunnels.to_string(),
                            format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down)),
                            last,
                        ],
                        health: if v.listeners.is_empty() {
                            Health::Broken
                        } else {
                            Health::Ok
                        },
                    }
                })
                .collect();
            Report {
                ready: accepting,
                status: json!({
                    "role": "relay",
                    "listen": self.listen.to_string(),
                    "accepting": accepting,
                    "hybridConnections": views.iter().map(|v| entity_json(v, &self.totals)).collect::<Vec<_>>(),
                }),
                columns: vec![
                    "Hybrid connection",
                    "Status",
                    "Endpoint",
                    "Listeners",
                    "Active tunnels",
                    "Bytes up / down",
                    "Last sender connect",
                ],
                rows,
            }
        })
    }
}
