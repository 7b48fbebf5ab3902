//! Splicing a client-side WebSocket (hcm's rendezvous, bridge's sender connection) to a
//! TCP connection, byte-exact, with half-close.
//!
//! Mapping between the TCP and WebSocket ends:
//! - TCP EOF from the local side → WebSocket Close(1000); we keep reading the WebSocket.
//! - WebSocket Close(1000, or no code) from the peer → TCP shutdown(write); we keep reading
//!   TCP, and send our Close (the echo) when TCP reaches EOF.
//! - Any other end is abnormal: the peer's Close with another code (1001 going away, 1011,
//!   1002, ...), the WebSocket vanishing, a protocol error, a TCP error, a failed WebSocket
//!   write, two ping periods of silence, or `stop`. Then the WebSocket gets a Close with the
//!   matching code where possible, and the TCP connection is *reset* (`SO_LINGER` 0, then
//!   closed), so the app or endpoint sees an error, never a FIN it could take for the end
//!   of a complete stream (issue 9, item 5). Only the clean sequence ends TCP with a FIN.
//!
//! These rules live once, sans-IO, in `session::splice`; this file is the epoll engine's
//! driver for them ([`EpollSplice`]), and `dataplane::drive::Splice` the one future that
//! polls both directions, the keep-alive timer and the stop signal (no locks, no
//! channels, no task per direction). TCP → WebSocket: once TCP is readable a pooled buffer
//! is taken, data is read after [`HEADROOM`] bytes, the frame header is written just before
//! it and the payload masked in place, so each frame is one write with no copy. WebSocket
//! → TCP: frames are decoded in place and their payload runs written with one vectored
//! write. Buffers go back to the pool as soon as their bytes are written, so an idle
//! tunnel holds none. Control frames the reading side owes (pong, close) are written
//! between data frames.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::drive::{self, SpliceLegs};
use super::io::{InBuf, ReadySource, Runs, TokioTimer};
use super::pool::{self, PoolBuf};
use super::stats::ActiveGuard;
use crate::proto::frame::{self, MAX_HEADER_LEN};
use crate::session::close::DownEnd;
use crate::session::splice::{DownStep, SpliceRules, UpEnd, UpStep};
use crate::session::wire::SmallFrame;
use crate::transport::Stream;

/// Bytes kept free in front of the payload for the frame header.
pub const HEADROOM: usize = MAX_HEADER_LEN;

/// Tunables of a splice.
#[derive(Debug, Clone)]
pub struct SpliceConfig {
    /// Ping the peer this often; two periods without any frame from it end the tunnel.
    /// Default: 30 s.
    pub ping_interval: Duration,
    /// Largest data frame accepted from the peer. Default: 1 MiB.
    pub max_frame: u64,
    /// Which end the TCP side is, to count bytes as up (towards the endpoint) or down.
    pub tcp_side: TcpSide,
}

/// What the TCP connection of a splice leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpSide {
    /// The app (bridge): TCP → WebSocket is "up".
    #[default]
    App,
    /// The endpoint (hcm): TCP → WebSocket is "down".
    Endpoint,
}

impl Default for SpliceConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            max_frame: frame::DEFAULT_MAX_FRAME,
            tcp_side: TcpSide::App,
        }
    }
}

/// How a splice ended and what it moved.
///
/// `end` is `"closed both ways"` for the normal end; anything else (the peer vanished, went
/// silent, broke the protocol, a TCP error, a stop) is worth an info line: see
/// [`SpliceStats::abnormal`].
#[derive(Debug, Clone, Default)]
pub struct SpliceStats {
    /// Payload bytes WebSocket → TCP.
    pub to_tcp: u64,
    /// Payload bytes TCP → WebSocket.
    pub to_ws: u64,
    /// Close code the peer sent, if it sent one.
    pub peer_close: Option<u16>,
    /// Why the splice ended, for logs.
    pub end: String,
}

impl SpliceStats {
    /// True unless both sides closed normally (then the TCP connection was reset).
    pub fn abnormal(&self) -> bool {
        self.end != CLEAN_END
    }
}

/// Closes the WebSocket after a splice (TLS close_notify, FIN), waiting at most 2 s.
async fn close_ws(mut ws: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncWriteExt::shutdown(&mut ws)).await;
}

