//! Connection-manager configuration: the TOML file ([`HcmFile`]) and the validated form
//! ([`HcmConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::allow::AllowList;
use crate::config::{opt_duration, secrets};
use crate::proto::connstr::{ConnectionString, Credential};
use crate::proto::metadata::HostPort;

/// One hybrid connection served by the hcm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcEntry {
    /// A Listen connection string with `EntityPath`.
    pub connection_string: ConnectionString,
    /// Overrides the entity's `endpoint` metadata.
    pub endpoint: Option<HostPort>,
    /// `Host` header for HTTP-mode requests forwarded to the endpoint. Default: the
    /// endpoint's `host:port`.
    pub http_host: Option<String>,
}

impl HcEntry {
    /// Validates that the string names an entity.
    pub fn new(connection_string: ConnectionString, endpoint: Option<HostPort>) -> anyhow::Result<Self> {
        if connection_string.entity_path.is_none() {
            bail!(
                "the connection string has no EntityPath; an hcm needs the hybrid connection's own (Listen) connection string"
            );
        }
        Ok(Self {
            connection_string,
            endpoint,
            http_host: None,
        })
    }

    /// The hybrid connection's name.
    pub fn name(&self) -> &str {
        self.connection_string.entity_path.as_deref().unwrap_or_default()
    }

    /// Identity of the entry: relay and hybrid connection (case-insensitive).
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.connection_string.endpoint.authority().to_ascii_lowercase(),
            self.name().to_lowercase()
        )
    }

    /// True if tokens can be minted (and so renewed) locally.
    pub fn has_key(&self) -> bool {
        matches!(self.connection_string.credential, Credential::Key { .. })
    }
}

/// The hcm's validated configuration.
#[derive(Debug, Clone)]
pub struct HcmConfig {
    /// Workers, buffer budget, I/O backend, admin listener, drain timeout (shared by the
    /// three roles; see [`crate::config::RuntimeSettings`]).
    pub runtime: crate::config::RuntimeSettings,
    /// Where `connections.json` (from `hcm add`) and `status.json` live.
    pub data_dir: PathBuf,
    /// Extra CA certificates to trust for the relay (PEM files).
    pub ca_files: Vec<PathBuf>,
    /// How the relay is reached: through an HTTP proxy (`proxy`, `no_proxy`; unset parts
    /// come from `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` when the command line starts the
    /// role) or directly. Default: directly.
    pub proxy: crate::transport::proxy::ProxyConfig,
    /// Use the hyrelay extensions a relay advertises (a pool of pre-opened rendezvous
    /// connections, each kept for the next tunnel); off, or against a relay that does not offer them, the standard
    /// protocol alone. Default: on.
    pub extensions: bool,
    /// Timeout for dialing an endpoint. Default: 10 s.
    pub dial_timeout: Duration,
    /// HTTP mode: how long the endpoint may take to send a response head (then 504), and
    /// the longest pause inside a body. Default: 55 s (inside the relay's 60 s, so the
    /// sender learns the endpoint's reason rather than the relay's).
    pub http_timeout: Duration,
    /// HTTP mode: how long a rendezvous the relay keeps for a sender connection's next
    /// requests may wait for one before the hcm closes it. Longer than the hyrelay relay's
    /// `[http] kept_rendezvous_idle` (30 s by default), so the relay normally closes first.
    /// Default: 60 s.
    pub http_rendezvous_idle: Duration,
    /// Timeout for reaching the relay (TCP, TLS, upgrade). Default: 20 s.
    pub relay_timeout: Duration,
    /// Lifetime of the tokens the hcm mints. Default: 1 h.
    pub token_ttl: Duration,
    /// Renew the control channel's token at 80 % of its lifetime. Default: on.
    pub renew_tokens: bool,
    /// Ping period on control channels and tunnels. Default: 30 s.
    pub ping_interval: Duration,
    /// A control channel that stayed up this long resets the reconnect backoff, so the hcm is
    /// back within about a second of every relay restart; shorter sessions (a relay that
    /// accepts and drops at once) keep backing off. Default: 2 s.
    pub stable_after: Duration,
    /// Longest wait between reconnect attempts. Default: 30 s.
    pub max_backoff: Duration,
    /// Largest data frame accepted on a tunnel. Default: 1 MiB.
    pub max_frame: u64,
    /// Endpoints this hcm may dial (see [`super::allow`] for the syntax). A hybrid
    /// connection whose endpoint is not allowed gets no control channel. Default: empty,
    /// which allows every endpoint (as Microsoft's HCM does).
    pub allowed_endpoints: AllowList,
    /// Hybrid connections from the config file (those added with `hcm add` come from the data dir).
    pub hybrid_connections: Vec<HcEntry>,
    /// The config file, watched and re-read on change or SIGHUP. Default: none.
    pub config_file: Option<PathBuf>,
}

