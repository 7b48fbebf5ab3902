//! Figures per target and run, their medians, and the printed report: one table of absolute
//! figures with ratios to direct TCP, a per-process table, the targets' checks, and what went
//! wrong (workload errors, warning lines in the processes' logs).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use crate::busy::Busy;
use crate::procs::Cpu;
use crate::redis::Traffic;
use crate::workloads::{Bulk, PingPong, Rtt, Setup};

type Map = BTreeMap<String, f64>;
/// Per target: medians of its figures, of its per-process figures, and its runs without error.
type Medians<'a> = BTreeMap<&'a String, (Map, BTreeMap<String, Map>, usize)>;

/// What one run measured for one target.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    /// Target-wide figures (sums over its processes where per process).
    pub m: Map,
    /// Per process name.
    pub per: BTreeMap<String, Map>,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    /// Warning and error lines from the processes' logs.
    pub complaints: Vec<String>,
    #[serde(skip)]
    bulk1_cpu: Cpu,
    #[serde(skip)]
    bulk1_bytes: u64,
}

impl Figures {
    pub fn add_bulk(&mut self, key: &str, b: &Bulk) {
        self.m.insert(key.into(), b.gbps);
        let gb = b.bytes as f64 / 1e9;
        self.set_per(
            &format!("cpu_s_per_gb_{key}"),
            b.cpu.iter().map(|(n, s)| (n.clone(), s / gb)).collect(),
        );
        // The headline CPU figure: both 1-stream directions together.
        if key == "up1" || key == "down1" {
            for (n, s) in &b.cpu {
                *self.bulk1_cpu.entry(n.clone()).or_default() += s;
            }
            self.bulk1_bytes += b.bytes;
            let gb = self.bulk1_bytes as f64 / 1e9;
            let per = self.bulk1_cpu.iter().map(|(n, s)| (n.clone(), s / gb)).collect();
            self.set_per("cpu_s_per_gb", per);
        }
    }

    pub fn add_rtt(&mut self, r: &Rtt) {
        self.m.insert("rtt_p50_us".into(), r.p50_us);
        self.m.insert("rtt_p99_us".into(), r.p99_us);
        self.m.insert("rtt_p999_us".into(), r.p999_us);
        self.set_per("cpu_us_per_rt", r.cpu.clone());
    }

    pub fn add_pingpong(&mut self, p: &PingPong) {
        self.m.insert("pingpong_per_s".into(), p.per_sec);
        self.set_per("cpu_us_per_pp_rt", p.cpu.clone());
    }

    pub fn add_setup(&mut self, s: &Setup) {
        self.m.insert("setup_per_s".into(), s.per_sec);
        self.m.insert("setup_p50_ms".into(), s.p50_ms);
        self.m.insert("setup_p99_ms".into(), s.p99_ms);
        self.set_per("cpu_us_per_conn", s.cpu.clone());
    }

    pub fn add_busy(&mut self, b: &Busy) {
        self.m.insert("busy_per_s".into(), b.per_sec);
        self.m.insert("busy_p50_ms".into(), b.p50_ms);
        self.m.insert("busy_p99_ms".into(), b.p99_ms);
        self.set_per("cpu_us_per_busy_req", b.cpu.clone());
    }

    /// Redis commands per new tunnel of the setup workload (`tunnels` of them): during it,
    /// over the idle interval after it, and the difference (net), also per command.
    pub fn add_redis(&mut self, t: &Traffic, tunnels: usize) {
        let n = tunnels as f64;
        let total = |c: &crate::redis::Calls| c.values().sum::<u64>() as f64 / n;
        self.m.insert("redis_cmds_per_conn".into(), total(&t.busy));
        self.m.insert("redis_idle_cmds_per_conn".into(), total(&t.idle));
        let net = t.net();
        self.m
            .insert("redis_net_cmds_per_conn".into(), net.values().sum::<i64>() as f64 / n);
        for (cmd, d) in net {
            self.m.insert(format!("{REDIS_NET_CMD}{cmd}"), d as f64 / n);
        }
    }

