//! `hyrelay up`: everything in one process with no configuration — a relay on loopback
//! with a development certificate, a demo hybrid connection, an hcm serving it and a bridge
//! in front of it. The endpoint is a built-in echo service unless `--endpoint` names one.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bridge::config::{BridgeConfig, Forward, Listen};
use crate::client::Management;
use crate::hcm::config::{HcEntry, HcmConfig};
use crate::proto::metadata::HostPort;
use crate::relay::config::{RelayConfig, TlsSetting};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Tunnel to this HOST:PORT instead of the built-in echo endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// Relay address.
    #[arg(long, default_value = "127.0.0.1:9443")]
    relay_listen: SocketAddr,
    /// Where the app connects.
    #[arg(long, default_value = "127.0.0.1:9000")]
    bridge_listen: SocketAddr,
    /// Name of the demo hybrid connection.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Keep state here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Data-plane I/O backend of all three roles: epoll (default), uring or auto (README
    /// "I/O backends"; `up`'s relay uses TLS, whose tunnels run there too).
    #[arg(long, value_name = "BACKEND", env = "HYRELAY_IO_BACKEND", default_value_t)]
    io_backend: crate::config::IoBackend,
    /// Admin listener for all three roles: /metrics, /healthz, /readyz, /status and a
    /// status page at / (one table per role).
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<SocketAddr>,
    /// On Ctrl-C/SIGTERM, how long open tunnels get to finish (`30s`, `2m`); a second
    /// signal stops at once.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
}

/// Writes each connection string to `<dir>/<what>.connection-string` (owner-only).
fn write_connection_strings(
    dir: &std::path::Path,
    list: &[(&str, &crate::proto::connstr::ConnectionString)],
) -> anyhow::Result<Vec<PathBuf>> {
    list.iter()
        .map(|(what, cs)| {
            let p = dir.join(format!("{what}.connection-string"));
            crate::config::write_private(&p, format!("{}\n", cs.expose()).as_bytes())
                .with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        })
        .collect()
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let temp = args.data_dir.is_none();
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("hyrelay-up-{}", std::process::id())));
    let result = run_in(&args, &dir);
    if temp {
        std::fs::remove_dir_all(&dir).ok();
    }
    result
}

