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
//! Engine: one future polls both directions; no locks, no channels, no task per
//! direction. TCP → WebSocket: once TCP is readable a pooled buffer is taken, data is
//! read after [`HEADROOM`] bytes, the frame header is written just before it and the
//! payload masked in place, so each frame is one write with no copy. WebSocket → TCP:
//! frames are decoded in place and their payload runs written with one vectored write.
//! Buffers go back to the pool as soon as their bytes are written, so an idle tunnel
//! holds none. Control frames the reading side owes (pong, close) are handed to the
//! writing side through `Ctrl` and written between data frames.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::io::{InBuf, ReadySource, Runs};
use super::pool::{self, PoolBuf};
use super::stats::ActiveGuard;
use crate::proto::frame::{self, Decoder, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Role, SliceItem, close_code};
use crate::proto::mask::apply_mask;
use crate::session::Keepalive;
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

/// Runs the splice to completion, then closes the WebSocket (TLS close_notify, FIN).
/// `leftover` holds bytes read past the WebSocket handshake. `stop` ends it with
/// Close(1001).
pub async fn ws_tcp(
    ws: Stream,
    leftover: BytesMut,
    tcp: TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    active: Option<ActiveGuard>,
) -> SpliceStats {
    let mut s = Splice::new(ws, &leftover, tcp, cfg, stop, active);
    drop(leftover);
    let stats = (&mut s).await;
    close_ws(s.into_ws()).await;
    stats
}

/// Closes the WebSocket after a splice (TLS close_notify, FIN), waiting at most 2 s.
async fn close_ws(mut ws: Stream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncWriteExt::shutdown(&mut ws)).await;
}

/// Starts the splice on a task of its own, on this worker, and returns at once.
///
/// The task holds only the two connections, the engine and `keep` (guards that must live
/// as long as the tunnel), so whatever led here (handshake buffers, headers) is freed.
/// `done` runs with the result when the tunnel has ended and the WebSocket is closed.
#[allow(clippy::too_many_arguments)]
pub fn spawn<K: 'static>(
    ws: Stream,
    leftover: BytesMut,
    tcp: TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
    active: Option<ActiveGuard>,
    keep: K,
    done: impl FnOnce(SpliceStats) + 'static,
) {
    let mut s = Splice::new(ws, &leftover, tcp, cfg, stop, active);
    drop(leftover);
    tokio::task::spawn_local(async move {
        let _keep = keep;
        let stats = (&mut s).await;
        close_ws(s.into_ws()).await;
        done(stats);
    });
}

pub(crate) use crate::session::close::{CLEAN_END, CloseState, Ctrl, DownEnd};

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

/// A driver's one keep-alive timer (tokio's or the completion runtime's).
pub(crate) trait Timer {
    /// The clock the timer runs on.
    fn now(&self) -> std::time::Instant;
    /// Ready once `at` has passed; re-arms itself when `at` changes.
    fn poll_until(&mut self, cx: &mut Context<'_>, at: std::time::Instant) -> Poll<()>;
}

/// One poll's worth of the keep-alive rules ([`Keepalive`]) for a splice: records that the
/// peer was `heard`, fires what is due, hands a ping to the writing side. Shared by both
/// engines. True if the peer is dead (silent for two periods).
pub(crate) fn poll_keepalive(
    keep: &mut Keepalive,
    timer: &mut impl Timer,
    cx: &mut Context<'_>,
    heard: bool,
    ctrl: &mut Ctrl,
) -> bool {
    // After the peer's Close nothing more is read, so silence means nothing then.
    if ctrl.peer_closed.is_some() {
        keep.stop();
    }
    if heard {
        keep.handle_heard(timer.now());
    }
    while let Some(at) = keep.poll_timeout() {
        if timer.poll_until(cx, at).is_pending() {
            break;
        }
        keep.handle_timeout(timer.now());
    }
    ctrl.ping_due |= keep.poll_ping();
    keep.is_dead()
}

/// tokio's timer for [`poll_keepalive`].
struct TokioTimer {
    sleep: Pin<Box<Sleep>>,
    at: Option<std::time::Instant>,
}

impl TokioTimer {
    fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            at: None,
        }
    }
}

