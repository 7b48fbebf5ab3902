//! The relay's status for the admin listener: hybrid connections with their listeners
//! (relay ↔ hcm), sender connects (sender ↔ relay) and traffic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::control::{Ctl, EntityView, MgmtOp, MgmtReply};
use super::usage::{SenderUsage, Usage};
use crate::telemetry::admin::{Cell, Health, Report, Row, Section, StatusSource, human_bytes, rfc3339};
use crate::telemetry::history::{History, Sample};
use crate::telemetry::metrics::Totals;

pub(crate) struct RelayStatus {
    pub ctl: Ctl,
    /// Recent senders per hybrid connection (this node's).
    pub usage: Arc<super::usage::Usage>,
    pub totals: Arc<Totals>,
    pub history: Arc<History>,
    pub draining: CancellationToken,
    pub listen: std::net::SocketAddr,
    /// The cluster this node belongs to, if any: readiness and the `cluster` section.
    pub cluster: Option<Arc<super::cluster::Cluster>>,
    /// HTTP-mode counts.
    pub http: Arc<super::http::stats::Stats>,
}

/// The `cluster` part of `/status`: this node, Redis, the catalog and every other node.
fn cluster_json(h: &super::cluster::Health) -> Value {
    json!({
        "node": h.node_id,
        "publicUrl": h.public_url,
        "redis": h.redis,
        "redisUp": h.redis_up,
        "state": h.word(),
        "reason": match &h.catalog {
            super::cluster::CatalogState::Synced => None,
            super::cluster::CatalogState::RedisDown(w)
            | super::cluster::CatalogState::Lost(w)
            | super::cluster::CatalogState::NoCatalog(w) => Some(w.clone()),
        },
        "clusterId": h.cluster_id,
        "catalogVersion": h.catalog_version,
        "nodes": h.nodes.iter().map(|n| json!({
            "node": n.node,
            "publicUrl": n.url,
            "started": n.started,
            "lastHeartbeatMs": n.at_ms,
            "listeners": n.listeners.len(),
            "tunnels": n.tunnels.values().sum::<u64>(),
        })).collect::<Vec<_>>(),
    })
}

/// "12 (1 in flight), last 200 at …" for the HTTP requests column.
fn http_cell(h: &super::http::stats::HcHttp) -> String {
    match h.last {
        None if h.in_flight == 0 => "-".into(),
        None => format!("{} in flight", h.in_flight),
        Some((at, status)) => format!(
            "{} ({} in flight, {} by the relay), last {status} at {}",
            h.requests,
            h.in_flight,
            h.by_relay,
            rfc3339(at)
        ),
    }
}