    /// RSS (KiB) per process at a point of the idle workload ("start", "1000", ...).
    pub fn set_rss(&mut self, label: &str, rss: &Map) {
        self.set_per(&format!("rss_{label}_kib"), rss.clone());
    }

    /// KiB per idle connection from RSS at start and with `n` connections.
    pub fn set_idle(&mut self, n: usize) {
        self.m.insert("idle_conns".into(), n as f64);
        let at_n = format!("rss_{n}_kib");
        let per: Map = self
            .per
            .iter()
            .filter_map(|(p, m)| Some((p.clone(), (m.get(&at_n)? - m.get("rss_start_kib")?) / n as f64)))
            .collect();
        self.set_per("kib_per_idle", per);
    }

    /// Stores a per-process figure and, if there are processes, its sum as a target figure.
    fn set_per(&mut self, key: &str, values: Map) {
        if values.is_empty() {
            return;
        }
        self.m.insert(key.into(), values.values().sum());
        for (p, v) in values {
            self.per.entry(p).or_default().insert(key.into(), v);
        }
    }
}

/// Prefix of the per-command figures of [`Figures::add_redis`].
const REDIS_NET_CMD: &str = "redis_net_per_conn_";

/// A cluster target and what it is held to: the single-node target of the same binary
/// (ratios) and the most Redis commands per new tunnel issue 10 allows it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterTarget {
    pub name: String,
    pub single: String,
    pub max_redis: f64,
}

/// Where and how the figures were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Env {
    pub date: String,
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub loadavg_start: String,
    pub command: String,
    /// `GLIBC_TUNABLES` as the harness got it (every target inherits it; README "TLS and
    /// memcpy"): TLS figures depend on it on x86-64.
    pub glibc_tunables: String,
    pub runs: usize,
    /// The ping-pong workload's shape, if it runs: connections at once, round trips each.
    pub pingpong: Option<(usize, usize)>,
    /// The busy-gateway workload's shape, if it runs: connections, seconds measured.
    pub busy: Option<(usize, f64)>,
    pub notes: Vec<String>,
    pub clusters: Vec<ClusterTarget>,
}

