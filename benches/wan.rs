//! WAN benchmark: what a relay costs on real round trips. Three network namespaces made by
//! the harness (`app | relay | private`), joined by two links with a user-space delay line
//! each (this kernel has no `sch_netem`): R = one link's round trip (default 20 ms), so
//! app ⇄ private is 2 R. Needs root (namespaces, TAP devices).
//!
//! ```sh
//! cargo build --release
//! scripts/bench-peers.sh --install-only                 # rathole, as the load bench uses it
//! cargo bench --bench wan -- [--hyrelay [NAME=]PATH ...] [--runs 3] [--json wan.json]
//! ```
//!
//! Per target (direct TCP, each hyrelay binary over ws:// and wss://, rathole), in one run
//! and a rotating order: time from `connect()` to the echo of the first 64 bytes on a new
//! connection (p50/p90, ms and R), a 64-byte round trip on an open connection (p50), and
//! bulk goodput of one stream from the endpoint with the links unlimited and limited to
//! `--rate-mbit` (both links, both directions, netem-style serialization and a 1000-frame
//! queue). Figures are medians over `--runs`.
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it only prints how to run it.

#[path = "wan/delay.rs"]
mod delay;
#[path = "wan/netns.rs"]
mod netns;
#[path = "wan/targets.rs"]
mod targets;
#[path = "wan/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use targets::{Kind, Target};

#[derive(Debug, Parser)]
#[command(name = "wan", about = "hyrelay WAN benchmark (cargo bench --bench wan -- ARGS)")]
struct Args {
    /// hyrelay binary, as PATH or NAME=PATH, optionally followed by arguments for its relay,
    /// hcm and bridge. Repeatable (compare binaries in one run). Default:
    /// target/release/hyrelay.
    #[arg(long = "hyrelay", value_name = "[NAME=]PATH [ARGS]")]
    hyrelay: Vec<String>,
    /// rathole binary (scripts/bench-peers.sh --install-only puts it there); left out if
    /// missing.
    #[arg(long, default_value = "target-bench/peers/bin/rathole")]
    rathole: PathBuf,
    /// Only these targets (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// One link's round trip in ms (R).
    #[arg(long, default_value_t = 20)]
    link_rtt_ms: u64,
    /// New connections timed per target and run.
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Round trips on an open connection per target and run.
    #[arg(long, default_value_t = 50)]
    rtt_count: usize,
    /// Seconds each bulk figure is counted over (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    bulk_secs: f64,
    /// The limited link rate, Mbit/s.
    #[arg(long, default_value_t = 200)]
    rate_mbit: u64,
    /// Where targets keep their files and logs (default: a new directory under /tmp).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Also write every figure of every run as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One target's figures in one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    first_p50_ms: f64,
    first_p90_ms: f64,
    rtt_p50_ms: f64,
    bulk_mbit: f64,
    bulk_limited_mbit: f64,
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("WAN benchmark: run it as root with `cargo bench --bench wan -- --help`");
        return Ok(());
    }
    let args = Args::parse();
    let list = targets_of(&args);
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new().prefix("hyrelay-wan-").tempdir()?.keep(),
    };
    let load_before = loadavg();
    let wan = netns::Wan::new(Duration::from_millis(args.link_rtt_ms))?;
    let endpoint_addr: SocketAddr = format!("{}:{}", netns::PRIVATE_IP, targets::ENDPOINT_PORT).parse()?;
    let listener = wan.private.within(move || TcpListener::bind(endpoint_addr))??;
    std::thread::spawn(move || workload::endpoint(listener));
    let mut all: BTreeMap<String, Vec<Figures>> = BTreeMap::new();
    for run in 0..args.runs {
        for i in 0..list.len() {
            let t = &list[(i + run) % list.len()];
            eprintln!("wan: run {}/{}: {}", run + 1, args.runs, t.name);
            let dir = work.join(format!("run{run}-{}", t.name));
            let f = measure(&args, &wan, t, &dir)
                .with_context(|| format!("target {} (logs in {})", t.name, dir.display()))?;
            eprintln!("wan:   {f:?}");
            all.entry(t.name.clone()).or_default().push(f);
        }
    }
    print_report(&args, &list, &all, wan.dropped(), &load_before);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}

