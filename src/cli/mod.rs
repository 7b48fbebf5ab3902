//! The `hyrelay` command line: one subcommand per role plus management and the one-shot
//! demo. Parsing is clap; every command returns `anyhow::Result` to `main`.

mod bridge_cmd;
mod cluster_cmd;
mod docs;
pub mod doctor;
mod hc_cmd;
mod hcm_cmd;
mod relay_cmd;
pub mod secret_args;
mod up;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// Self-hosted Hybrid Connections: relay, connection manager (hcm) and bridge.
#[derive(Debug, Parser)]
#[command(name = "hyrelay", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `hyrelay=trace`, …). Default: the HYRELAY_LOG variable,
    /// else `info`; this flag wins over the variable.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the rendezvous service).
    Relay(relay_cmd::RelayArgs),
    /// Manage hybrid connections on a relay (create, list, show, delete, keys).
    Hc(hc_cmd::HcArgs),
    /// A relay cluster on Redis: its nodes and catalog, and importing a single node's state.
    Cluster(cluster_cmd::ClusterArgs),
    /// The connection manager on the private network.
    Hcm(hcm_cmd::HcmArgs),
    /// Run the bridge: local TCP ports that lead to hybrid connections.
    Bridge(bridge_cmd::BridgeArgs),
    /// Relay + demo hybrid connection + hcm + bridge in one process, with no config.
    Up(up::UpArgs),
    /// Validate a config file and exit non-zero naming the field at fault.
    CheckConfig {
        /// The config file (TOML).
        file: PathBuf,
        /// Which role the file is for (default: guessed from the file name).
        #[arg(long, value_parser = ["relay", "hcm", "bridge"])]
        role: Option<String>,
    },
    /// Print a shell completion script: `hyrelay completions bash > /etc/bash_completion.d/hyrelay`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Write man pages (hyrelay.1 and one per subcommand) into DIR.
    Manpages {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Check a connection string step by step: DNS, TCP, TLS, WebSocket, token, listeners, endpoint.
    Doctor(doctor::DoctorArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::telemetry::init(cli.log_format, cli.log_level.as_deref());
    match cli.command {
        Command::Relay(a) => relay_cmd::run(a),
        Command::Hc(a) => hc_cmd::run(a),
        Command::Cluster(a) => cluster_cmd::run(a),
        Command::Hcm(a) => hcm_cmd::run(a),
        Command::Bridge(a) => bridge_cmd::run(a),
        Command::Up(a) => up::run(a),
        Command::CheckConfig { file, role } => check_config(&file, role.as_deref()),
        Command::Doctor(a) => doctor::run(a),
        Command::Completions { shell } => docs::completions(shell),
        Command::Manpages { dir } => docs::manpages(&dir),
    }
}

/// Parses `file` as the config of `role` (or the role its name suggests).
pub fn check_config(file: &std::path::Path, role: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(file.exists(), "{}: no such file", file.display());
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let role = match role {
        Some(r) => r.to_owned(),
        None => ["relay", "hcm", "bridge"]
            .into_iter()
            .find(|r| name.contains(r))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("cannot tell the role from {name:?}; pass --role relay|hcm|bridge"))?,
    };
    // Systemd credentials named by the file exist only inside its unit: not read here.
    crate::config::secrets::checking(|| -> anyhow::Result<()> {
        match role.as_str() {
            "relay" => {
                crate::relay::config::RelayConfig::from_file(crate::config::load_toml(file)?)?;
            }
            "hcm" => {
                crate::hcm::config::HcmConfig::from_file(crate::config::load_toml(file)?)?;
            }
            _ => {
                crate::bridge::config::BridgeConfig::from_file(crate::config::load_toml(file)?)?;
            }
        }
        Ok(())
    })?;
    println!("{}: valid {role} configuration", file.display());
    let names_credentials = std::fs::read_to_string(file).is_ok_and(|t| {
        t.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("CREDENTIALS_DIRECTORY"))
    });
    if names_credentials && std::env::var_os(crate::config::secrets::CREDENTIALS_DIRECTORY).is_none() {
        println!("note: systemd credentials ($CREDENTIALS_DIRECTORY) are read only inside the unit; not checked here");
    }
    Ok(())
}

