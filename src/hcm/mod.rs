//! The connection manager (hcm): on the private network, it holds one listener control
//! channel per configured hybrid connection and answers each `accept` by dialing the
//! endpoint and splicing it to a rendezvous WebSocket.
//!
//! Threads: a control thread runs the `Manager` (the set of hybrid connections, file
//! watching, the status file) and every control channel ([`channel`]); accepted tunnels
//! run on the data-plane workers ([`accept`]). Several hcm processes may serve the same
//! hybrid connection; the relay spreads senders over them.

pub mod accept;
pub mod allow;
pub mod channel;
pub mod config;
pub mod http;
pub mod pool;
pub mod state;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::config::{HcEntry, HcmConfig};
use self::state::{ChannelState, HcStatus};
use crate::dataplane::Workers;

/// Runtime state of one hybrid connection.
pub(crate) struct HcRt {
    pub entry: HcEntry,
    pub status: Mutex<HcStatus>,
    /// Stops the control channel (tunnels keep running).
    pub stop: CancellationToken,
    /// This listener's `sb-hc-id`, the same on every control channel it opens and on its
    /// pooled rendezvous connections, so the relay knows which listener a pooled
    /// connection belongs to (and balances senders over listeners, not connections).
    pub listener_id: String,
    /// Accepts that a rendezvous pool to this relay could have served, for its size.
    pub demand: pool::Demand,
    /// The Listen token for pooled rendezvous connections (reused for up to 5 minutes).
    pub tokens: crate::client::TokenCache,
}

impl HcRt {
    fn new(entry: HcEntry) -> Self {
        Self {
            status: Mutex::new(HcStatus::new(&entry)),
            entry,
            stop: CancellationToken::new(),
            listener_id: crate::proto::ids::new_id(),
            demand: pool::Demand::default(),
            tokens: Default::default(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut HcStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn set_state(&self, state: ChannelState) {
        self.update(|s| {
            if s.state != state {
                s.state = state;
                s.since = crate::clock::now_rfc3339();
            }
        });
    }

    pub fn snapshot(&self) -> HcStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the control channels and tunnels share.
pub(crate) struct HcmCtx {
    pub cfg: Arc<HcmConfig>,
    pub tls: Arc<rustls::ClientConfig>,
    pub workers: Arc<Workers>,
    /// Cancelled when the hcm stops; ends tunnels.
    pub shutdown: CancellationToken,
    /// Bytes and tunnels per hybrid connection, summed over workers.
    pub totals: Arc<crate::telemetry::metrics::Totals>,
    /// Accepts being served (dial, rendezvous, tunnel), for the drain.
    pub inflight: crate::dataplane::drain::InFlight,
    /// `allowed_endpoints` in effect (replaced by reloads).
    pub allowed: std::sync::RwLock<allow::AllowList>,
    /// Keep-alive connections to endpoints for HTTP-mode requests.
    pub http_pool: http::Pool,
}

#[derive(Default)]
pub(crate) struct Shared {
    hcs: Mutex<Vec<Arc<HcRt>>>,
}

impl Shared {
    /// Status of every hybrid connection served.
    pub fn snapshot(&self) -> Vec<HcStatus> {
        self.hcs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|h| h.snapshot())
            .collect()
    }
}

/// A running hcm. Dropping it stops the hcm.
#[must_use = "dropping the handle stops the hcm"]
pub struct HcmHandle {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    workers: Arc<Workers>,
    control: Option<std::thread::JoinHandle<()>>,
    admin: Option<crate::telemetry::admin::AdminHandle>,
    drain: CancellationToken,
    inflight: crate::dataplane::drain::InFlight,
    drain_timeout: std::time::Duration,
    reload_tx: tokio::sync::mpsc::UnboundedSender<()>,
    /// The data directory's lock, released by `halt`.
    dir_lock: Option<crate::config::DirLock>,
    /// Where status.json goes; the last one says the hcm stopped.
    data_dir: PathBuf,
    halted: bool,
    /// What the admin listener shows (also for `up`'s combined one).
    source: Arc<dyn crate::telemetry::admin::StatusSource>,
}

impl std::fmt::Debug for HcmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HcmHandle").finish_non_exhaustive()
    }
}

impl HcmHandle {
    /// Status of every hybrid connection served.
    pub fn status(&self) -> Vec<HcStatus> {
        self.shared.snapshot()
    }

