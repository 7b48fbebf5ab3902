//! The relay's tunnel: WebSocket → WebSocket forwarding without copying payload bytes.
//!
//! Each direction reads into a pooled buffer (taken only once the source is readable),
//! decodes frames in place ([`Decoder::decode_slice`] unmasks payloads where they lie),
//! overwrites each frame's masked header with the shorter unmasked header right in front
//! of its payload, and writes the resulting runs with one vectored write. A frame's payload
//! is streamed chunk by chunk as it arrives; nothing is buffered whole. When a buffer's
//! bytes are all written, the buffer goes back to the pool.
//!
//! Both directions are polled by one future ([`RelayTunnel`]), so the two legs — joined on
//! one worker — need no locks and no channels. Backpressure is natural: a direction does
//! not read again until its previous output is written.
//!
//! Close is forwarded, not answered (half-close, see `relay::tunnel`). A source that
//! vanishes or breaks the protocol gets Close(1001) sent to the other side instead; one
//! that breaks the protocol (a frame over `max_frame`, a control frame over 125 bytes,
//! bad masking, …) is also cut: the opposite direction ends at its next frame boundary
//! with Close(1009 or 1002) to the offender, and the tunnel closes without waiting for
//! the abandon grace.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::io::{InBuf, Runs};
pub use super::io::{ReadySource, preloaded};
use super::stats::ActiveGuard;
use crate::proto::frame::{self, Decoder, FrameError, MAX_HEADER_LEN, OpCode, Role, SliceItem, close_code};
use crate::transport::Stream;
use crate::transport::stream::linger_close;

/// How long the surviving side gets to answer after its peer vanished. Default: 5 s.
pub const ABANDON_GRACE: Duration = Duration::from_secs(5);
/// How long a tunnel's legs are read to their peers' EOF when the tunnel ends, and how
/// many bytes at most (shared by the epoll and io_uring engines).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
pub(crate) const LINGER_MAX: usize = 1 << 20;

/// How one direction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEnd {
    /// A Close was forwarded.
    Closed,
    /// The source ended without Close; 1001 was sent on.
    Vanished,
    /// The source broke the protocol; 1001 was sent on. Carries the close code the
    /// offender is owed (1009 for a frame over the limit, else 1002).
    ProtocolError(u16, String),
    /// The destination broke the protocol (on the other direction); this direction sent it
    /// Close with the given code and ended.
    Cut(u16),
    /// Writing to the destination failed.
    WriteFailed,
    /// Stopped by entity deletion or shutdown; 1001 was sent on where possible.
    Stopped,
}

impl DirEnd {
    fn abnormal(&self) -> bool {
        *self != DirEnd::Closed
    }

    /// The Close a direction that ends this way sends on to its destination (if it is at a
    /// frame boundary there). Shared by the epoll and io_uring engines.
    pub(crate) fn close_to_send(&self) -> (u16, &'static str) {
        match self {
            DirEnd::Stopped => (
                close_code::GOING_AWAY,
                "The hybrid connection was deleted or the relay is shutting down.",
            ),
            DirEnd::ProtocolError(..) => (close_code::GOING_AWAY, "The peer broke the WebSocket protocol."),
            DirEnd::Cut(close_code::TOO_BIG) => (close_code::TOO_BIG, "Frame larger than the relay's limit."),
            DirEnd::Cut(code) => (*code, "WebSocket protocol error."),
            _ => (close_code::GOING_AWAY, "The peer went away."),
        }
    }
}

/// An unmasked Close frame: the bytes and their length.
pub(crate) fn close_frame(code: u16, reason: &str) -> ([u8; 2 + frame::MAX_CONTROL_PAYLOAD], usize) {
    let payload = frame::close_payload(code, reason);
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = frame::encode_header(true, OpCode::Close, None, payload.len() as u64, &mut hdr);
    let mut bytes = [0u8; 2 + frame::MAX_CONTROL_PAYLOAD];
    bytes[..h].copy_from_slice(&hdr[..h]);
    bytes[h..h + payload.len()].copy_from_slice(&payload);
    (bytes, h + payload.len())
}

/// A small frame (Close) to write before a direction ends.
#[derive(Debug)]
struct Final {
    bytes: [u8; 2 + frame::MAX_CONTROL_PAYLOAD],
    len: usize,
    pos: usize,
}

impl Final {
    fn close(code: u16, reason: &str) -> Self {
        let (bytes, len) = close_frame(code, reason);
        Self { bytes, len, pos: 0 }
    }
}