/// A role's proxy setting: `--proxy` over the config file's, then the environment for
/// whatever neither set.
fn proxy_setting(
    from_file: crate::transport::proxy::ProxyConfig,
    flag: Option<&str>,
) -> anyhow::Result<crate::transport::proxy::ProxyConfig> {
    let mut p = from_file;
    if let Some(url) = flag {
        p.set_proxy(crate::transport::proxy::Proxy::parse(url).context("--proxy")?);
    }
    p.with_process_env()
        .context("the proxy environment (HTTPS_PROXY, ALL_PROXY, NO_PROXY)")
}

/// An error and its causes as one line, `outer: cause: root`, each cause once: a cause whose
/// text the message before it already contains (code that wrote `format!("…: {e}")` and
/// kept `e` as the source) is not repeated.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(text.trim()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A role started and serves: tells systemd (`READY=1`, `Type=notify` units) and starts
/// the watchdog pings if the unit has `WatchdogSec=`.
fn serving(status: &str, source: std::sync::Arc<dyn crate::telemetry::admin::StatusSource>) {
    crate::telemetry::systemd::ready(status);
    crate::telemetry::systemd::spawn_watchdog(source);
}

/// Blocks until SIGINT or SIGTERM (Ctrl-C on Windows), calling `on_reload` for every
/// SIGHUP meanwhile.
pub(crate) fn wait_for_stop(mut on_reload: impl FnMut()) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut hup = signal(SignalKind::hangup())?;
            loop {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => { r?; break; }
                    _ = term.recv() => break,
                    _ = hup.recv() => on_reload(),
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = &mut on_reload;
            tokio::signal::ctrl_c().await?;
        }
        tracing::info!("stop requested; draining (a second signal stops at once)");
        Ok(())
    })
}

/// Blocks until SIGINT or SIGTERM.
pub(crate) fn wait_for_signal() -> anyhow::Result<()> {
    wait_for_stop(|| tracing::info!("SIGHUP ignored: nothing to reload"))
}

/// A drain that a second SIGINT/SIGTERM cuts short.
pub(crate) fn force_on_second_signal() -> crate::dataplane::drain::Force {
    let force = crate::dataplane::drain::Force::default();
    let f = force.clone();
    std::thread::Builder::new()
        .name("hyrelay-signals".into())
        .spawn(move || {
            if wait_for_signal().is_ok() {
                tracing::warn!("second stop signal: stopping at once");
                f.trigger();
            }
        })
        .ok();
    force
}

/// Prints how a drain went.
pub(crate) fn report_drain(role: &str, r: &crate::dataplane::drain::DrainReport) {
    if r.remaining == 0 {
        eprintln!("{role}: drained in {:.1} s", r.waited.as_secs_f64());
    } else {
        eprintln!(
            "{role}: stopped with {} connection(s) still open after {:.1} s{}",
            r.remaining,
            r.waited.as_secs_f64(),
            if r.forced { " (forced)" } else { " (drain timeout)" }
        );
    }
}

/// A small runtime for one-shot async CLI work.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// Prints rows as an aligned table with a header ([`format_table`]).
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", format_table(header, rows));
}

/// Rows as an aligned table with a header, one line each. Control characters in cells
/// (which may come from a relay or a peer) are written escaped, never raw.
pub fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| crate::proto::host::escape_controls(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == cells.len() {
                    c.to_string()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address in use (os error 98)");
        let inner = anyhow::Error::new(io).context("cannot listen on 127.0.0.1:1: Address in use (os error 98)");
        let e = inner.context("starting the relay");
        assert_eq!(
            error_chain(&e),
            "starting the relay: cannot listen on 127.0.0.1:1: Address in use (os error 98)"
        );
        let plain = anyhow::anyhow!("root").context("middle").context("outer");
        assert_eq!(error_chain(&plain), "outer: middle: root");
    }
}
