//! WebSocket ⇄ TCP splice on the completion backend: the twin of
//! [`crate::dataplane::splice`], with the same mapping between the two ends.
//!
//! - TCP EOF → Close(1000); we keep reading the WebSocket.
//! - The peer's Close(1000, or no code) → TCP shutdown(write); we keep reading TCP and send
//!   our Close when TCP reaches EOF.
//! - Any other end (another close code, the WebSocket vanishing, a protocol error, a TCP
//!   error, a failed WebSocket write, two ping periods of silence, `stop`) → Close with the
//!   matching code where possible, and the TCP connection is reset, not closed with a FIN.
//!
//! TCP → WebSocket: the kernel fills a ring buffer when TCP data arrives; the payload is
//! masked in place and sent after its header with one vectored send. WebSocket → TCP:
//! frames are decoded in place and their payload runs sent with one vectored send. Control
//! frames the reading side owes (pong, close) go to the writing side through [`Ctrl`].

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::bufs::{Chunk, Out};
use super::io::{CompioTimer, Reader, Writer};
use crate::dataplane::io::MAX_BATCH;
use crate::dataplane::splice::{
    CLEAN_END, CloseState, Ctrl, DownEnd, SpliceConfig, SpliceStats, TcpSide, poll_keepalive,
};
use crate::dataplane::stats::ActiveGuard;
use crate::proto::frame::{self, Decoder, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Role, SliceItem, close_code};
use crate::proto::mask::apply_mask;
use crate::session::Keepalive;

fn ctl_frame(opcode: OpCode, payload: &[u8]) -> Out {
    let key = rand::random::<[u8; 4]>();
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = frame::encode_header(true, opcode, Some(key), payload.len() as u64, &mut hdr);
    let mut bytes = hdr[..h].to_vec();
    bytes.extend_from_slice(payload);
    apply_mask(&mut bytes[h..], key, 0);
    Out::bytes(&bytes)
}

/// TCP → WebSocket.
#[derive(Default)]
struct Up {
    buf: Option<Chunk>,
    out: Option<Out>,
    writing: bool,
    /// The frame being written is our Close.
    writing_close: bool,
    /// The run list, kept between frames.
    runs: Vec<Range<usize>>,
    bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UpEnd {
    Done,
    WsWriteFailed,
}

impl Up {
    fn poll(&mut self, cx: &mut Context<'_>, tcp: &mut Reader, ws: &mut Writer, ctrl: &mut Ctrl) -> Poll<UpEnd> {
        loop {
            if self.writing {
                let r = ready!(ws.poll_write_all(cx, &mut self.out));
                if let Some(mut o) = self.out.take() {
                    self.runs = std::mem::take(&mut o.runs);
                } // the buffer goes back while TCP is quiet
                self.writing = false;
                if r.is_err() {
                    return Poll::Ready(UpEnd::WsWriteFailed);
                }
                if std::mem::take(&mut self.writing_close) {
                    ctrl.close = CloseState::Sent;
                }
                continue;
            }
            if ctrl.close == CloseState::Sent && (ctrl.abort || ctrl.peer_closed.is_some()) {
                return Poll::Ready(UpEnd::Done);
            }
            if let Some(f) = self.next_ctl(ctrl) {
                self.out = Some(f);
                self.writing = true;
                continue;
            }
            if ctrl.tcp_done || ctrl.close == CloseState::Sent {
                return Poll::Pending;
            }
            match ready!(tcp.poll_read(cx, &mut self.buf)) {
                Ok(0) => {
                    self.buf = None;
                    ctrl.tcp_done = true;
                    ctrl.queue_close(close_code::NORMAL, "");
                }
                Ok(n) => self.frame(n),
                Err(_) => {
                    self.buf = None;
                    ctrl.tcp_done = true;
                    ctrl.abort = true;
                    ctrl.queue_close(close_code::GOING_AWAY, "The local connection failed.");
                }
            }
        }
    }

    /// A control frame owed now, if any; they go out between data frames.
    fn next_ctl(&mut self, ctrl: &mut Ctrl) -> Option<Out> {
        if let Some((p, n)) = ctrl.take_pong() {
            return Some(ctl_frame(OpCode::Pong, &p[..n]));
        }
        if ctrl.take_ping() {
            return Some(ctl_frame(OpCode::Ping, b""));
        }
        if let CloseState::Queued(code, reason) = ctrl.close {
            self.writing_close = true;
            return Some(ctl_frame(OpCode::Close, &frame::close_payload(code, reason)));
        }
        None
    }

