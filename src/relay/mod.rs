//! The relay role: the rendezvous service.
//!
//! Threads: one control plane ([`control::Plane`]) and N data-plane workers. Each worker
//! accepts TCP on its own socket, runs TLS and the HTTP head, then serves one of: a
//! listener control channel (`listener`), a sender connect or a listener's rendezvous
//! (`sender`, joined into a `tunnel`), or a plain HTTP request (`mgmt`: the
//! runtime-information GET and the management API; [`http`]: HTTP request/response mode).
//!
//! Limits: every connection is admitted against the caps in [`limits`] before TLS, and
//! authentication failures are slowed down per source address by [`throttle`].

pub mod auth;
pub mod cluster;
pub mod config;
mod conn;
pub mod control;
pub mod http;
pub mod limits;
mod listener;
pub mod mgmt;
mod pool;
mod sender;
mod status;
pub mod store;
pub mod throttle;
mod tunnel;
pub mod usage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use self::config::{RelayConfig, TlsSetting};
use self::control::{Ctl, Plane};
use self::store::{Catalog, ROOT_RULE, SharedState, Store};
use crate::dataplane::Workers;
use crate::proto::connstr::{ConnectionString, Credential, RelayEndpoint};

/// What every relay connection task shares.
pub(crate) struct Ctx {
    pub cfg: Arc<RelayConfig>,
    pub state: SharedState,
    pub ctl: Ctl,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Hard stop: tunnels end (1001).
    pub shutdown: CancellationToken,
    /// Graceful stop: accept loops and control channels end, tunnels continue.
    pub drain: CancellationToken,
    pub admission: Arc<limits::Admission>,
    pub throttle: throttle::AuthThrottle,
    /// The host names tokens must be scoped to ([`answers_to`]).
    pub audience: auth::Audience,
    /// Pooled rendezvous connections and the extensions advertised ([`pool`]).
    pub pool: pool::Pool,
    /// Recent senders per hybrid connection (issue 14 item 10).
    pub usage: Arc<usage::Usage>,
    /// HTTP-mode requests waiting for a listener.
    pub http: Arc<http::HttpRt>,
}

impl Ctx {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "wss" } else { "ws" }
    }

    /// Host names a token's audience may name: fixed at start ([`answers_to`]).
    fn hosts(&self) -> &auth::Audience {
        &self.audience
    }

    /// The endpoint clients use, for connection strings: `public_url`, else the `Host`
    /// the request came in on.
    fn public_endpoint(&self, host_header: Option<&str>) -> RelayEndpoint {
        match &self.cfg.cluster {
            // A cluster's clients use its shared address, not one node's own URL.
            Some(c) => {
                if let Some(s) = &c.service_url {
                    return s.clone();
                }
            }
            None => {
                if let Some(p) = &self.cfg.public_url {
                    return p.clone();
                }
            }
        }
        let tls = self.tls.is_some();
        let authority = host_header.unwrap_or("localhost");
        let (host, port) =
            crate::proto::connstr::split_host_port(authority).unwrap_or_else(|| ("localhost".into(), None));
        RelayEndpoint {
            tls,
            host,
            port: port.unwrap_or(if tls { 443 } else { 80 }),
        }
    }
}

/// A running relay. Dropping it stops the relay.
#[must_use = "dropping the handle stops the relay"]
pub struct RelayHandle {
    addr: SocketAddr,
    tls: bool,
    /// `public_url` when the relay serves a certificate from files (see
    /// [`RelayHandle::cli_endpoint`]).
    certified_url: Option<RelayEndpoint>,
    ca_file: Option<PathBuf>,
    data_dir: PathBuf,
    state: SharedState,
    shutdown: CancellationToken,
    workers: Arc<Workers>,
    control: Option<std::thread::JoinHandle<()>>,
    admin: Option<crate::telemetry::admin::AdminHandle>,
    /// What the admin listener shows (also for `up`'s combined one).
    source: Arc<dyn crate::telemetry::admin::StatusSource>,
    drain: CancellationToken,
    admission: Arc<limits::Admission>,
    drain_timeout: std::time::Duration,
    /// The data directory's lock, released by [`RelayHandle::halt`].
    dir_lock: Option<crate::config::DirLock>,
    /// Cluster membership, if this node is one of several.
    cluster: Option<Arc<cluster::Cluster>>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle").field("addr", &self.addr).finish()
    }
}

/// File in the data directory holding what the local `hyrelay hc` CLI needs: the root
/// Manage connection string and the CA to trust (owner-only permissions).
pub const CLI_FILE: &str = "cli.json";

