//! The bridge's status for the admin listener: each forward with its last relay connects
//! (sender ↔ relay) and traffic; ready when every relay answers with the credentials given.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::config::Forward;
use crate::telemetry::admin::{Health, Report, Row, StatusSource, human_bytes, rfc3339};
use crate::telemetry::metrics::Totals;

/// What a forward has seen lately.
#[derive(Debug, Default)]
pub struct ForwardStatus {
    pub last_connect: Option<(SystemTime, &'static str, String)>,
    pub connects: Vec<(&'static str, u64)>,
    pub local_connections: u64,
}

impl ForwardStatus {
    pub fn record(&mut self, result: &'static str, detail: String) {
        match self.connects.iter_mut().find(|(r, _)| *r == result) {
            Some((_, n)) => *n += 1,
            None => self.connects.push((result, 1)),
        }
        self.last_connect = Some((SystemTime::now(), result, detail));
    }
}

/// A forward as status sees it.
pub struct ForwardView {
    pub fwd: Forward,
    pub bound: SocketAddr,
    pub status: Arc<Mutex<ForwardStatus>>,
}

/// Result of asking a relay for the hybrid connection's runtime information.
#[derive(Debug, Clone)]
struct Probe {
    at: Instant,
    ok: bool,
    detail: String,
}

/// Lists the forwards as they run now (they change with reloads).
pub type ForwardList = Arc<dyn Fn() -> Vec<ForwardView> + Send + Sync>;

pub(crate) struct BridgeStatus {
    forwards: ForwardList,
    totals: Arc<Totals>,
    tls: Arc<rustls::ClientConfig>,
    /// The bridge's way to the relay, for the probe.
    proxy: crate::transport::proxy::ProxyConfig,
    /// Last probe per hybrid connection and relay.
    probes: Mutex<std::collections::HashMap<String, Probe>>,
}

/// Probes are reused for this long, so `/readyz` polling does not hammer the relay.
const PROBE_TTL: Duration = Duration::from_secs(5);

impl BridgeStatus {
    pub fn new(
        forwards: ForwardList,
        totals: Arc<Totals>,
        tls: Arc<rustls::ClientConfig>,
        proxy: crate::transport::proxy::ProxyConfig,
    ) -> Self {
        Self {
            forwards,
            totals,
            tls,
            proxy,
            probes: Mutex::new(Default::default()),
        }
    }

    async fn probe(&self, f: &Forward) -> Probe {
        let key = format!(
            "{}@{}",
            f.hybrid_connection.to_lowercase(),
            f.connection_string.endpoint.authority()
        );
        if let Some(p) = self.probes.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
            && p.at.elapsed() < PROBE_TTL
        {
            return p;
        }
        let r = crate::client::runtime_info(
            &f.connection_string,
            &f.hybrid_connection,
            &self.tls,
            &self.proxy,
            Duration::from_secs(3),
        )
        .await;
        let p = match r {
            Ok(info) => Probe {
                at: Instant::now(),
                ok: true,
                detail: format!("relay answers; {} listener(s)", info.listener_count),
            },
            Err(e) => Probe {
                at: Instant::now(),
                ok: false,
                detail: e.to_string(),
            },
        };
        self.probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, p.clone());
        p
    }
}

impl StatusSource for BridgeStatus {
    fn role(&self) -> &'static str {
        "bridge"
    }

    fn report(&self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>> {
        Box::pin(async move {
            let mut rows = Vec::new();
            let mut detail = Vec::new();
            let mut ready = true;
            for v in (self.forwards)() {
                let probe = self.probe(&v.fwd).await;
                ready &= probe.ok;
                let st = v.status.lock().unwrap_or_else(|e| e.into_inner());
                let t = self.totals.get(&v.fwd.hybrid_connection);
                let last = st
                    .last_connect
                    .as_ref()
                    .map(|(at, r, d)| format!("{} {r} {d}", rfc3339(*at)).trim_end().to_owned())
                    .unwrap_or_else(|| "-".into());
                let last_ok = st.last_connect.as_ref().is_none_or(|(_, r, _)| *r == "ok");
                rows.push(Row {
                    name: v.fwd.hybrid_connection.clone(),
                    cells: vec![
                        v.fwd.hybrid_connection.clone(),
                        if probe.ok {
                            "Relay answers".into()
                        } else {
                            "Relay unreachable".into()
                        },
                        v.bound.to_string(),
                        v.fwd.connection_string.endpoint.authority(),
                        probe.detail.clone(),
                        last,
                        t.active.to_string(),
                        format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down)),
                    ],
                    health: if probe.ok && last_ok {
                        Health::Ok
                    } else {
                        Health::Broken
                    },
                });
                detail.push(json!({
                    "hybridConnection": v.fwd.hybrid_connection,
                    "listen": v.bound.to_string(),
                    "relay": v.fwd.connection_string.endpoint.authority(),
                    "relayAnswers": probe.ok,
                    "probe": probe.detail,
                    "localConnections": st.local_connections,
                    "lastRelayConnect": st.last_connect.as_ref().map(|(at, r, d)| json!({"at": rfc3339(*at), "result": r, "detail": d})),
                    "relayConnects": st.connects.iter().map(|(r, n)| (r.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                    "activeTunnels": t.active,
                    "bytesUp": t.bytes_up,
                    "bytesDown": t.bytes_down,
                }));
            }
            Report {
                ready,
                status: json!({ "role": "bridge", "forwards": detail }),
                columns: vec![
                    "Hybrid connection",
                    "Status",
                    "Listening on",
                    "Relay",
                    "Relay probe",
                    "Last relay connect",
                    "Active tunnels",
                    "Bytes up / down",
                ],
                rows,
            }
        })
    }
}
