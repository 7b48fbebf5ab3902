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
mod early;
pub mod hosts;
mod status;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use self::config::{BridgeConfig, BridgeFile, Forward, Listen};
use crate::client;
use crate::dataplane::Workers;
use crate::dataplane::splice::{self, SpliceConfig};
use crate::proto::connstr::ConnectionString;
use crate::proto::metadata::{self, HostPort};
use crate::transport::ws;

/// A forward as it runs. Its connection string can be swapped by a reload; tunnels that
/// are open keep the credentials they started with.
struct ForwardRt {
    hc: String,
    listen: Listen,
    /// Shared, so a new app connection takes a reference rather than a copy.
    cs: RwLock<Arc<ConnectionString>>,
    /// The Send token for new app connections (reused for up to 5 minutes).
    tokens: crate::client::TokenCache,
    bound: SocketAddr,
    /// Ends this forward's accept loops (reload removed it, or the bridge drains).
    stop: CancellationToken,
    /// hyrelay extensions: what the relay offered, and warm connections to it.
    warm: Arc<early::Warm>,
    status: Arc<Mutex<status::ForwardStatus>>,
}

impl ForwardRt {
    fn record(&self, result: &'static str, detail: String) {
        let hc = self.hc.clone();
        metrics::counter!(crate::telemetry::metrics::BRIDGE_RELAY_CONNECTS, "hc" => hc, "result" => result)
            .increment(1);
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(result, detail);
    }

    fn connection_string(&self) -> Arc<ConnectionString> {
        Arc::clone(&self.cs.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn view(&self) -> status::ForwardView {
        status::ForwardView {
            fwd: Forward {
                hybrid_connection: self.hc.clone(),
                listen: self.listen.clone(),
                connection_string: ConnectionString::clone(&self.connection_string()),
            },
            bound: self.bound,
            status: self.status.clone(),
        }
    }
}

/// Identity of a forward across reloads: hybrid connection and where it listens.
fn forward_key(f: &Forward) -> String {
    let listen = match &f.listen {
        Listen::Addr(a) => a.to_string(),
        Listen::Resolve => "resolve".into(),
    };
    format!("{}@{listen}", f.hybrid_connection.to_lowercase())
}

struct BridgeCtx {
    cfg: Arc<BridgeConfig>,
    tls: Arc<rustls::ClientConfig>,
    /// Hard stop: tunnels end.
    shutdown: CancellationToken,
    /// App connections being served, for the drain.
    inflight: crate::dataplane::drain::InFlight,
    /// How warm connections to the relay are opened (TLS, proxy).
    dialer: Arc<early::Dialer>,
}

/// The set of forwards, changed by reloads.
struct Forwards {
    ctx: Arc<BridgeCtx>,
    workers: Arc<Workers>,
    drain: CancellationToken,
    running: Mutex<Vec<Arc<ForwardRt>>>,
    /// Loopback address per endpoint host, stable across reloads.
    loopbacks: Mutex<BTreeMap<String, IpAddr>>,
    /// Set once a hosts-file block has been written.
    hosts_written: Mutex<bool>,
    /// Forwards given on the command line: kept by every reload.
    fixed: Vec<Forward>,
}

impl Forwards {
    fn views(&self) -> Vec<status::ForwardView> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| f.view())
            .collect()
    }

    fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| (f.hc.clone(), f.bound))
            .collect()
    }

    /// Makes the running set equal to `want`: new forwards are bound first (any failure
    /// changes nothing), then removed ones stop accepting and rotated credentials swap in.
    /// Tunnels already open are never touched.
    fn apply(&self, want: &[Forward]) -> anyhow::Result<Change> {
        let running: Vec<Arc<ForwardRt>> = self.running.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let have = |k: &str| running.iter().find(|r| forward_key(&r.view().fwd) == k).cloned();
        let fresh: Vec<&Forward> = want.iter().filter(|f| have(&forward_key(f)).is_none()).collect();
        let endpoints = resolve_endpoints(&fresh, &self.ctx.tls, &self.ctx.cfg.proxy, self.ctx.cfg.relay_timeout)?;
        let mut loopbacks = self.loopbacks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for ep in endpoints.values() {
            let host = ep.host.to_ascii_lowercase();
            if !loopbacks.contains_key(&host) {
                let ip = hosts::next_free(&loopbacks);
                loopbacks.insert(host, ip);
            }
        }
        // Bind everything new before changing anything.
        let mut bound = Vec::new();
        for (i, f) in fresh.iter().enumerate() {
            let addr = match &f.listen {
                Listen::Addr(a) => *a,
                Listen::Resolve => {
                    let ep = &endpoints[&i];
                    SocketAddr::new(loopbacks[&ep.host.to_ascii_lowercase()], ep.port)
                }
            };
            let listeners = crate::transport::sock::bind_listeners(addr, self.workers.len())
                .with_context(|| format!("forward for {:?}: cannot listen on {addr}", f.hybrid_connection))?;
            bound.push(((*f).clone(), listeners));
        }
        let mut change = Change::default();
        if !endpoints.is_empty() {
            hosts::apply(&self.ctx.cfg.hosts_file, &loopbacks)
                .with_context(|| format!("writing the hyrelay block into {}", self.ctx.cfg.hosts_file.display()))?;
            *self.hosts_written.lock().unwrap_or_else(|e| e.into_inner()) = true;
            *self.loopbacks.lock().unwrap_or_else(|e| e.into_inner()) = loopbacks.clone();
        }
        let mut next = Vec::new();
        for r in running {
            let key = forward_key(&r.view().fwd);
            match want.iter().find(|f| forward_key(f) == key) {
                Some(f) => {
                    if *r.connection_string() != f.connection_string {
                        *r.cs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(f.connection_string.clone());
                        tracing::info!(hc = %r.hc, listen = %r.bound, "connection string rotated; new connections use it");
                        change.rotated += 1;
                    }
                    next.push(r);
                }
                None => {
                    r.stop.cancel();
                    tracing::info!(hc = %r.hc, listen = %r.bound, "forward removed; its open tunnels continue");
                    change.removed += 1;
                }
            }
        }
        for (f, listeners) in bound {
            let actual = listeners[0].local_addr()?;
            let rt = Arc::new(ForwardRt {
                hc: f.hybrid_connection.clone(),
                listen: f.listen.clone(),
                cs: RwLock::new(Arc::new(f.connection_string.clone())),
                tokens: Default::default(),
                bound: actual,
                stop: self.drain.child_token(),
                warm: Default::default(),
                status: Arc::new(Mutex::new(status::ForwardStatus::default())),
            });
            let (ctx, rt2) = (self.ctx.clone(), rt.clone());
            crate::dataplane::serve(&self.workers, listeners, rt.stop.clone(), move |tcp, peer| {
                serve(tcp, peer, rt2.clone(), ctx.clone())
            });
            tracing::info!(hc = %f.hybrid_connection, listen = %actual, relay = %f.connection_string.endpoint.authority(), "forward listening");
            change.added += 1;
            next.push(rt);
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(change)
    }

    /// Re-reads `file` and applies it with the command-line forwards.
    fn reload(&self, file: &std::path::Path) {
        let parsed = crate::config::load_toml::<BridgeFile>(file).and_then(BridgeConfig::from_file);
        let result = parsed.and_then(|c| {
            let mut want = self.fixed.clone();
            want.extend(c.forwards);
            self.apply(&want)
        });
        match result {
            Ok(c) => {
                tracing::info!(event = "reload_applied", file = %file.display(), added = c.added, removed = c.removed, rotated = c.rotated, "configuration reloaded")
            }
            Err(e) => {
                tracing::warn!(event = "reload_rejected", file = %file.display(), error = %format!("{e:#}"), "configuration reload rejected; the running configuration stays")
            }
        }
    }
}

/// What a reload changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub added: usize,
    pub removed: usize,
    pub rotated: usize,
}

/// A running bridge. Dropping it stops the bridge and removes its hosts-file block.
#[must_use = "dropping the handle stops the bridge"]
pub struct BridgeHandle {
    forwards: Arc<Forwards>,
    shutdown: CancellationToken,
    workers: Arc<Workers>,
    admin: Option<crate::telemetry::admin::AdminHandle>,
    /// What the admin listener shows (also for `up`'s combined one).
    source: Arc<dyn crate::telemetry::admin::StatusSource>,
    /// Graceful stop: accept loops end.
    drain: CancellationToken,
    inflight: crate::dataplane::drain::InFlight,
    drain_timeout: Duration,
    config_file: Option<PathBuf>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for BridgeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeHandle").field("bound", &self.bound()).finish()
    }
}

