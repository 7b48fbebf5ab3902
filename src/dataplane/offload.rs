//! Handing established tunnels to the completion backend.
//!
//! A tokio worker started with the completion backend ([`super::Workers::start_with`])
//! knows its [`Completion`] workers through a thread-local. When a tunnel is established,
//! [`relay`] and [`splice`] deregister the sockets and send them there, a TLS leg with its
//! session, and with what the caller wants done when the tunnel ends (its guards and its
//! log line, run on the completion worker: no tokio task waits for an offloaded tunnel).
//! Otherwise (epoll backend, a binary built without the `uring` feature, or a TLS leg that
//! still has records to write, which the handshakes flush) they give the legs back and the
//! caller runs the epoll engine, unchanged.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::BytesMut;
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

/// What an offloaded tunnel does when it ends, on its completion worker: `done` with the
/// tunnel's stats, or with `lost()`'s if the tunnel never ran or the worker dropped it
/// unfinished (it stopped), then `keep` (guards that live as long as the tunnel) released.
/// Dropped without [`OnEnd::ended`], it runs as lost. One allocation per tunnel, where a
/// tokio task waiting for the stats and its channel were about 0.5 KiB of every idle
/// tunnel in each process.
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
pub struct OnEnd<T>(Option<Box<dyn FnOnce(Option<T>) + Send>>);

#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
impl<T: 'static> OnEnd<T> {
    pub(crate) fn new<K: Send + 'static>(keep: K, done: impl FnOnce(T) + Send + 'static, lost: fn() -> T) -> Self {
        Self(Some(Box::new(move |stats: Option<T>| {
            done(stats.unwrap_or_else(lost));
            drop(keep);
        })))
    }

    /// The tunnel ended with `stats`.
    pub fn ended(mut self, stats: T) {
        if let Some(f) = self.0.take() {
            f(Some(stats));
        }
    }
}

#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
impl<T> Drop for OnEnd<T> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(None);
        }
    }
}

#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
impl<T> std::fmt::Debug for OnEnd<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OnEnd").field(&self.0.is_some()).finish()
    }
}

/// How a tunnel its completion worker lost ended, in its stats.
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
const LOST: &str = "the completion worker stopped";

/// A relay leg: the stream and the bytes read past its handshake.
pub type RelayLeg = (Stream, BytesMut);

/// Runs a joined relay tunnel on the completion backend if this worker has one and both
/// legs can leave ([`Stream::detachable`]): `keep` lives as long as the tunnel and `done`
/// gets its stats, both on the completion worker (an `OnEnd`). Otherwise gives the legs,
/// `keep` and `done` back.
#[allow(clippy::result_large_err, clippy::too_many_arguments, clippy::type_complexity)]
pub fn relay<K: Send + 'static, D: FnOnce(TunnelStats) + Send + 'static>(
    hc: &str,
    sender: RelayLeg,
    listener: RelayLeg,
    max_frame: u64,
    gone: &CancellationToken,
    shutdown: &CancellationToken,
    keep: K,
    done: D,
) -> Result<(), (RelayLeg, RelayLeg, K, D)> {
    let c = match current() {
        Some(c) if sender.0.detachable() && listener.0.detachable() => c,
        _ => return Err((sender, listener, keep, done)),
    };
    #[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
    {
        let lost = || TunnelStats {
            end: LOST.into(),
            ..Default::default()
        };
        let on_end = OnEnd::new(keep, done, lost);
        let (s, l) = match (sender.0.detach(sender.1), listener.0.detach(listener.1)) {
            (Ok(s), Ok(l)) => (s, l),
            // `on_end` runs as lost.
            (s, l) => return failed(s.and(l).err()),
        };
        c.relay(super::uring::RelayJob {
            hc: hc.to_owned(),
            sender: s,
            listener: l,
            max_frame,
            gone: gone.clone(),
            shutdown: shutdown.clone(),
            on_end,
        });
        Ok(())
    }
    #[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
    {
        let _ = (hc, max_frame, gone, shutdown, c);
        Err((sender, listener, keep, done))
    }
}

