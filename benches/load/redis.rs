//! Redis commands a cluster target issues, counted by Redis itself: `INFO commandstats`
//! (calls per command) read over a plain TCP connection before and after a workload, then
//! again after an idle interval as long as the workload took, which is the background
//! (presence beats, catalog version checks) to subtract.
//!
//! The harness's own `INFO` calls are left out of every count.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Calls per command name (`publish`, `get`, `client|setinfo`, ...).
pub type Calls = BTreeMap<String, u64>;

/// Counts the commands served from [`Probe::start`] to [`Probe::finish`].
pub struct Probe {
    addr: SocketAddr,
    before: Calls,
    t0: Instant,
}

/// What a [`Probe`] counted.
pub struct Traffic {
    /// Commands during the workload.
    pub busy: Calls,
    /// Commands during the idle interval after it, as long as the workload took.
    pub idle: Calls,
}

impl Probe {
    pub fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            addr,
            before: calls(addr)?,
            t0: Instant::now(),
        })
    }

    /// Reads the counts at the end of the workload, waits as long as it took, and reads
    /// them again.
    pub fn finish(self) -> anyhow::Result<Traffic> {
        let end = calls(self.addr)?;
        std::thread::sleep(self.t0.elapsed());
        let after_idle = calls(self.addr)?;
        Ok(Traffic {
            busy: delta(&self.before, &end),
            idle: delta(&end, &after_idle),
        })
    }
}

impl Traffic {
    /// Per command: commands during the workload less those of the idle interval.
    pub fn net(&self) -> BTreeMap<String, i64> {
        let names: BTreeSet<&String> = self.busy.keys().chain(self.idle.keys()).collect();
        let get = |c: &Calls, n: &String| c.get(n).copied().unwrap_or(0) as i64;
        names
            .into_iter()
            .map(|n| (n.clone(), get(&self.busy, n) - get(&self.idle, n)))
            .collect()
    }
}

/// `INFO commandstats` of the Redis at `addr`, without `info` itself.
fn calls(addr: SocketAddr) -> anyhow::Result<Calls> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("Redis at {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"INFO commandstats\r\n")?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head)?;
    // A bulk string: `$<length>\r\n<text>\r\n`.
    let len: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("INFO commandstats answered {head:?}"))?;
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)?;
    Ok(parse(&String::from_utf8_lossy(&text)))
}

/// `cmdstat_<name>:calls=<n>,usec=...` lines to calls per name.
fn parse(text: &str) -> Calls {
    text.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let n = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), n))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

/// Calls from `before` to `after`, per command that had any.
fn delta(before: &Calls, after: &Calls) -> Calls {
    after
        .iter()
        .map(|(n, a)| (n.clone(), a.saturating_sub(before.get(n).copied().unwrap_or(0))))
        .filter(|(_, d)| *d > 0)
        .collect()
}
