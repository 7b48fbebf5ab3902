//! The bridge's status for the admin listener: each forward with its last relay connects
//! (sender ↔ relay) and traffic; ready when every relay answers with the credentials given.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::config::Forward;
use crate::telemetry::admin::{Cell, Health, Report, Row, Section, StatusSource, human_bytes, rfc3339};
use crate::telemetry::history::{History, Sample};
use crate::telemetry::metrics::Totals;

/// What a forward has seen lately.
#[derive(Debug, Default)]
pub struct ForwardStatus {
    pub last_connect: Option<(SystemTime, &'static str, String)>,
    /// The latest relay connect that failed.
    pub last_failure: Option<(SystemTime, &'static str, String)>,
    pub connects: Vec<(&'static str, u64)>,
    pub local_connections: u64,
}

impl ForwardStatus {
    pub fn record(&mut self, result: &'static str, detail: String) {
        match self.connects.iter_mut().find(|(r, _)| *r == result) {
            Some((_, n)) => *n += 1,
            None => self.connects.push((result, 1)),
        }
        if result != "ok" {
            self.last_failure = Some((SystemTime::now(), result, detail.clone()));
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
    /// The relay answered with these credentials.
    ok: bool,
    /// Listeners (hcms) behind the hybrid connection, when the relay answered.
    listeners: u64,
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
    history: History,
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
            history: History::default(),
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
                listeners: info.listener_count as u64,
                detail: format!("relay answers; {} listener(s)", info.listener_count),
            },
            Err(e) => Probe {
                at: Instant::now(),
                ok: false,
                listeners: 0,
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

fn sample_of(st: &ForwardStatus, t: crate::telemetry::metrics::HcTotal, at: SystemTime) -> Sample {
    let (ok, failed) = st.connects.iter().fold(
        (0, 0),
        |(ok, failed), (r, n)| {
            if *r == "ok" { (ok + n, failed) } else { (ok, failed + n) }
        },
    );
    Sample {
        at,
        active: t.active,
        bytes: t.bytes_up + t.bytes_down,
        ok,
        failed,
    }
}

/// The status word and its colour. A forward is ready when its relay answers and at least
/// one listener (hcm) serves the hybrid connection: with none, every app connection would
/// be refused.
fn health(probe: &Probe, st: &ForwardStatus) -> (Health, &'static str) {
    let last_ok = st.last_connect.as_ref().is_none_or(|(_, r, _)| *r == "ok");
    if !probe.ok {
        (Health::Broken, "Relay unreachable")
    } else if probe.listeners == 0 {
        (Health::Broken, "No listener")
    } else if !last_ok {
        (Health::Degraded, "Connects failing")
    } else {
        (Health::Ok, "Ready")
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
                let st = v.status.lock().unwrap_or_else(|e| e.into_inner());
                let (health, word) = health(&probe, &st);
                ready &= health != Health::Broken;
                let t = self.totals.get(&v.fwd.hybrid_connection);
                rows.push(Row {
                    name: v.fwd.hybrid_connection.clone(),
                    health,
                    status: word.into(),
                    cells: vec![
                        Cell::text(v.bound.to_string()),
                        Cell::text(v.fwd.connection_string.endpoint.authority()),
                        Cell::text(&probe.detail),
                        match &st.last_connect {
                            Some((at, r, _)) => Cell::Ago(*at, r.to_string()),
                            None => Cell::text("-"),
                        },
                        Cell::text(t.active.max(0).to_string()),
                        Cell::text(format!("{} / {}", human_bytes(t.bytes_up), human_bytes(t.bytes_down))),
                    ],
                    last_error: st
                        .last_failure
                        .as_ref()
                        .map(|(at, r, d)| (*at, format!("relay connect {r}: {d}")))
                        .or_else(|| (!probe.ok).then(|| (SystemTime::now(), probe.detail.clone()))),
                    history: self
                        .history
                        .series_with(&v.fwd.hybrid_connection, sample_of(&st, t, SystemTime::now())),
                });
                detail.push(json!({
                    "hybridConnection": v.fwd.hybrid_connection,
                    "listen": v.bound.to_string(),
                    "relay": v.fwd.connection_string.endpoint.authority(),
                    "relayAnswers": probe.ok,
                    "listeners": probe.listeners,
                    "health": word,
                    "ready": health != Health::Broken,
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
                sections: vec![Section {
                    role: "bridge",
                    columns: vec![
                        "Listening on",
                        "Relay",
                        "Relay probe",
                        "Last relay connect",
                        "Active tunnels",
                        "Bytes up / down",
                    ],
                    rows,
                }],
            }
        })
    }

    fn sample(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let at = SystemTime::now();
            let round = (self.forwards)()
                .iter()
                .map(|v| {
                    let t = self.totals.get(&v.fwd.hybrid_connection);
                    let st = v.status.lock().unwrap_or_else(|e| e.into_inner());
                    (v.fwd.hybrid_connection.clone(), sample_of(&st, t, at))
                })
                .collect();
            self.history.record(round);
        })
    }

    fn hybrid_connections(&self) -> Pin<Box<dyn Future<Output = Vec<(&'static str, String)>> + Send + '_>> {
        let names = (self.forwards)()
            .into_iter()
            .map(|v| ("bridge", v.fwd.hybrid_connection))
            .collect();
        Box::pin(std::future::ready(names))
    }
}
