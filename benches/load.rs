//! Load harness: drives traffic through running tunnels on loopback and prints one table of
//! absolute figures with ratios to direct TCP.
//!
//! ```sh
//! cargo build --release                                   # the hyrelay under test
//! cargo bench --bench load -- --hyrelay target/release/hyrelay [--hyrelay old=/tmp/hyrelay-old] \
//!     [--tls] [--cluster] [--targets-file peers.json] [--runs 3] [--json out.json] \
//!     [--workloads busy] [--busy-conns 2000] [--busy-secs 10]
//! ```
//!
//! Targets: `direct` (client -> endpoint), one `hyrelay` chain (bridge -> relay -> hcm,
//! separate processes) per `--hyrelay` binary, `<name>-tls` with `--tls`, with `--cluster`
//! `cluster-same` and `cluster-cross` (two relay nodes on a Redis of their own, the hcm on
//! node A, the bridge on node A or B; Redis commands per new tunnel are counted around the
//! setup workload and reported against the single-node chain), and whatever
//! `--targets-file` lists (see `load/target.rs`; `scripts/bench-peers.sh` writes one for
//! rathole, bore, haproxy, socat and websocat). Per run each target is started twice: once
//! for the idle-memory workload on fresh processes, once for bulk, RTT, ping-pong (32
//! connections at once), setup and the busy gateway (2,000 tunnels opened first, then all
//! doing 1 KiB-up / 16 KiB-down exchanges back to back for 10 s; tokio clients, see
//! `load/busy.rs`). `--workloads` and `--skip` pick the workloads. Figures are medians over
//! `--runs`, with targets in a rotating order.
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it only prints how to run it.

#[path = "load/busy.rs"]
mod busy;
#[path = "load/endpoint.rs"]
mod endpoint;
#[path = "load/procs.rs"]
mod procs;
#[path = "load/redis.rs"]
mod redis;
#[path = "load/report.rs"]
mod report;
#[path = "load/target.rs"]
mod target;
#[path = "load/workloads.rs"]
mod workloads;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use report::{ClusterTarget, Figures};
use target::TargetSpec;

