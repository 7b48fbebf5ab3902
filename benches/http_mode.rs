//! HTTP request/response mode under load: requests/s, p50/p99 latency and CPU per request
//! per process, for small GETs and 1 MiB POSTs, against three targets in the same run:
//!
//! - `direct`: the load generator → the endpoint;
//! - `haproxy`: → haproxy (Debian's, `mode http`, one hop) → the endpoint;
//! - `hyrelay`: → `hyrelay relay` → `hyrelay hcm` → the endpoint (HTTP mode, plain `ws://`).
//!
//! Every process is a real one on 127.0.0.1 (the endpoint is this binary re-executed), so
//! their CPU can be read from /proc. Targets alternate within each round; compare ratios,
//! never numbers from different runs.
//!
//! `cargo bench --bench http_mode -- [--seconds 5] [--connections 16] [--rounds 2]`

#[path = "load/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const BIG: usize = 1 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("endpoint") {
        return endpoint();
    }
    let opt = |name: &str, dflt: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(dflt)
    };
    let (seconds, conns, rounds) = (opt("--seconds", 5), opt("--connections", 16), opt("--rounds", 2));
    let scratch = tempfile::tempdir()?;
    let mut rig = Rig::start(scratch.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "| workload | target | req/s | p50 ms | p99 ms | CPU µs/req: {} |",
        rig.procs
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!("|---|---|---|---|---|---|");
    for round in 0..rounds {
        for (workload, method, path, body) in [
            ("GET 100 B", "GET", "small", Bytes::new()),
            ("POST 1 MiB", "POST", "upload", Bytes::from(vec![7u8; BIG])),
        ] {
            for target in ["direct", "haproxy", "hyrelay"] {
                let (addr, prefix, token) = match target {
                    "direct" => (rig.endpoint, "", None),
                    "haproxy" => (rig.haproxy, "", None),
                    _ => (rig.relay, "/bench", Some(rig.token.clone())),
                };
                let target_path = format!("{prefix}/{path}");
                let before = procs::cpu(&rig.procs);
                let r = rt.block_on(load(
                    addr,
                    method,
                    &target_path,
                    body.clone(),
                    token,
                    conns as usize,
                    Duration::from_secs(seconds),
                ))?;
                let cpu = procs::delta(&before, &procs::cpu(&rig.procs));
                let per_req: Vec<String> = rig
                    .procs
                    .iter()
                    .map(|(n, _)| {
                        format!(
                            "{:.0}",
                            cpu.get(n).copied().unwrap_or(0.0) * 1e6 / r.count.max(1) as f64
                        )
                    })
                    .collect();
                println!(
                    "| {workload} | {target} (round {}) | {:.0} | {:.2} | {:.2} | {} |",
                    round + 1,
                    r.count as f64 / r.elapsed.as_secs_f64(),
                    r.p50 * 1e3,
                    r.p99 * 1e3,
                    per_req.join(" / ")
                );
                if r.errors > 0 {
                    println!("|   | ({} errors, first: {}) | | | | |", r.errors, r.first_error);
                }
            }
        }
        rig.check_alive()?;
    }
    Ok(())
}

/// What one measurement gave.
struct Result {
    count: u64,
    errors: u64,
    first_error: String,
    elapsed: Duration,
    p50: f64,
    p99: f64,
}