    /// Masks the `n` bytes just read in place and queues them after their frame header.
    fn frame(&mut self, n: usize) {
        let mut buf = self.buf.take().expect("data implies a buffer");
        let key = rand::random::<[u8; 4]>();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = frame::encode_header(true, OpCode::Binary, Some(key), n as u64, &mut hdr);
        apply_mask(&mut buf[..n], key, 0);
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        runs.push(0..n);
        self.out = Some(Out::new(&hdr[..h], buf, runs));
        self.writing = true;
        self.bytes += n as u64;
    }
}

/// WebSocket → TCP.
struct Down {
    dec: Decoder,
    buf: Option<Chunk>,
    start: usize,
    end: usize,
    runs: Vec<Range<usize>>,
    out: Option<Out>,
    writing: bool,
    closing: bool,
    bytes: u64,
}

impl Down {
    fn new(max_frame: u64, leftover: &[u8]) -> Self {
        Self {
            dec: Decoder::new(Role::Client, max_frame),
            buf: (!leftover.is_empty()).then(|| Chunk::heap(leftover)),
            start: 0,
            end: leftover.len(),
            runs: Vec::new(),
            out: None,
            writing: false,
            closing: false,
            bytes: 0,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Reader,
        tcp: &mut Writer,
        ctrl: &mut Ctrl,
        heard: &mut bool,
    ) -> Poll<DownEnd> {
        loop {
            if self.writing {
                let r = ready!(tcp.poll_write_all(cx, &mut self.out));
                self.writing = false;
                if let Some(mut o) = self.out.take() {
                    self.runs = std::mem::take(&mut o.runs);
                    self.runs.clear();
                    self.buf = o.into_chunk();
                }
                if r.is_err() {
                    return Poll::Ready(DownEnd::TcpWriteFailed);
                }
                continue;
            }
            if !self.runs.is_empty() {
                let chunk = self.buf.take().expect("runs live in the buffer");
                self.out = Some(Out::new(&[], chunk, std::mem::take(&mut self.runs)));
                self.writing = true;
                continue;
            }
            if self.closing {
                // A clean Close ends TCP's output with a FIN; any other is answered by a reset.
                if ctrl.peer_closed_cleanly() {
                    let _ = ready!(tcp.poll_shutdown(cx));
                }
                self.buf = None;
                return Poll::Ready(DownEnd::PeerClosed);
            }
            if self.buf.is_some() && self.start < self.end {
                if let Err(e) = self.decode_batch(ctrl) {
                    return Poll::Ready(DownEnd::ProtocolError(e.close_code(), e.to_string()));
                }
                if !self.runs.is_empty() || self.closing {
                    continue;
                }
            }
            match ready!(self.poll_fill(cx, ws)) {
                Ok(true) => *heard = true,
                Ok(false) | Err(_) => return Poll::Ready(DownEnd::Vanished),
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, ws: &mut Reader) -> Poll<std::io::Result<bool>> {
        if let Some(buf) = &mut self.buf {
            if self.start == self.end {
                self.buf = None;
            } else if self.start > 0 {
                buf.keep(self.start..self.end);
            }
            self.end -= self.start;
            self.start = 0;
        }
        let n = ready!(ws.poll_read(cx, &mut self.buf))?;
        self.end = self.buf.as_ref().map_or(0, |b| b.len());
        if self.end == 0 {
            self.buf = None;
        }
        Poll::Ready(Ok(n > 0))
    }

    fn decode_batch(&mut self, ctrl: &mut Ctrl) -> Result<(), frame::FrameError> {
        let buf: &mut [u8] = self.buf.as_mut().expect("bytes imply a buffer");
        self.runs.clear();
        while self.start < self.end && self.runs.len() < MAX_BATCH {
            let base = self.start;
            let Some((item, used)) = self.dec.decode_slice(&mut buf[base..self.end])? else {
                break;
            };
            self.start += used;
            match item {
                SliceItem::Data(c) => {
                    if !c.payload.is_empty() {
                        self.bytes += c.payload.len() as u64;
                        self.runs.push(base + c.payload.start..base + c.payload.end);
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
                    self.start = self.end;
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The splice future: both directions, the keep-alive timers and the stop signal.
pub struct Splice {
    ws_r: Reader,
    ws_w: Writer,
    tcp_r: Reader,
    tcp_w: Writer,
    up: Up,
    down: Down,
    ctrl: Ctrl,
    up_end: Option<UpEnd>,
    down_end: Option<DownEnd>,
    keep: Keepalive,
    timer: CompioTimer,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    stopping: bool,
    active: ActiveGuard,
    tcp_side: TcpSide,
    counted: (u64, u64),
    end: Option<String>,
}

impl Splice {
    pub fn new(
        ws: (Reader, Writer, &[u8]),
        tcp: (Reader, Writer),
        cfg: &SpliceConfig,
        stop: &CancellationToken,
        active: ActiveGuard,
    ) -> Self {
        Self {
            ws_r: ws.0,
            ws_w: ws.1,
            tcp_r: tcp.0,
            tcp_w: tcp.1,
            up: Up::default(),
            down: Down::new(cfg.max_frame, ws.2),
            ctrl: Ctrl::default(),
            up_end: None,
            down_end: None,
            keep: Keepalive::new(Instant::now(), cfg.ping_interval),
            timer: CompioTimer::default(),
            stop: Box::pin(stop.clone().cancelled_owned()),
            stopping: false,
            active,
            tcp_side: cfg.tcp_side,
            counted: (0, 0),
            end: None,
        }
    }

    /// The WebSocket's write side, for closing after the splice; everything else (the TCP
    /// connection among it) is closed now.
    pub fn into_ws_writer(self) -> Writer {
        self.ws_w
    }

    fn count(&mut self) {
        let (to_ws, to_tcp) = (self.up.bytes - self.counted.0, self.down.bytes - self.counted.1);
        self.tcp_side.count(self.active.counters(), to_ws, to_tcp);
        self.counted = (self.up.bytes, self.down.bytes);
    }

    /// The splice's result; an abnormal end also arms the TCP reset.
    fn stats(&mut self, why: String) -> SpliceStats {
        self.count();
        if why != CLEAN_END {
            self.tcp_w.reset_on_close();
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
                .poll(cx, &mut this.ws_r, &mut this.tcp_w, &mut this.ctrl, &mut heard)
        {
            let fatal = this.on_down_end(&e);
            this.down_end = Some(e);
            if let Some(fatal) = fatal {
                return Poll::Ready(this.stats(fatal));
            }
        }
        if poll_keepalive(&mut this.keep, &mut this.timer, cx, heard, &mut this.ctrl) {
            return Poll::Ready(this.stats("peer silent for two ping periods".into()));
        }
        if this.up_end.is_none()
            && let Poll::Ready(e) = this.up.poll(cx, &mut this.tcp_r, &mut this.ws_w, &mut this.ctrl)
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