#[derive(Debug, Parser)]
#[command(name = "load", about = "hyrelay load harness (cargo bench --bench load -- ARGS)")]
pub struct Args {
    /// A hyrelay binary under test, as PATH or NAME=PATH, optionally followed by arguments
    /// for its relay, hcm and bridge ("uring=target/release/hyrelay --io-backend uring").
    /// Repeatable: compares binaries or settings in one run. Default: target/release/hyrelay.
    #[arg(long = "hyrelay", value_name = "[NAME=]PATH [ARGS]")]
    hyrelay: Vec<String>,
    /// Also run each hyrelay binary with a TLS relay (--self-signed, --ca-file).
    #[arg(long)]
    tls: bool,
    /// Only the TLS variant of hyrelay (implies --tls).
    #[arg(long)]
    tls_only: bool,
    /// Also run each hyrelay binary as a relay cluster: two relay nodes sharing a
    /// `redis-server` (from PATH) that the target starts on a free port, with the hcm on
    /// node A and the bridge on node A (`cluster-same`) or node B (`cluster-cross`).
    #[arg(long)]
    cluster: bool,
    /// Also run each hyrelay binary with the hyrelay extensions off (`extensions = false`
    /// in the relay's config: nothing advertised, so the hcm and the bridge use the
    /// standard protocol), as `<name>-noext`, to compare in one run.
    #[arg(long)]
    noext: bool,
    /// More targets (JSON list; see benches/load/target.rs).
    #[arg(long)]
    targets_file: Option<PathBuf>,
    /// Run only the targets with these names (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Runs per target; figures are medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Data-plane workers of each hyrelay process (default: hyrelay's own, one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds each bulk figure is measured over (after --warmup seconds).
    #[arg(long, default_value_t = 3.0)]
    bulk_secs: f64,
    /// Seconds of traffic before the bulk and busy-gateway figures are taken.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Round trips of 64 bytes on one connection.
    #[arg(long, default_value_t = 10_000)]
    rtt_count: usize,
    /// Connections of the ping-pong workload, all at once ...
    #[arg(long, default_value_t = 32)]
    pingpong_conns: usize,
    /// ... each doing this many round trips of 64 bytes.
    #[arg(long, default_value_t = 2_500)]
    pingpong_count: usize,
    /// New connections for the setup rate, and how many at a time.
    #[arg(long, default_value_t = 2_000)]
    setup_count: usize,
    #[arg(long, default_value_t = 8)]
    setup_concurrency: usize,
    /// Idle connections for the memory figure (also measured at 1,000 on the way).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Busy gateway: connections opened first, then all doing request/response exchanges
    /// (1 KiB up, 16 KiB down) back to back ...
    #[arg(long, default_value_t = 2_000)]
    busy_conns: usize,
    /// ... measured over this many seconds (after --warmup seconds).
    #[arg(long, default_value_t = 10.0)]
    busy_secs: f64,
    /// Workloads to run (comma-separated; default: all of them).
    #[arg(long, value_delimiter = ',', value_parser = WORKLOADS)]
    workloads: Vec<String>,
    /// Workloads to leave out (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = WORKLOADS)]
    skip: Vec<String>,
    /// Also write every figure of every run as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where targets keep their files and logs (default: a new directory under /tmp).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The workloads `--workloads` and `--skip` name.
const WORKLOADS: [&str; 6] = ["bulk", "rtt", "pingpong", "setup", "busy", "idle"];

impl Args {
    /// Whether workload `w` runs: listed in `--workloads` (or that is empty), not in `--skip`.
    fn wants(&self, w: &str) -> bool {
        (self.workloads.is_empty() || self.workloads.iter().any(|s| s == w)) && !self.skip.iter().any(|s| s == w)
    }
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--hold-idle") {
        return workloads::hold_idle_main(argv.get(2).context("--hold-idle ADDR")?.parse()?);
    }
    if !argv.iter().any(|a| a == "--bench") {
        println!("load harness: run it with `cargo bench --bench load -- --help`");
        return Ok(());
    }
    let args = Args::parse();
    let mut notes = vec![];
    let fd_hard = raise_nofile(&mut notes);
    let idle_cap = ((fd_hard.saturating_sub(300) / 2) / 100 * 100) as usize;
    if args.idle > idle_cap && args.wants("idle") {
        notes.push(format!(
            "idle connections capped at {idle_cap}: a relay process holds 2 descriptors per tunnel and RLIMIT_NOFILE's hard limit is {fd_hard} (raising it needs CAP_SYS_RESOURCE)"
        ));
    }
    if args.wants("rtt") {
        match hold_dma_latency() {
            Ok(_) => notes.push("/dev/cpu_dma_latency is held at 0 during each RTT workload".into()),
            Err(e) => notes.push(format!(
                "/dev/cpu_dma_latency cannot be held at 0 ({e}); RTT runs without it"
            )),
        }
    }
    let (targets, clusters) = targets(&args)?;
    let ep = endpoint::Endpoint::start()?;
    let base = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("hyrelay-load-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base)?;
    eprintln!(
        "load: endpoint {}, work dir {}, targets: {}",
        ep.addr,
        base.display(),
        targets
            .iter()
            .map(|(t, _)| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let env = report::Env::capture(&args, &notes, clusters);
    let mut runs: Vec<BTreeMap<String, Figures>> = vec![];
    for r in 0..args.runs {
        let mut this = BTreeMap::new();
        for i in 0..targets.len() {
            let (spec, vars) = &targets[(i + r) % targets.len()];
            eprintln!("load: run {}/{}: {}", r + 1, args.runs, spec.name);
            let mut f = Figures::default();
            run_target(&args, &ep, &base, spec, vars, idle_cap, &mut f);
            for e in &f.errors {
                eprintln!("load:   {}: {e}", spec.name);
            }
            this.insert(spec.name.clone(), f);
            std::thread::sleep(Duration::from_secs(1));
        }
        runs.push(this);
    }
    let order: Vec<String> = targets.iter().map(|(t, _)| t.name.clone()).collect();
    let text = report::render(&env, &order, &runs);
    println!("{text}");
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report::json(&env, &order, &runs))?)?;
        eprintln!("load: JSON written to {}", p.display());
    }
    Ok(())
}

/// A target to run with its own placeholder values.
type Planned = (TargetSpec, BTreeMap<String, String>);

