//! The endpoint (in the private namespace) and what the app (in the app namespace) measures
//! through a target: time from `connect()` to the echo of the first 64 bytes on a new
//! connection, 64-byte round trips on an open one, and bulk goodput (the endpoint sends as
//! fast as it can; the app counts what arrives).
//!
//! Endpoint protocol: a connection whose first byte is `D` gets an endless stream; any other
//! is echoed byte for byte. Every loop is bounded by a count or a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The echo/stream endpoint: one thread per connection, forever (it dies with the
/// namespace thread's process).
pub fn endpoint(listener: TcpListener) {
    for s in listener.incoming().flatten() {
        std::thread::spawn(move || serve(s));
    }
}

fn serve(mut s: TcpStream) {
    s.set_nodelay(true).ok();
    let mut buf = vec![0u8; 64 * 1024];
    let Ok(n) = s.read(&mut buf) else { return };
    if n == 0 {
        return;
    }
    if buf[0] == b'D' {
        let chunk = vec![0x5au8; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
        return;
    }
    let mut n = n;
    loop {
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
        n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
    }
}

const MSG: [u8; 64] = [b'E'; 64];

/// One new connection: `connect()`, 64 bytes out, 64 back. Returns the time it took.
pub fn first_echo(entry: SocketAddr, limit: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&entry, limit).context("connect")?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(&MSG)?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).context("reading the echo")?;
    let took = t.elapsed();
    if back != MSG {
        bail!("the echo came back different");
    }
    Ok(took)
}

/// `count` 64-byte round trips on one connection (after one to open it).
pub fn round_trips(entry: SocketAddr, count: usize, limit: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&entry, limit)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(limit))?;
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(count);
    for i in 0..=count {
        let t = Instant::now();
        s.write_all(&MSG)?;
        s.read_exact(&mut back)?;
        if i > 0 {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Goodput in bits per second of a stream from the endpoint, counted over `secs` after
/// `warmup`.
pub fn bulk(entry: SocketAddr, warmup: Duration, secs: Duration) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect_timeout(&entry, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"D")?;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let (mut counted, mut from) = (0u64, None);
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the stream ended");
        }
        let now = Instant::now();
        match from {
            None if now - start >= warmup => from = Some(now),
            Some(f) if now - f >= secs => return Ok(counted as f64 * 8.0 / (now - f).as_secs_f64()),
            Some(_) => counted += n as u64,
            None => {}
        }
    }
}

/// The `q` quantile (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize]
}