impl BridgeHandle {
    /// `(hybrid connection, local address)` of every forward.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.forwards.bound()
    }

    /// The admin listener's address, if one was configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// The status the admin listener serves, for a combined one (`hyrelay up --admin`).
    pub fn status_source(&self) -> Arc<dyn crate::telemetry::admin::StatusSource> {
        self.source.clone()
    }

    /// Address of the first forward of `hc`.
    pub fn addr_of(&self, hc: &str) -> Option<SocketAddr> {
        self.bound()
            .into_iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(hc))
            .map(|(_, a)| a)
    }

    /// Re-reads the config file (SIGHUP); an invalid file is logged and changes nothing.
    pub fn reload(&self) {
        match &self.config_file {
            Some(f) => self.forwards.reload(f),
            None => tracing::info!("reload requested, but the bridge runs without a config file"),
        }
    }

    /// Applies a new set of forwards directly (tests, embedding).
    pub fn apply(&self, forwards: &[Forward]) -> anyhow::Result<Change> {
        self.forwards.apply(forwards)
    }

    pub fn stop(mut self) {
        self.halt();
    }

    /// Graceful stop: the local ports close, tunnels get up to `drain_timeout` (from the
    /// config) to finish; then a hard stop. `force` cuts the wait short.
    pub fn drain(mut self, force: &crate::dataplane::drain::Force) -> crate::dataplane::drain::DrainReport {
        tracing::info!(
            event = "drain_started",
            role = "bridge",
            timeout_s = self.drain_timeout.as_secs(),
            "draining: local ports closed, tunnels finishing"
        );
        self.drain.cancel();
        let inflight = self.inflight.clone();
        let report =
            crate::dataplane::drain::wait_idle(move || inflight.count(), self.drain_timeout, force).logged("bridge");
        self.halt();
        report
    }

    fn halt(&mut self) {
        self.drain.cancel();
        self.shutdown.cancel();
        if let Some(w) = self.watcher.take() {
            w.join().ok();
        }
        self.workers.stop();
        if *self.forwards.hosts_written.lock().unwrap_or_else(|e| e.into_inner()) {
            let p = &self.forwards.ctx.cfg.hosts_file;
            if let Err(e) = hosts::remove(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove the hosts-file block");
            }
        }
    }
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Resolves hosts-file forwards, binds every forward and starts serving. With
/// `cfg.config_file` set, changes to that file are applied as they happen.
pub fn start(cfg: BridgeConfig) -> anyhow::Result<BridgeHandle> {
    let cfg = Arc::new(cfg);
    let tls = crate::transport::tls::client_config(&cfg.ca_files)?;
    let workers = Workers::start_with("hyrelay-bridge", &cfg.runtime)?;
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();
    let inflight = crate::dataplane::drain::InFlight::default();
    let ctx = Arc::new(BridgeCtx {
        cfg: cfg.clone(),
        tls: tls.clone(),
        shutdown: shutdown.clone(),
        inflight: inflight.clone(),
        dialer: Arc::new(early::Dialer {
            tls: tls.clone(),
            proxy: cfg.proxy.clone(),
        }),
    });
    crate::telemetry::metrics::announce("bridge", cfg.runtime.worker_count());
    let totals = Arc::new(crate::dataplane::flush::Totals::default());
    crate::dataplane::flush::spawn(&workers, "bridge", totals.clone());
    let forwards = Arc::new(Forwards {
        ctx,
        workers: workers.clone(),
        drain: drain.clone(),
        running: Mutex::new(Vec::new()),
        loopbacks: Mutex::new(BTreeMap::new()),
        hosts_written: Mutex::new(false),
        fixed: cfg.fixed_forwards.clone(),
    });
    forwards.apply(&cfg.forwards)?;
    let f = forwards.clone();
    let source: Arc<dyn crate::telemetry::admin::StatusSource> = Arc::new(status::BridgeStatus::new(
        Arc::new(move || f.views()),
        totals,
        tls,
        cfg.proxy.clone(),
    ));
    let admin = match cfg.runtime.admin {
        Some(a) => Some(
            crate::telemetry::admin::spawn(a, source.clone())
                .with_context(|| format!("cannot listen on admin address {a}"))?,
        ),
        None => None,
    };
    let watcher = match &cfg.config_file {
        Some(file) => Some(spawn_watcher(file.clone(), forwards.clone(), drain.clone())?),
        None => None,
    };
    Ok(BridgeHandle {
        forwards,
        shutdown,
        workers,
        admin,
        source,
        drain,
        inflight,
        drain_timeout: cfg.runtime.drain_timeout,
        config_file: cfg.config_file.clone(),
        watcher,
    })
}