/// The targets to run, and which of them are cluster targets.
fn targets(args: &Args) -> anyhow::Result<(Vec<Planned>, Vec<ClusterTarget>)> {
    let mut out = vec![(TargetSpec::direct(), BTreeMap::new())];
    let mut clusters = vec![];
    let bins = if args.hyrelay.is_empty() {
        vec!["target/release/hyrelay".to_string()]
    } else {
        args.hyrelay.clone()
    };
    for spec in &bins {
        let mut words = spec.split_whitespace();
        let b = words.next().context("empty --hyrelay")?;
        let extra: Vec<String> = words.map(str::to_string).collect();
        let (tag, path) = match b.split_once('=') {
            Some((n, p)) => (format!("[{n}]"), p),
            None if bins.len() == 1 => (String::new(), b),
            None => (format!("[{b}]"), b),
        };
        let name = format!("hyrelay{tag}");
        let path = std::fs::canonicalize(path)
            .with_context(|| format!("hyrelay binary {path} (build it with cargo build --release)"))?;
        let vars = BTreeMap::from([("hyrelay".to_string(), path.display().to_string())]);
        let toml = TargetSpec::hyrelay_relay_toml(&path, &std::env::temp_dir());
        if toml.is_none() {
            eprintln!(
                "load: {} does not take the relay limits config; its relay runs with its defaults",
                path.display()
            );
        }
        if !args.tls_only {
            out.push((
                TargetSpec::hyrelay(&name, false, args.workers, toml.as_deref(), &extra),
                vars.clone(),
            ));
        }
        if args.tls || args.tls_only {
            out.push((
                TargetSpec::hyrelay(&format!("{name}-tls"), true, args.workers, toml.as_deref(), &extra),
                vars.clone(),
            ));
        }
        if args.noext
            && let Some(t) = &toml
        {
            // Top-level keys come before the config's tables.
            let off = format!("extensions = false\n{t}");
            out.push((
                TargetSpec::hyrelay(&format!("{name}-noext"), false, args.workers, Some(&off), &extra),
                vars.clone(),
            ));
        }
        if args.cluster {
            // Issue 10's targets: no Redis command for a tunnel whose listener is on the
            // sender's node, at most two (a request and its answer) when it is on another.
            for (kind, cross, max_redis) in [("same", false, 0.0), ("cross", true, 2.0)] {
                let c = format!("cluster-{kind}{tag}");
                out.push((
                    TargetSpec::hyrelay_cluster(&c, cross, args.workers, toml.as_deref(), &extra),
                    vars.clone(),
                ));
                clusters.push(ClusterTarget {
                    name: c,
                    single: name.clone(),
                    max_redis,
                });
            }
        }
    }
    if let Some(f) = &args.targets_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        let specs: Vec<TargetSpec> = serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?;
        out.extend(specs.into_iter().map(|s| (s, BTreeMap::new())));
    }
    if !args.only.is_empty() {
        out.retain(|(t, _)| args.only.contains(&t.name));
        clusters.retain(|c| args.only.contains(&c.name));
    }
    anyhow::ensure!(!out.is_empty(), "no target left to run");
    Ok((out, clusters))
}

