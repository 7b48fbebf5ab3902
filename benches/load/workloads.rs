//! The workloads, the same for every target: bulk throughput, round-trip latency, many
//! concurrent ping-pongs (the "pp32" of runtime-notes.md), tunnel setup rate and
//! idle-connection memory; the busy gateway, with thousands of connections, is in `busy.rs`.
//! Clients are blocking threads; every loop is bounded in count and time (socket timeouts
//! plus deadlines), and a stalled tunnel is an error, not a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::endpoint::{Endpoint, IO_BUF};
use crate::procs;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects with timeouts and TCP_NODELAY set.
fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Retries an echo of one byte through `addr` until it works or `limit` passes.
pub fn wait_echo(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        let r = (|| {
            let mut s = connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"Ex")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok::<_, std::io::Error>(())
        })();
        match r {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("last error: {last:?}")
}

/// Result of a bulk run: Gb/s, bytes counted, and CPU seconds of each process meanwhile.
pub struct Bulk {
    pub gbps: f64,
    pub bytes: u64,
    pub cpu: procs::Cpu,
}

/// `streams` connections sending (`up`) or receiving for `warmup + secs`; the rate is taken
/// over the last `secs`, from bytes the receiving side counted.
pub fn bulk(
    ep: &Endpoint,
    entry: SocketAddr,
    pids: &[(String, u32)],
    up: bool,
    streams: usize,
    warmup: f64,
    secs: f64,
) -> anyhow::Result<Bulk> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut threads = vec![];
    for _ in 0..streams {
        let (stop, received, errors) = (stop.clone(), received.clone(), errors.clone());
        let mut s = connect(entry).context("connect")?;
        threads.push(std::thread::spawn(move || {
            let r = (|| {
                if up {
                    s.write_all(b"U")?;
                    let buf = vec![0xa5u8; IO_BUF];
                    while !stop.load(Ordering::Relaxed) {
                        s.write_all(&buf)?;
                    }
                } else {
                    s.write_all(b"D")?;
                    let mut buf = vec![0u8; IO_BUF];
                    while !stop.load(Ordering::Relaxed) {
                        let n = s.read(&mut buf)?;
                        if n == 0 {
                            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source closed"));
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                Ok::<_, std::io::Error>(())
            })();
            if let Err(e) = r
                && !stop.load(Ordering::Relaxed)
            {
                errors.lock().unwrap().push(e.to_string());
            }
        }));
    }
    let count = || {
        if up {
            ep.sunk.load(Ordering::Relaxed)
        } else {
            received.load(Ordering::Relaxed)
        }
    };
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let (b0, c0, t0) = (count(), procs::cpu(pids), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (b1, c1, dt) = (count(), procs::cpu(pids), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let errors = errors.lock().unwrap().clone();
    if !errors.is_empty() {
        bail!("{} of {streams} streams failed: {}", errors.len(), errors[0]);
    }
    let bytes = b1 - b0;
    if bytes == 0 {
        bail!("stalled: no byte arrived in {secs} s");
    }
    Ok(Bulk {
        gbps: bytes as f64 * 8.0 / dt / 1e9,
        bytes,
        cpu: procs::delta(&c0, &c1),
    })
}

pub struct Rtt {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU µs per round trip, per process.
    pub cpu: procs::Cpu,
}

/// `count` round trips of 64 bytes on one connection, after 500 unrecorded ones.
pub fn rtt(entry: SocketAddr, pids: &[(String, u32)], count: usize) -> anyhow::Result<Rtt> {
    let mut s = connect(entry)?;
    let mut msg = [0x42u8; 65];
    msg[0] = b'E';
    s.write_all(&msg)?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..500 {
        s.write_all(&msg[1..])?;
        s.read_exact(&mut back)?;
    }
    let mut times = Vec::with_capacity(count);
    let c0 = procs::cpu(pids);
    for i in 0..count {
        let t = Instant::now();
        s.write_all(&msg[1..])?;
        s.read_exact(&mut back)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if i % 1000 == 0 && Instant::now() > deadline {
            bail!("round trips took over 120 s");
        }
    }
    let c1 = procs::cpu(pids);
    times.sort_by(|a, b| a.total_cmp(b));
    let cpu = procs::us_per(&c0, &c1, count as f64);
    Ok(Rtt {
        p50_us: pct(&times, 0.50),
        p99_us: pct(&times, 0.99),
        p999_us: pct(&times, 0.999),
        cpu,
    })
}

/// Result of the ping-pong workload: aggregate round trips per second over all connections.
pub struct PingPong {
    pub per_sec: f64,
    /// CPU µs per round trip, per process.
    pub cpu: procs::Cpu,
}

/// `conns` connections at once, each doing `count` round trips of 64 bytes (after 100
/// unrecorded ones); the rate is all round trips over the time from the common start until
/// the last connection finished.
pub fn pingpong(entry: SocketAddr, pids: &[(String, u32)], conns: usize, count: usize) -> anyhow::Result<PingPong> {
    let streams = (0..conns)
        .map(|_| echo_stream(entry))
        .collect::<std::io::Result<Vec<_>>>()
        .context("open the ping-pong connections")?;
    let start = Arc::new(Barrier::new(conns + 1));
    let deadline = Instant::now() + Duration::from_secs(120);
    let threads: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let start = start.clone();
            std::thread::spawn(move || ping_pong_loop(s, &start, count, deadline))
        })
        .collect();
    start.wait();
    let (c0, t0) = (procs::cpu(pids), Instant::now());
    let results: Vec<std::io::Result<()>> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("client thread panicked")))
        })
        .collect();
    let (c1, wall) = (procs::cpu(pids), t0.elapsed().as_secs_f64());
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    if !failed.is_empty() {
        bail!("{} of {conns} connections failed, first: {}", failed.len(), failed[0]);
    }
    let total = (conns * count) as f64;
    let cpu = procs::us_per(&c0, &c1, total);
    Ok(PingPong {
        per_sec: total / wall,
        cpu,
    })
}

