//! Relay configuration: the TOML file form ([`RelayFile`]) and the validated form
//! ([`RelayConfig`]) the relay runs on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::config::opt_duration;
use crate::proto::connstr::RelayEndpoint;

/// How new senders are spread over a hybrid connection's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Uniformly at random (what Azure does). Default.
    #[default]
    Random,
    /// The listener with the fewest active tunnels, ties broken at random.
    LeastLoaded,
}

/// TLS on the relay's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Certificate chain and key from PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// Development: a generated CA and certificate in `<data_dir>/tls`, covering
    /// localhost, 127.0.0.1, ::1 and `names`.
    SelfSigned { names: Vec<String> },
    /// Plain `ws://`: only behind a TLS terminator, or in tests.
    Plain,
}

/// The relay's validated configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Workers, buffer budget, I/O backend, admin listener, drain timeout (shared by the
    /// three roles; see [`crate::config::RuntimeSettings`]).
    pub runtime: crate::config::RuntimeSettings,
    /// Address to listen on. Default: `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// Where `state.json` (entities, keys) and the development certificate live.
    pub data_dir: PathBuf,
    /// Start a new namespace (new root key) even though the data directory's `cli.json`
    /// shows one was created there and `state.json` is missing. Default: off, and the
    /// relay refuses to start in that case.
    pub new_namespace: bool,
    /// Base URL clients reach this relay at; used in rendezvous addresses and connection
    /// strings. Default: taken from each request's `Host` header.
    pub public_url: Option<RelayEndpoint>,
    /// Extra host names tokens may be scoped to (besides the `Host` header and `public_url`).
    pub hostnames: Vec<String>,
    pub tls: TlsSetting,
    /// Listeners allowed per hybrid connection. Default: 25.
    pub max_listeners: usize,
    /// Hybrid connections the namespace may hold (`limits.max_hybrid_connections`; the
    /// management API refuses to create more). Default: unlimited.
    pub max_hybrid_connections: Option<std::num::NonZeroUsize>,
    /// `accept`s (and other commands) queued for one listener before further senders get
    /// 503 "full backlog". An `accept` is about 1 KiB of JSON, so a listener that stops
    /// reading holds at most this many KiB until it is dropped (two ping periods). Sized so
    /// that a burst of a few thousand new tunnels is carried. Default: 4096.
    pub max_pending_accepts: usize,
    /// How long a control channel authenticated with a key that was regenerated (or whose
    /// rule was removed) stays open before it is closed with 1008. Default: 5 s.
    pub revoked_key_grace: Duration,
    pub balance: Balance,
    /// Ping period on control channels; two missed pongs end the channel. Default: 30 s.
    pub ping_interval: Duration,
    /// How long past its expiry a listener token keeps the control channel open unless
    /// renewed. Default: 5 min (clients renew at the expiry instant).
    pub token_grace: Duration,
    /// How long a sender waits for a listener to accept. Default: 30 s.
    pub accept_timeout: Duration,
    /// TCP accept to completed upgrade, TLS included. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Largest request head. Default: 16 KiB.
    pub max_head: usize,
    /// Largest data frame. Default: 1 MiB.
    pub max_frame: u64,
    /// Largest message on a listener control channel (a bigger one gets Close 1009).
    /// Default: 64 KiB (what the .NET listener reads into).
    pub max_control_message: usize,
    /// Open connections, all kinds together; more are closed at accept. Default: 100 000.
    pub max_connections: usize,
    /// Open connections from one source IP. A busy bridge or hcm host legitimately holds
    /// one connection per tunnel (both, if they share an address: two), so this is high.
    /// Default: 20 000.
    pub max_connections_per_ip: usize,
    /// Connections still in TLS, the HTTP head or authentication. Default: 2 000.
    pub max_unauthenticated: usize,
    /// Authentication failures from one IP before its requests are delayed. Default: 5.
    pub auth_failures_before_delay: u32,
    /// Failures further apart than this start a new count. Default: 60 s.
    pub auth_failure_window: Duration,
    /// Longest delay for an address that keeps failing (250 ms, doubling). Default: 5 s.
    pub auth_max_delay: Duration,
    /// Membership of a relay cluster sharing its state through Redis (`[cluster]`,
    /// `--redis`). Default: none, a single node with its own state file.
    pub cluster: Option<super::cluster::ClusterConfig>,
    /// hyrelay-to-hyrelay extensions (README "Extensions"): advertised to clients and
    /// honoured when our hcm and bridge opt in. Default: on.
    pub extensions: bool,
    /// HTTP request/response mode (`[http]`).
    pub http: super::http::config::HttpSettings,
}

