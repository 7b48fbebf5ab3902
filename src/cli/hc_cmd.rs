//! `hyrelay hc ...`: management of hybrid connections through the relay's API.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::Management;
use crate::proto::connstr::ConnectionString;

#[derive(Debug, Args)]
pub struct HcArgs {
    /// A namespace-wide Manage connection string (RootManageSharedAccessKey). Default: read
    /// from the local relay's data directory (cli.json).
    #[command(flatten)]
    cs: super::secret_args::ConnStrArg,
    /// The local relay's data directory, to find cli.json (default: the relay's default
    /// data directory).
    #[arg(long, global = true, value_name = "DIR")]
    relay_data_dir: Option<PathBuf>,
    /// Extra CA certificate to trust (PEM), e.g. the relay's development CA.
    #[arg(long, global = true, env = "HYRELAY_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// HTTP proxy to reach the relay through: `http://[USER:PASSWORD@]HOST:PORT`. Default:
    /// HTTPS_PROXY, else ALL_PROXY (NO_PROXY lists hosts reached directly).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: HcCommand,
}

#[derive(Debug, Subcommand)]
enum HcCommand {
    /// Create a hybrid connection for one endpoint.
    Create {
        /// Name of the new hybrid connection (letters, digits, `-`, `_`, `.`, `/`).
        name: String,
        /// The endpoint HOST:PORT on the private network.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: String,
        /// Let senders connect without a token.
        #[arg(long)]
        no_client_authorization: bool,
    },
    /// List hybrid connections with their status.
    List,
    /// Show one hybrid connection with its listeners, rules and keys.
    Show {
        /// The hybrid connection.
        name: String,
    },
    /// Delete a hybrid connection (its listeners are disconnected).
    Delete {
        /// The hybrid connection.
        name: String,
    },
    /// Print a connection string: --listen for an hcm, --send for a bridge.
    #[command(group = clap::ArgGroup::new("right").required(true).args(["listen", "send"]))]
    ConnectionString {
        /// The hybrid connection.
        name: String,
        /// The Listen string (rule defaultListener), for an hcm: Azure's "gateway
        /// connection string".
        #[arg(long)]
        listen: bool,
        /// The Send string (rule defaultSender), for a bridge.
        #[arg(long)]
        send: bool,
        /// Use the secondary key instead of the primary.
        #[arg(long)]
        secondary: bool,
        /// Write the string to FILE (owner-only, 0600) instead of printing it.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Print a SAS token for plain HTTP senders (--send, e.g.
    /// `curl -H "ServiceBusAuthorization: $(hyrelay hc token api --send)" https://relay/api/x`)
    /// or for a listener (--listen). Signed with the hybrid connection's own rule; with an
    /// entity connection string for NAME (--connection-string) no relay is contacted.
    Token {
        /// The hybrid connection.
        name: String,
        /// A Listen token (rule defaultListener), for a listener such as hyco-https.
        #[arg(long, conflicts_with = "send", required_unless_present = "send")]
        listen: bool,
        /// A Send token (rule defaultSender), for plain HTTP senders.
        #[arg(long)]
        send: bool,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// Sign with the secondary key.
        #[arg(long)]
        secondary: bool,
    },
    /// Replace a key of the hybrid connection's rules; tokens made with the old key stop working.
    #[command(group = clap::ArgGroup::new("key").required(true).args(["primary", "secondary"]))]
    RegenerateKey {
        /// The hybrid connection.
        name: String,
        /// Replace the primary key (connection strings printed by default use it).
        #[arg(long)]
        primary: bool,
        /// Replace the secondary key (for rotation: move clients to the secondary, then
        /// regenerate the primary).
        #[arg(long)]
        secondary: bool,
        /// Only this rule (defaultListener or defaultSender); default: both.
        #[arg(long, value_name = "RULE")]
        rule: Option<String>,
    },
}

/// Connection string and CA from flags, or from the local relay's cli.json.
fn credentials(args: &HcArgs) -> anyhow::Result<(ConnectionString, Vec<PathBuf>)> {
    let mut ca: Vec<PathBuf> = args.ca_file.iter().cloned().collect();
    if let Some(cs) = args.cs.read()? {
        return Ok((cs, ca));
    }
    let dir = args
        .relay_data_dir
        .clone()
        .unwrap_or_else(|| crate::config::default_data_dir("relay"));
    let path = dir.join(crate::relay::CLI_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no --connection-string given and no local relay credentials at {} (pass --connection-string or --relay-data-dir)",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    let cs = v["connectionString"]
        .as_str()
        .with_context(|| format!("{}: no connectionString", path.display()))?;
    if ca.is_empty()
        && let Some(f) = v["caFile"].as_str()
    {
        ca.push(PathBuf::from(f));
    }
    Ok((ConnectionString::parse(cs)?, ca))
}

/// `--ttl`: a humantime duration of at least one minute and at most a year.
fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(60) || d > std::time::Duration::from_secs(366 * 86_400) {
        return Err("a token lives between 1m and 366d".into());
    }
    Ok(d)
}

pub fn run(args: HcArgs) -> anyhow::Result<()> {
    let (cs, ca) = credentials(&args)?;
    // An entity connection string for the hybrid connection itself signs without the relay.
    if let HcCommand::Token { name, ttl, .. } = &args.command
        && cs.entity_path.as_deref().is_some_and(|e| e.eq_ignore_ascii_case(name))
    {
        println!("{}", crate::client::token(&cs, name, *ttl));
        return Ok(());
    }
    let tls = crate::transport::tls::client_config(&ca)?;
    let proxy = crate::transport::proxy::ProxyConfig::from_flag(args.proxy.as_deref())?;
    let m = Management::new(cs, tls).with_proxy(proxy);
    let hint = Hint {
        again: again(&args),
        inline_cs: args.cs.connection_string_file.is_none()
            && args.cs.connection_string.is_some()
            && std::env::var_os("HYRELAY_CONNECTION_STRING").is_none(),
    };
    super::block_on(async move { command(&m, args.command, args.json, &hint).await })?
}

/// How to run `hyrelay hc` again against the same relay, for printed hints: the flags this
/// command was given that locate the relay (never an inline key).
struct Hint {
    again: String,
    /// The manage string came inline on the command line (not repeated in hints).
    inline_cs: bool,
}

fn again(args: &HcArgs) -> String {
    let mut out = String::from("hyrelay hc");
    if let Some(d) = &args.relay_data_dir {
        out.push_str(&format!(" --relay-data-dir {}", shell_word(&d.display().to_string())));
    }
    if let Some(f) = &args.cs.connection_string_file {
        out.push_str(&format!(
            " --connection-string-file {}",
            shell_word(&f.display().to_string())
        ));
    }
    if let Some(f) = &args.ca_file
        && std::env::var_os("HYRELAY_CA_FILE").is_none()
    {
        out.push_str(&format!(" --ca-file {}", shell_word(&f.display().to_string())));
    }
    out
}

/// `s` quoted for a POSIX shell when it needs it.
pub(crate) fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => crate::proto::host::escape_controls(s),
        other => other.to_string(),
    }
}

