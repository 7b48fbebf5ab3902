//! The completion backend (cargo feature `uring`): io_uring on Linux, IOCP on Windows,
//! through compio, kept behind this module so no other part of the crate names its types.
//!
//! Handshakes, TLS, authentication and control channels stay on the tokio workers. Once a
//! tunnel is established and all its legs are plain TCP, the tokio side deregisters the
//! sockets and hands them, with any bytes read past the handshakes, to a completion worker
//! ([`Completion`]: one thread per data-plane worker, each with its own ring). The tunnel
//! runs there under the same sans-IO rules as on epoll (`session::forward` for `relay`,
//! `session::splice` for `splice`; only the byte moving differs) and counts into that
//! thread's counters, which a
//! flush task publishes like a tokio worker's. The tokio task that handed the tunnel off
//! waits for its result, so connection caps, drain and logs see it as before. Tunnels with
//! a TLS leg stay on the epoll engines.
//!
//! Buffers: see [`bufs`]. A waiting connection holds no buffer on Linux.

pub mod bufs;
mod io;
mod relay;
mod splice;

use std::future::Future;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::io::{Reader, Writer, adopt};
use super::reframe::TunnelStats;
use super::splice::{SpliceConfig, SpliceStats};
use super::stats::{self, ActiveGuard};
use super::threads::{ThreadStart, Threads};
use crate::dataplane::pool::{self, BUF_SIZE};

/// Tunnels started on completion workers in this process, per hybrid connection (for
/// tests; touched once per tunnel).
static TUNNELS_RUN: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

/// How many tunnels of hybrid connection `hc` have run on completion workers.
pub fn tunnels_run(hc: &str) -> u64 {
    let runs = TUNNELS_RUN.lock().unwrap_or_else(|e| e.into_inner());
    runs.iter().find(|(h, _)| h == hc).map_or(0, |(_, n)| *n)
}

fn count_run(hc: &str) {
    let mut runs = TUNNELS_RUN.lock().unwrap_or_else(|e| e.into_inner());
    match runs.iter_mut().find(|(h, _)| h == hc) {
        Some((_, n)) => *n += 1,
        None => runs.push((hc.to_owned(), 1)),
    }
}

/// Completion worker threads, one runtime and ring each.
pub struct Completion {
    threads: Threads,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("count", &self.threads.len())
            .finish()
    }
}

impl Completion {
    /// Starts `count` threads named `{role}-uring-{i}` (`name` without its `hyrelay-`, to fit
    /// the 15 bytes a thread name keeps) with `budget` bytes of buffers each.
    pub fn start(name: &str, count: usize, budget: usize) -> std::io::Result<Arc<Self>> {
        let role = name.trim_start_matches("hyrelay-");
        let threads = Threads::start(
            count,
            |i| format!("{role}-uring-{i}"),
            move |_, s| run_worker(budget, s),
        )?;
        Ok(Arc::new(Self { threads }))
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.len() == 0
    }

    /// Runs `make()` on worker `i` and spawns its future there.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.threads.spawn_on(i, make);
    }

    /// Stops the threads (dropping their tunnels) and waits for them.
    pub fn stop(&self) {
        self.threads.stop();
    }

    /// Relays a joined tunnel whose two legs are plain TCP; resolves with its stats.
    pub fn relay(&self, t: RelayJob) -> oneshot::Receiver<TunnelStats> {
        let (tx, rx) = oneshot::channel();
        self.threads.spawn(move || async move {
            if let Some(stats) = run_relay(t).await {
                tx.send(stats).ok();
            }
        });
        rx
    }

    /// Splices a plain-TCP WebSocket to a TCP connection; resolves with its stats.
    pub fn splice(&self, s: SpliceJob) -> oneshot::Receiver<SpliceStats> {
        let (tx, rx) = oneshot::channel();
        self.threads.spawn(move || async move {
            if let Some(stats) = run_splice(s).await {
                tx.send(stats).ok();
            }
        });
        rx
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.threads.cancel();
    }
}

/// A relay tunnel to run: legs with the bytes read past their handshakes.
pub struct RelayJob {
    pub hc: String,
    pub sender: (std::net::TcpStream, BytesMut),
    pub listener: (std::net::TcpStream, BytesMut),
    pub max_frame: u64,
    pub gone: CancellationToken,
    pub shutdown: CancellationToken,
}

/// A splice to run: the WebSocket (with bytes past its handshake) and the TCP connection.
pub struct SpliceJob {
    pub hc: String,
    pub ws: (std::net::TcpStream, BytesMut),
    pub tcp: std::net::TcpStream,
    pub cfg: SpliceConfig,
    pub stop: CancellationToken,
}