    /// Re-reads the config file (SIGHUP); an invalid file is logged and changes nothing.
    pub fn reload(&self) {
        self.reload_tx.send(()).ok();
    }

    /// The admin listener's address, if one was configured.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// The status the admin listener serves, for a combined one (`hyrelay up --admin`).
    pub fn status_source(&self) -> Arc<dyn crate::telemetry::admin::StatusSource> {
        self.source.clone()
    }

    /// Stops control channels and tunnels and waits for the threads.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Graceful stop: control channels closed (the relay sends no more accepts), tunnels
    /// given up to `drain_timeout` (from the config) to finish; then a hard stop. `force`
    /// cuts the wait short.
    pub fn drain(mut self, force: &crate::dataplane::drain::Force) -> crate::dataplane::drain::DrainReport {
        tracing::info!(
            event = "drain_started",
            role = "hcm",
            timeout_s = self.drain_timeout.as_secs(),
            "draining: control channels closed, tunnels finishing"
        );
        self.drain.cancel();
        if let Some(t) = self.control.take() {
            t.join().ok();
        }
        let inflight = self.inflight.clone();
        let report =
            crate::dataplane::drain::wait_idle(move || inflight.count(), self.drain_timeout, force).logged("hcm");
        self.halt();
        report
    }

    fn halt(&mut self) {
        self.drain.cancel();
        self.shutdown.cancel();
        if let Some(t) = self.control.take() {
            t.join().ok();
        }
        self.workers.stop();
        if !std::mem::replace(&mut self.halted, true) {
            // `hcm status` then says the hcm is not running, with no tunnels.
            state::write_stopped(&self.data_dir, &self.shared.snapshot()).ok();
        }
        self.dir_lock.take();
    }
}

impl Drop for HcmHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Starts an hcm serving the config's hybrid connections plus those added with `hcm add`.
pub fn start(cfg: HcmConfig) -> anyhow::Result<HcmHandle> {
    // One hcm per data directory (issue 9 item 6); `hcm add` and `remove` do not lock.
    let dir_lock = crate::config::lock_dir(&cfg.data_dir)?;
    if let Err(e) = crate::config::remove_leftovers(&cfg.data_dir) {
        tracing::warn!(dir = %cfg.data_dir.display(), error = %e, "cannot remove temporary files left by an interrupted write");
    }
    let cfg = Arc::new(cfg);
    let tls = crate::transport::tls::client_config(&cfg.ca_files)?;
    let workers = Workers::start_with("hyrelay-hcm", &cfg.runtime)?;
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();
    let inflight = crate::dataplane::drain::InFlight::default();
    let shared = Arc::new(Shared::default());
    crate::telemetry::metrics::announce("hcm", cfg.runtime.worker_count());
    let totals = Arc::new(crate::dataplane::flush::Totals::default());
    crate::dataplane::flush::spawn(&workers, "hcm", totals.clone());
    let source: Arc<dyn crate::telemetry::admin::StatusSource> = Arc::new(status::HcmStatus {
        shared: shared.clone(),
        totals: totals.clone(),
        history: Default::default(),
    });
    let admin = match cfg.runtime.admin {
        Some(a) => Some(
            crate::telemetry::admin::spawn(a, source.clone())
                .map_err(|e| anyhow::anyhow!("cannot listen on admin address {a}: {e}"))?,
        ),
        None => None,
    };
    let ctx = Arc::new(HcmCtx {
        cfg: cfg.clone(),
        tls,
        workers: workers.clone(),
        shutdown: shutdown.clone(),
        totals,
        inflight: inflight.clone(),
        allowed: std::sync::RwLock::new(cfg.allowed_endpoints.clone()),
        http_pool: http::Pool::default(),
    });
    // Fail early on a corrupt connections file rather than serving a partial set.
    state::load_added(&cfg.data_dir)?;
    let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
    let manager = Manager {
        configured: cfg.hybrid_connections.clone(),
        ctx,
        shared: shared.clone(),
        running: HashMap::new(),
        reloads,
    };
    // The manager (control channels) ends on drain; tunnels on the workers end on shutdown.
    let stop = drain.clone();
    let control = std::thread::Builder::new()
        .name("hyrelay-hcm-ctl".into())
        .spawn(
            move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(manager.run(stop)),
                Err(e) => tracing::error!(error = %e, "cannot start the hcm control runtime"),
            },
        )?;
    Ok(HcmHandle {
        shared,
        shutdown,
        workers,
        control: Some(control),
        admin,
        drain,
        inflight,
        drain_timeout: cfg.runtime.drain_timeout,
        reload_tx,
        dir_lock: Some(dir_lock),
        data_dir: cfg.data_dir.clone(),
        halted: false,
        source,
    })
}

