//! `hyrelay relay`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::relay::config::{RelayConfig, RelayFile, TlsSetting};

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Config file (TOML); flags override it.
    #[arg(long, short = 'c', env = "HYRELAY_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (default 0.0.0.0:443).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory: state.json (hybrid connections, keys), dev certificate, cli.json.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key", conflicts_with_all = ["self_signed", "plain"])]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Development: generate a CA and certificate in <data-dir>/tls.
    #[arg(long, conflicts_with = "plain")]
    self_signed: bool,
    /// Plain ws:// (only behind a TLS terminator, or for tests).
    #[arg(long)]
    plain: bool,
    /// Base URL clients reach this relay at (wss://host[:port]); used in rendezvous
    /// addresses and connection strings.
    #[arg(long)]
    public_url: Option<String>,
    /// Extra host name tokens may be scoped to (repeatable).
    #[arg(long = "hostname")]
    hostnames: Vec<String>,
    #[command(flatten)]
    runtime: crate::config::RuntimeArgs,
    /// Create a new namespace (new keys) when state.json is missing from a data directory
    /// that had one; without it the relay refuses to start then.
    #[arg(long)]
    new_namespace: bool,
    /// Join a relay cluster whose state lives in this Redis (redis://HOST:PORT[/DB] or
    /// rediss://); needs --public-url naming this node. A password belongs in
    /// HYRELAY_REDIS_PASSWORD or --redis-password-file, not in the URL on a command line.
    #[arg(long, value_name = "URL", env = "HYRELAY_REDIS", hide_env_values = true)]
    redis: Option<String>,
    /// File holding the Redis password (a cluster node).
    #[arg(long, value_name = "FILE")]
    redis_password_file: Option<PathBuf>,
    /// This node's name in the cluster (default: its public URL's host:port).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
}

impl RelayArgs {
    fn into_config(self) -> anyhow::Result<RelayConfig> {
        let mut file = match &self.config {
            Some(p) => crate::config::load_toml::<RelayFile>(p)?,
            None => RelayFile::default(),
        };
        // Flags replace file values before validation, so errors name the same fields.
        if let Some(l) = self.listen {
            file.listen = Some(l.to_string());
        }
        if let Some(d) = self.data_dir {
            file.data_dir = Some(d);
        }
        if let Some(u) = self.public_url {
            file.public_url = Some(u);
        }
        file.hostnames.extend(self.hostnames);
        // The runtime flags go to the file's fields too, so errors name the same fields.
        if self.runtime.workers.is_some() {
            file.workers = self.runtime.workers;
        }
        if self.runtime.io_backend.is_some() {
            file.io_backend = self.runtime.io_backend;
        }
        if let Some(a) = self.runtime.admin {
            file.admin = Some(a.to_string());
        }
        if self.redis.is_some() {
            file.cluster.redis = self.redis;
        }
        if self.redis_password_file.is_some() {
            file.cluster.redis_password_file = self.redis_password_file;
        }
        if self.node_id.is_some() {
            file.cluster.node_id = self.node_id;
        }
        let tls_flag = if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            Some(TlsSetting::Files { cert, key })
        } else if self.self_signed {
            Some(TlsSetting::SelfSigned {
                names: file.tls.names.clone(),
            })
        } else if self.plain {
            Some(TlsSetting::Plain)
        } else {
            None
        };
        if tls_flag.is_some() {
            // Validation would reject a file without TLS settings; the flag decides.
            file.tls.mode = Some(crate::relay::config::TlsMode::None);
        }
        let mut cfg = RelayConfig::from_file(file)?;
        cfg.new_namespace = self.new_namespace;
        if let Some(t) = tls_flag {
            cfg.tls = t;
        }
        Ok(cfg)
    }
}

pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let cfg = args.into_config()?;
    if cfg.tls == TlsSetting::Plain {
        tracing::warn!("TLS is off: run this relay only behind a TLS terminator or for tests");
    }
    let relay = crate::relay::start(cfg)?;
    eprintln!("hyrelay relay listening on {}", relay.local_addr());
    if let Some(a) = relay.admin_addr() {
        eprintln!("admin (metrics, health, status page) on http://{a}/");
    }
    if let Some(ca) = relay.ca_file() {
        eprintln!("development CA (trust it with --ca-file): {}", ca.display());
    }
    let mut hc = String::from("hyrelay hc");
    if relay.data_dir() != crate::config::default_data_dir("relay") {
        let dir = relay.data_dir().display().to_string();
        hc.push_str(&format!(" --relay-data-dir {}", super::hc_cmd::shell_word(&dir)));
    }
    eprintln!(
        "manage it on this machine with: {hc} list   (credentials: {})",
        relay.data_dir().join(crate::relay::CLI_FILE).display()
    );
    super::serving(
        &format!("relay serving on {}", relay.local_addr()),
        relay.status_source(),
    );
    super::wait_for_stop(|| {
        tracing::info!("SIGHUP: the relay keeps its state in the data directory; nothing to reload")
    })?;
    crate::telemetry::systemd::stopping();
    let report = relay.drain(&super::force_on_second_signal());
    super::report_drain("relay", &report);
    Ok(())
}
