//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_start_time_seconds`), read from `/proc/self` at each scrape
//! and appended to `/metrics` in the text format, with the names and meanings the official
//! client libraries use. Read here rather than through `metrics-process`: a page of code
//! against its dependency tree (procfs and its own), and CPU time as a fraction of a
//! second where that crate rounds to whole seconds.
//!
//! Linux only (elsewhere: nothing, and the rest of `/metrics` is unchanged). A value that
//! cannot be read is left out rather than reported as zero. Parsing is pure
//! ([`parse_stat`]) and tested; reading the files is one small function.

use std::fmt::Write as _;

/// What `/proc/self/stat` gives (after the command name, which may hold spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// User + system CPU time in clock ticks.
    pub cpu_ticks: u64,
    /// Start time in clock ticks after boot.
    pub start_ticks: u64,
    /// Virtual memory size in bytes.
    pub vsize: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses `/proc/self/stat`; `None` if it does not have the expected fields.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // Fields after "pid (comm) ": state is field 3; utime 14, stime 15, starttime 22,
    // vsize 23, rss 24 (1-based, proc(5)).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: at(14)? + at(15)?,
        start_ticks: at(22)?,
        vsize: at(23)?,
        rss_pages: at(24)?,
    })
}

/// The boot time in Unix seconds: the wall clock minus `CLOCK_BOOTTIME` (the clock that
/// `/proc/self/stat`'s start time counts on). Needs no `/proc/stat`, which `ProcSubset=pid`
/// hides in the systemd units.
#[cfg(target_os = "linux")]
fn boot_time() -> Option<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let since_boot = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some(now - since_boot)
}

/// The process metrics in Prometheus text format (empty where they cannot be read).
pub fn render() -> String {
    let mut out = String::new();
    #[cfg(target_os = "linux")]
    render_linux(&mut out);
    out
}

#[cfg(target_os = "linux")]
fn render_linux(out: &mut String) {
    // SAFETY: sysconf only reads a system constant.
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let (tick, page) = (tick.max(1) as f64, page.max(1) as u64);
    if let Some(st) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(parse_stat)
    {
        metric(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            st.cpu_ticks as f64 / tick,
        );
        metric(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (st.rss_pages * page) as f64,
        );
        metric(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            st.vsize as f64,
        );
        if let Some(boot) = boot_time() {
            // Whole seconds: the boot time derived from two clocks jitters below that.
            let start = (boot + st.start_ticks as f64 / tick).round();
            metric(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        metric(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            lim.rlim_cur as f64,
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (hy relay) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 50 0 0 20 0 9 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_ticks: 200,
                start_ticks: 12345,
                vsize: 104857600,
                rss_pages: 2560
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        #[cfg(target_os = "linux")]
        {
            let r = render();
            for name in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_start_time_seconds",
            ] {
                assert!(r.contains(&format!("# TYPE {name} ")), "{name} in {r}");
            }
            let start: f64 = r
                .lines()
                .find_map(|l| l.strip_prefix("process_start_time_seconds "))
                .unwrap()
                .parse()
                .unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            assert!(
                start <= now + 1.0 && start > now - 3600.0,
                "this test process started {start}, now {now}"
            );
        }
    }
}