/// Applies the config file whenever its modification time changes (checked every second).
fn spawn_watcher(
    file: PathBuf,
    forwards: Arc<Forwards>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = mtime(&file);
    std::thread::Builder::new()
        .name("hyrelay-bridge-watch".into())
        .spawn(move || {
            while !stop.is_cancelled() {
                std::thread::sleep(Duration::from_millis(250));
                let now = mtime(&file);
                if now != seen {
                    seen = now;
                    forwards.reload(&file);
                }
            }
        })
}

/// Reads the endpoint of every hosts-file forward among `forwards` from the relay (on a
/// scratch thread, so this works inside or outside a runtime). Keyed by position.
fn resolve_endpoints(
    forwards: &[&Forward],
    tls: &Arc<rustls::ClientConfig>,
    proxy: &crate::transport::proxy::ProxyConfig,
    relay_timeout: Duration,
) -> anyhow::Result<BTreeMap<usize, HostPort>> {
    let wanted: Vec<(usize, Forward)> = forwards
        .iter()
        .enumerate()
        .filter(|(_, f)| f.listen == Listen::Resolve)
        .map(|(i, f)| (i, (*f).clone()))
        .collect();
    if wanted.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (tls, proxy, timeout) = (tls.clone(), proxy.clone(), relay_timeout.min(Duration::from_secs(20)));
    std::thread::spawn(move || -> anyhow::Result<BTreeMap<usize, HostPort>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut out = BTreeMap::new();
            for (i, f) in wanted {
                let hc = &f.hybrid_connection;
                let info = client::runtime_info(&f.connection_string, hc, &tls, &proxy, timeout)
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

/// Waits before each retry of a sender connect the relay refused for now: 503 (every
/// listener's backlog full, the relay busy; issue 9 item 9) or 404 "no listeners
/// connected" (an hcm reconnecting, after a relay node failed over). About 1.5 s in all,
/// then the app's connection is reset.
const RETRY_503: [Duration; 5] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];

/// Whether the relay's refusal says "not right now" rather than "no".
fn transient(e: &ws::ConnectError) -> bool {
    match e {
        ws::ConnectError::Rejected { status: 503, .. } => true,
        ws::ConnectError::Rejected { status: 404, reason } => reason.contains("no listeners connected"),
        _ => false,
    }
}

/// Opens the sender WebSocket for `hc`; a transient refusal is retried a few times
/// (bounded, see [`RETRY_503`]). App bytes already sent early ride along with every
/// retry.
async fn connect_with_retry(
    fw: &ForwardRt,
    cs: &ConnectionString,
    ctx: &BridgeCtx,
    tcp: &mut TcpStream,
) -> Result<ws::ClientWs, ws::ConnectError> {
    let hc = fw.hc.as_str();
    let mut waits = RETRY_503.iter();
    let mut early_sent = Vec::new();
    loop {
        let token = fw.tokens.token(cs, hc, ctx.cfg.token_ttl);
        let url = client::hc_url(cs, hc, "connect", &crate::proto::ids::new_id());
        let headers = [
            ("ServiceBusAuthorization", token.as_str()),
            (crate::proto::client_id::CLIENT_ID_HEADER, ctx.cfg.client_id.as_str()),
        ];
        match connect(fw, ctx, &url, &headers, tcp, &mut early_sent).await {
            Err(e) if transient(&e) => match waits.next() {
                Some(wait) => {
                    tracing::debug!(hc, reason = %e, retry_in_ms = wait.as_millis() as u64, "relay busy; retrying the connect");
                    tokio::time::sleep(*wait).await;
                }
                None => return Err(e),
            },
            other => return other,
        }
    }
}

/// Opens the sender WebSocket within the relay timeout: with early data (on a warm
/// connection if one is ready) once the relay offered it, else the standard way.
async fn connect(
    fw: &ForwardRt,
    ctx: &BridgeCtx,
    url: &ws::WsUrl,
    headers: &[(&str, &str)],
    tcp: &mut TcpStream,
    early_sent: &mut Vec<u8>,
) -> Result<ws::ClientWs, ws::ConnectError> {
    let cs = fw.connection_string();
    let relay = &cs.endpoint;
    let Some(offer) = ctx.cfg.extensions.then(|| fw.warm.offer(relay)).flatten() else {
        return ws::connect_via(url, Some(&ctx.tls), &ctx.cfg.proxy, headers, ctx.cfg.relay_timeout).await;
    };
    let mut with_opt_in = headers.to_vec();
    with_opt_in.push((crate::proto::extensions::EARLY_HEADER, "1"));
    // Reuse when the relay offers it, unless this bridge's tunnels run on the completion
    // backend, which closes them.
    let reuse = offer.reuse && !crate::dataplane::offload::active();
    if reuse {
        with_opt_in.push((crate::proto::extensions::REUSE_HEADER, "1"));
    }
    let warm = fw.warm.take(relay, reuse);
    tokio::time::timeout(
        ctx.cfg.relay_timeout,
        early::connect(warm, url, &with_opt_in, tcp, &ctx.dialer, early_sent),
    )
    .await
    .unwrap_or(Err(ws::ConnectError::Timeout(ctx.cfg.relay_timeout)))
}

/// One app connection: open the sender WebSocket and splice.
async fn serve(tcp: TcpStream, peer: SocketAddr, fw: Arc<ForwardRt>, ctx: Arc<BridgeCtx>) {
    let inflight = ctx.inflight.enter();
    crate::transport::sock::tune_accepted(&tcp);
    // Until the tunnel opens, however this ends, the app sees a reset, not an empty answer.
    let mut tcp = splice::ResetUnlessTaken::new(tcp);
    fw.warm.served();
    let cs = fw.connection_string();
    metrics::counter!(crate::telemetry::metrics::BRIDGE_LOCAL_CONNECTIONS, "hc" => fw.hc.clone()).increment(1);
    fw.status.lock().unwrap_or_else(|e| e.into_inner()).local_connections += 1;
    let hc = fw.hc.as_str();
    // Boxed: the dial's state (TLS included) is not carried in every app connection's task.
    let conn = tokio::select! {
        c = Box::pin(connect_with_retry(&fw, &cs, &ctx, tcp.get_mut())) => c,
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
            return;
        }
    };
    fw.record("ok", String::new());
    if ctx.cfg.extensions && fw.warm.learn(&cs.endpoint, &conn.response) {
        tracing::info!(hc, relay = %cs.endpoint.authority(), "the relay offers early data: keeping warm connections to it");
        let relay = {
            let fw = fw.clone();
            move || fw.connection_string().endpoint.clone()
        };
        let maintaining = fw
            .warm
            .clone()
            .maintain(fw.hc.clone(), relay, ctx.dialer.clone(), fw.stop.clone());
        tokio::spawn(maintaining);
    }
    tracing::debug!(event = "tunnel_open", hc, %peer, "tunnel open");
    let cfg = SpliceConfig {
        ping_interval: ctx.cfg.ping_interval,
        max_frame: ctx.cfg.max_frame,
        tcp_side: splice::TcpSide::App,
    };
    let name: Arc<str> = hc.into();
    let done = move |stats: splice::SpliceStats| {
        if stats.abnormal() {
            tracing::info!(event = "tunnel_closed", hc = %name, %peer, to_app = stats.to_tcp, from_app = stats.to_ws, end = %stats.end, "tunnel ended abnormally");
        } else {
            tracing::debug!(event = "tunnel_closed", hc = %name, %peer, to_app = stats.to_tcp, from_app = stats.to_ws, end = %stats.end, "tunnel closed");
        }
    };
    // The relay promised to keep this connection after a clean end: it comes back to the
    // warm queue then.
    let promised =
        crate::proto::extensions::flag_set(conn.response.headers.get(crate::proto::extensions::REUSE_HEADER));
    let back = (ctx.cfg.extensions && promised).then(|| fw.warm.back(fw.hc.clone(), cs.endpoint.clone()));
    let tcp = tcp.take();
    crate::dataplane::offload::spawn_ws_tcp(
        hc,
        conn.stream,
        conn.leftover,
        tcp,
        &cfg,
        &ctx.shutdown,
        inflight,
        back,
        done,
    );
}

#[cfg(test)]
mod tests {
    /// An app connection's task does not carry the dial to the relay (TLS, early data,
    /// retries: 3,368 bytes before it was boxed).
    #[test]
    fn an_app_connection_task_does_not_carry_its_dial() {
        crate::test_support::assert_future_at_most(&super::serve, 512, "a bridge app connection");
    }
}