impl Env {
    pub fn capture(args: &crate::Args, notes: &[String], clusters: Vec<ClusterTarget>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let args_text: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        Self {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            loadavg_start: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
            command: format!("cargo bench --bench load -- {}", args_text.join(" ")),
            glibc_tunables: std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "unset".into()),
            runs: args.runs,
            pingpong: args
                .wants("pingpong")
                .then_some((args.pingpong_conns, args.pingpong_count)),
            busy: args.wants("busy").then_some((args.busy_conns, args.busy_secs)),
            notes: notes.to_vec(),
            clusters,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over runs of the target-wide figures, and of the per-process ones.
fn medians(runs: &[BTreeMap<String, Figures>], target: &str) -> (Map, BTreeMap<String, Map>, usize) {
    let figs: Vec<&Figures> = runs.iter().filter_map(|r| r.get(target)).collect();
    let keys: std::collections::BTreeSet<&String> = figs.iter().flat_map(|f| f.m.keys()).collect();
    let m = keys
        .into_iter()
        .filter_map(|k| {
            Some((
                k.clone(),
                median(figs.iter().filter_map(|f| f.m.get(k).copied()).collect())?,
            ))
        })
        .collect();
    let mut per: BTreeMap<String, Map> = BTreeMap::new();
    for f in &figs {
        for (p, pm) in &f.per {
            for k in pm.keys() {
                let vals = figs.iter().filter_map(|g| g.per.get(p)?.get(k).copied()).collect();
                if let Some(v) = median(vals) {
                    per.entry(p.clone()).or_default().insert(k.clone(), v);
                }
            }
        }
    }
    let complete = figs.iter().filter(|f| f.errors.is_empty()).count();
    (m, per, complete)
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{v:.0}");
        // Thousands separators for readability: 20400 -> 20,400.
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The columns of the main table: key, heading, whether a ratio to direct is shown.
const COLUMNS: &[(&str, &str, bool)] = &[
    ("up1", "bulk ↑ 1 stream Gb/s", true),
    ("down1", "bulk ↓ 1 stream Gb/s", true),
    ("up8", "bulk ↑ 8 streams Gb/s", true),
    ("down8", "bulk ↓ 8 streams Gb/s", true),
    ("rtt_p50_us", "RTT p50 µs", true),
    ("rtt_p99_us", "RTT p99 µs", true),
    ("rtt_p999_us", "RTT p99.9 µs", true),
    ("rtt_added_p50_us", "added p50 µs", false),
    ("pingpong_per_s", "ping-pong rt/s", true),
    ("cpu_us_per_pp_rt", "CPU µs / ping-pong rt", false),
    ("setup_per_s", "setup conns/s", true),
    ("setup_p99_ms", "setup p99 ms", true),
    ("busy_per_s", "busy req/s", true),
    ("busy_p50_ms", "busy p50 ms", true),
    ("busy_p99_ms", "busy p99 ms", true),
    ("cpu_us_per_busy_req", "CPU µs / busy req", false),
    ("kib_per_idle", "KiB / idle conn", false),
    ("rss_start_kib", "RSS at start MiB", false),
    ("cpu_s_per_gb", "CPU s/GB", false),
    ("cpu_us_per_rt", "CPU µs / round trip", false),
];

pub fn render(env: &Env, order: &[String], runs: &[BTreeMap<String, Figures>]) -> String {
    let mut s = String::new();
    let w = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    w(
        &mut s,
        format!(
            "date: {}   machine: {} vCPU, {}, kernel {}",
            env.date, env.nproc, env.cpu, env.kernel
        ),
    );
    w(&mut s, format!("command: {}", env.command));
    w(&mut s, format!("GLIBC_TUNABLES: {}", env.glibc_tunables));
    w(
        &mut s,
        format!(
            "load average at start: {}   figures: median of {} run(s)",
            env.loadavg_start, env.runs
        ),
    );
    if let Some((conns, count)) = env.pingpong {
        w(
            &mut s,
            format!("ping-pong: {conns} connections at once × {count} round trips of 64 B (aggregate rate)"),
        );
    }
    if let Some((conns, secs)) = env.busy {
        w(
            &mut s,
            format!(
                "busy gateway: {conns} connections at once, each doing {} B up / {} B down exchanges back to back, {secs} s measured",
                crate::endpoint::REQUEST,
                crate::endpoint::RESPONSE,
            ),
        );
    }
    for n in &env.notes {
        w(&mut s, format!("note: {n}"));
    }
    let med: Medians<'_> = order.iter().map(|t| (t, medians(runs, t))).collect();
    let direct = med
        .get(&"direct".to_string())
        .map(|(m, _, _)| m.clone())
        .unwrap_or_default();
    w(&mut s, String::new());
    // Only the columns of workloads that ran.
    let measured = |k: &str| med.values().any(|(m, _, _)| m.contains_key(k));
    let columns: Vec<_> = COLUMNS
        .iter()
        .filter(|c| measured(if c.0 == "rtt_added_p50_us" { "rtt_p50_us" } else { c.0 }))
        .collect();
    let head: Vec<&str> = columns.iter().map(|c| c.1).collect();
    w(&mut s, format!("| target | {} |", head.join(" | ")));
    w(&mut s, format!("|---|{}", "---|".repeat(columns.len())));
    for t in order {
        let (m, _, _) = &med[t];
        let mut cells = vec![];
        for (key, _, ratio) in columns.iter().copied() {
            let v = match *key {
                "rtt_added_p50_us" => m.get("rtt_p50_us").zip(direct.get("rtt_p50_us")).map(|(a, d)| a - d),
                "rss_start_kib" => m.get(*key).map(|k| k / 1024.0),
                _ => m.get(*key).copied(),
            };
            cells.push(match (v, direct.get(*key)) {
                (None, _) => "–".to_string(),
                (Some(_), _) if t == "direct" && !ratio => "–".to_string(),
                (Some(v), Some(d)) if *ratio && t != "direct" && *d != 0.0 => format!("{} ({:.2}×)", num(v), v / d),
                (Some(v), _) => num(v),
            });
        }
        w(&mut s, format!("| {t} | {} |", cells.join(" | ")));
    }
    per_process(&mut s, order, &med);
    checks(&mut s, order, &env.clusters, &med);
    cluster(&mut s, &env.clusters, &med);
    problems(&mut s, order, runs);
    s
}

/// The columns of the per-process table: key, heading, and whether KiB are shown as MiB.
/// [`RSS_IDLE_MAX`] stands for the RSS key at the idle workload's most connections.
const PER_COLUMNS: &[(&str, &str, bool)] = &[
    ("cpu_s_per_gb", "CPU s/GB (1 stream, both ways)", false),
    ("cpu_us_per_rt", "CPU µs / round trip", false),
    ("cpu_us_per_pp_rt", "CPU µs / ping-pong rt", false),
    ("cpu_us_per_conn", "CPU µs / new conn", false),
    ("cpu_us_per_busy_req", "CPU µs / busy req", false),
    ("rss_start_kib", "RSS at start MiB", true),
    (RSS_IDLE_MAX, "RSS idle-max MiB", true),
    ("kib_per_idle", "KiB / idle conn", false),
];
const RSS_IDLE_MAX: &str = "rss_idle_max";

fn per_process(s: &mut String, order: &[String], med: &Medians<'_>) {
    // A target's key for a column: the idle maximum's RSS key depends on its connections.
    let key = |m: &Map, k: &'static str| match k {
        RSS_IDLE_MAX => m.get("idle_conns").map(|n| format!("rss_{n}_kib")),
        _ => Some(k.to_string()),
    };
    // Only the columns of workloads that ran.
    let columns: Vec<_> = PER_COLUMNS
        .iter()
        .filter(|c| {
            med.values()
                .any(|(m, per, _)| key(m, c.0).is_some_and(|k| per.values().any(|pm| pm.contains_key(&k))))
        })
        .collect();
    s.push_str("\nPer process (CPU from utime+stime of the process and its children; RSS = VmRSS):\n\n");
    let head: Vec<&str> = columns.iter().map(|c| c.1).collect();
    s.push_str(&format!(
        "| target | process | {} |\n|---|---|{}\n",
        head.join(" | "),
        "---|".repeat(columns.len())
    ));
    for t in order {
        let (m, per, _) = &med[t];
        for (p, pm) in per {
            let cells: Vec<String> = columns
                .iter()
                .map(|(k, _, mib)| {
                    let v = key(m, k).and_then(|k| pm.get(&k).copied());
                    v.map(|v| num(if *mib { v / 1024.0 } else { v }))
                        .unwrap_or_else(|| "–".into())
                })
                .collect();
            s.push_str(&format!("| {t} | {p} | {} |\n", cells.join(" | ")));
        }
    }
}

/// The data-plane issue's targets, for every single-node hyrelay target; peers are the
/// targets that are neither direct, hyrelay nor one of `clusters`.
fn checks(s: &mut String, order: &[String], clusters: &[ClusterTarget], med: &Medians<'_>) {
    let get = |t: &str, k: &str| {
        med.iter()
            .find(|(n, _)| n.as_str() == t)
            .and_then(|(_, (m, _, _))| m.get(k).copied())
    };
    let peers: Vec<&String> = order
        .iter()
        .filter(|t| *t != "direct" && !t.starts_with("hyrelay") && !clusters.iter().any(|c| c.name == **t))
        .collect();
    for t in order.iter().filter(|t| t.starts_with("hyrelay")) {
        let mut lines: Vec<(Option<bool>, String)> = vec![];
        let mut line = |ok: Option<bool>, what: String| lines.push((ok, what));
        for k in ["up1", "down1"] {
            let r = get(t, k).zip(get("direct", k)).map(|(a, d)| a / d);
            let best_peer = peers
                .iter()
                .filter_map(|p| Some((p.as_str(), get(p, k)?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let ahead = best_peer.map(|(_, v)| get(t, k).is_some_and(|a| a > v));
            line(
                r.map(|r| r >= 0.47),
                format!(
                    "bulk {k} ≥ 0.47× direct: {}",
                    r.map(|r| format!("{r:.2}×")).unwrap_or("–".into())
                ),
            );
            line(
                ahead,
                format!(
                    "bulk {k} ahead of every peer (best peer: {})",
                    best_peer
                        .map(|(p, v)| format!("{p} {}", num(v)))
                        .unwrap_or("none run".into())
                ),
            );
        }
        let d50 = get("direct", "rtt_p50_us");
        let added = get(t, "rtt_p50_us").zip(d50).map(|(a, d)| a - d);
        let rat = get("rathole", "rtt_p50_us").zip(d50).map(|(a, d)| a - d);
        line(
            added.zip(rat).map(|(a, r)| a <= 0.7 * r),
            format!("RTT added p50 ≤ 0.7× rathole's: {} vs {} µs", opt(added), opt(rat)),
        );
        let p = get(t, "rtt_p99_us").zip(get(t, "rtt_p50_us")).map(|(a, b)| a / b);
        line(
            p.map(|p| p <= 1.5),
            format!(
                "RTT p99 ≤ 1.5× p50: {}",
                p.map(|p| format!("{p:.2}×")).unwrap_or("–".into())
            ),
        );
        let sr = get(t, "setup_per_s")
            .zip(get("direct", "setup_per_s"))
            .map(|(a, d)| a / d);
        line(
            sr.map(|r| r >= 0.25),
            format!(
                "setup rate ≥ 0.25× direct: {}",
                sr.map(|r| format!("{r:.2}×")).unwrap_or("–".into())
            ),
        );
        let rs = get(t, "setup_per_s").zip(get("rathole", "setup_per_s"));
        line(
            rs.map(|(a, r)| a >= r),
            format!(
                "setup rate ≥ rathole's: {} vs {}",
                opt(get(t, "setup_per_s")),
                opt(get("rathole", "setup_per_s"))
            ),
        );
        let k = get(t, "kib_per_idle");
        line(
            k.map(|k| k <= 30.0),
            format!("≤ 30 KiB RSS per idle tunnel (bridge+relay+hcm): {}", opt(k)),
        );
        let c = get(t, "cpu_s_per_gb");
        line(
            c.map(|c| c <= 0.75),
            format!("≤ 0.75 CPU s/GB (bridge+relay+hcm): {}", opt(c)),
        );
        // None measured: the run left out the workloads these targets are about.
        if lines.iter().all(|(ok, _)| ok.is_none()) {
            continue;
        }
        s.push_str(&format!("\nTargets for {t} (ratios to direct TCP):\n"));
        for (ok, what) in lines {
            s.push_str(&format!("  [{}] {what}\n", mark(ok)));
        }
    }
}

/// The columns of the cluster table: key, heading (each with its ratio to single-node).
const CLUSTER_COLUMNS: &[(&str, &str)] = &[
    ("setup_per_s", "setup conns/s"),
    ("setup_p50_ms", "setup p50 ms"),
    ("setup_p99_ms", "setup p99 ms"),
    ("cpu_us_per_conn", "CPU µs / new conn (all processes)"),
    ("rtt_p50_us", "RTT p50 µs"),
    ("rtt_p99_us", "RTT p99 µs"),
];

/// Issue 10's figures: every cluster target under its single-node target, with ratios to
/// it, and the Redis commands per new tunnel against the targets.
fn cluster(s: &mut String, clusters: &[ClusterTarget], med: &Medians<'_>) {
    if clusters.is_empty() {
        return;
    }
    let fig = |t: &str| med.get(&t.to_string()).map(|(m, _, _)| m);
    s.push_str(
        "\nRelay cluster: two relay nodes on one Redis, the hcm on node A, the bridge on node A (-same) or B \
         (-cross); ratios to the single-node target:\n\n",
    );
    let head: Vec<&str> = CLUSTER_COLUMNS.iter().map(|c| c.1).collect();
    s.push_str(&format!(
        "| target | {} | Redis cmds / new tunnel: setup, idle, net |\n|---|{}---|\n",
        head.join(" | "),
        "---|".repeat(CLUSTER_COLUMNS.len())
    ));
    let mut rows: Vec<(&str, Option<&str>)> = vec![];
    for c in clusters {
        if !rows.iter().any(|(t, _)| *t == c.single) {
            rows.push((&c.single, None));
        }
        rows.push((&c.name, Some(&c.single)));
    }
    for (t, single) in rows {
        let (m, base) = (fig(t), single.and_then(fig));
        let cells: Vec<String> = CLUSTER_COLUMNS
            .iter()
            .map(
                |(k, _)| match (m.and_then(|m| m.get(*k)), base.and_then(|b| b.get(*k))) {
                    (None, _) => "–".to_string(),
                    (Some(v), Some(b)) if *b != 0.0 => format!("{} ({:.2}×)", num(*v), v / b),
                    (Some(v), _) => num(*v),
                },
            )
            .collect();
        let redis = [
            "redis_cmds_per_conn",
            "redis_idle_cmds_per_conn",
            "redis_net_cmds_per_conn",
        ]
        .map(|k| m.and_then(|m| m.get(k)));
        let redis = match redis {
            [Some(a), Some(b), Some(c)] => format!("{a:.3}, {b:.3}, {c:.3}"),
            _ => "–".into(),
        };
        s.push_str(&format!("| {t} | {} | {redis} |\n", cells.join(" | ")));
    }
    s.push_str(
        "\nRedis commands per new tunnel (setup workload less an idle interval as long; ±0.02 for the \
         background's jitter):\n",
    );
    for c in clusters {
        let m = fig(&c.name);
        let net = m.and_then(|m| m.get("redis_net_cmds_per_conn")).copied();
        let by_cmd: Vec<String> = m
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.strip_prefix(REDIS_NET_CMD)?, v)))
            .filter(|(_, v)| v.abs() >= 0.005)
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect();
        s.push_str(&format!(
            "  [{}] {} ≤ {}: {} net{}\n",
            mark(net.map(|n| n <= c.max_redis + 0.02)),
            c.name,
            c.max_redis,
            net.map(|n| format!("{n:.3}")).unwrap_or("–".into()),
            if by_cmd.is_empty() {
                String::new()
            } else {
                format!(" ({})", by_cmd.join(", "))
            }
        ));
    }
}

/// The mark of a target line: met, missed, or not measured.
fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok  ",
        Some(false) => "MISS",
        None => "n/a ",
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "–".into())
}