impl Timer for TokioTimer {
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }

    fn poll_until(&mut self, cx: &mut Context<'_>, at: std::time::Instant) -> Poll<()> {
        if self.at != Some(at) {
            self.sleep.as_mut().reset(Instant::from_std(at));
            self.at = Some(at);
        }
        self.sleep.as_mut().poll(cx)
    }
}

/// A small masked control frame being written.
#[derive(Debug)]
struct CtlFrame {
    bytes: [u8; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD],
    len: usize,
    pos: usize,
    is_close: bool,
}

impl CtlFrame {
    fn new(opcode: OpCode, payload: &[u8]) -> Self {
        let key = rand::random::<[u8; 4]>();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = frame::encode_header(true, opcode, Some(key), payload.len() as u64, &mut hdr);
        let mut bytes = [0u8; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        bytes[..h].copy_from_slice(&hdr[..h]);
        bytes[h..h + payload.len()].copy_from_slice(payload);
        apply_mask(&mut bytes[h..h + payload.len()], key, 0);
        Self {
            bytes,
            len: h + payload.len(),
            pos: 0,
            is_close: opcode == OpCode::Close,
        }
    }
}

/// TCP → WebSocket.
#[derive(Debug, Default)]
struct Up {
    buf: Option<PoolBuf>,
    /// Framed bytes waiting to be written: `buf[out]`.
    out: Range<usize>,
    ctl: Option<CtlFrame>,
    need_flush: bool,
    bytes: u64,
    /// Our place in line while the pool's budget is spent.
    acquire: pool::Acquire,
}

/// Why the writing side stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UpEnd {
    /// Our Close is out (and, unless aborting, the peer's has arrived).
    Done,
    WsWriteFailed,
}

