//! Bridge configuration: forwards from local TCP listeners to hybrid connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::config::{opt_duration, secrets};
use crate::proto::connstr::ConnectionString;

/// Where a forward listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A fixed address.
    Addr(SocketAddr),
    /// Hosts-file mode: a loopback address of its own at the endpoint's port, with the
    /// endpoint's host name mapped to it.
    Resolve,
}

/// One forward: local listener → hybrid connection.
#[derive(Debug, Clone)]
pub struct Forward {
    pub hybrid_connection: String,
    pub listen: Listen,
    /// A Send connection string for this hybrid connection (or namespace-wide).
    pub connection_string: ConnectionString,
}

/// The bridge's validated configuration.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Workers, buffer budget, I/O backend, admin listener, drain timeout (shared by the
    /// three roles; see [`crate::config::RuntimeSettings`]).
    pub runtime: crate::config::RuntimeSettings,
    /// Extra CA certificates to trust for the relay.
    pub ca_files: Vec<PathBuf>,
    /// How the relay is reached: through an HTTP proxy (`proxy`, `no_proxy`; unset parts
    /// come from `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` when the command line starts the
    /// role) or directly. Default: directly.
    pub proxy: crate::transport::proxy::ProxyConfig,
    /// Use the hyrelay extensions a relay advertises (warm connections, early data,
    /// connection reuse); off,
    /// or against a relay that does not offer them, the standard protocol alone. Default: on.
    pub extensions: bool,
    /// Timeout for reaching the relay and being accepted. Default: 40 s (the relay waits
    /// up to 30 s for a listener).
    pub relay_timeout: Duration,
    /// Lifetime of minted tokens (one is shared by new app connections for up to 5 minutes,
    /// `client::TokenCache`). Default: 1 h.
    pub token_ttl: Duration,
    /// Ping period on tunnels. Default: 30 s.
    pub ping_interval: Duration,
    /// Largest data frame accepted. Default: 1 MiB.
    pub max_frame: u64,
    /// Hosts file for [`Listen::Resolve`] forwards. Default: `/etc/hosts`
    /// (`%SystemRoot%\System32\drivers\etc\hosts` on Windows).
    pub hosts_file: PathBuf,
    /// All forwards to run at start.
    pub forwards: Vec<Forward>,
    /// Forwards from the command line, kept by every reload of `config_file`.
    pub fixed_forwards: Vec<Forward>,
    /// The config file, watched and re-read on change or SIGHUP. Default: none.
    pub config_file: Option<PathBuf>,
    /// What the bridge calls itself to the relay ([`crate::proto::client_id::CLIENT_ID_HEADER`]
    /// on every connect), so the relay's usage tells bridges apart. Default: the host name.
    pub client_id: String,
}

impl BridgeConfig {
    pub fn new(forwards: Vec<Forward>) -> Self {
        Self {
            runtime: crate::config::RuntimeSettings::default(),
            ca_files: Vec::new(),
            proxy: Default::default(),
            extensions: true,
            relay_timeout: Duration::from_secs(40),
            token_ttl: Duration::from_secs(3600),
            ping_interval: Duration::from_secs(30),
            max_frame: crate::proto::frame::DEFAULT_MAX_FRAME,
            hosts_file: default_hosts_file(),
            forwards,
            fixed_forwards: Vec::new(),
            config_file: None,
            client_id: default_client_id(),
        }
    }

    /// Validates a parsed file.
    pub fn from_file(f: BridgeFile) -> anyhow::Result<Self> {
        let default_cs = secrets::connection_string_field(
            f.connection_string.as_deref(),
            f.connection_string_file.as_deref(),
            "connection_string",
        )?;
        let default_deferred = matches!(default_cs, secrets::CsField::Deferred);
        let default_cs = default_cs.given();
        let mut forwards = Vec::new();
        let mut deferred = 0;
        for (i, fw) in f.forward.into_iter().enumerate() {
            let listen = parse_listen(&fw.listen).with_context(|| format!("field `forward[{i}].listen`"))?;
            let own = secrets::connection_string_field(
                fw.connection_string.as_deref(),
                fw.connection_string_file.as_deref(),
                &format!("forward[{i}].connection_string"),
            )?;
            let own_deferred = matches!(own, secrets::CsField::Deferred);
            let cs = match own.given().or_else(|| default_cs.clone()) {
                Some(cs) => cs,
                None if own_deferred || default_deferred => {
                    deferred += 1; // a systemd credential: only the unit reads it
                    continue;
                }
                None => bail!(
                    "field `forward[{i}].connection_string`: missing, and there is no top-level `connection_string`"
                ),
            };
            check_entity(&cs, &fw.hybrid_connection).with_context(|| format!("field `forward[{i}]`"))?;
            forwards.push(Forward {
                hybrid_connection: fw.hybrid_connection,
                listen,
                connection_string: cs,
            });
        }
        if forwards.is_empty() && deferred == 0 {
            bail!("field `forward`: at least one [[forward]] is needed");
        }
        let mut c = Self::new(forwards);
        c.runtime = crate::config::runtime::settings_of_file!(f)?;
        c.ca_files = f.ca_files;
        c.extensions = f.extensions.unwrap_or(true);
        c.proxy = crate::transport::proxy::ProxyConfig::from_settings(f.proxy.as_deref(), f.no_proxy.as_deref())
            .context("field `proxy` / `no_proxy`")?;
        if let Some(p) = f.hosts_file {
            c.hosts_file = p;
        }
        if let Some(id) = f.client_id {
            c.client_id = checked_client_id(&id).context("field `client_id`")?;
        }
        for (field, slot, v) in [
            ("relay_timeout", &mut c.relay_timeout, f.relay_timeout),
            ("ping_interval", &mut c.ping_interval, f.ping_interval),
        ] {
            if let Some(d) = v {
                if d.is_zero() {
                    bail!("field `{field}`: must be longer than 0s");
                }
                *slot = d;
            }
        }
        Ok(c)
    }
}