impl RelayConfig {
    /// Defaults with the given listen address, data directory and TLS.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, tls: TlsSetting) -> Self {
        Self {
            listen,
            data_dir,
            new_namespace: false,
            public_url: None,
            hostnames: Vec::new(),
            runtime: crate::config::RuntimeSettings::default(),
            tls,
            max_listeners: 25,
            max_hybrid_connections: None,
            max_pending_accepts: 4096,
            revoked_key_grace: Duration::from_secs(5),
            balance: Balance::Random,
            ping_interval: Duration::from_secs(30),
            token_grace: Duration::from_secs(300),
            accept_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_head: crate::proto::handshake::DEFAULT_MAX_HEAD,
            max_frame: crate::proto::frame::DEFAULT_MAX_FRAME,
            max_control_message: crate::proto::control::MAX_CONTROL_MESSAGE,
            max_connections: 100_000,
            max_connections_per_ip: 20_000,
            max_unauthenticated: 2_000,
            auth_failures_before_delay: 5,
            auth_failure_window: Duration::from_secs(60),
            auth_max_delay: Duration::from_secs(5),
            cluster: None,
            extensions: true,
            http: Default::default(),
        }
    }

    /// Validates a parsed file.
    pub fn from_file(f: RelayFile) -> anyhow::Result<Self> {
        let listen = f
            .listen
            .as_deref()
            .unwrap_or("0.0.0.0:443")
            .parse()
            .context("field `listen`: expected IP:PORT")?;
        let tls = match (f.tls.mode, f.tls.cert, f.tls.key) {
            (Some(TlsMode::Files) | None, Some(cert), Some(key)) => TlsSetting::Files { cert, key },
            (Some(TlsMode::Files) | None, _, _) => bail!(
                "field `tls`: set `tls.cert` and `tls.key`, or `tls.mode = \"self-signed\"` for development, or `tls.mode = \"none\"` behind a TLS terminator"
            ),
            (Some(TlsMode::SelfSigned), _, _) => TlsSetting::SelfSigned { names: f.tls.names },
            (Some(TlsMode::None), _, _) => TlsSetting::Plain,
        };
        let public_url = f
            .public_url
            .as_deref()
            .map(RelayEndpoint::parse)
            .transpose()
            .context("field `public_url`: expected wss://HOST[:PORT] or ws://HOST:PORT")?;
        let mut c = Self::new(
            listen,
            f.data_dir.unwrap_or_else(|| crate::config::default_data_dir("relay")),
            tls,
        );
        c.public_url = public_url;
        c.hostnames = f.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect();
        c.runtime = crate::config::runtime::settings_of_file!(f)?;
        c.extensions = f.extensions.unwrap_or(true);
        let l = f.listeners;
        if let Some(n) = l.max_per_hybrid_connection {
            if n == 0 {
                bail!("field `listeners.max_per_hybrid_connection`: must be at least 1");
            }
            c.max_listeners = n;
        }
        c.balance = l.balance.unwrap_or_default();
        set_in(
            &mut c.max_pending_accepts,
            l.max_pending_accepts,
            16..=1_000_000,
            "listeners.max_pending_accepts",
        )?;
        if let Some(g) = l.revoked_key_grace {
            c.revoked_key_grace = g;
        }
        set(&mut c.ping_interval, l.ping_interval, "listeners.ping_interval")?;
        c.token_grace = l.token_grace.unwrap_or(c.token_grace);
        set(
            &mut c.accept_timeout,
            f.senders.accept_timeout,
            "senders.accept_timeout",
        )?;
        c.apply_limits(f.limits)?;
        c.cluster = f.cluster.validate(c.public_url.as_ref())?;
        if let Some(cl) = &c.cluster
            && c.public_url.is_none()
        {
            c.public_url = Some(cl.public_url.clone());
        }
        c.http = super::http::config::HttpSettings::from_file(f.http)?;
        Ok(c)
    }

    /// The `[limits]` table.
    fn apply_limits(&mut self, l: LimitsFile) -> anyhow::Result<()> {
        if let Some(n) = l.max_hybrid_connections {
            self.max_hybrid_connections = Some(std::num::NonZeroUsize::new(n).ok_or_else(|| {
                anyhow::anyhow!("field `limits.max_hybrid_connections`: must be at least 1 (omit it for no limit)")
            })?);
        }
        set(
            &mut self.handshake_timeout,
            l.handshake_timeout,
            "limits.handshake_timeout",
        )?;
        set(
            &mut self.auth_failure_window,
            l.auth_failure_window,
            "limits.auth_failure_window",
        )?;
        set(&mut self.auth_max_delay, l.auth_max_delay, "limits.auth_max_delay")?;
        set_in(
            &mut self.max_head,
            l.max_head_bytes,
            1024..=1 << 20,
            "limits.max_head_bytes",
        )?;
        set_in(
            &mut self.max_frame,
            l.max_frame_bytes,
            1024..=1 << 40,
            "limits.max_frame_bytes",
        )?;
        let control = 1024..=16 << 20;
        set_in(
            &mut self.max_control_message,
            l.max_control_message_bytes,
            control,
            "limits.max_control_message_bytes",
        )?;
        set_in(
            &mut self.max_connections,
            l.max_connections,
            1..=usize::MAX,
            "limits.max_connections",
        )?;
        set_in(
            &mut self.max_connections_per_ip,
            l.max_connections_per_ip,
            1..=usize::MAX,
            "limits.max_connections_per_ip",
        )?;
        set_in(
            &mut self.max_unauthenticated,
            l.max_unauthenticated,
            1..=usize::MAX,
            "limits.max_unauthenticated",
        )?;
        set_in(
            &mut self.auth_failures_before_delay,
            l.auth_failures_before_delay,
            1..=u32::MAX,
            "limits.auth_failures_before_delay",
        )?;
        Ok(())
    }
}