fn targets_of(args: &Args) -> Vec<Target> {
    let mut list = vec![Target {
        name: "direct".into(),
        kind: Kind::Direct,
    }];
    let specs = if args.hyrelay.is_empty() {
        vec!["target/release/hyrelay".to_owned()]
    } else {
        args.hyrelay.clone()
    };
    for spec in &specs {
        let mut words = spec.split_whitespace();
        let first = words.next().unwrap_or_default();
        let (name, path) = first.split_once('=').unwrap_or(("hyrelay", first));
        let extra: Vec<String> = words.map(str::to_owned).collect();
        for (suffix, tls) in [("ws", false), ("wss", true)] {
            list.push(Target {
                name: format!("{name}-{suffix}"),
                kind: Kind::Hyrelay {
                    bin: PathBuf::from(path),
                    tls,
                    extra: extra.clone(),
                },
            });
        }
    }
    if args.rathole.exists() {
        list.push(Target {
            name: "rathole".into(),
            kind: Kind::Rathole {
                bin: args.rathole.clone(),
            },
        });
    } else {
        eprintln!(
            "wan: no rathole at {} (scripts/bench-peers.sh --install-only); left out",
            args.rathole.display()
        );
    }
    list.retain(|t| args.only.is_empty() || args.only.contains(&t.name));
    list
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Every figure of one target.
fn measure(args: &Args, wan: &netns::Wan, t: &Target, dir: &std::path::Path) -> anyhow::Result<Figures> {
    let running = t.start(wan, dir)?;
    let entry = running.entry;
    let limit = Duration::from_secs(10);
    // Warm-up: name lookups, ARP, TLS session tickets, pools.
    for _ in 0..3 {
        wan.app.within(move || workload::first_echo(entry, limit))??;
    }
    let mut firsts = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        firsts.push(wan.app.within(move || workload::first_echo(entry, limit))??);
        // Let the previous connection's close finish on every side.
        std::thread::sleep(Duration::from_millis(50));
    }
    let count = args.rtt_count;
    let mut rtts = wan.app.within(move || workload::round_trips(entry, count, limit))??;
    let (warm, secs) = (Duration::from_secs(1), Duration::from_secs_f64(args.bulk_secs));
    let bulk = wan.app.within(move || workload::bulk(entry, warm, secs))??;
    wan.set_rate(args.rate_mbit * 1_000_000);
    let limited = wan.app.within(move || workload::bulk(entry, warm, secs));
    wan.set_rate(0);
    let limited = limited??;
    drop(running);
    Ok(Figures {
        first_p50_ms: ms(workload::quantile(&mut firsts, 0.5)),
        first_p90_ms: ms(workload::quantile(&mut firsts, 0.9)),
        rtt_p50_ms: ms(workload::quantile(&mut rtts, 0.5)),
        bulk_mbit: bulk / 1e6,
        bulk_limited_mbit: limited / 1e6,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn print_report(args: &Args, list: &[Target], all: &BTreeMap<String, Vec<Figures>>, dropped: u64, load_before: &str) {
    let r = args.link_rtt_ms as f64;
    let med = |name: &str, f: fn(&Figures) -> f64| median(all[name].iter().map(f).collect());
    let direct_rtt = all.get("direct").map(|_| med("direct", |f| f.rtt_p50_ms));
    println!(
        "\nWAN: R = {} ms per link (app ⇄ private = 2 R), limited links {} Mbit/s; {} run(s), medians; {} samples per first-echo figure",
        args.link_rtt_ms, args.rate_mbit, args.runs, args.samples
    );
    println!(
        "load average before: {load_before}; after: {}; frames dropped at the queue limit: {dropped}\n",
        loadavg()
    );
    println!(
        "| target | first echo p50 | p90 | RTT p50 | RTT − direct | bulk, unlimited | bulk, {} Mbit/s link |",
        args.rate_mbit
    );
    println!("|---|---|---|---|---|---|---|");
    for t in list {
        let n = t.name.as_str();
        let (p50, p90, rtt) = (
            med(n, |f| f.first_p50_ms),
            med(n, |f| f.first_p90_ms),
            med(n, |f| f.rtt_p50_ms),
        );
        let (bulk, limited) = (med(n, |f| f.bulk_mbit), med(n, |f| f.bulk_limited_mbit));
        let delta = direct_rtt.map(|d| format!("{:+.2} ms", rtt - d)).unwrap_or_default();
        println!(
            "| {n} | {p50:.1} ms ({:.2} R) | {p90:.1} ms ({:.2} R) | {rtt:.2} ms | {delta} | {bulk:.0} Mbit/s | {limited:.1} Mbit/s ({:.3} of the link) |",
            p50 / r,
            p90 / r,
            limited / args.rate_mbit as f64
        );
    }
}