impl HcmConfig {
    /// Defaults with the given data directory and no hybrid connections.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            runtime: crate::config::RuntimeSettings::default(),
            ca_files: Vec::new(),
            proxy: Default::default(),
            extensions: true,
            dial_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(55),
            http_rendezvous_idle: Duration::from_secs(60),
            relay_timeout: Duration::from_secs(20),
            token_ttl: Duration::from_secs(3600),
            renew_tokens: true,
            ping_interval: Duration::from_secs(30),
            stable_after: Duration::from_secs(2),
            max_backoff: Duration::from_secs(30),
            max_frame: crate::proto::frame::DEFAULT_MAX_FRAME,
            allowed_endpoints: AllowList::default(),
            hybrid_connections: Vec::new(),
            config_file: None,
        }
    }

    /// Validates a parsed file.
    pub fn from_file(f: HcmFile) -> anyhow::Result<Self> {
        let mut c = Self::new(f.data_dir.unwrap_or_else(|| crate::config::default_data_dir("hcm")));
        c.runtime = crate::config::runtime::settings_of_file!(f)?;
        c.ca_files = f.ca_files;
        c.extensions = f.extensions.unwrap_or(true);
        c.proxy = crate::transport::proxy::ProxyConfig::from_settings(f.proxy.as_deref(), f.no_proxy.as_deref())
            .context("field `proxy` / `no_proxy`")?;
        for (field, slot, v) in [
            ("dial_timeout", &mut c.dial_timeout, f.dial_timeout),
            ("relay_timeout", &mut c.relay_timeout, f.relay_timeout),
            ("http_timeout", &mut c.http_timeout, f.http_timeout),
            (
                "http_rendezvous_idle",
                &mut c.http_rendezvous_idle,
                f.http_rendezvous_idle,
            ),
            ("token_ttl", &mut c.token_ttl, f.token_ttl),
            ("ping_interval", &mut c.ping_interval, f.ping_interval),
        ] {
            if let Some(d) = v {
                if d.is_zero() {
                    bail!("field `{field}`: must be longer than 0s");
                }
                *slot = d;
            }
        }
        if c.token_ttl < Duration::from_secs(60) {
            bail!("field `token_ttl`: must be at least 60s");
        }
        c.allowed_endpoints = AllowList::parse(&f.allowed_endpoints)
            .map_err(|(i, e)| anyhow::anyhow!("field `allowed_endpoints[{i}]`: {e}"))?;
        for (i, hc) in f.hybrid_connection.into_iter().enumerate() {
            let cs = secrets::connection_string_field(
                hc.connection_string.as_deref(),
                hc.connection_string_file.as_deref(),
                &format!("hybrid_connection[{i}].connection_string"),
            )?;
            let cs = match cs {
                secrets::CsField::Given(cs) => cs,
                secrets::CsField::Deferred => continue, // a systemd credential: only the unit reads it
                secrets::CsField::Absent => {
                    bail!("field `hybrid_connection[{i}]`: needs `connection_string` or `connection_string_file`")
                }
            };
            let endpoint = hc
                .endpoint
                .map(|e| e.parse::<HostPort>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("field `hybrid_connection[{i}].endpoint`: {e}"))?;
            let mut entry = HcEntry::new(cs, endpoint).with_context(|| format!("field `hybrid_connection[{i}]`"))?;
            if let Some(h) = hc.http_host {
                if h.is_empty() || h.chars().any(|c| c.is_control() || c == ' ') {
                    bail!("field `hybrid_connection[{i}].http_host`: expected a host name, optionally with :PORT");
                }
                entry.http_host = Some(h);
            }
            if c.hybrid_connections.iter().any(|e| e.key() == entry.key()) {
                bail!("field `hybrid_connection[{i}]`: {} is listed twice", entry.name());
            }
            c.hybrid_connections.push(entry);
        }
        Ok(c)
    }
}

/// The hcm config file. Every field is optional; see [`HcmConfig`] for defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcmFile {
    pub data_dir: Option<PathBuf>,
    pub admin: Option<String>,
    pub workers: Option<usize>,
    pub buffer_budget_mib: Option<usize>,
    pub io_backend: Option<crate::config::IoBackend>,
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    /// `http://[user:password@]host:port`.
    pub proxy: Option<String>,
    pub no_proxy: Option<Vec<String>>,
    pub extensions: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub dial_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub relay_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub http_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub http_rendezvous_idle: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub token_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub allowed_endpoints: Vec<String>,
    #[serde(default)]
    pub hybrid_connection: Vec<HcFile>,
}

/// One `[[hybrid_connection]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HcFile {
    pub connection_string: Option<String>,
    /// The connection string in a file (a systemd credential: `${CREDENTIALS_DIRECTORY}/NAME`).
    pub connection_string_file: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub http_host: Option<String>,
}