async fn command(m: &Management, cmd: HcCommand, json: bool, hint: &Hint) -> anyhow::Result<()> {
    let (again, inline_cs) = (&hint.again, hint.inline_cs);
    match cmd {
        HcCommand::Create {
            name,
            endpoint,
            no_client_authorization,
        } => {
            endpoint
                .parse::<crate::proto::metadata::HostPort>()
                .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
            let v = m.create(&name, Some(&endpoint), !no_client_authorization).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("created {} -> {}", s(&v["name"]), s(&v["endpoint"]));
                println!("next: {again} connection-string {name} --listen --output {name}.listen   (for an hcm)");
                println!("      {again} connection-string {name} --send --output {name}.send       (for a bridge)");
                if inline_cs {
                    println!("      (with the same --connection-string as this command)");
                }
            }
        }
        HcCommand::List => {
            let v = m.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            let last = &e["lastSenderConnect"];
                            let last = if last.is_null() {
                                "-".into()
                            } else {
                                format!("{} {}", s(&last["result"]), s(&last["at"]))
                            };
                            vec![
                                s(&e["name"]),
                                s(&e["endpoint"]),
                                s(&e["status"]),
                                s(&e["listenerCount"]),
                                s(&e["activeTunnels"]),
                                last,
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            super::print_table(
                &[
                    "NAME",
                    "ENDPOINT",
                    "STATUS",
                    "LISTENERS",
                    "TUNNELS",
                    "LAST SENDER CONNECT",
                ],
                &rows,
            );
        }
        HcCommand::Show { name } => {
            let v = m.show(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            for k in [
                "name",
                "endpoint",
                "status",
                "listenerCount",
                "activeTunnels",
                "requiresClientAuthorization",
                "createdAt",
                "updatedAt",
            ] {
                println!("{k:<28} {}", s(&v[k]));
            }
            for l in v["listeners"].as_array().into_iter().flatten() {
                println!(
                    "listener {:<19} {} since {} ({} tunnels){}",
                    s(&l["id"]),
                    s(&l["remoteAddress"]),
                    s(&l["connectedAt"]),
                    s(&l["activeTunnels"]),
                    l["node"]
                        .as_str()
                        .map(|n| format!(" on node {}", crate::proto::host::escape_controls(n)))
                        .unwrap_or_default()
                );
            }
            for r in v["rules"].as_array().into_iter().flatten() {
                println!("rule {:<23} rights {}", s(&r["keyName"]), s(&r["rights"]));
                println!("  primaryKey   {}", s(&r["primaryKey"]));
                println!("  secondaryKey {}", s(&r["secondaryKey"]));
            }
            print_senders(&v["senders"]);
        }
        HcCommand::Delete { name } => {
            m.delete(&name).await?;
            println!("deleted {name}");
        }
        HcCommand::ConnectionString {
            name,
            send,
            secondary,
            output,
            ..
        } => {
            let cs = m.connection_string(&name, send, secondary).await?;
            match output {
                Some(f) => {
                    crate::config::write_private(&f, format!("{}\n", cs.expose()).as_bytes())
                        .with_context(|| format!("writing {}", f.display()))?;
                    println!("wrote {} (owner-only)", f.display());
                }
                None => println!("{}", cs.expose()),
            }
        }
        HcCommand::Token {
            name,
            send,
            ttl,
            secondary,
            ..
        } => {
            let cs = m.connection_string(&name, send, secondary).await?;
            println!("{}", crate::client::token(&cs, &name, ttl));
        }
        HcCommand::RegenerateKey {
            name, secondary, rule, ..
        } => {
            m.regenerate_key(&name, secondary, rule.as_deref()).await?;
            let which = if secondary { "secondary" } else { "primary" };
            println!(
                "regenerated the {which} key of {name} ({}); update the hcms and bridges that use it",
                rule.as_deref().unwrap_or("defaultListener and defaultSender")
            );
        }
    }
    Ok(())
}

/// The "recent senders" table of `hc show` (the relay's usage, issue 14 item 10).
fn print_senders(senders: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    };
    let list = senders.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        println!("recent senders               none (since the relay started)");
        return;
    }
    println!("recent senders (newest first; kept per relay node, in memory):");
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|x| {
            vec![
                s(&x["remoteAddress"]),
                s(&x["keyName"]),
                s(&x["clientId"]),
                s(&x["firstSeen"]),
                s(&x["lastSeen"]),
                format!("{} ({} open)", s(&x["tunnels"]), s(&x["activeTunnels"])),
                format!(
                    "{} / {}",
                    crate::telemetry::admin::human_bytes(x["bytesSent"].as_u64().unwrap_or(0)),
                    crate::telemetry::admin::human_bytes(x["bytesReceived"].as_u64().unwrap_or(0))
                ),
            ]
        })
        .collect();
    super::print_table(
        &[
            "ADDRESS",
            "KEY NAME",
            "CLIENT ID",
            "FIRST SEEN",
            "LAST SEEN",
            "TUNNELS",
            "BYTES SENT / RECEIVED",
        ],
        &rows,
    );
}