/// All workloads for one target; failures are recorded in `f.errors`, never abort the run.
fn run_target(
    args: &Args,
    ep: &endpoint::Endpoint,
    base: &std::path::Path,
    spec: &TargetSpec,
    vars: &BTreeMap<String, String>,
    idle_cap: usize,
    f: &mut Figures,
) {
    if args.wants("idle") {
        let n = args.idle.min(idle_cap).min(spec.idle_max.unwrap_or(usize::MAX));
        if let Err(e) = idle(ep, base, spec, vars, n, f) {
            f.errors.push(format!("idle: {e:#}"));
        }
        ep.release_idle();
    }
    let mut t = match spec.start(base, ep.addr, vars) {
        Ok(t) => t,
        Err(e) => {
            f.errors.push(format!("start: {e:#}"));
            return;
        }
    };
    let pids = t.pids();
    if args.wants("bulk") {
        for (key, up, streams) in [
            ("up1", true, 1),
            ("down1", false, 1),
            ("up8", true, 8),
            ("down8", false, 8),
        ] {
            match workloads::bulk(ep, t.entry, &pids, up, streams, args.warmup, args.bulk_secs) {
                Ok(b) => f.add_bulk(key, &b),
                Err(e) => f.errors.push(format!("bulk {key}: {e:#}")),
            }
        }
    }
    if args.wants("rtt") {
        let dma = hold_dma_latency();
        if let Err(e) = &dma {
            f.notes
                .push(format!("/dev/cpu_dma_latency could not be held at 0: {e}"));
        }
        match workloads::rtt(t.entry, &pids, args.rtt_count) {
            Ok(r) => f.add_rtt(&r),
            Err(e) => f.errors.push(format!("rtt: {e:#}")),
        }
        drop(dma);
    }
    if args.wants("pingpong") {
        match workloads::pingpong(t.entry, &pids, args.pingpong_conns, args.pingpong_count) {
            Ok(p) => f.add_pingpong(&p),
            Err(e) => f.errors.push(format!("pingpong: {e:#}")),
        }
    }
    if args.wants("setup") {
        let probe = t.redis.map(redis::Probe::start);
        match workloads::setup(t.entry, &pids, args.setup_count, args.setup_concurrency) {
            Ok(s) => {
                f.add_setup(&s);
                match probe.map(|p| p.and_then(redis::Probe::finish)) {
                    Some(Ok(traffic)) => f.add_redis(&traffic, args.setup_count),
                    Some(Err(e)) => f.errors.push(format!("Redis commands: {e:#}")),
                    None => {}
                }
            }
            Err(e) => f.errors.push(format!("setup: {e:#}")),
        }
    }
    if args.wants("busy") {
        check_nofile(&pids, args.busy_conns, f);
        match busy::busy(t.entry, &pids, args.busy_conns, args.warmup, args.busy_secs) {
            Ok(b) => f.add_busy(&b),
            Err(e) => f.errors.push(format!("busy: {e:#}")),
        }
    }
    if let Err(e) = t.check_alive() {
        f.errors.push(format!("after workloads: {e:#}"));
    }
    f.complaints.extend(t.log_complaints(5));
}

/// The idle-memory workload on a fresh instance: RSS at start, with 1,000 and with `n`.
fn idle(
    ep: &endpoint::Endpoint,
    base: &std::path::Path,
    spec: &TargetSpec,
    vars: &BTreeMap<String, String>,
    n: usize,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let mut t = spec.start(base, ep.addr, vars)?;
    let pids = t.pids();
    check_nofile(&pids, n, f);
    std::thread::sleep(Duration::from_millis(500));
    f.set_rss("start", &procs::rss(&pids));
    let before = ep.held();
    let mut holder = workloads::IdleHolder::spawn(t.entry)?;
    let mut opened = 0;
    for level in [1000.min(n), n] {
        if level <= opened {
            continue;
        }
        let held = holder.open(level - opened)?;
        opened = level;
        anyhow::ensure!(held == level, "only {held} of {level} idle connections opened");
        std::thread::sleep(Duration::from_secs(1));
        anyhow::ensure!(
            ep.held() - before == level,
            "{} of {level} idle connections reached the endpoint",
            ep.held() - before
        );
        t.check_alive()?;
        f.set_rss(&level.to_string(), &procs::rss(&pids));
    }
    f.set_idle(n);
    drop(holder);
    f.complaints.extend(t.log_complaints(5));
    Ok(())
}

/// Notes every process whose RLIMIT_NOFILE is too low for `n` tunnels (two descriptors each).
fn check_nofile(pids: &[(String, u32)], n: usize, f: &mut Figures) {
    for (name, pid) in pids {
        if let Some(lim) = procs::nofile(*pid)
            && lim < (2 * n + 100) as u64
        {
            f.notes.push(format!(
                "{name}: RLIMIT_NOFILE {lim} is below the {} descriptors {n} tunnels need",
                2 * n + 100
            ));
        }
    }
}

/// Keeps /dev/cpu_dma_latency at 0 (no deep C-states) while the returned file is open.
fn hold_dma_latency() -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/cpu_dma_latency")?;
    f.write_all(&0i32.to_ne_bytes())?;
    Ok(f)
}

/// Raises RLIMIT_NOFILE (inherited by every target process) as far as allowed; the hard limit.
fn raise_nofile(notes: &mut Vec<String>) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: 100_000,
            rlim_max: lim.rlim_max.max(100_000),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            notes.push(format!(
                "RLIMIT_NOFILE cannot be raised to 100000 ({}); children get the hard limit {}",
                std::io::Error::last_os_error(),
                lim.rlim_max
            ));
            let cur = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_max
}