/// Runs a splice on the completion backend if this worker has one and the WebSocket can
/// leave ([`Stream::detachable`]), with `keep` and `done` as in [`relay`]; otherwise gives
/// the legs, `keep` and `done` back.
#[allow(clippy::result_large_err, clippy::too_many_arguments, clippy::type_complexity)]
pub fn splice<K: Send + 'static, D: FnOnce(SpliceStats) + Send + 'static>(
    hc: &str,
    ws: RelayLeg,
    tcp: tokio::net::TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    keep: K,
    done: D,
) -> Result<(), (RelayLeg, tokio::net::TcpStream, K, D)> {
    let c = match current() {
        Some(c) if ws.0.detachable() => c,
        _ => return Err((ws, tcp, keep, done)),
    };
    #[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
    {
        let lost = || SpliceStats {
            end: LOST.into(),
            ..Default::default()
        };
        let on_end = OnEnd::new(keep, done, lost);
        let (w, t) = match (ws.0.detach(ws.1), tcp.into_std()) {
            (Ok(w), Ok(t)) => (w, t),
            // `on_end` runs as lost.
            (w, t) => return failed(w.and(t).err()),
        };
        c.splice(super::uring::SpliceJob {
            hc: hc.to_owned(),
            ws: w,
            tcp: t,
            cfg: cfg.clone(),
            stop: stop.clone(),
            on_end,
        });
        Ok(())
    }
    #[cfg(not(all(feature = "uring", any(target_os = "linux", windows))))]
    {
        let _ = (hc, cfg, stop, c);
        Err((ws, tcp, keep, done))
    }
}

/// A hand-off that failed while deregistering a socket: logged; the tunnel counts as run
/// (its `OnEnd`, dropped, runs as lost).
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
fn failed<E>(e: Option<std::io::Error>) -> Result<(), E> {
    if let Some(e) = e {
        tracing::warn!(error = %e, "cannot move the tunnel to the completion worker");
    }
    Ok(())
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
/// backend when [`splice`] can, else with the epoll engine on a task of its own; either
/// way the tunnel holds only itself and `keep`, so the caller's handshake state is freed,
/// and `done` runs with the stats when it ends. Counts into `hc`'s counters. After a clean
/// end the epoll engine gives the WebSocket to `back` (if any) instead of closing it.
#[allow(clippy::too_many_arguments)]
pub fn spawn_ws_tcp<K: Send + 'static>(
    hc: &str,
    ws: Stream,
    leftover: BytesMut,
    tcp: tokio::net::TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    keep: K,
    back: Option<super::splice::Back>,
    done: impl FnOnce(SpliceStats) + Send + 'static,
) {
    // On the completion backend the WebSocket is closed at the end: `back` is dropped.
    if let Err(((ws, leftover), tcp, keep, done)) = splice(hc, (ws, leftover), tcp, cfg, stop, keep, done) {
        let active = super::stats::ActiveGuard::new(super::stats::for_hc(hc));
        super::splice::spawn(ws, leftover, tcp, cfg, stop, Some(active), (keep, back), done);
    }
}

#[cfg(all(test, feature = "uring", any(target_os = "linux", windows)))]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// What a tunnel's end did, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    /// Notes its own release in the log.
    struct Guard(Log);

    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("keep released".into());
        }
    }

    fn on_end(log: &Log) -> OnEnd<SpliceStats> {
        let l = log.clone();
        let lost = || SpliceStats {
            end: LOST.into(),
            ..Default::default()
        };
        OnEnd::new(
            Guard(log.clone()),
            move |s: SpliceStats| l.lock().unwrap().push(s.end),
            lost,
        )
    }

    #[test]
    fn a_tunnel_end_runs_once_with_its_stats_then_releases_its_guards() {
        let log = Log::default();
        on_end(&log).ended(SpliceStats {
            end: "clean".into(),
            ..Default::default()
        });
        assert_eq!(*log.lock().unwrap(), ["clean", "keep released"]);
    }

    #[test]
    fn a_tunnel_its_worker_drops_ends_as_lost() {
        // A job dropped unrun (the workers stopping) or a task dropped mid-tunnel.
        let log = Log::default();
        drop(on_end(&log));
        assert_eq!(*log.lock().unwrap(), [LOST, "keep released"]);
    }
}