/// Sets `slot` to `v` if given and within `range`.
fn set_in<T>(slot: &mut T, v: Option<T>, range: std::ops::RangeInclusive<T>, field: &str) -> anyhow::Result<()>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if let Some(v) = v {
        if !range.contains(&v) {
            bail!("field `{field}`: must be between {} and {}", range.start(), range.end());
        }
        *slot = v;
    }
    Ok(())
}

fn set(slot: &mut Duration, v: Option<Duration>, field: &str) -> anyhow::Result<()> {
    if let Some(d) = v {
        if d.is_zero() {
            bail!("field `{field}`: must be longer than 0s");
        }
        *slot = d;
    }
    Ok(())
}

/// `tls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Files,
    SelfSigned,
    None,
}

/// The relay config file. Every field is optional; see [`RelayConfig`] for defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub public_url: Option<String>,
    pub admin: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub workers: Option<usize>,
    pub buffer_budget_mib: Option<usize>,
    pub io_backend: Option<crate::config::IoBackend>,
    pub extensions: Option<bool>,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub listeners: ListenersFile,
    #[serde(default)]
    pub senders: SendersFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub cluster: super::cluster::config::ClusterFile,
    #[serde(default)]
    pub http: super::http::config::HttpFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub mode: Option<TlsMode>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenersFile {
    pub max_per_hybrid_connection: Option<usize>,
    pub max_pending_accepts: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub revoked_key_grace: Option<Duration>,
    pub balance: Option<Balance>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub token_grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendersFile {
    #[serde(default, deserialize_with = "opt_duration")]
    pub accept_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_hybrid_connections: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub handshake_timeout: Option<Duration>,
    pub max_head_bytes: Option<usize>,
    pub max_frame_bytes: Option<u64>,
    pub max_control_message_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_unauthenticated: Option<usize>,
    pub auth_failures_before_delay: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub auth_failure_window: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub auth_max_delay: Option<Duration>,
}