/// Where a WebSocket goes after a clean end instead of being closed, with what the relay
/// sent after its Close: the relay promised to keep the connection for another tunnel
/// (the `reuse` extension, [`crate::proto::extensions`]). Dropped unused after any other
/// end.
pub type Back = Box<dyn FnOnce(Stream, BytesMut) + Send>;

/// Starts the splice on a task of its own, on this worker, and returns at once.
///
/// The task holds only the two connections, the engine and `keep` (guards that must live
/// as long as the tunnel), so whatever led here (handshake buffers, headers) is freed.
/// `done` runs with the result when the tunnel has ended and the WebSocket is closed, or
/// given to `back` (after a clean end).
#[allow(clippy::too_many_arguments)]
pub fn spawn<K: 'static>(
    ws: Stream,
    leftover: BytesMut,
    tcp: TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    active: Option<ActiveGuard>,
    (keep, back): (K, Option<Back>),
    done: impl FnOnce(SpliceStats) + 'static,
) {
    let s = Splice::new(ws, &leftover, tcp, cfg, stop, active);
    drop(leftover);
    tokio::task::spawn_local(task(s, (keep, back), done));
}

/// The task of splice `s`: the splice, then the WebSocket's close (or its hand-back).
/// Boxed, the closing (a TLS close, a timer) and the stats waiting for it are not part of
/// the task for the tunnel's whole life (as the relay's tunnel keeps its closing off its
/// task).
// Not an `async fn`: one moves each argument into a local of its body, so the task would
// hold the splice twice (1,216 bytes around a 568-byte splice; the test below).
#[allow(clippy::manual_async_fn)]
fn task<K: 'static>(
    mut s: Splice,
    (keep, back): (K, Option<Back>),
    done: impl FnOnce(SpliceStats) + 'static,
) -> impl Future<Output = ()> {
    async move {
        let stats = (&mut s).await;
        Box::pin(async move {
            // The TCP connection is closed (a FIN, or a reset after an abnormal end) as
            // `into_parts` drops it.
            let (ws, rest) = s.into_parts();
            match back {
                Some(back) if !stats.abnormal() => back(ws, rest),
                _ => close_ws(ws).await,
            }
            done(stats);
            drop(keep);
        })
        .await;
    }
}

pub(crate) use crate::session::close::CLEAN_END;

/// Makes the coming close of `tcp` a reset (RST) rather than a FIN: an abnormal end must
/// not look like the end of a complete stream to the app or endpoint.
#[cfg(unix)]
pub(crate) fn reset_on_close<S: std::os::fd::AsFd>(tcp: &S) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// See the Unix version.
#[cfg(windows)]
pub(crate) fn reset_on_close<S: std::os::windows::io::AsSocket>(tcp: &S) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// An app's or endpoint's TCP connection whose tunnel is not open yet: reset if dropped
/// before [`ResetUnlessTaken::take`] (the relay refused, the rendezvous failed, the
/// process is stopping, the task was dropped), so a tunnel that never opened does not end
/// like a complete stream.
#[derive(Debug)]
pub(crate) struct ResetUnlessTaken(Option<tokio::net::TcpStream>);

impl ResetUnlessTaken {
    pub fn new(tcp: tokio::net::TcpStream) -> Self {
        Self(Some(tcp))
    }

    pub fn get_mut(&mut self) -> &mut tokio::net::TcpStream {
        self.0.as_mut().expect("present until taken")
    }

    /// The connection, for the tunnel: from here its end is the tunnel's.
    pub fn take(mut self) -> tokio::net::TcpStream {
        self.0.take().expect("present until taken")
    }
}

impl Drop for ResetUnlessTaken {
    fn drop(&mut self) {
        if let Some(tcp) = &self.0 {
            reset_on_close(tcp);
        }
    }
}

impl TcpSide {
    /// Adds bytes moved since the last call to the hybrid connection's counters: "up" is
    /// app → endpoint whichever side of the tunnel this splice is on.
    pub(crate) fn count(self, c: &super::stats::Counters, to_ws: u64, to_tcp: u64) {
        let (up, down) = match self {
            TcpSide::App => (to_ws, to_tcp),
            TcpSide::Endpoint => (to_tcp, to_ws),
        };
        c.add_up(up);
        c.add_down(down);
    }
}

