//! The busy-gateway workload (issue 13): `conns` tunnels opened first, then every one of them
//! doing request/response exchanges back to back ([`REQUEST`] bytes up, [`RESPONSE`] down:
//! the endpoint's mode `R`) for a warm-up and a measured window. Figures count the exchanges
//! that completed inside the window: aggregate rate, latency p50/p99 of each exchange, and
//! CPU µs per exchange of every process over the same window.
//!
//! The clients are tokio tasks on a runtime of the workload's own (one worker per core), not
//! a thread per connection. Every connect, read and write is bounded by a timeout, so a
//! stalled tunnel is an error, not a hang.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::endpoint::{REQUEST, RESPONSE};
use crate::procs;

/// Bound on each connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnels being opened at a time.
const OPENERS: usize = 64;

pub struct Busy {
    /// Exchanges completed per second in the window, over all connections.
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU µs per exchange, per process.
    pub cpu: procs::Cpu,
}

/// Opens `conns` connections through `entry`, then runs them all for `warmup + secs`
/// seconds; the figures are taken over the last `secs`.
pub fn busy(entry: SocketAddr, pids: &[(String, u32)], conns: usize, warmup: f64, secs: f64) -> anyhow::Result<Busy> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("busy-client")
        .enable_all()
        .build()?;
    rt.block_on(async {
        let streams = open_all(entry, conns).await?;
        let start = Instant::now() + Duration::from_secs_f64(warmup);
        let end = start + Duration::from_secs_f64(secs);
        let mut clients = JoinSet::new();
        for s in streams {
            clients.spawn(client(s, start, end));
        }
        tokio::time::sleep_until(start.into()).await;
        let c0 = procs::cpu(pids);
        tokio::time::sleep_until(end.into()).await;
        let c1 = procs::cpu(pids);
        let (mut times, mut failed) = (vec![], vec![]);
        while let Some(r) = clients.join_next().await {
            match r {
                Ok(Ok(t)) => times.extend(t),
                Ok(Err(e)) => failed.push(e.to_string()),
                Err(e) => failed.push(e.to_string()),
            }
        }
        if !failed.is_empty() {
            bail!("{} of {conns} connections failed, first: {}", failed.len(), failed[0]);
        }
        if times.is_empty() {
            bail!("stalled: no exchange completed in {secs} s");
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let n = times.len() as f64;
        let cpu = procs::us_per(&c0, &c1, n);
        Ok(Busy {
            per_sec: n / secs,
            p50_ms: crate::workloads::pct(&times, 0.50) / 1e3,
            p99_ms: crate::workloads::pct(&times, 0.99) / 1e3,
            cpu,
        })
    })
}

/// `conns` connections in mode `R`, each having done one exchange, `OPENERS` at a time.
async fn open_all(entry: SocketAddr, conns: usize) -> anyhow::Result<Vec<TcpStream>> {
    let left = Arc::new(AtomicUsize::new(conns));
    let mut openers = JoinSet::new();
    for _ in 0..OPENERS.min(conns) {
        let left = left.clone();
        openers.spawn(async move {
            let mut opened = vec![];
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                match open(entry).await {
                    Ok(s) => opened.push(s),
                    Err(e) => {
                        // Stop the other openers too: one broken tunnel is enough to report.
                        left.store(0, Ordering::Relaxed);
                        return (opened, Some(e));
                    }
                }
            }
            (opened, None)
        });
    }
    let (mut all, mut first_err) = (vec![], None);
    while let Some(r) = openers.join_next().await {
        let (opened, err) = r?;
        all.extend(opened);
        first_err = first_err.or(err);
    }
    if let Some(e) = first_err {
        bail!("opened {} of {conns} connections, then: {e}", all.len());
    }
    Ok(all)
}

/// One connection in mode `R` that has done one exchange (so it reaches the endpoint).
async fn open(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = timed(TcpStream::connect(entry)).await?;
    s.set_nodelay(true)?;
    timed(s.write_all(b"R")).await?;
    exchange(&mut s, &mut vec![0u8; RESPONSE]).await?;
    Ok(s)
}

/// One client: exchanges until `end`; returns the latencies (µs) of those that completed
/// between `start` and `end`.
async fn client(mut s: TcpStream, start: Instant, end: Instant) -> std::io::Result<Vec<f64>> {
    let mut buf = vec![0u8; RESPONSE];
    let mut times = vec![];
    loop {
        let t = Instant::now();
        if t >= end {
            return Ok(times);
        }
        exchange(&mut s, &mut buf).await?;
        let done = Instant::now();
        if done >= start && done <= end {
            times.push((done - t).as_secs_f64() * 1e6);
        }
    }
}

/// One request out, its whole response back into `buf`.
async fn exchange(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    static REQ: [u8; REQUEST] = [0xa5; REQUEST];
    timed(s.write_all(&REQ)).await?;
    timed(s.read_exact(buf)).await?;
    Ok(())
}

async fn timed<T>(f: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f).await?
}
