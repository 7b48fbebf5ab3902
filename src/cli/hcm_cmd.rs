//! `hyrelay hcm ...`: the connection manager daemon and its local set of hybrid connections.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::hcm::config::{HcEntry, HcmConfig, HcmFile};
use crate::hcm::state;

#[derive(Debug, Args)]
pub struct HcmArgs {
    /// Config file (TOML).
    #[arg(long, short = 'c', global = true, env = "HYRELAY_HCM_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: connections.json (from `hcm add`) and status.json.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: HcmCommand,
}

#[derive(Debug, Subcommand)]
enum HcmCommand {
    /// Run the connection manager.
    Run {
        /// Extra CA certificate to trust for the relay (repeatable).
        #[arg(long, env = "HYRELAY_CA_FILE")]
        ca_file: Vec<PathBuf>,
        #[command(flatten)]
        runtime: crate::config::RuntimeArgs,
        /// HTTP proxy to reach the relay through: `http://[USER:PASSWORD@]HOST:PORT`. Default:
        /// the config's `proxy`, else HTTPS_PROXY, else ALL_PROXY (NO_PROXY lists hosts reached
        /// directly).
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
    },
    /// Add a hybrid connection by its Listen connection string (a running hcm picks it up).
    Add {
        /// The Listen connection string,
        /// `Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...`;
        /// `-` reads it from standard input. A string given here shows in the process list
        /// and shell history: prefer `-`, --connection-string-file or HYRELAY_CONNECTION_STRING.
        #[arg(value_name = "CONNECTION_STRING")]
        string: Option<String>,
        #[command(flatten)]
        cs: super::secret_args::ConnStrArg,
        /// Override the endpoint from the hybrid connection's metadata.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// List hybrid connections: endpoint, status, since when.
    List,
    /// Status by segment: relay ⇄ hcm (control channel) and hcm ⇄ endpoint (last dial).
    Status {
        /// Print the daemon's status JSON.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one hybrid connection: relay, endpoint, key name and token expiry
    /// (never the key), each segment's state, tunnels, traffic and recent errors.
    Show {
        /// The hybrid connection (as in `hcm list`).
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a hybrid connection added with `hcm add`.
    Remove {
        /// The hybrid connection (as in `hcm list`).
        name: String,
    },
}

fn load_config(args: &HcmArgs) -> anyhow::Result<HcmConfig> {
    let mut cfg = match &args.config {
        Some(p) => {
            let mut c = HcmConfig::from_file(crate::config::load_toml::<HcmFile>(p)?)?;
            c.config_file = Some(p.clone());
            c
        }
        None => HcmConfig::new(crate::config::default_data_dir("hcm")),
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

pub fn run(args: HcmArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(&args)?;
    match args.command {
        HcmCommand::Run {
            ca_file,
            runtime,
            proxy,
        } => {
            runtime.apply(&mut cfg.runtime)?;
            cfg.ca_files.extend(ca_file);
            cfg.proxy = super::proxy_setting(cfg.proxy, proxy.as_deref())?;
            let added = state::load_added(&cfg.data_dir)?.len();
            if cfg.hybrid_connections.is_empty() && added == 0 {
                tracing::warn!(data_dir = %cfg.data_dir.display(), "no hybrid connections yet: add one with `hyrelay hcm add -` (paste the Listen connection string)");
            }
            let hcm = crate::hcm::start(cfg)?;
            if let Some(a) = hcm.admin_addr() {
                eprintln!("admin (metrics, health, status page) on http://{a}/");
            }
            super::serving("hcm serving its hybrid connections", hcm.status_source());
            super::wait_for_stop(|| hcm.reload())?;
            crate::telemetry::systemd::stopping();
            let report = hcm.drain(&super::force_on_second_signal());
            super::report_drain("hcm", &report);
            Ok(())
        }
        HcmCommand::Add { string, cs, endpoint } => {
            let cs = match string {
                Some(s) => super::secret_args::from_inline(&s)?,
                None => cs.read()?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "no connection string: give it as `-` (standard input), --connection-string-file FILE or HYRELAY_CONNECTION_STRING"
                    )
                })?,
            };
            let ep = endpoint
                .map(|e| e.parse())
                .transpose()
                .map_err(|e: String| anyhow::anyhow!("--endpoint: {e}"))?;
            let entry = HcEntry::new(cs, ep)?;
            let replaced = state::add(&cfg.data_dir, &entry)?;
            println!(
                "{} {} (relay {})",
                if replaced { "updated" } else { "added" },
                entry.name(),
                entry.connection_string.endpoint.authority()
            );
            if state::read_status(&cfg.data_dir).is_some() {
                println!("the running hcm picks it up within a few seconds");
            } else {
                println!(
                    "start the hcm with: hyrelay hcm run --data-dir {}",
                    cfg.data_dir.display()
                );
            }
            Ok(())
        }
        HcmCommand::List => {
            list(&cfg);
            Ok(())
        }
        HcmCommand::Status { json } => status(&cfg, json),
        HcmCommand::Show { name, json } => show(&cfg, &name, json),
        HcmCommand::Remove { name } => {
            let n = state::remove(&cfg.data_dir, &name)?;
            anyhow::ensure!(
                n > 0,
                "{name} was not added with `hcm add` (hybrid connections from the config file are removed there)"
            );
            println!("removed {name}");
            Ok(())
        }
    }
}

/// Why there is no running status, for messages.
fn not_running(cfg: &HcmConfig) -> String {
    match state::read_status_any(&cfg.data_dir) {
        Some(f) if f.stopped => format!(
            "the hcm is not running (it stopped at {})",
            crate::clock::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.updated))
        ),
        Some(_) => format!(
            "the hcm is not running (its status in {} is stale: it was killed or hangs)",
            cfg.data_dir.display()
        ),
        None => format!("the hcm is not running (no status in {})", cfg.data_dir.display()),
    }
}