/// The epoll engine's legs of a splice: the WebSocket (plain or TLS) and the TCP
/// connection, with each direction's buffers.
pub struct EpollSplice {
    ws: Stream,
    tcp: TcpStream,
    up: UpIo,
    down: DownIo,
}

/// The splice future on the epoll engine.
pub(crate) type Splice = drive::Splice<EpollSplice, TokioTimer>;

impl Splice {
    /// A splice of `ws` (with `leftover`, the bytes read past its handshake) and `tcp`.
    pub fn new(
        ws: Stream,
        leftover: &[u8],
        tcp: TcpStream,
        cfg: &SpliceConfig,
        stop: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        let mut down = DownIo::default();
        down.input.preload(leftover);
        let legs = EpollSplice {
            ws,
            tcp,
            up: UpIo::default(),
            down,
        };
        Self::with_legs(legs, TokioTimer::default(), cfg, stop, active)
    }

    /// The WebSocket, for closing or keeping after the splice, and what the relay sent
    /// after its Close (unconsumed); the TCP connection is closed now (a reset if the
    /// splice ended abnormally).
    pub fn into_parts(self) -> (Stream, BytesMut) {
        let mut legs = self.legs;
        (legs.ws, legs.down.input.take_rest())
    }
}

impl SpliceLegs for EpollSplice {
    fn poll_down(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<DownEnd> {
        self.down.poll(cx, &mut self.ws, &mut self.tcp, rules)
    }

    fn poll_up(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<UpEnd> {
        self.up.poll(cx, &mut self.tcp, &mut self.ws, rules)
    }

    fn reset_tcp_on_close(&mut self) {
        reset_on_close(&self.tcp);
    }
}

/// TCP → WebSocket: each read becomes one frame, written with its header from the buffer's
/// headroom.
#[derive(Debug, Default)]
struct UpIo {
    buf: Option<PoolBuf>,
    /// Framed bytes waiting to be written: `buf[out]`.
    out: Range<usize>,
    /// A control frame being written, and how much of it is out (boxed: a few per ping
    /// period, not worth a place in every idle tunnel).
    ctl: Option<Box<(SmallFrame, usize)>>,
    need_flush: bool,
    /// Our place in line while the pool's budget is spent.
    acquire: pool::Acquire,
}

impl UpIo {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        ws: &mut Stream,
        rules: &mut SpliceRules,
    ) -> Poll<UpEnd> {
        loop {
            if !self.out.is_empty() {
                let buf = self.buf.as_ref().expect("output lives in the buffer");
                match ready!(Pin::new(&mut *ws).poll_write(cx, &buf[self.out.clone()])) {
                    Ok(0) | Err(_) => return Poll::Ready(UpEnd::WsWriteFailed),
                    Ok(n) => self.out.start += n,
                }
                if self.out.is_empty() {
                    self.need_flush = true;
                    self.buf = None; // back to the pool while TCP is quiet
                }
                continue;
            }
            if let Some(f) = &mut self.ctl {
                let (f, pos) = &mut **f;
                let bytes = f.as_bytes();
                while *pos < bytes.len() {
                    match ready!(Pin::new(&mut *ws).poll_write(cx, &bytes[*pos..])) {
                        Ok(0) | Err(_) => return Poll::Ready(UpEnd::WsWriteFailed),
                        Ok(n) => *pos += n,
                    }
                }
                self.ctl = None;
                rules.up.handle_written(&mut rules.ctrl);
                self.need_flush = true;
            }
            if self.need_flush {
                if ready!(Pin::new(&mut *ws).poll_flush(cx)).is_err() {
                    return Poll::Ready(UpEnd::WsWriteFailed);
                }
                self.need_flush = false;
            }
            match rules.up.poll_step(&mut rules.ctrl) {
                UpStep::Write(f) => self.ctl = Some(Box::new((f, 0))),
                UpStep::Done => return Poll::Ready(UpEnd::Done),
                // Woken again when the reading side, a timer or the stop has news.
                UpStep::Idle => return Poll::Pending,
                UpStep::ReadTcp => {
                    let r = ready!(self.poll_read_tcp(cx, tcp));
                    if let Some(n) = rules.up.handle_tcp_read(&mut rules.ctrl, r) {
                        let buf = self.buf.as_mut().expect("data implies a buffer");
                        let h = rules.up.frame(&mut buf[HEADROOM..HEADROOM + n]);
                        let h = h.as_bytes();
                        buf[HEADROOM - h.len()..HEADROOM].copy_from_slice(h);
                        self.out = HEADROOM - h.len()..HEADROOM + n;
                    }
                }
            }
        }
    }

    /// Reads TCP data after the headroom; takes a buffer only once TCP is readable, and
    /// keeps it only if data came (not for EOF, an error or a spurious wake-up).
    fn poll_read_tcp(&mut self, cx: &mut Context<'_>, tcp: &mut TcpStream) -> Poll<io::Result<usize>> {
        if self.buf.is_none() {
            ready!(ReadySource::poll_ready(tcp, cx))?;
            self.buf = Some(ready!(self.acquire.poll(cx)));
        }
        let buf = self.buf.as_mut().expect("acquired above");
        let mut rb = ReadBuf::new(&mut buf[HEADROOM..]);
        let r = match Pin::new(tcp).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            other => other.map_ok(|()| 0),
        };
        if !matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.buf = None;
        }
        r
    }
}