fn run_in(args: &UpArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let endpoint: HostPort = match &args.endpoint {
        Some(e) => e.parse().map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?,
        None => {
            let a = crate::echo::spawn("127.0.0.1:0".parse()?)?;
            HostPort {
                host: a.ip().to_string(),
                port: a.port(),
            }
        }
    };
    let mut rc = RelayConfig::new(
        args.relay_listen,
        dir.join("relay"),
        TlsSetting::SelfSigned { names: vec![] },
    );
    rc.runtime.set_workers(rc.runtime.worker_count().min(2))?;
    rc.runtime.io_backend = args.io_backend;
    rc.runtime.drain_timeout = args.drain_timeout;
    let relay = crate::relay::start(rc).with_context(|| {
        format!(
            "starting the relay on {} (pick another with --relay-listen)",
            args.relay_listen
        )
    })?;
    let ca: Vec<PathBuf> = relay.ca_file().map(|p| p.to_path_buf()).into_iter().collect();
    let tls = crate::transport::tls::client_config(&ca)?;
    let mgmt = Management::new(relay.manage_connection_string(), tls);
    let name = args.name.clone();
    let ep_text = endpoint.to_string();
    let (listen_cs, send_cs) = super::block_on(async {
        if mgmt.show(&name).await.is_ok() {
            mgmt.delete(&name).await?;
        }
        mgmt.create(&name, Some(&ep_text), true).await?;
        Ok::<_, anyhow::Error>((
            mgmt.connection_string(&name, false, false).await?,
            mgmt.connection_string(&name, true, false).await?,
        ))
    })??;
    let mut hc = HcmConfig::new(dir.join("hcm"));
    hc.runtime.set_workers(1)?;
    hc.runtime.io_backend = args.io_backend;
    hc.runtime.drain_timeout = args.drain_timeout;
    hc.ca_files = ca.clone();
    hc.hybrid_connections = vec![HcEntry::new(listen_cs.clone(), None)?];
    let hcm = crate::hcm::start(hc)?;
    let mut bc = BridgeConfig::new(vec![Forward {
        hybrid_connection: name.clone(),
        listen: Listen::Addr(args.bridge_listen),
        connection_string: send_cs.clone(),
    }]);
    bc.runtime.set_workers(1)?;
    bc.runtime.io_backend = args.io_backend;
    bc.runtime.drain_timeout = args.drain_timeout;
    bc.ca_files = ca.clone();
    let bridge = crate::bridge::start(bc).with_context(|| {
        format!(
            "starting the bridge on {} (pick another with --bridge-listen)",
            args.bridge_listen
        )
    })?;
    let app = bridge.bound()[0].1;
    println!(
        "hyrelay is up: app -> bridge {app} -> relay {} -> hcm -> endpoint {endpoint}",
        relay.local_addr()
    );
    println!();
    println!("  connect your app to:     {app}");
    println!(
        "  try it:                  echo hello | nc -N {} {}",
        app.ip(),
        app.port()
    );
    println!(
        "  relay (wss):             wss://localhost:{}",
        relay.local_addr().port()
    );
    if let Some(c) = relay.ca_file() {
        println!("  relay CA certificate:    {}", c.display());
    }
    println!("  hybrid connection:       {name} -> {endpoint}");
    let files = write_connection_strings(
        dir,
        &[
            ("listen", &listen_cs),
            ("send", &send_cs),
            ("manage", &relay.manage_connection_string()),
        ],
    )?;
    println!("  listen connection string (for `hyrelay hcm add`):");
    println!("    {}", listen_cs.expose());
    println!("  send connection string (for `hyrelay bridge --connection-string-file`):");
    println!("    {}", send_cs.expose());
    println!("  manage connection string (for `hyrelay hc --connection-string-file`):");
    println!("    {}", relay.manage_connection_string().expose());
    println!("  the same in owner-only files (kept while `up` runs), for commands that must not");
    println!("  show keys in the process list:");
    for f in &files {
        println!("    {}", f.display());
    }
    if let Some(c) = relay.ca_file() {
        println!(
            "  try: hyrelay hc list --connection-string-file {} --ca-file {}",
            files[2].display(),
            c.display()
        );
    }
    let admin = match args.admin {
        Some(a) => {
            let all = crate::telemetry::admin::Composite::new(vec![
                relay.status_source(),
                hcm.status_source(),
                bridge.status_source(),
            ]);
            let h = crate::telemetry::admin::spawn(a, std::sync::Arc::new(all))
                .with_context(|| format!("cannot listen on admin address {a}"))?;
            println!("  admin (metrics, health, status page): http://{}/", h.local_addr());
            Some(h)
        }
        None => None,
    };
    println!();
    println!(
        "Ctrl-C stops everything (open tunnels get up to {} to finish; a second Ctrl-C stops at once).",
        humantime::format_duration(args.drain_timeout)
    );
    super::wait_for_signal()?;
    // All three drain at once: the bridge closes its port, the hcm its control channel,
    // the relay stops accepting; tunnels that are open run on until they end or time out.
    let force = super::force_on_second_signal();
    let (f1, f2) = (force.clone(), force.clone());
    let b = std::thread::spawn(move || bridge.drain(&f1));
    let h = std::thread::spawn(move || hcm.drain(&f2));
    let r = relay.drain(&force);
    for (role, report) in [("bridge", b.join()), ("hcm", h.join())] {
        if let Ok(report) = report {
            super::report_drain(role, &report);
        }
    }
    super::report_drain("relay", &r);
    drop(admin);
    Ok(())
}
