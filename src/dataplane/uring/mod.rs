//! The completion backend (cargo feature `uring`): io_uring on Linux, IOCP on Windows,
//! through compio, kept behind this module so no other part of the crate names its types.
//!
//! Handshakes (TLS's among them), authentication and control channels stay on the tokio
//! workers. Once a tunnel is established, the tokio side deregisters its sockets and hands
//! them, with any bytes read past the handshakes and each TLS leg's session
//! ([`crate::transport::tls_session::TlsSession`]: keys, sequence numbers, what rustls
//! keeps for key updates and tickets), to a completion worker
//! ([`Completion`]: one thread per data-plane worker, each with its own ring). The tunnel
//! runs there under the same sans-IO rules as on epoll (`session::forward` for `relay`,
//! `session::splice` for `splice`; only the byte moving differs) and counts into that
//! thread's counters, which a
//! flush task publishes like a tokio worker's. The tunnel takes along what its tokio side
//! would hold until the end (connection slots and counts, which caps and drain read) and
//! what it would do then (the log line), and does it on this worker when the tunnel ends
//! ([`crate::dataplane::offload::OnEnd`]); no tokio task waits for it. A TLS leg's
//! records are opened in the pooled buffer they are received into and sealed into a send
//! buffer on the way out (`io::DirBuf`, `io::Writer`).
//!
//! Buffers: see [`bufs`]. A waiting connection holds no buffer on Linux.

pub mod bufs;
mod io;
mod relay;
mod splice;

use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use tokio_util::sync::CancellationToken;

use self::io::{DirBuf, Reader, Writer, adopt};
use super::reframe::{LINGER, TunnelStats};
use super::splice::{SpliceConfig, SpliceStats};
use super::stats::{self, ActiveGuard};
use super::threads::{ThreadStart, Threads};
use crate::dataplane::offload::OnEnd;
use crate::dataplane::pool::{self, BUF_SIZE};
use crate::transport::stream::Detached;

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

    /// Relays a joined tunnel; its `on_end` runs when it ends (or, as lost, when the job
    /// is dropped: the workers are stopping).
    pub fn relay(&self, t: RelayJob) {
        self.threads.spawn(move || OptionFuture::from(run_relay(t)).map(drop));
    }

    /// Splices a WebSocket to a TCP connection; its `on_end` runs when it ends.
    pub fn splice(&self, s: SpliceJob) {
        self.threads.spawn(move || OptionFuture::from(run_splice(s)).map(drop));
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.threads.cancel();
    }
}

/// A relay tunnel to run: its two legs as they left the tokio worker.
pub struct RelayJob {
    pub hc: String,
    pub sender: Detached,
    pub listener: Detached,
    pub max_frame: u64,
    pub gone: CancellationToken,
    pub shutdown: CancellationToken,
    pub on_end: OnEnd<TunnelStats>,
}

/// A splice to run: the WebSocket as it left the tokio worker, and the TCP connection.
pub struct SpliceJob {
    pub hc: String,
    pub ws: Detached,
    pub tcp: std::net::TcpStream,
    pub cfg: SpliceConfig,
    pub stop: CancellationToken,
    pub on_end: OnEnd<SpliceStats>,
}

/// A socket's read and write halves on this worker's runtime.
type Halves = (Reader, Writer);

/// `s`'s halves; `tls`: it carries TLS records (read with one-shot receives).
fn leg(s: std::net::TcpStream, tls: bool) -> std::io::Result<Halves> {
    let s = adopt(s)?;
    let r = Reader::new(s.clone());
    Ok((if tls { r.one_shot() } else { r }, Writer::new(s)))
}

