//! The bridge: the app side. Each forward is a local TCP listener; every accepted
//! connection becomes a sender WebSocket to the hybrid connection, spliced byte-exact.
//!
//! When the relay refuses (no listener, bad credentials, endpoint unreachable on the far
//! side) the app's connection is reset at once and the reason is logged.
//!
//! Hosts-file mode ([`Listen::Resolve`]): the endpoint is read from the entity's metadata,
//! its host name gets a loopback address of its own ([`hosts`]), and the forward listens
//! there on the endpoint's own port, so the app connects to `db.corp.local:5432` unchanged.

pub mod config;
pub mod hosts;
mod status;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use self::config::{BridgeConfig, Forward, Listen};
use crate::client;
use crate::dataplane::Workers;
use crate::dataplane::splice::{self, SpliceConfig};
use crate::proto::metadata::{self, HostPort};
use crate::transport::ws;

/// A forward as it runs.
struct ForwardRt {
    fwd: Forward,
    bound: SocketAddr,
    status: Arc<std::sync::Mutex<status::ForwardStatus>>,
}

impl ForwardRt {
    fn record(&self, result: &'static str, detail: String) {
        let hc = self.fwd.hybrid_connection.clone();
        metrics::counter!(crate::telemetry::metrics::BRIDGE_RELAY_CONNECTS, "hc" => hc, "result" => result).increment(1);
        self.status.lock().unwrap_or_else(|e| e.into_inner()).record(result, detail);
    }
}

struct BridgeCtx {
    cfg: Arc<BridgeConfig>,
    tls: Arc<rustls::ClientConfig>,
    /// Hard stop: tunnels end.
    shutdown: CancellationToken,
    /// App connections being served, for the drain.
    inflight: crate::dataplane::drain::InFlight,
}

/// A running bridge. Dropping it stops the bridge and removes its hosts-file block.
#[must_use = "dropping the handle stops the bridge"]
pub struct BridgeHandle {
    bound: Vec<(String, SocketAddr)>,
    hosts_file: Option<PathBuf>,
    shutdown: CancellationToken,
    workers: Arc<Workers>,
    admin: Option<crate::telemetry::admin::AdminHandle>,
    /// Graceful stop: accept loops end.
    drain: CancellationToken,
    inflight: crate::dataplane::drain::InFlight,
    drain_timeout: Duration,
}

impl std::fmt::Debug for BridgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeHandle").field("bound", &self.bound).finish()
    }
}

impl BridgeHandle {
    /// `(hybrid connection, local address)` of every forward.
    pub fn bound(&self) -> &[(String, SocketAddr)] {
        &self.bound
    }

    /// The admin listener's address, if one was configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// Address of the first forward of `hc`.
    pub fn addr_of(&self, hc: &str) -> Option<SocketAddr> {
        self.bound.iter().find(|(h, _)| h.eq_ignore_ascii_case(hc)).map(|(_, a)| *a)
    }

    pub fn stop(mut self) {
        self.halt();
    }

    /// Graceful stop: the local ports close, tunnels get up to `drain_timeout` (from the
    /// config) to finish; then a hard stop. `force` cuts the wait short.
    pub fn drain(mut self, force: &crate::dataplane::drain::Force) -> crate::dataplane::drain::DrainReport {
        tracing::info!(event = "drain_started", role = "bridge", timeout_s = self.drain_timeout.as_secs(), "draining: local ports closed, tunnels finishing");
        self.drain.cancel();
        let inflight = self.inflight.clone();
        let report = crate::dataplane::drain::wait_idle(move || inflight.count(), self.drain_timeout, force);
        tracing::info!(event = "drain_finished", role = "bridge", remaining = report.remaining, waited_ms = report.waited.as_millis() as u64, "drain finished");
        self.halt();
        report
    }

    fn halt(&mut self) {
        self.drain.cancel();
        self.shutdown.cancel();
        self.workers.stop();
        if let Some(p) = self.hosts_file.take()
            && let Err(e) = hosts::remove(&p)
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove the hosts-file block");
        }
    }
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Resolves hosts-file forwards, binds every forward and starts serving.
pub fn start(cfg: BridgeConfig) -> anyhow::Result<BridgeHandle> {
    let cfg = Arc::new(cfg);
    let tls = crate::transport::tls::client_config(&cfg.ca_files)?;
    let endpoints = resolve_endpoints(&cfg, &tls)?;
    let loopbacks = hosts::allocate(endpoints.values().map(|e| e.host.as_str()));
    let workers = Workers::start("hyrelay-bridge", cfg.workers, cfg.buffer_budget)?;
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();
    let inflight = crate::dataplane::drain::InFlight::default();
    let ctx = Arc::new(BridgeCtx {
        cfg: cfg.clone(),
        tls: tls.clone(),
        shutdown: shutdown.clone(),
        inflight: inflight.clone(),
    });
    let mut bound = Vec::new();
    let mut views = Vec::new();
    crate::telemetry::metrics::announce("bridge", cfg.workers);
    let totals = Arc::new(crate::telemetry::metrics::Totals::default());
    crate::telemetry::metrics::spawn_worker_flush(&workers, "bridge", totals.clone());
    for (i, fwd) in cfg.forwards.iter().enumerate() {
        let addr = match &fwd.listen {
            Listen::Addr(a) => *a,
            Listen::Resolve => {
                let ep = &endpoints[&i];
                SocketAddr::new(loopbacks[&ep.host.to_ascii_lowercase()], ep.port)
            }
        };
        let listeners = crate::transport::sock::bind_listeners(addr, cfg.workers)
            .with_context(|| format!("forward for {:?}: cannot listen on {addr}", fwd.hybrid_connection))?;
        let actual = listeners[0].local_addr()?;
        let status = Arc::new(std::sync::Mutex::new(status::ForwardStatus::default()));
        views.push(status::ForwardView { fwd: fwd.clone(), bound: actual, status: status.clone() });
        let rt = Arc::new(ForwardRt { fwd: fwd.clone(), bound: actual, status });
        let ctx = ctx.clone();
        crate::dataplane::serve(&workers, listeners, drain.clone(), move |tcp, peer| {
            serve(tcp, peer, rt.clone(), ctx.clone())
        });
        tracing::info!(hc = %fwd.hybrid_connection, listen = %actual, relay = %fwd.connection_string.endpoint.authority(), "forward listening");
        bound.push((fwd.hybrid_connection.clone(), actual));
    }
    let hosts_file = if loopbacks.is_empty() {
        None
    } else {
        hosts::apply(&cfg.hosts_file, &loopbacks)
            .with_context(|| format!("writing the hyrelay block into {}", cfg.hosts_file.display()))?;
        for (host, ip) in &loopbacks {
            tracing::info!(host = %host, address = %ip, file = %cfg.hosts_file.display(), "hosts-file entry added");
        }
        Some(cfg.hosts_file.clone())
    };
    let admin = match cfg.admin {
        Some(a) => {
            let source = status::BridgeStatus::new(views, totals, tls);
            Some(crate::telemetry::admin::spawn(a, Arc::new(source)).with_context(|| format!("cannot listen on admin address {a}"))?)
        }
        None => None,
    };
    Ok(BridgeHandle {
        bound,
        hosts_file,
        shutdown,
        workers,
        admin,
        drain,
        inflight,
        drain_timeout: cfg.drain_timeout,
    })
}