/// WebSocket → TCP: frames decoded in place, their payload runs written with one
/// vectored write.
#[derive(Debug, Default)]
struct DownIo {
    /// Undecoded input from the WebSocket.
    input: InBuf,
    /// Payload runs of the input buffer waiting to go to TCP.
    out: Runs,
}

impl DownIo {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Stream,
        tcp: &mut TcpStream,
        rules: &mut SpliceRules,
    ) -> Poll<DownEnd> {
        let end = loop {
            if self.out.pending() {
                if ready!(self.out.poll_write(cx, tcp, self.input.buf())).is_err() {
                    break DownEnd::TcpWriteFailed;
                }
                continue;
            }
            match rules.down.poll_step(&rules.ctrl, self.input.has_bytes()) {
                DownStep::Finish { fin } => {
                    if fin {
                        let _ = ready!(Pin::new(&mut *tcp).poll_shutdown(cx));
                    }
                    break DownEnd::PeerClosed;
                }
                DownStep::Decode => {
                    let (buf, start, end) = self.input.split();
                    if let Err(e) = rules.down.decode(&mut rules.ctrl, buf, start, end, &mut self.out) {
                        break e;
                    }
                }
                DownStep::Read => {
                    let r = ready!(self.input.poll_fill(cx, ws));
                    if let Err(e) = rules.down.handle_read(r) {
                        break e;
                    }
                }
            }
        };
        // What came after the peer's Close stays for a connection kept for another tunnel
        // (`into_parts`); it goes with the buffer otherwise.
        if !(end == DownEnd::PeerClosed && self.input.has_bytes()) {
            self.input.release();
        }
        Poll::Ready(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A splice's task lives as long as the tunnel, and an idle tunnel costs what its task
    /// holds: the splice and a few words. Not the WebSocket's closing (a TLS close, a
    /// timer) nor the stats waiting for it, needed only at the end, nor the guards twice
    /// (with both, the task was 896 bytes around a 568-byte splice; 616 without).
    #[tokio::test(flavor = "current_thread")]
    async fn a_splice_task_holds_its_splice_and_little_else() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let b = l.accept().await.unwrap().0;
        let ws = Stream::Plain(crate::transport::sock::Sock::Live(a));
        let s = Splice::new(ws, &[], b, &SpliceConfig::default(), &CancellationToken::new(), None);
        let splice = std::mem::size_of_val(&s);
        // Guards of a few words, as the roles' are.
        let keep = [0usize; 4];
        let t = std::mem::size_of_val(&task(s, (keep, None), drop));
        let words = 8 * std::mem::size_of::<usize>();
        assert!(
            t <= splice + std::mem::size_of_val(&keep) + words,
            "task {t} bytes, its splice {splice}"
        );
    }
}