/// A socket's read and write halves on this worker's runtime.
type Halves = (Reader, Writer);

fn leg(s: std::net::TcpStream) -> std::io::Result<Halves> {
    let s = adopt(s)?;
    Ok((Reader::new(s.clone()), Writer::new(s)))
}

/// A tunnel's two sockets adopted by this worker's runtime, and the tunnel of `hc`
/// counted as running here; `None` (logged) if the runtime refused one.
fn adopt_pair(hc: String, a: std::net::TcpStream, b: std::net::TcpStream) -> Option<(Halves, Halves, ActiveGuard)> {
    match leg(a).and_then(|a| Ok((a, leg(b)?))) {
        Ok((a, b)) => {
            count_run(&hc);
            Some((a, b, ActiveGuard::new(stats::for_hc(&hc))))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot move the tunnel to the completion worker");
            None
        }
    }
}

async fn run_relay(t: RelayJob) -> Option<TunnelStats> {
    let RelayJob {
        hc,
        sender,
        listener,
        max_frame,
        gone,
        shutdown,
    } = t;
    let ((sr, sw), (lr, lw), active) = adopt_pair(hc, sender.0, listener.0)?;
    let mut tunnel = relay::RelayTunnel::new(
        (relay::Leg { r: sr, w: sw }, &sender.1),
        (relay::Leg { r: lr, w: lw }, &listener.1),
        max_frame,
        &gone,
        &shutdown,
        active,
    );
    // The handshake buffers are copied; free them for the tunnel's lifetime.
    drop((sender.1, listener.1, gone, shutdown));
    (&mut tunnel).await;
    Some(tunnel.shutdown_legs().await)
}

async fn run_splice(s: SpliceJob) -> Option<SpliceStats> {
    let SpliceJob { hc, ws, tcp, cfg, stop } = s;
    let ((wr, ww), tcp, active) = adopt_pair(hc, ws.0, tcp)?;
    let mut sp = splice::Splice::new((wr, ww, &ws.1), tcp, &cfg, &stop, active);
    drop((ws.1, cfg, stop));
    let stats = (&mut sp).await;
    let _ = sp.into_ws_writer().shutdown();
    Some(stats)
}

/// Body of a completion worker thread.
fn run_worker(budget: usize, start: ThreadStart) {
    let ThreadStart { mut jobs, stop, ready } = start;
    let ring = bufs::ring_size(budget);
    let rt = match build_runtime(ring) {
        Ok(rt) => rt,
        Err(e) => {
            ready.send(Err(e)).ok();
            return;
        }
    };
    pool::set_budget(budget.saturating_sub(ring * BUF_SIZE));
    bufs::set_ring_len(ring);
    ready.send(Ok(())).ok();
    rt.block_on(async move {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(job) => compio::runtime::spawn(job()).detach(),
                    None => break,
                },
            }
        }
    });
    // Dropping the runtime drops every task still on this worker.
}

fn build_runtime(ring: usize) -> std::io::Result<compio::runtime::Runtime> {
    // One thread submits and reaps: let the kernel run completion work only when we
    // enter it (no interrupts while the worker runs), as io_uring advises for this shape.
    build_with(ring, true).or_else(|_| build_with(ring, false))
}

fn build_with(ring: usize, single_thread_flags: bool) -> std::io::Result<compio::runtime::Runtime> {
    let mut pb = compio::driver::ProactorBuilder::new();
    let ring = std::num::NonZero::new(ring.min(1 << 15) as u16).unwrap_or(std::num::NonZero::<u16>::MIN);
    pb.buffer_pool_size(ring).buffer_pool_buffer_len(BUF_SIZE);
    if single_thread_flags {
        pb.single_issuer(true)
            .defer_taskrun(true)
            .coop_taskrun(true)
            .taskrun_flag(true);
    }
    compio::runtime::RuntimeBuilder::new().with_proactor(pb).build()
}

/// Calls `flush` every second (a completion worker's counter flush).
pub async fn flush_every_second(mut flush: impl FnMut()) {
    loop {
        compio::time::sleep(std::time::Duration::from_secs(1)).await;
        flush();
    }
}

/// Buffers of this completion worker in use and allowed, as a pool's counters.
pub fn buffer_stats() -> pool::PoolStats {
    let p = pool::stats();
    pool::PoolStats {
        in_use: p.in_use + bufs::ring_in_use(),
        high_water: p.high_water,
        budget: p.budget + bufs::ring_len(),
        reserve: p.reserve,
    }
}
