//! What the app's traffic goes through, started inside the WAN's namespaces:
//!
//! - `direct`: the app connects to the endpoint in the private namespace (routed through
//!   the relay namespace: both links);
//! - hyrelay: `relay` in the relay namespace (`ws://`, or `wss://` with a self-signed
//!   certificate), `hcm run` in the private namespace, `bridge -L` in the app namespace;
//! - `rathole`: its server in the relay namespace, its client in the private one; the app
//!   connects to the server's service port across the first link.
//!
//! Invariant: a [`Running`] owns its processes and kills them when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::netns::{Netns, PRIVATE_IP, RELAY_IP, Wan};
use super::workload;

/// The endpoint's port in the private namespace.
pub const ENDPOINT_PORT: u16 = 7000;

#[derive(Debug, Clone)]
pub enum Kind {
    Direct,
    Hyrelay {
        bin: PathBuf,
        tls: bool,
        extra: Vec<String>,
    },
    Rathole {
        bin: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
}

/// A started target: its processes and where the app connects.
pub struct Running {
    procs: Vec<Child>,
    pub entry: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Target {
    /// Starts the target in `wan` with its files under `dir`, and waits until an echo
    /// comes through it.
    pub fn start(&self, wan: &Wan, dir: &Path) -> anyhow::Result<Running> {
        std::fs::create_dir_all(dir)?;
        let running = match &self.kind {
            Kind::Direct => Running {
                procs: vec![],
                entry: SocketAddr::new(PRIVATE_IP.parse()?, ENDPOINT_PORT),
            },
            Kind::Hyrelay { bin, tls, extra } => hyrelay(wan, dir, bin, *tls, extra)?,
            Kind::Rathole { bin } => rathole(wan, dir, bin)?,
        };
        let entry = running.entry;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = wan
                .app
                .within(move || workload::first_echo(entry, Duration::from_secs(5)))?;
            match r {
                Ok(_) => return Ok(running),
                Err(e) if Instant::now() > deadline => bail!("{}: no echo within 30 s: {e:#}", self.name),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

fn spawn(ns: &Netns, dir: &Path, name: &str, argv: &[String]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    ns.command(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// Runs `argv` in `ns` to completion; its stdout.
fn run(ns: &Netns, argv: &[String]) -> anyhow::Result<String> {
    let out = ns.command(argv).output()?;
    if !out.status.success() {
        bail!("{argv:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn hyrelay(wan: &Wan, dir: &Path, bin: &Path, tls: bool, extra: &[String]) -> anyhow::Result<Running> {
    let (b, d) = (bin.display().to_string(), dir.display().to_string());
    let (mode, scheme) = if tls { ("self-signed", "wss") } else { ("none", "ws") };
    // public_url: connection strings (and `hc` through cli.json) name the relay's address.
    std::fs::write(
        dir.join("relay.toml"),
        format!("public_url = \"{scheme}://{RELAY_IP}:9000\"\n[tls]\nmode = \"{mode}\"\nnames = [\"{RELAY_IP}\"]\n"),
    )?;
    let relay_addr = format!("{RELAY_IP}:9000");
    let mut procs = vec![];
    let mut argv = strings(&[
        &b,
        "--log-level",
        "warn",
        "relay",
        "--config",
        &format!("{d}/relay.toml"),
    ]);
    argv.extend(strings(&[
        "--listen",
        &relay_addr,
        "--data-dir",
        &format!("{d}/relay"),
        "--workers",
        "2",
    ]));
    argv.extend(extra.iter().cloned());
    procs.push(spawn(&wan.relay, dir, "relay", &argv)?);
    let running = |procs| Running {
        procs,
        entry: "127.0.0.1:15000".parse().expect("literal"),
    };
    let endpoint = format!("{PRIVATE_IP}:{ENDPOINT_PORT}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let manage = loop {
        if let Some(cs) = manage_string(dir) {
            break cs;
        }
        if Instant::now() > deadline {
            bail!("the relay did not come up: see {d}/relay.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // cli.json names localhost for a TLS relay; this one listens on RELAY_IP only.
    let hc = |args: &[&str]| {
        let mut v = strings(&[&b, "--log-level", "warn", "hc", "--connection-string", &manage]);
        if tls {
            v.extend(strings(&["--ca-file", &format!("{d}/relay/tls/ca.pem")]));
        }
        v.extend(strings(args));
        v
    };
    while run(&wan.relay, &hc(&["create", "wan", "--endpoint", &endpoint])).is_err() {
        if Instant::now() > deadline {
            bail!("the relay did not come up: see {d}/relay.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let listen = run(&wan.relay, &hc(&["connection-string", "wan", "--listen"]))?;
    let send = run(&wan.relay, &hc(&["connection-string", "wan", "--send"]))?;
    let ca: Vec<String> = if tls {
        strings(&["--ca-file", &format!("{d}/relay/tls/ca.pem")])
    } else {
        vec![]
    };
    let hcm_dir = format!("{d}/hcm");
    run(
        &wan.private,
        &strings(&[&b, "hcm", "--data-dir", &hcm_dir, "add", &listen]),
    )?;
    let mut argv = strings(&[
        &b,
        "--log-level",
        "warn",
        "hcm",
        "--data-dir",
        &hcm_dir,
        "run",
        "--workers",
        "2",
    ]);
    argv.extend(ca.iter().cloned());
    argv.extend(extra.iter().cloned());
    procs.push(spawn(&wan.private, dir, "hcm", &argv)?);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = run(&wan.relay, &hc(&["show", "wan", "--json"]))?;
        let v: serde_json::Value = serde_json::from_str(&shown)?;
        if v["listenerCount"].as_u64() == Some(1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the hcm never registered: see {d}/hcm.log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut argv = strings(&[&b, "--log-level", "warn", "bridge", "-L", "127.0.0.1:15000=wan"]);
    argv.extend(strings(&["--connection-string", &send, "--workers", "2"]));
    argv.extend(ca);
    argv.extend(extra.iter().cloned());
    procs.push(spawn(&wan.app, dir, "bridge", &argv)?);
    Ok(running(procs))
}

/// The relay's Manage connection string from its cli.json, pointed at `RELAY_IP`.
fn manage_string(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("relay/cli.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let cs = v["connectionString"].as_str()?;
    let at = format!("//{RELAY_IP}:");
    Some(cs.replace("//localhost:", &at).replace("//127.0.0.1:", &at))
}

fn rathole(wan: &Wan, dir: &Path, bin: &Path) -> anyhow::Result<Running> {
    let (b, d) = (bin.display().to_string(), dir.display().to_string());
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "[server]\nbind_addr = \"{RELAY_IP}:2333\"\ndefault_token = \"bench\"\n[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n[server.services.bench]\nbind_addr = \"{RELAY_IP}:15001\"\nnodelay = true\n"
        ),
    )?;
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "[client]\nremote_addr = \"{RELAY_IP}:2333\"\ndefault_token = \"bench\"\n[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n[client.services.bench]\nlocal_addr = \"{PRIVATE_IP}:{ENDPOINT_PORT}\"\nnodelay = true\n"
        ),
    )?;
    let server = spawn(
        &wan.relay,
        dir,
        "rathole-server",
        &strings(&[&b, "--server", &format!("{d}/server.toml")]),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = spawn(
        &wan.private,
        dir,
        "rathole-client",
        &strings(&[&b, "--client", &format!("{d}/client.toml")]),
    )?;
    Ok(Running {
        procs: vec![server, client],
        entry: format!("{RELAY_IP}:15001").parse()?,
    })
}