/// Reads the endpoint of every hosts-file forward from the relay (on a scratch thread, so
/// `start` works inside or outside a runtime).
fn resolve_endpoints(cfg: &Arc<BridgeConfig>, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<BTreeMap<usize, HostPort>> {
    let wanted: Vec<(usize, Forward)> = cfg
        .forwards
        .iter()
        .enumerate()
        .filter(|(_, f)| f.listen == Listen::Resolve)
        .map(|(i, f)| (i, f.clone()))
        .collect();
    if wanted.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (tls, timeout) = (tls.clone(), cfg.relay_timeout.min(Duration::from_secs(20)));
    std::thread::spawn(move || -> anyhow::Result<BTreeMap<usize, HostPort>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut out = BTreeMap::new();
            for (i, f) in wanted {
                let hc = &f.hybrid_connection;
                let info = client::runtime_info(&f.connection_string, hc, &tls, timeout)
                    .await
                    .with_context(|| format!("reading the endpoint of {hc:?} for hosts-file mode"))?;
                let ep = metadata::endpoint_from_user_metadata(&info.user_metadata)
                    .map_err(|e| anyhow::anyhow!("{hc:?}: {e}"))?
                    .ok_or_else(|| anyhow::anyhow!("{hc:?} has no endpoint metadata; use -L PORT={hc} instead"))?;
                if ep.bare_host().parse::<IpAddr>().is_ok() {
                    anyhow::bail!("{hc:?}: endpoint {ep} is an IP address, which a hosts file cannot redirect; use -L PORT={hc} instead");
                }
                out.insert(i, ep);
            }
            Ok(out)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("endpoint resolution thread panicked"))?
}

/// One app connection: open the sender WebSocket and splice.
async fn serve(tcp: TcpStream, peer: SocketAddr, fw: Arc<ForwardRt>, ctx: Arc<BridgeCtx>) {
    let _inflight = ctx.inflight.enter();
    crate::transport::sock::tune(&tcp);
    let f = &fw.fwd;
    metrics::counter!(crate::telemetry::metrics::BRIDGE_LOCAL_CONNECTIONS, "hc" => f.hybrid_connection.clone()).increment(1);
    fw.status.lock().unwrap_or_else(|e| e.into_inner()).local_connections += 1;
    let hc = f.hybrid_connection.as_str();
    let token = client::token(&f.connection_string, hc, ctx.cfg.token_ttl);
    let url = client::hc_url(&f.connection_string, hc, "connect", &crate::relay::control::new_id());
    let headers = [("ServiceBusAuthorization", token.as_str())];
    let conn = tokio::select! {
        c = ws::connect(&url, Some(&ctx.tls), &headers, ctx.cfg.relay_timeout) => c,
        _ = ctx.shutdown.cancelled() => return,
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            let result = match e.status() {
                Some(404) => "no_listener",
                Some(401 | 403) => "auth_failed",
                Some(_) => "rejected",
                None if e.is_unreachable() => "unreachable",
                None => "error",
            };
            fw.record(result, e.to_string());
            tracing::warn!(event = "relay_connect_failed", hc, %peer, local = %fw.bound, status = e.status().unwrap_or(0), reason = %e, "relay refused the connection; resetting the app's connection");
            // Reset rather than FIN, so the app sees a failure, not an empty answer.
            socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).ok();
            return;
        }
    };
    fw.record("ok", String::new());
    tracing::debug!(event = "tunnel_open", hc, %peer, "tunnel open");
    let cfg = SpliceConfig {
        ping_interval: ctx.cfg.ping_interval,
        max_frame: ctx.cfg.max_frame,
        tcp_side: splice::TcpSide::App,
    };
    let active = crate::dataplane::stats::ActiveGuard::new(crate::dataplane::stats::for_hc(hc));
    let stats = splice::ws_tcp(conn.stream, conn.leftover, tcp, &cfg, &ctx.shutdown, Some(active)).await;
    tracing::debug!(event = "tunnel_closed", hc, %peer, to_app = stats.to_tcp, from_app = stats.to_ws, end = %stats.end, "tunnel closed");
}