/// A connection in echo mode that has echoed one 64-byte message.
fn echo_stream(entry: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = connect(entry)?;
    let mut msg = [0x33u8; 65];
    msg[0] = b'E';
    s.write_all(&msg)?;
    s.read_exact(&mut [0u8; 64])?;
    Ok(s)
}

/// One client of [`pingpong`]: warms up, waits for the common start, then `count` round trips.
fn ping_pong_loop(mut s: TcpStream, start: &Barrier, count: usize, deadline: Instant) -> std::io::Result<()> {
    let msg = [0x33u8; 64];
    let mut back = [0u8; 64];
    let mut round_trip = |s: &mut TcpStream| {
        s.write_all(&msg)?;
        s.read_exact(&mut back)
    };
    // Even a failed warm-up reaches the barrier, or the other threads would wait for ever.
    let warm = (0..100).try_for_each(|_| round_trip(&mut s));
    start.wait();
    warm?;
    for i in 0..count {
        round_trip(&mut s)?;
        if i % 100 == 0 && Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "ping-pong took over 120 s",
            ));
        }
    }
    Ok(())
}

pub struct Setup {
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU µs per connection, per process.
    pub cpu: procs::Cpu,
}

/// `count` new connections, `conc` at a time, each with one 64-byte exchange.
pub fn setup(entry: SocketAddr, pids: &[(String, u32)], count: usize, conc: usize) -> anyhow::Result<Setup> {
    let left = Arc::new(AtomicUsize::new(count));
    let times = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let c0 = procs::cpu(pids);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (left, times, errors) = (left.clone(), times.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut msg = [0x17u8; 65];
                msg[0] = b'E';
                let mut back = [0u8; 64];
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let t = Instant::now();
                    let r = (|| {
                        let mut s = connect(entry)?;
                        s.write_all(&msg)?;
                        s.read_exact(&mut back)
                    })();
                    match r {
                        Ok(()) => times.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3),
                        Err(e) => {
                            let mut errs = errors.lock().unwrap();
                            errs.push(e.to_string());
                            // Give up on a broken target rather than grind through the rest.
                            if errs.len() > count / 100 + 5 {
                                left.store(0, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let c1 = procs::cpu(pids);
    let errors = errors.lock().unwrap().clone();
    if !errors.is_empty() {
        bail!("{} of {count} connections failed, first: {}", errors.len(), errors[0]);
    }
    let mut times = times.lock().unwrap().clone();
    times.sort_by(|a, b| a.total_cmp(b));
    let cpu = procs::us_per(&c0, &c1, count as f64);
    Ok(Setup {
        per_sec: count as f64 / wall,
        p50_ms: pct(&times, 0.5),
        p99_ms: pct(&times, 0.99),
        cpu,
    })
}

/// The `p` quantile of ascending `sorted` (NaN if empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A child process (this binary with `--hold-idle ADDR`) that opens idle tunneled
/// connections on request and holds them, so their file descriptors do not count against
/// the harness's RLIMIT_NOFILE, which the endpoint's side of the same connections needs.
pub struct IdleHolder {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl IdleHolder {
    pub fn spawn(entry: SocketAddr) -> anyhow::Result<Self> {
        // /proc/self/exe is this very binary even if cargo has rebuilt the file meanwhile.
        let mut child = Command::new("/proc/self/exe")
            .args(["--hold-idle", &entry.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self { child, out })
    }

    /// Opens `n` more connections; returns how many are held in all.
    pub fn open(&mut self, n: usize) -> anyhow::Result<usize> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "{n}")?;
        let mut line = String::new();
        // The child bounds its own work (per-connection timeouts), so this read ends.
        self.out.read_line(&mut line)?;
        let mut it = line.split_whitespace();
        let (held, err) = (it.next().and_then(|s| s.parse().ok()), it.collect::<Vec<_>>().join(" "));
        match held {
            Some(h) if err.is_empty() => Ok(h),
            Some(h) => bail!("{h} held; {err}"),
            None => bail!("idle holder died: {line:?}"),
        }
    }
}

impl Drop for IdleHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side of [`IdleHolder`]: reads counts on stdin, answers `HELD [error]`.
pub fn hold_idle_main(entry: SocketAddr) -> anyhow::Result<()> {
    let mut held: Vec<TcpStream> = vec![];
    for line in std::io::stdin().lock().lines() {
        let n: usize = line?.trim().parse()?;
        let left = Arc::new(AtomicUsize::new(n));
        let opened = Arc::new(Mutex::new(vec![]));
        let first_err = Arc::new(Mutex::new(None::<String>));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (left, opened, first_err) = (left.clone(), opened.clone(), first_err.clone());
                std::thread::spawn(move || {
                    while left
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        let r = (|| {
                            let mut s = connect(entry)?;
                            s.write_all(b"Iz")?;
                            let mut b = [0u8; 1];
                            s.read_exact(&mut b)?;
                            Ok::<_, std::io::Error>(s)
                        })();
                        match r {
                            Ok(s) => opened.lock().unwrap().push(s),
                            Err(e) => {
                                first_err.lock().unwrap().get_or_insert(e.to_string());
                                left.store(0, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        held.append(&mut opened.lock().unwrap());
        let err = first_err.lock().unwrap().clone().unwrap_or_default();
        println!("{} {err}", held.len());
    }
    Ok(())
}