impl Up {
    fn poll(&mut self, cx: &mut Context<'_>, tcp: &mut TcpStream, ws: &mut Stream, ctrl: &mut Ctrl) -> Poll<UpEnd> {
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
                while f.pos < f.len {
                    match ready!(Pin::new(&mut *ws).poll_write(cx, &f.bytes[f.pos..f.len])) {
                        Ok(0) | Err(_) => return Poll::Ready(UpEnd::WsWriteFailed),
                        Ok(n) => f.pos += n,
                    }
                }
                if f.is_close {
                    ctrl.close = CloseState::Sent;
                }
                self.ctl = None;
                self.need_flush = true;
            }
            if self.need_flush {
                if ready!(Pin::new(&mut *ws).poll_flush(cx)).is_err() {
                    return Poll::Ready(UpEnd::WsWriteFailed);
                }
                self.need_flush = false;
            }
            if ctrl.close == CloseState::Sent && (ctrl.abort || ctrl.peer_closed.is_some()) {
                return Poll::Ready(UpEnd::Done);
            }
            // Control frames go out between data frames, which is always here.
            if let Some((p, n)) = ctrl.take_pong() {
                self.ctl = Some(CtlFrame::new(OpCode::Pong, &p[..n]));
                continue;
            }
            if ctrl.take_ping() {
                self.ctl = Some(CtlFrame::new(OpCode::Ping, b""));
                continue;
            }
            if let CloseState::Queued(code, reason) = ctrl.close {
                self.ctl = Some(CtlFrame::new(OpCode::Close, &frame::close_payload(code, reason)));
                continue;
            }
            if ctrl.tcp_done || ctrl.close == CloseState::Sent {
                // Nothing to read; woken again when the reading side or a timer has work.
                return Poll::Pending;
            }
            match ready!(self.poll_read_tcp(cx, tcp)) {
                Ok(0) => {
                    ctrl.tcp_done = true;
                    ctrl.queue_close(close_code::NORMAL, "");
                }
                Ok(n) => self.frame_in_place(n),
                Err(_) => {
                    ctrl.tcp_done = true;
                    ctrl.abort = true;
                    ctrl.queue_close(close_code::GOING_AWAY, "The local connection failed.");
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

    /// Turns `buf[HEADROOM..HEADROOM + n]` into one masked binary frame, in place.
    fn frame_in_place(&mut self, n: usize) {
        let buf = self.buf.as_mut().expect("data implies a buffer");
        let key = rand::random::<[u8; 4]>();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = frame::encode_header(true, OpCode::Binary, Some(key), n as u64, &mut hdr);
        buf[HEADROOM - h..HEADROOM].copy_from_slice(&hdr[..h]);
        apply_mask(&mut buf[HEADROOM..HEADROOM + n], key, 0);
        self.out = HEADROOM - h..HEADROOM + n;
        self.bytes += n as u64;
    }
}

/// WebSocket → TCP.
#[derive(Debug)]
struct Down {
    dec: Decoder,
    /// Undecoded input from the WebSocket.
    input: InBuf,
    /// Payload runs of the input buffer waiting to go to TCP.
    out: Runs,
    /// The peer's Close was read: shut TCP's write side once the output is out.
    closing: bool,
    bytes: u64,
}

impl Down {
    fn new(max_frame: u64) -> Self {
        Self {
            dec: Decoder::new(Role::Client, max_frame),
            input: InBuf::default(),
            out: Runs::default(),
            closing: false,
            bytes: 0,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Stream,
        tcp: &mut TcpStream,
        ctrl: &mut Ctrl,
        heard: &mut bool,
    ) -> Poll<DownEnd> {
        loop {
            if self.out.pending() {
                if ready!(self.out.poll_write(cx, tcp, self.input.buf())).is_err() {
                    return Poll::Ready(DownEnd::TcpWriteFailed);
                }
                continue;
            }
            if self.closing {
                // A clean Close ends TCP's output with a FIN; any other is answered by a reset.
                if ctrl.peer_closed_cleanly() {
                    let _ = ready!(Pin::new(&mut *tcp).poll_shutdown(cx));
                }
                self.input.release();
                return Poll::Ready(DownEnd::PeerClosed);
            }
            if self.input.has_bytes() {
                if let Err(e) = self.decode_batch(ctrl) {
                    return Poll::Ready(DownEnd::ProtocolError(e.close_code(), e.to_string()));
                }
                if self.out.pending() || self.closing {
                    continue;
                }
            }
            match ready!(self.input.poll_fill(cx, ws)) {
                Ok(true) => *heard = true,
                Ok(false) | Err(_) => return Poll::Ready(DownEnd::Vanished),
            }
        }
    }

    fn decode_batch(&mut self, ctrl: &mut Ctrl) -> Result<(), frame::FrameError> {
        self.out.clear();
        let out = &mut self.out;
        let (buf, start, end) = self.input.split();
        while *start < end && out.has_room() {
            let base = *start;
            let Some((item, used)) = self.dec.decode_slice(&mut buf[base..end])? else {
                break;
            };
            *start += used;
            match item {
                SliceItem::Data(c) => {
                    if !c.payload.is_empty() {
                        self.bytes += c.payload.len() as u64;
                        out.push(base + c.payload.start..base + c.payload.end);
                    }
                }
                SliceItem::Control {
                    opcode: OpCode::Ping,
                    payload,
                } => {
                    let mut p = [0u8; MAX_CONTROL_PAYLOAD];
                    p[..payload.len()].copy_from_slice(&buf[base + payload.start..base + payload.end]);
                    ctrl.pong = Some((p, payload.len()));
                }
                SliceItem::Control {
                    opcode: OpCode::Pong, ..
                } => {}
                SliceItem::Control { payload, .. } => {
                    let close = frame::parse_close(&buf[base + payload.start..base + payload.end])?;
                    ctrl.peer_closed = Some(close.code);
                    self.closing = true;
                    *start = end; // nothing may follow a Close
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The splice future: both directions, the keep-alive timer and the stop signal.
pub struct Splice {
    ws: Stream,
    tcp: TcpStream,
    up: Up,
    down: Down,
    ctrl: Ctrl,
    up_end: Option<UpEnd>,
    down_end: Option<DownEnd>,
    keep: Keepalive,
    /// One timer for the keep-alive rules.
    timer: TokioTimer,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    stopping: bool,
    active: Option<ActiveGuard>,
    tcp_side: TcpSide,
    counted: (u64, u64),
    end: Option<String>,
}

impl Splice {
    pub fn new(
        ws: Stream,
        leftover: &[u8],
        tcp: TcpStream,
        cfg: &SpliceConfig,
        stop: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        let mut down = Down::new(cfg.max_frame);
        down.input.preload(leftover);
        Self {
            ws,
            tcp,
            up: Up::default(),
            down,
            ctrl: Ctrl::default(),
            up_end: None,
            down_end: None,
            keep: Keepalive::new(Instant::now().into_std(), cfg.ping_interval),
            timer: TokioTimer::new(),
            stop: Box::pin(stop.clone().cancelled_owned()),
            stopping: false,
            active,
            tcp_side: cfg.tcp_side,
            counted: (0, 0),
            end: None,
        }
    }

    /// The WebSocket, for closing after the splice; the TCP connection is closed now (a
    /// reset if the splice ended abnormally).
    pub fn into_ws(self) -> Stream {
        self.ws
    }

    fn count(&mut self) {
        if let Some(a) = &self.active {
            let (to_ws, to_tcp) = (self.up.bytes - self.counted.0, self.down.bytes - self.counted.1);
            self.tcp_side.count(a.counters(), to_ws, to_tcp);
        }
        self.counted = (self.up.bytes, self.down.bytes);
    }

    /// The splice's result; an abnormal end also arms the TCP reset.
    fn stats(&mut self, why: String) -> SpliceStats {
        self.count();
        if why != CLEAN_END {
            reset_on_close(&self.tcp);
        }
        SpliceStats {
            to_tcp: self.down.bytes,
            to_ws: self.up.bytes,
            peer_close: self.ctrl.peer_closed.flatten(),
            end: why,
        }
    }

    /// Applies [`Ctrl::on_down_end`]; `Some(why)` if the splice ends now.
    fn on_down_end(&mut self, e: &DownEnd) -> Option<String> {
        match self.ctrl.on_down_end(e) {
            Ok(end) => {
                self.end = end.or(self.end.take());
                None
            }
            Err(fatal) => Some(fatal),
        }
    }
}

impl Future for Splice {
    type Output = SpliceStats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SpliceStats> {
        let this = self.get_mut();
        if !this.stopping && this.stop.as_mut().poll(cx).is_ready() {
            this.stopping = true;
            this.ctrl.abort = true;
            this.ctrl.tcp_done = true;
            this.ctrl.queue_close(close_code::GOING_AWAY, "Shutting down.");
            this.end.get_or_insert_with(|| "stopped".into());
        }
        let mut heard = false;
        if this.down_end.is_none()
            && let Poll::Ready(e) = this
                .down
                .poll(cx, &mut this.ws, &mut this.tcp, &mut this.ctrl, &mut heard)
        {
            if let Some(fatal) = this.on_down_end(&e) {
                this.down_end = Some(e);
                return Poll::Ready(this.stats(fatal));
            }
            this.down_end = Some(e);
        }
        // After reading, so that a frame that just arrived counts.
        if poll_keepalive(&mut this.keep, &mut this.timer, cx, heard, &mut this.ctrl) {
            return Poll::Ready(this.stats("peer silent for two ping periods".into()));
        }
        if this.up_end.is_none()
            && let Poll::Ready(e) = this.up.poll(cx, &mut this.tcp, &mut this.ws, &mut this.ctrl)
        {
            if e == UpEnd::WsWriteFailed {
                return Poll::Ready(this.stats("WebSocket write failed".into()));
            }
            this.up_end = Some(e);
        }
        this.count();
        let done = match (&this.up_end, &this.down_end) {
            (Some(_), Some(_)) => true,
            (Some(UpEnd::Done), None) => this.ctrl.abort,
            _ => false,
        };
        if done {
            let why = this.end.take().unwrap_or_else(|| CLEAN_END.into());
            return Poll::Ready(this.stats(why));
        }
        Poll::Pending
    }
}
