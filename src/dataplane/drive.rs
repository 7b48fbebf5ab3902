//! What the epoll and completion engines share: the one future per tunnel that feeds the
//! sans-IO rules ([`crate::session::splice`], [`crate::session::forward`]) their timer,
//! their stop signal and their legs' progress, and counts bytes. An engine supplies only
//! its legs ([`SpliceLegs`], [`TunnelLegs`]: how bytes move between its sockets and the
//! rules) and its timer ([`Timer`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::reframe::TunnelStats;
use super::splice::{SpliceConfig, SpliceStats, TcpSide};
use super::stats::ActiveGuard;
use crate::session::close::{CLEAN_END, DownEnd};
use crate::session::forward::{Dir, DirEnd, Forward, TunnelRules};
use crate::session::splice::{SpliceRules, UpEnd};

/// An engine's timer (tokio's or the completion runtime's).
pub(crate) trait Timer {
    /// The clock the timer runs on.
    fn now(&self) -> Instant;
    /// Ready once `at` has passed; re-arms itself when `at` changes.
    fn poll_until(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()>;
}

/// How an engine moves a splice's bytes: WebSocket → TCP and TCP → WebSocket, each until
/// that direction ends, as its [`SpliceRules`] say.
pub(crate) trait SpliceLegs {
    fn poll_down(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<DownEnd>;
    fn poll_up(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<UpEnd>;
    /// Makes the coming close of the TCP connection a reset: the splice ended abnormally.
    fn reset_tcp_on_close(&mut self);
}

/// A splice: both directions, the keep-alive timer and the stop signal, polled together.
pub(crate) struct Splice<L, T> {
    pub(crate) legs: L,
    rules: SpliceRules,
    timer: T,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    active: Option<ActiveGuard>,
    tcp_side: TcpSide,
    counted: (u64, u64),
}

impl<L: SpliceLegs, T: Timer> Splice<L, T> {
    pub(crate) fn with_legs(
        legs: L,
        timer: T,
        cfg: &SpliceConfig,
        stop: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        Self {
            rules: SpliceRules::new(timer.now(), cfg.ping_interval, cfg.max_frame),
            legs,
            timer,
            stop: Box::pin(stop.clone().cancelled_owned()),
            active,
            tcp_side: cfg.tcp_side,
            counted: (0, 0),
        }
    }

    fn count(&mut self) {
        let (up, down) = (self.rules.up.bytes, self.rules.down.bytes);
        if let Some(a) = &self.active {
            self.tcp_side
                .count(a.counters(), up - self.counted.0, down - self.counted.1);
        }
        self.counted = (up, down);
    }

    /// The splice's result; an abnormal end also arms the TCP reset.
    fn finish(&mut self, why: String) -> SpliceStats {
        self.count();
        if why != CLEAN_END {
            self.legs.reset_tcp_on_close();
        }
        SpliceStats {
            to_tcp: self.rules.down.bytes,
            to_ws: self.rules.up.bytes,
            peer_close: self.rules.peer_close(),
            end: why,
        }
    }
}

impl<L: SpliceLegs + Unpin, T: Timer + Unpin> Future for Splice<L, T> {
    type Output = SpliceStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceStats> {
        let this = self.get_mut();
        if !this.rules.stopping() && this.stop.as_mut().poll(cx).is_ready() {
            this.rules.handle_stop();
        }
        if this.rules.down_running()
            && let Poll::Ready(e) = this.legs.poll_down(cx, &mut this.rules)
            && let Some(fatal) = this.rules.handle_down_end(e)
        {
            return Poll::Ready(this.finish(fatal));
        }
        // After reading, so that a frame that just arrived counts.
        this.rules.handle_heard(|| this.timer.now());
        while let Some(at) = this.rules.poll_timeout() {
            if this.timer.poll_until(cx, at).is_pending() {
                break;
            }
            this.rules.handle_timeout(this.timer.now());
        }
        if let Some(dead) = this.rules.poll_keepalive() {
            return Poll::Ready(this.finish(dead));
        }
        if this.rules.up_running()
            && let Poll::Ready(e) = this.legs.poll_up(cx, &mut this.rules)
            && let Some(fatal) = this.rules.handle_up_end(e)
        {
            return Poll::Ready(this.finish(fatal));
        }
        this.count();
        match this.rules.poll_end() {
            Some(why) => Poll::Ready(this.finish(why)),
            None => Poll::Pending,
        }
    }
}

/// How an engine moves one direction of a relay tunnel, as its [`Forward`] says, until it
/// ends.
pub(crate) trait TunnelLegs {
    fn poll_dir(&mut self, cx: &mut Context<'_>, d: Dir, rules: &mut Forward) -> Poll<DirEnd>;
}

/// A relay tunnel: both directions, the grace timer and the stop signals, polled together.
pub(crate) struct Tunnel<L, T> {
    pub(crate) legs: L,
    rules: TunnelRules,
    timer: T,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    active: Option<ActiveGuard>,
    counted: (u64, u64),
}

impl<L: TunnelLegs, T: Timer> Tunnel<L, T> {
    /// `gone`: the hybrid connection was deleted; `shutdown`: the relay stops.
    pub(crate) fn with_legs(
        legs: L,
        timer: T,
        max_frame: u64,
        gone: &CancellationToken,
        shutdown: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        Self {
            legs,
            rules: TunnelRules::new(max_frame),
            timer,
            gone: Box::pin(gone.clone().cancelled_owned()),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            active,
            counted: (0, 0),
        }
    }

    /// Adds new byte counts to the worker's counters.
    fn count(&mut self) {
        let (up, down) = (self.rules.up.bytes, self.rules.down.bytes);
        if let Some(a) = &self.active {
            let c = a.counters();
            c.add_up(up - self.counted.0);
            c.add_down(down - self.counted.1);
        }
        self.counted = (up, down);
    }

    /// True if both directions ended with a forwarded Close (see
    /// [`TunnelRules::closed_cleanly`]).
    pub(crate) fn closed_cleanly(&self) -> bool {
        self.rules.closed_cleanly()
    }

    /// True if both directions ended with a forwarded normal Close (see
    /// [`TunnelRules::closed_normally`]).
    pub(crate) fn closed_normally(&self) -> bool {
        self.rules.closed_normally()
    }

    /// Byte counts and how the directions ended.
    pub(crate) fn stats(&self) -> TunnelStats {
        TunnelStats {
            up: self.rules.up.bytes,
            down: self.rules.down.bytes,
            end: self.rules.end(),
        }
    }
}

impl<L: TunnelLegs + Unpin, T: Timer + Unpin> Future for Tunnel<L, T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.rules.stopped()
            && (this.gone.as_mut().poll(cx).is_ready() || this.shutdown.as_mut().poll(cx).is_ready())
        {
            this.rules.handle_stop(this.timer.now());
        }
        for d in [Dir::Up, Dir::Down] {
            if this.rules.running(d)
                && let Poll::Ready(e) = this.legs.poll_dir(cx, d, this.rules.forward(d))
                && this.rules.handle_end(this.timer.now(), d, e)
            {
                // The other direction was cut: it sends its Close on its next poll.
                cx.waker().wake_by_ref();
            }
        }
        this.count();
        if this.rules.both_ended() {
            return Poll::Ready(());
        }
        // The grace, once armed, ends the tunnel when the timer says it is over.
        if let Some(at) = this.rules.poll_timeout()
            && this.timer.poll_until(cx, at).is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    /// A tunnel's future is held for its whole life, idle or not, and moved when spawned:
    /// what it carries inline is per-tunnel memory. Control frames in flight, the grace
    /// timer and closing state live on the heap while they are needed (the first version of
    /// these drivers carried them inline: 1,608 and 968 bytes).
    #[test]
    fn tunnel_futures_stay_small() {
        let relay = std::mem::size_of::<super::super::reframe::RelayTunnel>();
        let splice = std::mem::size_of::<super::super::splice::Splice>();
        assert!(relay <= 1_100, "relay tunnel future: {relay} bytes");
        assert!(splice <= 880, "splice future: {splice} bytes");
    }
}