impl RelayHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, if one was configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// The status the admin listener serves, for a combined one (`hyrelay up --admin`).
    pub fn status_source(&self) -> Arc<dyn crate::telemetry::admin::StatusSource> {
        self.source.clone()
    }

    /// The development CA certificate, in self-signed mode.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// How a client on this machine reaches the relay (`localhost` for TLS, so the
    /// development certificate matches).
    pub fn local_endpoint(&self) -> RelayEndpoint {
        RelayEndpoint {
            tls: self.tls,
            host: if self.tls {
                "localhost".into()
            } else {
                self.addr.ip().to_string()
            },
            port: self.addr.port(),
        }
    }

    /// Where the local `hyrelay hc` CLI reaches the relay (`cli.json`): with a certificate
    /// from files and a `public_url`, that URL, whose host the certificate names (the
    /// certificate need not name `localhost`); otherwise [`RelayHandle::local_endpoint`].
    pub fn cli_endpoint(&self) -> RelayEndpoint {
        self.certified_url.clone().unwrap_or_else(|| self.local_endpoint())
    }

    /// The namespace-wide Manage connection string (RootManageSharedAccessKey).
    ///
    /// # Panics
    /// On a cluster node that has no catalog yet (Redis away at its first start): see
    /// [`RelayHandle::try_manage_connection_string`].
    pub fn manage_connection_string(&self) -> ConnectionString {
        self.try_manage_connection_string()
            .expect("the catalog has a root rule")
    }

    /// The namespace-wide Manage connection string, if the catalog has its root rule.
    pub fn try_manage_connection_string(&self) -> Option<ConnectionString> {
        let st = self.state.load();
        let rule = st.namespace_rule(ROOT_RULE)?;
        Some(ConnectionString {
            endpoint: self.local_endpoint(),
            credential: Credential::Key {
                name: rule.key_name.clone(),
                key: rule.primary_key.clone(),
            },
            entity_path: None,
        })
    }

    /// The cluster this node belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Stops accepting, closes every connection and waits for the threads.
    pub fn stop(mut self) {
        self.halt();
    }

    /// Graceful stop: no new connections, control channels closed with 1001, tunnels and
    /// pending senders given up to `drain_timeout` (from the config) to finish; then a hard
    /// stop. `force` cuts the wait short.
    pub fn drain(mut self, force: &crate::dataplane::drain::Force) -> crate::dataplane::drain::DrainReport {
        tracing::info!(
            event = "drain_started",
            role = "relay",
            timeout_s = self.drain_timeout.as_secs(),
            "draining: no new connections, control channels closed"
        );
        if let Some(c) = &self.cluster {
            // Other nodes stop routing senders here at once.
            c.drain();
        }
        self.drain.cancel();
        let admission = self.admission.clone();
        let report =
            crate::dataplane::drain::wait_idle(move || admission.counts().0, self.drain_timeout, force).logged("relay");
        self.halt();
        report
    }

    /// Like [`RelayHandle::stop`] without consuming the handle; idempotent.
    pub fn halt(&mut self) {
        self.drain.cancel();
        self.shutdown.cancel();
        if let Some(t) = self.control.take() {
            t.join().ok();
        }
        self.workers.stop();
        self.admin.take();
        if let Some(c) = self.cluster.take() {
            c.stop();
        }
        self.dir_lock.take();
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Starts a relay: opens the state, binds, spawns the control plane and the workers.
pub fn start(cfg: RelayConfig) -> anyhow::Result<RelayHandle> {
    let cfg = Arc::new(cfg);
    let dir_lock = crate::config::lock_dir(&cfg.data_dir)?;
    match crate::config::remove_leftovers(&cfg.data_dir) {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(dir = %cfg.data_dir.display(), removed = n, "removed temporary files left by an interrupted write")
        }
        Err(e) => {
            tracing::warn!(dir = %cfg.data_dir.display(), error = %e, "cannot remove temporary files left by an interrupted write")
        }
    }
    let (catalog, cluster) = match &cfg.cluster {
        None => (Catalog::File(Store::open(&cfg.data_dir, cfg.new_namespace)?), None),
        Some(cc) => {
            let c = cluster::start(cc.clone(), &cfg.data_dir)?;
            (Catalog::Cluster(c.clone()), Some(c))
        }
    };
    let state = catalog.shared();
    let audience = answers_to(&cfg)?;
    tracing::info!(names = ?audience.names(), "tokens are accepted for these host names (public_url, hostnames, the certificate's names, the listen address)");
    let (tls, ca_file) = match &cfg.tls {
        TlsSetting::Files { cert, key } => (Some(crate::transport::tls::server_config_from_files(cert, key)?), None),
        TlsSetting::SelfSigned { names } => {
            let (c, files) = crate::transport::tls::self_signed(&cfg.data_dir.join("tls"), names)?;
            (Some(c), Some(files.ca))
        }
        TlsSetting::Plain => (None, None),
    };
    let listeners = crate::transport::sock::bind_listeners(cfg.listen, cfg.runtime.worker_count())
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listeners[0].local_addr()?;
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();
    let (plane, ctl, rx) = Plane::new(cfg.clone(), catalog);
    let plane_stop = shutdown.clone();
    let control = std::thread::Builder::new()
        .name("hyrelay-relay-ctl".into())
        .spawn(
            move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(plane.run(rx, plane_stop)),
                Err(e) => tracing::error!(error = %e, "cannot start the control plane runtime"),
            },
        )?;
    let workers = Workers::start_with("hyrelay-relay", &cfg.runtime)?;
    crate::telemetry::metrics::announce("relay", cfg.runtime.worker_count());
    let totals = Arc::new(crate::dataplane::flush::Totals::default());
    crate::dataplane::flush::spawn(&workers, "relay", totals.clone());
    if let Some(c) = &cluster {
        c.attach(ctl.clone(), totals.clone());
    }
    let usage = Arc::new(usage::Usage::default());
    let http_rt = Arc::new(http::HttpRt::default());
    let source: Arc<dyn crate::telemetry::admin::StatusSource> = Arc::new(status::RelayStatus {
        ctl: ctl.clone(),
        usage: usage.clone(),
        totals,
        history: Default::default(),
        draining: drain.clone(),
        listen: addr,
        cluster: cluster.clone(),
        http: http_rt.stats.clone(),
    });
    let admin = match cfg.runtime.admin {
        Some(a) => Some(
            crate::telemetry::admin::spawn(a, source.clone())
                .with_context(|| format!("cannot listen on admin address {a}"))?,
        ),
        None => None,
    };
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        state: state.clone(),
        ctl,
        tls,
        shutdown: shutdown.clone(),
        drain: drain.clone(),
        admission: limits::Admission::new(limits::Caps {
            total: cfg.max_connections,
            per_ip: cfg.max_connections_per_ip,
            unauthenticated: cfg.max_unauthenticated,
        }),
        throttle: throttle::AuthThrottle::new(throttle::ThrottleConfig {
            threshold: cfg.auth_failures_before_delay,
            window: cfg.auth_failure_window,
            max_delay: cfg.auth_max_delay,
        }),
        audience,
        pool: pool::Pool::new(cfg.extensions, cfg.handshake_timeout),
        usage,
        http: http_rt,
    });
    let admission = ctx.admission.clone();
    crate::dataplane::serve(&workers, listeners, drain.clone(), move |tcp, peer| {
        conn::serve(tcp, peer, ctx.clone())
    });
    let handle = RelayHandle {
        addr,
        tls: !matches!(cfg.tls, TlsSetting::Plain),
        certified_url: matches!(cfg.tls, TlsSetting::Files { .. })
            .then(|| cfg.public_url.clone())
            .flatten(),
        ca_file,
        data_dir: cfg.data_dir.clone(),
        state,
        shutdown,
        workers,
        control: Some(control),
        admin,
        source,
        drain,
        admission,
        drain_timeout: cfg.runtime.drain_timeout,
        dir_lock: Some(dir_lock),
        cluster,
    };
    write_cli_file(&handle)?;
    tracing::info!(addr = %addr, workers = cfg.runtime.worker_count(), tls = handle.tls, data_dir = %cfg.data_dir.display(), "relay started");
    Ok(handle)
}