/// A tunnel's two sockets (each with whether it carries TLS) adopted by this worker's
/// runtime, and the tunnel of `hc` counted as running here; `None` (logged) if the runtime
/// refused one.
fn adopt_pair(
    hc: String,
    a: (std::net::TcpStream, bool),
    b: (std::net::TcpStream, bool),
) -> Option<(Halves, Halves, ActiveGuard)> {
    match leg(a.0, a.1).and_then(|a| Ok((a, leg(b.0, b.1)?))) {
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

/// The task of relay tunnel `t`, which ends with its `on_end`; `None` (logged; `on_end`
/// runs as lost) if the runtime refused a socket. The job is taken apart here, on the
/// worker, and only the tunnel goes into the task: what an `async fn` is given stays in its
/// future for the whole tunnel (a few hundred bytes of each idle tunnel).
fn run_relay(t: RelayJob) -> Option<impl Future<Output = ()>> {
    let RelayJob {
        hc,
        sender,
        listener,
        max_frame,
        gone,
        shutdown,
        on_end,
    } = t;
    let s = (sender.sock, sender.tls.is_some());
    let l = (listener.sock, listener.tls.is_some());
    let ((sr, sw), (lr, lw), active) = adopt_pair(hc, s, l)?;
    // The handshake leftovers are copied into the tunnel's buffers and freed here.
    let mut tunnel = relay::RelayTunnel::new(
        (
            relay::Leg {
                r: sr,
                w: sw,
                tls: sender.tls,
            },
            DirBuf::with_cipher(&sender.plain, &sender.cipher),
        ),
        (
            relay::Leg {
                r: lr,
                w: lw,
                tls: listener.tls,
            },
            DirBuf::with_cipher(&listener.plain, &listener.cipher),
        ),
        max_frame,
        &gone,
        &shutdown,
        active,
    );
    Some(async move {
        (&mut tunnel).await;
        // Boxed: the closing's state (two lingering reads) is needed only at the end, and
        // inline it would be part of the task for the tunnel's whole life (as in the epoll
        // engine's `relay::tunnel::spawn`).
        on_end.ended(Box::pin(tunnel.shutdown_legs()).await);
    })
}

/// The task of splice `s`, as [`run_relay`]'s.
fn run_splice(s: SpliceJob) -> Option<impl Future<Output = ()>> {
    let SpliceJob {
        hc,
        ws,
        tcp,
        cfg,
        stop,
        on_end,
    } = s;
    let ((wr, ww), tcp, active) = adopt_pair(hc, (ws.sock, ws.tls.is_some()), (tcp, false))?;
    let input = DirBuf::with_cipher(&ws.plain, &ws.cipher);
    let mut sp = splice::Splice::new((wr, ww, ws.tls, input), tcp, &cfg, &stop, active);
    Some(async move {
        let stats = (&mut sp).await;
        // Boxed, like the relay's closing, to keep it (and the stats) off the task. A TLS
        // WebSocket's close_notify may wait for a peer that reads nothing: bounded.
        Box::pin(async move {
            let (mut w, mut tls) = sp.into_ws_writer();
            let _ = compio::time::timeout(LINGER, w.close(tls.as_deref_mut())).await;
            on_end.ended(stats);
        })
        .await;
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn detached(s: std::net::TcpStream) -> Detached {
        Detached {
            sock: s,
            tls: None,
            plain: Default::default(),
            cipher: Default::default(),
        }
    }

    /// The size of what a worker spawns for `f`.
    fn task_size<F: Future<Output = ()>>(f: Option<F>) -> usize {
        std::mem::size_of_val(&OptionFuture::from(f).map(drop))
    }

    /// A tunnel's task lives as long as the tunnel, and an idle tunnel costs what its task
    /// holds: the tunnel, and nothing else of size. Not the closing's state (two lingering
    /// reads, a TLS close), needed only at the end (inline it made an idle relay tunnel on
    /// io_uring cost 7 KiB in its task alone), and not the job it was made from (the
    /// handshake leftovers, the tokens: 400 bytes more when the task was an `async fn` of
    /// the job).
    #[test]
    fn a_tunnel_task_holds_its_tunnel_and_little_else() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let b = l.accept().unwrap().0;
        let rt = build_runtime(4).expect("a completion runtime");
        let (relay, splice) = rt.block_on(async {
            let relay = run_relay(RelayJob {
                hc: "t".into(),
                sender: detached(a.try_clone().unwrap()),
                listener: detached(b.try_clone().unwrap()),
                max_frame: 1 << 20,
                gone: CancellationToken::new(),
                shutdown: CancellationToken::new(),
                on_end: OnEnd::new((), drop, TunnelStats::default),
            });
            let splice = run_splice(SpliceJob {
                hc: "t".into(),
                ws: detached(a),
                tcp: b,
                cfg: SpliceConfig::default(),
                stop: CancellationToken::new(),
                on_end: OnEnd::new((), drop, SpliceStats::default),
            });
            (task_size(relay), task_size(splice))
        });
        // The tunnel, its `OnEnd` and the task's state: a few words.
        let words = 8 * std::mem::size_of::<usize>();
        let (relay_tunnel, splice_tunnel) = (
            std::mem::size_of::<relay::RelayTunnel>(),
            std::mem::size_of::<splice::Splice>(),
        );
        assert!(
            relay <= relay_tunnel + words,
            "relay task {relay} bytes, its tunnel {relay_tunnel}"
        );
        assert!(
            splice <= splice_tunnel + words,
            "splice task {splice} bytes, its splice {splice_tunnel}"
        );
    }
}