/// One direction of a relay tunnel: frames from `src` re-sent unmasked to `dst`.
#[derive(Debug)]
pub struct Direction {
    dec: Decoder,
    /// Undecoded input.
    input: InBuf,
    /// Runs of the input buffer ready to write.
    out: Runs,
    need_flush: bool,
    /// The last forwarded data chunk was not its frame's last: no Close may be injected.
    mid_frame: bool,
    /// Set once the direction has decided to end (after its output and final frame).
    ending: Option<DirEnd>,
    final_frame: Option<Final>,
    /// Set by [`Direction::stop`] or [`Direction::cut`]: end at the next frame boundary.
    stop_requested: Option<DirEnd>,
    /// Payload bytes forwarded.
    pub bytes: u64,
}

impl Direction {
    pub fn new(max_frame: u64) -> Self {
        Self {
            dec: Decoder::new(Role::Server, max_frame),
            input: InBuf::default(),
            out: Runs::default(),
            need_flush: false,
            mid_frame: false,
            ending: None,
            final_frame: None,
            stop_requested: None,
            bytes: 0,
        }
    }

    /// Seeds the direction with bytes that arrived with the handshake.
    pub fn preload(&mut self, bytes: &[u8]) {
        self.input.preload(bytes);
    }

    /// Asks the direction to end at the next frame boundary with Close(1001).
    pub fn stop(&mut self) {
        self.stop_requested.get_or_insert(DirEnd::Stopped);
    }

    /// Asks the direction to end at the next frame boundary with Close(`code`): its
    /// destination broke the protocol on the other direction.
    pub fn cut(&mut self, code: u16) {
        self.stop_requested = Some(DirEnd::Cut(code));
    }

    /// Ends the direction after its pending output: Close(1001) to the destination if a
    /// frame may be injected there.
    fn abort(&mut self, end: DirEnd) {
        if self.ending.is_some() {
            return;
        }
        if !self.mid_frame {
            let (code, reason) = end.close_to_send();
            self.final_frame = Some(Final::close(code, reason));
        }
        self.ending = Some(end);
    }

