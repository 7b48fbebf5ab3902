//! CPU time and RSS of a target's processes from /proc.
//!
//! A spawned process counts together with its descendants (socat forks one process per
//! connection): CPU is utime+stime+cutime+cstime summed over the live tree, so children
//! that have exited and were waited for still count through their parent's cutime/cstime;
//! RSS is VmRSS summed over the live tree.

use std::collections::BTreeMap;

/// Per named process: CPU seconds.
pub type Cpu = BTreeMap<String, f64>;

pub fn cpu(pids: &[(String, u32)]) -> Cpu {
    let tree = children_map();
    pids.iter()
        .map(|(n, p)| (n.clone(), subtree(*p, &tree).iter().map(|p| cpu_of(*p)).sum()))
        .collect()
}

/// Per named process: RSS in KiB.
pub fn rss(pids: &[(String, u32)]) -> BTreeMap<String, f64> {
    let tree = children_map();
    pids.iter()
        .map(|(n, p)| (n.clone(), subtree(*p, &tree).iter().map(|p| rss_of(*p)).sum()))
        .collect()
}

/// `after - before` per process.
pub fn delta(before: &Cpu, after: &Cpu) -> Cpu {
    after
        .iter()
        .map(|(n, a)| (n.clone(), a - before.get(n).copied().unwrap_or(0.0)))
        .collect()
}

/// CPU µs per operation, per process: `after - before` over `ops` operations.
pub fn us_per(before: &Cpu, after: &Cpu, ops: f64) -> Cpu {
    delta(before, after)
        .into_iter()
        .map(|(n, s)| (n, s * 1e6 / ops))
        .collect()
}

/// The soft RLIMIT_NOFILE of a process, from /proc/<pid>/limits.
pub fn nofile(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn cpu_of(pid: u32) -> f64 {
    let Some(fields) = stat_fields(pid) else { return 0.0 };
    // Fields after the command name, 0-based from field 3 (state): utime is field 14.
    let tick = clock_ticks();
    (11..=14)
        .filter_map(|i| fields.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / tick
}

fn rss_of(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0)
}

/// The fields of /proc/<pid>/stat after `(comm)`, starting with the state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Parent pid to children, over every process on the machine.
fn children_map() -> BTreeMap<u32, Vec<u32>> {
    let mut map: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

fn subtree(root: u32, map: &BTreeMap<u32, Vec<u32>>) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        out.extend(map.get(&out[i]).into_iter().flatten().copied());
        i += 1;
    }
    out
}