fn problems(s: &mut String, order: &[String], runs: &[BTreeMap<String, Figures>]) {
    let mut any = false;
    for t in order {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for f in runs.iter().filter_map(|r| r.get(t)) {
            for e in f
                .errors
                .iter()
                .map(|e| format!("error: {e}"))
                .chain(f.notes.iter().map(|n| format!("note: {n}")))
                .chain(f.complaints.iter().map(|c| format!("log: {c}")))
            {
                *seen.entry(e).or_default() += 1;
            }
        }
        if seen.is_empty() {
            continue;
        }
        if !any {
            s.push_str("\nErrors, notes and log warnings (× runs):\n");
            any = true;
        }
        // Log lines name connections, so they rarely repeat exactly: show a few.
        let (logs, other): (Vec<_>, Vec<_>) = seen.into_iter().partition(|(e, _)| e.starts_with("log: "));
        for (e, n) in &other {
            s.push_str(&format!("  {t}: {e} (×{n})\n"));
        }
        for (e, n) in logs.iter().take(4) {
            s.push_str(&format!("  {t}: {e} (×{n})\n"));
        }
        if logs.len() > 4 {
            s.push_str(&format!(
                "  {t}: ... {} more log lines (see the JSON output or the logs in the work dir)\n",
                logs.len() - 4
            ));
        }
    }
}

/// Everything as JSON: environment, every run's figures, and the medians.
pub fn json(env: &Env, order: &[String], runs: &[BTreeMap<String, Figures>]) -> serde_json::Value {
    let med: BTreeMap<&String, serde_json::Value> = order
        .iter()
        .map(|t| {
            let (m, per, complete) = medians(runs, t);
            (
                t,
                json!({ "figures": m, "per_process": per, "runs_without_error": complete }),
            )
        })
        .collect();
    json!({ "env": env, "targets": order, "median": med, "runs": runs })
}