/// The host names this relay answers to (issue 9 item 13): `public_url`'s host, the
/// configured `hostnames`, the names of its certificate (the file's subjectAltNames, or
/// localhost and the `tls.names` of a development certificate), and the listen address -
/// for an unspecified one (`0.0.0.0`, `::`) the loopback names and this machine's name.
pub fn answers_to(cfg: &RelayConfig) -> anyhow::Result<auth::Audience> {
    let mut names: Vec<String> = cfg.hostnames.clone();
    if let Some(p) = &cfg.public_url {
        names.push(p.host.clone());
    }
    let loopback = || ["localhost", "127.0.0.1", "[::1]"].map(String::from);
    match &cfg.tls {
        TlsSetting::Files { cert, .. } => {
            let certs = crate::transport::tls::read_certs(cert)?;
            if let Some(leaf) = certs.first() {
                names.extend(crate::transport::cert::subject_names(leaf));
            }
        }
        TlsSetting::SelfSigned { names: extra } => {
            names.extend(loopback());
            names.extend(extra.iter().cloned());
        }
        TlsSetting::Plain => {}
    }
    let ip = cfg.listen.ip();
    if ip.is_unspecified() {
        names.extend(loopback());
        names.extend(crate::config::system_hostname());
    } else {
        names.push(match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        });
    }
    Ok(auth::Audience::new(names))
}

fn write_cli_file(h: &RelayHandle) -> anyhow::Result<()> {
    let Some(mut cs) = h.try_manage_connection_string() else {
        tracing::warn!(
            "no catalog yet (Redis unreachable and nothing cached): cli.json not written; pass --connection-string to `hyrelay hc`"
        );
        return Ok(());
    };
    cs.endpoint = h.cli_endpoint();
    let body = serde_json::json!({
        "connectionString": cs.expose(),
        "caFile": h.ca_file().map(|p| p.display().to_string()),
    });
    crate::config::write_private(
        &h.data_dir.join(CLI_FILE),
        serde_json::to_string_pretty(&body)?.as_bytes(),
    )
    .context("writing the CLI credentials file")
}