    /// Drives the direction; `Ready` once it has ended.
    pub fn poll<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D) -> Poll<DirEnd>
    where
        S: ReadySource,
        D: AsyncWrite + Unpin,
    {
        loop {
            if self.out.pending() {
                if let Err(e) = ready!(self.out.poll_write(cx, dst, self.input.buf())) {
                    tracing::trace!(error = %e, "relay leg write failed");
                    return Poll::Ready(self.finish(DirEnd::WriteFailed));
                }
                self.need_flush |= !self.out.pending();
                continue;
            }
            if let Some(f) = &mut self.final_frame {
                while f.pos < f.len {
                    match ready!(Pin::new(&mut *dst).poll_write(cx, &f.bytes[f.pos..f.len])) {
                        Ok(0) | Err(_) => return Poll::Ready(self.finish(DirEnd::WriteFailed)),
                        Ok(n) => f.pos += n,
                    }
                }
                self.final_frame = None;
                self.need_flush = true;
            }
            if self.need_flush {
                match ready!(Pin::new(&mut *dst).poll_flush(cx)) {
                    Ok(()) => self.need_flush = false,
                    Err(_) => return Poll::Ready(self.finish(DirEnd::WriteFailed)),
                }
            }
            if let Some(end) = self.ending.take() {
                return Poll::Ready(self.finish(end));
            }
            if let Some(end) = self.stop_requested.take() {
                self.abort(end);
                continue;
            }
            if self.input.has_bytes() {
                match self.decode_batch() {
                    Ok(()) => {
                        if self.out.pending() || self.ending.is_some() {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.abort(DirEnd::ProtocolError(e.close_code(), e.to_string()));
                        continue;
                    }
                }
            }
            match ready!(self.input.poll_fill(cx, src)) {
                Ok(true) => {}
                Ok(false) | Err(_) => self.abort(DirEnd::Vanished),
            }
        }
    }

    fn finish(&mut self, end: DirEnd) -> DirEnd {
        self.input.release();
        end
    }

    /// Decodes buffered frames into output runs, rewriting headers in place.
    fn decode_batch(&mut self) -> Result<(), FrameError> {
        self.out.clear();
        let out = &mut self.out;
        let (buf, start, end) = self.input.split();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        while *start < end && out.has_room() {
            let base = *start;
            let Some((item, used)) = self.dec.decode_slice(&mut buf[base..end])? else {
                break;
            };
            *start += used;
            match item {
                SliceItem::Data(c) => {
                    self.bytes += c.payload.len() as u64;
                    self.mid_frame = !c.last;
                    let (p0, p1) = (base + c.payload.start, base + c.payload.end);
                    if c.first {
                        let h = frame::encode_header(c.fin, c.opcode, None, c.frame_len, &mut hdr);
                        buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                        out.push(p0 - h..p1);
                    } else if p1 > p0 {
                        out.push(p0..p1);
                    }
                }
                SliceItem::Control { opcode, payload } => {
                    let (p0, p1) = (base + payload.start, base + payload.end);
                    if opcode == OpCode::Close {
                        frame::parse_close(&buf[p0..p1])?;
                    }
                    let h = frame::encode_header(true, opcode, None, (p1 - p0) as u64, &mut hdr);
                    buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                    out.push(p0 - h..p1);
                    if opcode == OpCode::Close {
                        // Nothing may follow a Close; whatever the peer sent after it is dropped.
                        *start = end;
                        self.ending = Some(DirEnd::Closed);
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Byte counts and how a relay tunnel ended.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Payload bytes sender → listener.
    pub up: u64,
    /// Payload bytes listener → sender.
    pub down: u64,
    pub end: String,
}

/// Both directions of a joined tunnel, polled together.
pub struct RelayTunnel {
    sender: Stream,
    listener: Stream,
    up: Direction,
    down: Direction,
    up_end: Option<DirEnd>,
    down_end: Option<DirEnd>,
    deadline: Option<Pin<Box<Sleep>>>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    stopped: bool,
    active: Option<ActiveGuard>,
    counted: (u64, u64),
}

impl RelayTunnel {
    /// `sender`/`listener` with the bytes that came after their handshakes.
    pub fn new(
        sender: (Stream, &[u8]),
        listener: (Stream, &[u8]),
        max_frame: u64,
        gone: &CancellationToken,
        shutdown: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        let mut up = Direction::new(max_frame);
        up.preload(sender.1);
        let mut down = Direction::new(max_frame);
        down.preload(listener.1);
        Self {
            sender: sender.0,
            listener: listener.0,
            up,
            down,
            up_end: None,
            down_end: None,
            deadline: None,
            gone: Box::pin(gone.clone().cancelled_owned()),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            stopped: false,
            active,
            counted: (0, 0),
        }
    }

    fn arm_deadline(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(ABANDON_GRACE)));
        }
    }

    /// A direction ended: arm the grace if abnormally; cut the offender if it broke the
    /// protocol (`up`: the sender's direction).
    fn on_end(&mut self, e: &DirEnd, up: bool) {
        if e.abnormal() {
            self.arm_deadline();
        }
        if let DirEnd::ProtocolError(code, _) = e {
            let other = if up { &mut self.down } else { &mut self.up };
            other.cut(*code);
        }
    }

    /// Adds new byte counts to the worker's counters.
    fn count(&mut self) {
        if let Some(a) = &self.active {
            let c = a.counters();
            c.add_up(self.up.bytes - self.counted.0);
            c.add_down(self.down.bytes - self.counted.1);
        }
        self.counted = (self.up.bytes, self.down.bytes);
    }

    /// Closes both legs (TLS close_notify, FIN) lingering, within 2 s: each is read to its
    /// peer's EOF first, so a frame that arrived after the last one forwarded (a ping sent
    /// just after a Close) cannot turn the close into a reset that destroys the tail of
    /// what this leg was sent ([`linger_close`]).
    pub async fn shutdown_legs(mut self) -> TunnelStats {
        tokio::join!(
            linger_close(&mut self.sender, LINGER, LINGER_MAX),
            linger_close(&mut self.listener, LINGER, LINGER_MAX)
        );
        self.stats()
    }

    fn stats(&self) -> TunnelStats {
        TunnelStats {
            up: self.up.bytes,
            down: self.down.bytes,
            end: format!("up: {:?}, down: {:?}", self.up_end, self.down_end),
        }
    }
}

impl Future for RelayTunnel {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.stopped && (this.gone.as_mut().poll(cx).is_ready() || this.shutdown.as_mut().poll(cx).is_ready()) {
            this.stopped = true;
            this.up.stop();
            this.down.stop();
            this.arm_deadline();
        }
        if this.up_end.is_none()
            && let Poll::Ready(e) = this.up.poll(cx, &mut this.sender, &mut this.listener)
        {
            this.on_end(&e, true);
            this.up_end = Some(e);
        }
        if this.down_end.is_none()
            && let Poll::Ready(e) = this.down.poll(cx, &mut this.listener, &mut this.sender)
        {
            this.on_end(&e, false);
            this.down_end = Some(e);
            // A cut of the sender's direction happens on the next poll of `up`.
            if this.up_end.is_none() && matches!(this.down_end, Some(DirEnd::ProtocolError(..))) {
                cx.waker().wake_by_ref();
            }
        }
        this.count();
        if this.up_end.is_some() && this.down_end.is_some() {
            return Poll::Ready(());
        }
        if let Some(d) = &mut this.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