/// Owns the set of served hybrid connections.
struct Manager {
    ctx: Arc<HcmCtx>,
    shared: Arc<Shared>,
    running: HashMap<String, Arc<HcRt>>,
    /// Hybrid connections from the config file as last (re)loaded.
    configured: Vec<HcEntry>,
    /// Reload requests (SIGHUP).
    reloads: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Manager {
    async fn run(mut self, stop: CancellationToken) {
        let dir: PathBuf = self.ctx.cfg.data_dir.clone();
        let mut seen = state::connections_mtime(&dir);
        let config_mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut config_seen = self.ctx.cfg.config_file.as_deref().and_then(config_mtime);
        self.reconcile(self.desired());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_written = String::new();
        let mut last_write = std::time::Instant::now() - Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(()) = self.reloads.recv() => self.reload(),
                _ = tick.tick() => {
                    let now = state::connections_mtime(&dir);
                    if now != seen {
                        seen = now;
                        self.reconcile(self.desired());
                    }
                    let cfg_now = self.ctx.cfg.config_file.as_deref().and_then(config_mtime);
                    if cfg_now != config_seen {
                        config_seen = cfg_now;
                        self.reload();
                    }
                    let list: Vec<HcStatus> = self.running.values().map(|h| self.with_bytes(h.snapshot())).collect();
                    let text = serde_json::to_string(&list).unwrap_or_default();
                    if text != last_written || last_write.elapsed() >= Duration::from_secs(5) {
                        if let Err(e) = state::write_status(&dir, &list) {
                            tracing::warn!(error = %e, "cannot write the status file");
                        }
                        last_written = text;
                        last_write = std::time::Instant::now();
                    }
                }
            }
        }
        for hc in self.running.values() {
            hc.stop.cancel();
        }
        // Let control channels finish their close (WebSocket Close, its echo, TLS
        // close_notify), bounded: each ends in at most about 3 s.
        let closing = Instant::now();
        while closing.elapsed() < Duration::from_secs(4)
            && self
                .running
                .values()
                .any(|h| h.snapshot().state != ChannelState::Stopped)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let list: Vec<HcStatus> = self
            .running
            .values()
            .map(|h| {
                let mut s = h.snapshot();
                s.state = ChannelState::Stopped;
                s
            })
            .collect();
        state::write_status(&dir, &list).ok();
    }

    /// Re-reads the config file: hybrid connections are added, removed or (new key)
    /// restarted and `allowed_endpoints` replaced, without touching open tunnels. An
    /// invalid file changes nothing. Other settings take effect after a restart.
    fn reload(&mut self) {
        let Some(file) = self.ctx.cfg.config_file.clone() else {
            tracing::info!("reload requested, but the hcm runs without a config file");
            return;
        };
        let new = match crate::config::load_toml::<config::HcmFile>(&file).and_then(HcmConfig::from_file) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(event = "reload_rejected", file = %file.display(), error = %format!("{e:#}"), "configuration reload rejected; the running configuration stays");
                return;
            }
        };
        let old = &self.ctx.cfg;
        for (field, changed) in [
            ("data_dir", new.data_dir != old.data_dir),
            ("workers", new.runtime.workers != old.runtime.workers),
            ("admin", new.runtime.admin != old.runtime.admin),
            ("ca_files", new.ca_files != old.ca_files),
            ("proxy", new.proxy.clone().with_process_env().as_ref() != Ok(&old.proxy)),
        ] {
            if changed {
                tracing::warn!(file = %file.display(), field, "this setting changed; it takes effect after a restart");
            }
        }
        let allowed_changed = {
            let mut a = self.ctx.allowed.write().unwrap_or_else(|e| e.into_inner());
            let changed = *a != new.allowed_endpoints;
            *a = new.allowed_endpoints.clone();
            changed
        };
        let before: Vec<String> = self.running.keys().cloned().collect();
        self.configured = new.hybrid_connections;
        self.reconcile(self.desired());
        // A narrower allow list applies at once: channels whose endpoint is no longer
        // allowed restart (and then refuse); their tunnels are not touched.
        let mut restarted = 0;
        if allowed_changed {
            for hc in self.running.values() {
                let ep = hc
                    .snapshot()
                    .endpoint
                    .and_then(|e| e.parse::<crate::proto::metadata::HostPort>().ok());
                if ep.is_some_and(|ep| !self.ctx.allowed.read().unwrap_or_else(|e| e.into_inner()).allows(&ep)) {
                    hc.stop.cancel();
                    restarted += 1;
                }
            }
            if restarted > 0 {
                self.running.retain(|_, hc| !hc.stop.is_cancelled());
                self.reconcile(self.desired());
            }
        }
        let added = self.running.keys().filter(|k| !before.contains(k)).count();
        let removed = before.iter().filter(|k| !self.running.contains_key(*k)).count();
        tracing::info!(event = "reload_applied", file = %file.display(), added, removed, restarted, "configuration reloaded");
    }

    fn with_bytes(&self, mut s: HcStatus) -> HcStatus {
        let t = self.ctx.totals.get(&s.name);
        s.bytes_to_endpoint = t.bytes_up;
        s.bytes_from_endpoint = t.bytes_down;
        s
    }

    /// Config entries plus `hcm add` entries (an added entry replaces a configured one
    /// for the same relay and hybrid connection).
    fn desired(&self) -> Vec<HcEntry> {
        let mut out = self.configured.clone();
        match state::load_added(&self.ctx.cfg.data_dir) {
            Ok(added) => {
                for a in added {
                    out.retain(|e| e.key() != a.key());
                    out.push(a);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read added hybrid connections; keeping the current set");
                return self.running.values().map(|h| h.entry.clone()).collect();
            }
        }
        out
    }

    fn reconcile(&mut self, desired: Vec<HcEntry>) {
        let keep: HashMap<String, HcEntry> = desired.into_iter().map(|e| (e.key(), e)).collect();
        self.running.retain(|k, hc| {
            let same = keep.get(k) == Some(&hc.entry);
            if !same {
                tracing::info!(hc = %hc.entry.name(), "hybrid connection removed or changed; stopping its control channel");
                hc.stop.cancel();
            }
            same
        });
        for (k, e) in keep {
            if self.running.contains_key(&k) {
                continue;
            }
            tracing::info!(hc = %e.name(), relay = %e.connection_string.endpoint.authority(), "serving hybrid connection");
            let hc = Arc::new(HcRt::new(e));
            tokio::spawn(channel::run(hc.clone(), self.ctx.clone()));
            self.running.insert(k, hc);
        }
        *self.shared.hcs.lock().unwrap_or_else(|e| e.into_inner()) = self.running.values().cloned().collect();
    }
}