fn entity_json(
    v: &EntityView,
    totals: &Totals,
    history: &History,
    usage: &Usage,
    http: &super::http::stats::Stats,
) -> Value {
    let t = totals.get(&v.entity.name);
    let h = http.get(&v.entity.name);
    json!({
        "name": v.entity.name,
        "endpoint": v.entity.endpoint().map(|e| e.to_string()),
        "status": if v.listeners.is_empty() { "Not connected" } else { "Connected" },
        "health": health(v, history).1,
        "lastSenderFailure": v.last_failure.as_ref().map(|c| json!({
            "at": rfc3339(c.at), "result": c.result, "detail": c.detail,
        })),
        "listeners": v.listeners.iter().map(|l| json!({
            "id": l.id,
            "node": l.node,
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
        "httpRequests": json!({
            "total": h.requests,
            "answeredByRelay": h.by_relay,
            "inFlight": h.in_flight,
            "last": h.last.map(|(at, status)| json!({ "at": rfc3339(at), "status": status })),
        }),
        "senderConnects": v.connects.iter().map(|(r, n)| (r.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "senders": usage.senders(&v.entity.name).iter().map(SenderUsage::to_json).collect::<Vec<_>>(),
    })
}

/// How long "every sender fails" must have held for the status to say degraded.
const FAILING_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);

/// The status word and its colour: red with no listener, amber when listeners are there
/// but every sender lately failed (rejected by the hcm, timed out, ...), else green.
fn health(v: &EntityView, history: &History) -> (Health, &'static str) {
    if v.listeners.is_empty() {
        (Health::Broken, "No listener")
    } else if history.failing(&v.entity.name, FAILING_WINDOW)
        || v.last_connect.as_ref().is_some_and(|c| c.result != "accepted") && !history_has_success(v)
    {
        (Health::Degraded, "Senders failing")
    } else {
        (Health::Ok, "Connected")
    }
}

/// True if any sender connect was ever accepted.
fn history_has_success(v: &EntityView) -> bool {
    v.connects.iter().any(|(r, n)| *r == "accepted" && *n > 0)
}

fn ok_failed(v: &EntityView) -> (u64, u64) {
    v.connects.iter().fold((0, 0), |(ok, failed), (r, n)| {
        if *r == "accepted" {
            (ok + n, failed)
        } else {
            (ok, failed + n)
        }
    })
}

/// The relay page's "Recent senders" cell: the newest sender (client id, else key name,
/// and address) with when it was last seen, and how many there were.
fn senders_cell(senders: &[SenderUsage]) -> Cell {
    let Some(s) = senders.first() else {
        return Cell::text("-");
    };
    let who = s
        .key
        .client_id
        .clone()
        .or_else(|| s.key.key_name.clone())
        .unwrap_or_else(|| "anonymous".into());
    let more = match senders.len() {
        1 => String::new(),
        n => format!(" (+{} more)", n - 1),
    };
    Cell::Ago(
        s.last_seen,
        format!("{who} from {}, {} tunnels{more}", s.key.remote, s.tunnels),
    )
}

fn row(v: &EntityView, totals: &Totals, history: &History, usage: &Usage, http: &super::http::stats::Stats) -> Row {
    let t = totals.get(&v.entity.name);
    let (health, word) = health(v, history);
    Row {
        name: v.entity.name.clone(),
        health,
        status: word.into(),
        cells: vec![
            Cell::text(v.entity.endpoint().map(|e| e.to_string()).unwrap_or_else(|| "-".into())),
            Cell::text(v.listeners.len().to_string()),
            Cell::text(v.active_tunnels.to_string()),
            Cell::text(format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down))),
            Cell::text(http_cell(&http.get(&v.entity.name))),
            match &v.last_connect {
                Some(c) => Cell::Ago(c.at, c.result.to_string()),
                None => Cell::text("-"),
            },
            senders_cell(&usage.senders(&v.entity.name)),
        ],
        last_error: v.last_failure.as_ref().map(|c| {
            (
                c.at,
                format!("sender {}: {}", c.result, c.detail)
                    .trim_end_matches(": ")
                    .to_owned(),
            )
        }),
        history: history.series_with(&v.entity.name, sample_of(v, t, std::time::SystemTime::now())),
    }
}

fn sample_of(v: &EntityView, t: crate::telemetry::metrics::HcTotal, at: std::time::SystemTime) -> Sample {
    let (ok, failed) = ok_failed(v);
    Sample {
        at,
        active: v.active_tunnels as i64,
        bytes: t.bytes_up + t.bytes_down,
        ok,
        failed,
    }
}

impl StatusSource for RelayStatus {
    fn role(&self) -> &'static str {
        "relay"
    }

    fn report(&self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        Box::pin(async move {
            let views = self.views().await;
            let accepting = !self.draining.is_cancelled();
            let rows = views
                .iter()
                .map(|v| row(v, &self.totals, &self.history, &self.usage, &self.http))
                .collect();
            let cluster = self.cluster.as_ref().map(|c| c.health());
            let cluster_ready = cluster.as_ref().map_or(Ok(()), |h| h.ready());
            let mut status = json!({
                "role": "relay",
                "listen": self.listen.to_string(),
                "accepting": accepting,
                "hybridConnections": views.iter().map(|v| entity_json(v, &self.totals, &self.history, &self.usage, &self.http)).collect::<Vec<_>>(),
            });
            if let Some(h) = &cluster {
                status["cluster"] = cluster_json(h);
            }
            if let Err(why) = &cluster_ready {
                status["notReadyBecause"] = why.as_str().into();
            }
            Report {
                ready: accepting && cluster_ready.is_ok(),
                status,
                sections: vec![Section {
                    role: "relay",
                    columns: vec![
                        "Endpoint",
                        "Listeners",
                        "Active tunnels",
                        "Bytes up / down",
                        "HTTP requests",
                        "Last sender connect",
                        "Recent senders",
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
                .views()
                .await
                .iter()
                .map(|v| (v.entity.name.clone(), sample_of(v, self.totals.get(&v.entity.name), at)))
                .collect();
            self.history.record(round);
        })
    }

    fn hybrid_connections(&self) -> Pin<Box<dyn Future<Output = Vec<(&'static str, String)>> + Send + '_>> {
        Box::pin(self.names())
    }
}

impl RelayStatus {
    /// The hybrid connections in the relay's state (a round trip through its control plane).
    async fn names(&self) -> Vec<(&'static str, String)> {
        self.views()
            .await
            .into_iter()
            .map(|v| ("relay", v.entity.name))
            .collect()
    }

    async fn views(&self) -> Vec<EntityView> {
        match self.ctl.manage(MgmtOp::List).await {
            Ok(MgmtReply::List(v)) => v,
            _ => Vec::new(),
        }
    }
}