/// `conns` keep-alive connections sending requests back to back for `span`.
async fn load(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    body: Bytes,
    token: Option<String>,
    conns: usize,
    span: Duration,
) -> anyhow::Result<Result> {
    let started = Instant::now();
    let end = started + span;
    let path = Arc::new(path.to_owned());
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (path, body, token) = (path.clone(), body.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = (0u64, String::new());
            let mut sender = None;
            while Instant::now() < end {
                if sender.is_none() {
                    let s = tokio::net::TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
                    tokio::spawn(c);
                    sender = Some(tx);
                }
                let tx = sender.as_mut().unwrap();
                let mut b = hyper::Request::builder()
                    .method(method)
                    .uri(path.as_str())
                    .header("host", addr.to_string());
                if let Some(t) = &token {
                    b = b.header("ServiceBusAuthorization", t.as_str());
                }
                let req = b.body(Full::new(body.clone()))?;
                let t0 = Instant::now();
                let ok = async {
                    tx.ready().await?;
                    let resp = tx.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    anyhow::Ok(status)
                }
                .await;
                match ok {
                    Ok(s) if s.is_success() => lat.push(t0.elapsed().as_secs_f64()),
                    other => {
                        if errors.0 == 0 {
                            errors.1 = format!("{other:?}");
                        }
                        errors.0 += 1;
                        sender = None;
                    }
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut all = Vec::new();
    let (mut errors, mut first_error) = (0, String::new());
    for t in tasks {
        let (lat, (e, first)) = t.await??;
        all.extend(lat);
        if errors == 0 {
            first_error = first;
        }
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Result {
        count: all.len() as u64,
        errors,
        first_error,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

/// The processes under test.
struct Rig {
    children: Vec<Child>,
    procs: Vec<(String, u32)>,
    endpoint: SocketAddr,
    haproxy: SocketAddr,
    relay: SocketAddr,
    token: String,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.children {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn hyrelay() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyrelay"))
}

/// Runs a hyrelay command to completion; its trimmed stdout.
fn run(args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(hyrelay()).args(args).stdin(Stdio::null()).output()?;
    anyhow::ensure!(
        o.status.success(),
        "hyrelay {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8(o.stdout)?.trim().to_owned())
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on {addr}")
}

impl Rig {
    fn start(dir: &Path) -> anyhow::Result<Rig> {
        let mut rig = Rig {
            children: Vec::new(),
            procs: Vec::new(),
            endpoint: "127.0.0.1:0".parse()?,
            haproxy: "127.0.0.1:0".parse()?,
            relay: "127.0.0.1:0".parse()?,
            token: String::new(),
        };
        let spawn = |rig: &mut Rig, name: &str, cmd: &mut Command| -> anyhow::Result<()> {
            let c = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
            rig.procs.push((name.to_owned(), c.id()));
            rig.children.push(c);
            Ok(())
        };
        // The endpoint: this binary, re-executed.
        let ep = free_port()?;
        rig.endpoint = format!("127.0.0.1:{ep}").parse()?;
        spawn(
            &mut rig,
            "endpoint",
            Command::new(std::env::current_exe()?).args(["endpoint", &ep.to_string()]),
        )?;
        wait_port(rig.endpoint)?;
        // haproxy, one hop in HTTP mode.
        let hp = free_port()?;
        rig.haproxy = format!("127.0.0.1:{hp}").parse()?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\nfrontend f\n  bind 127.0.0.1:{hp}\n  default_backend b\nbackend b\n  http-reuse always\n  server e 127.0.0.1:{ep}\n"
            ),
        )?;
        spawn(
            &mut rig,
            "haproxy",
            Command::new("haproxy").arg("-f").arg(&cfg).arg("-db"),
        )?;
        wait_port(rig.haproxy)?;
        // relay + hcm.
        let rp = free_port()?;
        rig.relay = format!("127.0.0.1:{rp}").parse()?;
        let relay_dir = dir.join("relay");
        let rd = relay_dir.to_str().unwrap();
        let listen = rig.relay.to_string();
        spawn(
            &mut rig,
            "relay",
            Command::new(hyrelay()).args([
                "--log-level",
                "warn",
                "relay",
                "--plain",
                "--listen",
                &listen,
                "--data-dir",
                rd,
            ]),
        )?;
        wait_port(rig.relay)?;
        std::thread::sleep(Duration::from_millis(300));
        run(&[
            "hc",
            "--relay-data-dir",
            rd,
            "create",
            "bench",
            "--endpoint",
            &rig.endpoint.to_string(),
        ])?;
        let listen = run(&["hc", "--relay-data-dir", rd, "connection-string", "bench", "--listen"])?;
        rig.token = run(&["hc", "--relay-data-dir", rd, "token", "bench", "--send", "--ttl", "2h"])?;
        let hcm_dir = dir.join("hcm");
        let hd = hcm_dir.to_str().unwrap();
        run(&["hcm", "--data-dir", hd, "add", &listen])?;
        spawn(
            &mut rig,
            "hcm",
            Command::new(hyrelay()).args(["--log-level", "warn", "hcm", "--data-dir", hd, "run"]),
        )?;
        // Up when a request goes through.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let r = rt.block_on(load(
                rig.relay,
                "GET",
                "/bench/small",
                Bytes::new(),
                Some(rig.token.clone()),
                1,
                Duration::from_millis(50),
            ));
            if r.is_ok_and(|r| r.count > 0) {
                break;
            }
            anyhow::ensure!(Instant::now() < end, "the hcm never served a request");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(rig)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (c, (n, _)) in self.children.iter_mut().zip(&self.procs) {
            anyhow::ensure!(c.try_wait()?.is_none(), "{n} exited during the run");
        }
        Ok(())
    }
}

/// The endpoint process: `GET /small` answers 100 bytes; `POST /upload` reads the body and
/// answers its length.
fn endpoint() -> anyhow::Result<()> {
    let port: u16 = std::env::args().nth(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true).ok();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let text = if body.is_empty() {
                        "x".repeat(100)
                    } else {
                        body.len().to_string()
                    };
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    })
}
