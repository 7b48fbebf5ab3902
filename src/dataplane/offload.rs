//! Handing established tunnels to the completion backend.
//!
//! A tokio worker started with the completion backend ([`super::Workers::start_with`])
//! knows its [`Completion`] workers through a thread-local. When a tunnel is established,
//! [`relay`] and [`splice`] deregister the sockets and send them there, a TLS leg with its
//! session; the returned [`Offloaded`] resolves with the tunnel's stats. Otherwise (epoll
//! backend, a binary built without the `uring` feature, or a TLS leg that still has
//! records to write, which the handshakes flush) they give the legs back and the caller
//! runs the epoll engine, unchanged.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Workers;
use super::flush::Totals;
use super::reframe::TunnelStats;
use super::splice::{SpliceConfig, SpliceStats};
use crate::transport::Stream;

#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
pub use super::uring::Completion;

/// No completion backend in this build.
#[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
#[derive(Debug)]
pub enum Completion {}

#[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
impl Completion {
    pub fn start(_: &str, _: usize, _: usize) -> std::io::Result<Arc<Self>> {
        Err(std::io::Error::other("built without the `uring` feature"))
    }

    pub fn stop(&self) {
        match *self {}
    }
}

thread_local! {
    static COMPLETION: RefCell<Option<Arc<Completion>>> = const { RefCell::new(None) };
}

/// Makes this thread (a tokio worker) hand tunnels to `c`.
pub(super) fn install(c: Option<Arc<Completion>>) {
    COMPLETION.with(|slot| *slot.borrow_mut() = c);
}

fn current() -> Option<Arc<Completion>> {
    COMPLETION.with(|slot| slot.borrow().clone())
}

/// True if tunnels established on this thread run on the completion backend.
pub fn active() -> bool {
    COMPLETION.with(|slot| slot.borrow().is_some())
}

/// A tunnel running on a completion worker.
#[derive(Debug)]
pub struct Offloaded<T>(oneshot::Receiver<T>);

impl<T> Offloaded<T> {
    /// Waits for the tunnel's end; `lost` makes the stats if the worker went away first.
    pub async fn wait(self, lost: impl FnOnce() -> T) -> T {
        self.0.await.unwrap_or_else(|_| lost())
    }
}

/// A relay leg: the stream and the bytes read past its handshake.
pub type RelayLeg = (Stream, BytesMut);

/// Runs a joined relay tunnel on the completion backend if this worker has one and both
/// legs can leave ([`Stream::detachable`]); otherwise gives the legs back.
#[allow(clippy::result_large_err)]
pub fn relay(
    hc: &str,
    sender: RelayLeg,
    listener: RelayLeg,
    max_frame: u64,
    gone: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<Offloaded<TunnelStats>, (RelayLeg, RelayLeg)> {
    let c = match current() {
        Some(c) if sender.0.detachable() && listener.0.detachable() => c,
        _ => return Err((sender, listener)),
    };
    #[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
    {
        let (s, l) = match (sender.0.detach(sender.1), listener.0.detach(listener.1)) {
            (Ok(s), Ok(l)) => (s, l),
            (s, l) => return Ok(failed(s.and(l).err())),
        };
        let job = super::uring::RelayJob {
            hc: hc.to_owned(),
            sender: s,
            listener: l,
            max_frame,
            gone: gone.clone(),
            shutdown: shutdown.clone(),
        };
        Ok(Offloaded(c.relay(job)))
    }
    #[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
    {
        let _ = (hc, max_frame, gone, shutdown, c);
        Err((sender, listener))
    }
}

/// Runs a splice on the completion backend if this worker has one and the WebSocket can
/// leave ([`Stream::detachable`]); otherwise gives the legs back.
#[allow(clippy::result_large_err)]
pub fn splice(
    hc: &str,
    ws: RelayLeg,
    tcp: tokio::net::TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
) -> Result<Offloaded<SpliceStats>, (RelayLeg, tokio::net::TcpStream)> {
    let c = match current() {
        Some(c) if ws.0.detachable() => c,
        _ => return Err((ws, tcp)),
    };
    #[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
    {
        let (w, t) = match (ws.0.detach(ws.1), tcp.into_std()) {
            (Ok(w), Ok(t)) => (w, t),
            (w, t) => return Ok(failed(w.and(t).err())),
        };
        let job = super::uring::SpliceJob {
            hc: hc.to_owned(),
            ws: w,
            tcp: t,
            cfg: cfg.clone(),
            stop: stop.clone(),
        };
        Ok(Offloaded(c.splice(job)))
    }
    #[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
    {
        let _ = (hc, cfg, stop, c);
        Err((ws, tcp))
    }
}

/// A hand-off that failed while deregistering a socket: resolves at once (as lost).
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
fn failed<T>(e: Option<std::io::Error>) -> Offloaded<T> {
    if let Some(e) = e {
        tracing::warn!(error = %e, "cannot move the tunnel to the completion worker");
    }
    let (_, rx) = oneshot::channel();
    Offloaded(rx)
}

/// Starts the counter flush on every completion worker of `workers`, with worker indexes
/// after the tokio workers'.
pub fn spawn_flush(workers: &Arc<Workers>, role: &'static str, totals: Arc<Totals>) {
    let Some(c) = workers.completion() else { return };
    #[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
    for i in 0..c.len() {
        let totals = totals.clone();
        let index = workers.len() + i;
        c.spawn_on(i, move || {
            let mut f = super::flush::WorkerFlush::new(role, index, totals);
            super::uring::flush_every_second(move || {
                super::pool::trim();
                f.flush(super::uring::buffer_stats())
            })
        });
    }
    #[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
    let _ = (c, role, totals);
}

/// Splices `ws` (with the bytes read past its handshake) to `tcp` on the completion
/// backend when [`splice`] can, else with the epoll engine; counts into `hc`'s counters.
pub async fn ws_tcp(
    hc: &str,
    ws: Stream,
    leftover: BytesMut,
    tcp: tokio::net::TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
) -> SpliceStats {
    match splice(hc, (ws, leftover), tcp, cfg, stop) {
        Ok(t) => {
            t.wait(|| SpliceStats {
                end: "the completion worker stopped".into(),
                ..Default::default()
            })
            .await
        }
        Err(((ws, leftover), tcp)) => {
            let active = super::stats::ActiveGuard::new(super::stats::for_hc(hc));
            super::splice::ws_tcp(ws, leftover, tcp, cfg, stop, Some(active)).await
        }
    }
}

/// Like [`ws_tcp`], but on a task of its own that holds only the tunnel and `keep`, so the
/// caller's handshake state is freed; `done` runs with the stats when the tunnel ends.
#[allow(clippy::too_many_arguments)]
pub fn spawn_ws_tcp<K: 'static>(
    hc: &str,
    ws: Stream,
    leftover: BytesMut,
    tcp: tokio::net::TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    keep: K,
    done: impl FnOnce(SpliceStats) + 'static,
) {
    match splice(hc, (ws, leftover), tcp, cfg, stop) {
        Ok(t) => {
            tokio::task::spawn_local(async move {
                let _keep = keep;
                let lost = || SpliceStats {
                    end: "the completion worker stopped".into(),
                    ..Default::default()
                };
                done(t.wait(lost).await);
            });
        }
        Err(((ws, leftover), tcp)) => {
            let active = super::stats::ActiveGuard::new(super::stats::for_hc(hc));
            super::splice::spawn(ws, leftover, tcp, cfg, stop, Some(active), keep, done);
        }
    }
}
