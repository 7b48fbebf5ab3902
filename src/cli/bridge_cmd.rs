//! `hyrelay bridge`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bridge::config::{self, BridgeConfig, BridgeFile, Forward, Listen};
use crate::proto::connstr::ConnectionString;

#[derive(Debug, Args)]
pub struct BridgeArgs {
    /// Config file (TOML); its forwards are used in addition to -L/--resolve.
    #[arg(long, short = 'c', env = "HYRELAY_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Forward [BIND_ADDR:]PORT=HC_NAME (repeatable). The bind address defaults to 127.0.0.1.
    #[arg(short = 'L', value_name = "[BIND_ADDR:]PORT=HC_NAME")]
    forwards: Vec<String>,
    /// Hosts-file mode for HC_NAME: listen on a loopback address of its own at the endpoint's
    /// port and map the endpoint's host name there (repeatable).
    #[arg(long = "resolve", value_name = "HC_NAME")]
    resolve: Vec<String>,
    /// Send connection string (repeatable: one per hybrid connection, or one namespace-wide);
    /// `-` reads it from standard input. A value here shows in the process list: prefer
    /// --connection-string-file or the environment.
    #[arg(
        long = "connection-string",
        value_name = "STRING",
        env = "HYRELAY_CONNECTION_STRING",
        hide_env_values = true
    )]
    connection_strings: Vec<String>,
    /// File holding a Send connection string (repeatable; `-` = standard input;
    /// `${CREDENTIALS_DIRECTORY}/NAME` reads a systemd credential).
    #[arg(
        long = "connection-string-file",
        value_name = "FILE",
        env = "HYRELAY_CONNECTION_STRING_FILE"
    )]
    connection_string_files: Vec<PathBuf>,
    /// Hosts file for --resolve (default /etc/hosts).
    #[arg(long)]
    hosts_file: Option<PathBuf>,
    /// Extra CA certificate to trust for the relay (repeatable).
    #[arg(long, env = "HYRELAY_CA_FILE")]
    ca_file: Vec<PathBuf>,
    #[command(flatten)]
    runtime: crate::config::RuntimeArgs,
    /// What this bridge calls itself to the relay, shown in the relay's usage (`hc show`,
    /// its status page). Default: the config's `client_id`, else the host name.
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// HTTP proxy to reach the relay through: `http://[USER:PASSWORD@]HOST:PORT`. Default:
    /// the config's `proxy`, else HTTPS_PROXY, else ALL_PROXY (NO_PROXY lists hosts reached
    /// directly).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

fn build(args: BridgeArgs) -> anyhow::Result<BridgeConfig> {
    let mut list: Vec<ConnectionString> = args
        .connection_string_files
        .iter()
        .map(|f| super::secret_args::from_file(f))
        .collect::<anyhow::Result<_>>()?;
    for s in &args.connection_strings {
        list.push(super::secret_args::from_inline(s)?);
    }
    let mut forwards = Vec::new();
    for spec in &args.forwards {
        let (listen, hc) = config::parse_forward_spec(spec)?;
        forwards.push(Forward {
            connection_string: config::match_connection_string(&list, &hc)?,
            hybrid_connection: hc,
            listen,
        });
    }
    for hc in &args.resolve {
        forwards.push(Forward {
            connection_string: config::match_connection_string(&list, hc)?,
            hybrid_connection: hc.clone(),
            listen: Listen::Resolve,
        });
    }
    let mut cfg = match &args.config {
        Some(p) => {
            let mut c = BridgeConfig::from_file(crate::config::load_toml::<BridgeFile>(p)?)?;
            c.forwards.extend(forwards.iter().cloned());
            c.fixed_forwards = forwards;
            c.config_file = Some(p.clone());
            c
        }
        None => {
            anyhow::ensure!(
                !forwards.is_empty(),
                "nothing to forward: give -L [BIND_ADDR:]PORT=HC_NAME, --resolve HC_NAME or --config FILE"
            );
            BridgeConfig::new(forwards)
        }
    };
    cfg.ca_files.extend(args.ca_file);
    cfg.proxy = super::proxy_setting(cfg.proxy, args.proxy.as_deref())?;
    if let Some(h) = args.hosts_file {
        cfg.hosts_file = h;
    }
    args.runtime.apply(&mut cfg.runtime)?;
    if let Some(id) = &args.client_id {
        cfg.client_id = config::checked_client_id(id).context("--client-id")?;
    }
    Ok(cfg)
}

pub fn run(args: BridgeArgs) -> anyhow::Result<()> {
    let bridge = crate::bridge::start(build(args)?)?;
    for (hc, addr) in bridge.bound() {
        eprintln!("forwarding {addr} -> hybrid connection {hc}");
    }
    if let Some(a) = bridge.admin_addr() {
        eprintln!("admin (metrics, health, status page) on http://{a}/");
    }
    super::serving(
        &format!("bridge serving {} forward(s)", bridge.bound().len()),
        bridge.status_source(),
    );
    super::wait_for_stop(|| bridge.reload())?;
    crate::telemetry::systemd::stopping();
    let report = bridge.drain(&super::force_on_second_signal());
    super::report_drain("bridge", &report);
    Ok(())
}