/// The platform's hosts file.
pub fn default_hosts_file() -> PathBuf {
    if cfg!(windows) {
        let root = std::env::var_os("SystemRoot").unwrap_or_else(|| "C:\\Windows".into());
        PathBuf::from(root).join("System32\\drivers\\etc\\hosts")
    } else {
        PathBuf::from("/etc/hosts")
    }
}

/// `PORT`, `ADDR:PORT` or `resolve`.
pub fn parse_listen(s: &str) -> anyhow::Result<Listen> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("resolve") {
        return Ok(Listen::Resolve);
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(Listen::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)));
    }
    s.parse::<SocketAddr>()
        .map(Listen::Addr)
        .map_err(|_| anyhow::anyhow!("{s:?} is not PORT, IP:PORT or \"resolve\""))
}

/// `-L [BIND_ADDR:]PORT=HC_NAME`.
pub fn parse_forward_spec(spec: &str) -> anyhow::Result<(Listen, String)> {
    let (listen, hc) = spec
        .rsplit_once('=')
        .ok_or_else(|| anyhow::anyhow!("-L {spec:?}: expected [BIND_ADDR:]PORT=HC_NAME"))?;
    if hc.trim().is_empty() {
        bail!("-L {spec:?}: the hybrid connection name is empty");
    }
    Ok((
        parse_listen(listen).with_context(|| format!("-L {spec:?}"))?,
        hc.trim().to_owned(),
    ))
}

/// Picks, for `hc`, the connection string naming it, else a namespace-wide one.
pub fn match_connection_string(list: &[ConnectionString], hc: &str) -> anyhow::Result<ConnectionString> {
    list.iter()
        .find(|c| c.entity_path.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(hc)))
        .or_else(|| list.iter().find(|c| c.entity_path.is_none()))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no --connection-string for hybrid connection {hc:?} (give one with EntityPath={hc}, or a namespace-wide one)"))
}

fn check_entity(cs: &ConnectionString, hc: &str) -> anyhow::Result<()> {
    match &cs.entity_path {
        Some(e) if !e.eq_ignore_ascii_case(hc) => {
            bail!("the connection string is for {e:?}, not {hc:?}")
        }
        _ => Ok(()),
    }
}

/// The bridge config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeFile {
    pub workers: Option<usize>,
    pub admin: Option<String>,
    pub buffer_budget_mib: Option<usize>,
    pub io_backend: Option<crate::config::IoBackend>,
    #[serde(default)]
    pub ca_files: Vec<PathBuf>,
    /// `http://[user:password@]host:port`.
    pub proxy: Option<String>,
    pub no_proxy: Option<Vec<String>>,
    pub extensions: Option<bool>,
    pub hosts_file: Option<PathBuf>,
    pub client_id: Option<String>,
    /// Default connection string for forwards without their own.
    pub connection_string: Option<String>,
    /// The same, read from a file (a systemd credential: `${CREDENTIALS_DIRECTORY}/NAME`).
    pub connection_string_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub relay_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub forward: Vec<ForwardFile>,
}

/// One `[[forward]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardFile {
    pub hybrid_connection: String,
    /// `PORT`, `IP:PORT` or `"resolve"`.
    pub listen: String,
    pub connection_string: Option<String>,
    pub connection_string_file: Option<PathBuf>,
}

/// The host name, else `bridge`: the default client id.
fn default_client_id() -> String {
    crate::config::system_hostname()
        .and_then(|h| checked_client_id(&h).ok())
        .unwrap_or_else(|| "bridge".into())
}

/// A client id as the relay records it, or why it would not be.
pub fn checked_client_id(id: &str) -> anyhow::Result<String> {
    use crate::proto::client_id;
    match client_id::client_id(Some(id)) {
        Some(v) if v != client_id::INVALID_CLIENT_ID => Ok(v),
        _ => bail!(
            "{id:?}: a client id is 1 to {} letters, digits and . _ - : @",
            client_id::MAX_CLIENT_ID
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        assert_eq!(
            parse_forward_spec("15432=db").unwrap(),
            (Listen::Addr("127.0.0.1:15432".parse().unwrap()), "db".into())
        );
        assert_eq!(
            parse_forward_spec("0.0.0.0:80=web/api").unwrap(),
            (Listen::Addr("0.0.0.0:80".parse().unwrap()), "web/api".into())
        );
        assert_eq!(
            parse_forward_spec("[::1]:5=x").unwrap().0,
            Listen::Addr("[::1]:5".parse().unwrap())
        );
        assert_eq!(parse_forward_spec("resolve=db").unwrap().0, Listen::Resolve);
        for bad in ["db", "abc=db", "15432=", "1.2.3.4=db"] {
            assert!(parse_forward_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connection_string_matching() {
        let a =
            ConnectionString::parse("Endpoint=sb://r/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=A").unwrap();
        let ns = ConnectionString::parse("Endpoint=sb://r/;SharedAccessKeyName=s;SharedAccessKey=k").unwrap();
        assert_eq!(match_connection_string(&[ns.clone(), a.clone()], "a").unwrap(), a);
        assert_eq!(match_connection_string(&[ns.clone(), a.clone()], "b").unwrap(), ns);
        assert!(match_connection_string(&[a], "b").is_err());
    }
}