fn status(cfg: &HcmConfig, json: bool) -> anyhow::Result<()> {
    let Some(st) = state::read_status(&cfg.data_dir) else {
        anyhow::bail!("{}", not_running(cfg));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = st
        .hybrid_connections
        .iter()
        .map(|s| {
            let (channel, dial) = crate::hcm::status::segments(s);
            vec![
                s.name.clone(),
                channel,
                format!("{} ({dial})", s.endpoint.clone().unwrap_or_else(|| "?".into())),
                s.active_tunnels.to_string(),
                s.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    super::print_table(
        &["NAME", "RELAY <-> HCM", "HCM <-> ENDPOINT", "TUNNELS", "LAST ERROR"],
        &rows,
    );
    Ok(())
}

/// Every hybrid connection this hcm serves: the config file's, then those from `hcm add`
/// (which replace a configured one for the same relay and name). Marks where each came from.
fn entries(cfg: &HcmConfig) -> Vec<(HcEntry, &'static str)> {
    let mut out: Vec<(HcEntry, &'static str)> = cfg
        .hybrid_connections
        .iter()
        .map(|e| (e.clone(), "config file"))
        .collect();
    match state::load_added(&cfg.data_dir) {
        Ok(added) => {
            for a in added {
                out.retain(|(e, _)| e.key() != a.key());
                out.push((a, "hcm add"));
            }
        }
        Err(e) => eprintln!("warning: {e:#}"),
    }
    out
}

fn show(cfg: &HcmConfig, name: &str, json: bool) -> anyhow::Result<()> {
    let status = state::read_status(&cfg.data_dir);
    let running: Vec<&state::HcStatus> = status
        .iter()
        .flat_map(|s| s.hybrid_connections.iter())
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .collect();
    let mut docs = Vec::new();
    for (e, source) in entries(cfg).iter().filter(|(e, _)| e.name().eq_ignore_ascii_case(name)) {
        let relay = e.connection_string.endpoint.authority();
        let st = running.iter().copied().find(|h| h.relay == relay);
        docs.push(show_doc(Some(e), source, st, &relay));
    }
    // Served by the hcm from a config this command was not given (known from its status
    // file; the last one if it stopped).
    let last = state::read_status_any(&cfg.data_dir);
    for st in last.iter().flat_map(|s| s.hybrid_connections.iter()) {
        if st.name.eq_ignore_ascii_case(name) && !docs.iter().any(|d| d["relay"] == st.relay.as_str()) {
            let live = running.iter().copied().find(|h| h.relay == st.relay);
            let mut d = show_doc(None, "the hcm's configuration", live, &st.relay);
            d["name"] = serde_json::json!(st.name);
            d["keyName"] = serde_json::json!(st.key_name);
            d["endpoint"] = serde_json::json!(st.endpoint);
            docs.push(d);
        }
    }
    anyhow::ensure!(
        !docs.is_empty(),
        "{name} is not served by this hcm (see `hyrelay hcm list`)"
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(());
    }
    if status.is_none() {
        println!("({})", not_running(cfg));
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_show(d);
    }
    Ok(())
}

/// What `hcm show` prints for one hybrid connection (JSON; the key is never part of it).
fn show_doc(e: Option<&HcEntry>, source: &str, st: Option<&state::HcStatus>, relay: &str) -> serde_json::Value {
    let endpoint = st
        .and_then(|s| s.endpoint.clone())
        .or_else(|| e.and_then(|e| e.endpoint.as_ref()).map(|x| x.to_string()));
    let key_name = e
        .and_then(|e| e.connection_string.key_name().map(str::to_owned))
        .or_else(|| st.and_then(|s| s.key_name.clone()));
    serde_json::json!({
        "name": e.map(|e| e.name().to_owned()).or_else(|| st.map(|s| s.name.clone())),
        "relay": relay,
        "source": source,
        "endpoint": endpoint,
        "endpointFrom": match e {
            Some(e) if e.endpoint.is_some() => "override",
            Some(_) => "metadata",
            None => "the running hcm",
        },
        "keyName": key_name,
        "credential": match e {
            Some(e) if !e.has_key() => "SharedAccessSignature (not renewable)",
            _ => "key (tokens minted and renewed here)",
        },
        "running": st.is_some(),
        "status": st,
    })
}

fn print_show(d: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    };
    let st = &d["status"];
    let line = |k: &str, v: String| println!("{k:<18} {v}");
    line("name", s(&d["name"]));
    line("relay", s(&d["relay"]));
    line(
        "endpoint",
        format!("{} (from {})", s(&d["endpoint"]), s(&d["endpointFrom"])),
    );
    line("added by", s(&d["source"]));
    line("key name", format!("{} ({})", s(&d["keyName"]), s(&d["credential"])));
    if st.is_null() {
        line("status", "not running".into());
        return;
    }
    let hs: state::HcStatus = match serde_json::from_value(st.clone()) {
        Ok(h) => h,
        Err(_) => return,
    };
    let (channel, dial) = crate::hcm::status::segments(&hs);
    line("token expires", hs.token_expires.clone().unwrap_or_else(|| "-".into()));
    line("relay <-> hcm", channel);
    line("hcm <-> endpoint", dial);
    line(
        "tunnels",
        format!("{} active, {} accepted", hs.active_tunnels, hs.accepts),
    );
    line(
        "bytes",
        format!(
            "{} to / {} from the endpoint",
            crate::telemetry::admin::human_bytes(hs.bytes_to_endpoint),
            crate::telemetry::admin::human_bytes(hs.bytes_from_endpoint)
        ),
    );
    if hs.recent_errors.is_empty() {
        line("recent errors", "none".into());
    } else {
        println!("recent errors (newest last):");
        for e in &hs.recent_errors {
            println!("  {} {:?}: {}", e.at, e.segment, e.detail);
        }
    }
}

fn list(cfg: &HcmConfig) {
    let entries: Vec<HcEntry> = entries(cfg).into_iter().map(|(e, _)| e).collect();
    let status = state::read_status(&cfg.data_dir);
    if status.is_none() {
        println!("(the hcm is not running; status is unknown)");
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let st = status.as_ref().and_then(|s| {
                s.hybrid_connections.iter().find(|h| {
                    h.name.eq_ignore_ascii_case(e.name()) && h.relay == e.connection_string.endpoint.authority()
                })
            });
            let endpoint = st
                .and_then(|s| s.endpoint.clone())
                .or_else(|| e.endpoint.as_ref().map(|x| x.to_string()))
                .unwrap_or_else(|| "(from metadata)".into());
            let (state, since, detail) = match st {
                Some(s) => (
                    format!("{:?}", s.state),
                    s.since.clone(),
                    s.last_error.clone().unwrap_or_default(),
                ),
                None => ("Not running".into(), "-".into(), String::new()),
            };
            vec![
                e.name().to_owned(),
                e.connection_string.endpoint.authority(),
                endpoint,
                state,
                since,
                detail,
            ]
        })
        .collect();
    super::print_table(&["NAME", "RELAY", "ENDPOINT", "STATUS", "SINCE", "LAST ERROR"], &rows);
}
