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
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::pool::{self, PoolBuf};
use super::stats::ActiveGuard;
use crate::proto::frame::{self, Decoder, FrameError, MAX_HEADER_LEN, OpCode, Role, SliceItem, close_code};
use crate::transport::Stream;

/// Most frames written by one vectored write.
const MAX_BATCH: usize = 64;
/// How long the surviving side gets to answer after its peer vanished. Default: 5 s.
pub const ABANDON_GRACE: Duration = Duration::from_secs(5);

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
        let payload = frame::close_payload(code, reason);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = frame::encode_header(true, OpCode::Close, None, payload.len() as u64, &mut hdr);
        let mut bytes = [0u8; 2 + frame::MAX_CONTROL_PAYLOAD];
        bytes[..h].copy_from_slice(&hdr[..h]);
        bytes[h..h + payload.len()].copy_from_slice(&payload);
        Self {
            bytes,
            len: h + payload.len(),
            pos: 0,
        }
    }
}

/// One direction of a relay tunnel: frames from `src` re-sent unmasked to `dst`.
#[derive(Debug)]
pub struct Direction {
    dec: Decoder,
    buf: Option<PoolBuf>,
    /// Undecoded bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Runs of `buf` ready to write, and progress through them.
    out: Vec<Range<usize>>,
    out_idx: usize,
    out_off: usize,
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
            buf: None,
            start: 0,
            end: 0,
            out: Vec::new(),
            out_idx: 0,
            out_off: 0,
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
        if bytes.is_empty() {
            return;
        }
        self.buf = Some(preloaded(bytes));
        self.end = bytes.len();
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
            let (code, reason) = match &end {
                DirEnd::Stopped => (
                    close_code::GOING_AWAY,
                    "The hybrid connection was deleted or the relay is shutting down.",
                ),
                DirEnd::ProtocolError(..) => (close_code::GOING_AWAY, "The peer broke the WebSocket protocol."),
                DirEnd::Cut(close_code::TOO_BIG) => (close_code::TOO_BIG, "Frame larger than the relay's limit."),
                DirEnd::Cut(code) => (*code, "WebSocket protocol error."),
                _ => (close_code::GOING_AWAY, "The peer went away."),
            };
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
            if self.out_idx < self.out.len() {
                if let Err(e) = ready!(self.poll_write_out(cx, dst)) {
                    tracing::trace!(error = %e, "relay leg write failed");
                    return Poll::Ready(self.finish(DirEnd::WriteFailed));
                }
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
            if self.start < self.end {
                match self.decode_batch() {
                    Ok(()) => {
                        if self.out_idx < self.out.len() || self.ending.is_some() {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.abort(DirEnd::ProtocolError(e.close_code(), e.to_string()));
                        continue;
                    }
                }
            }
            match ready!(self.poll_fill(cx, src)) {
                Ok(true) => {}
                Ok(false) | Err(_) => self.abort(DirEnd::Vanished),
            }
        }
    }

    fn finish(&mut self, end: DirEnd) -> DirEnd {
        self.buf = None;
        self.start = 0;
        self.end = 0;
        end
    }

    /// Reads more input. `Ok(false)` on EOF. Holds no buffer while waiting for readiness.
    fn poll_fill<S: ReadySource>(&mut self, cx: &mut Context<'_>, src: &mut S) -> Poll<io::Result<bool>> {
        // Keep a partial header or control frame; release the buffer when nothing is left.
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.buf = None;
        } else if self.start > 0 {
            let buf = self.buf.as_mut().expect("bytes imply a buffer");
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.is_none() {
            ready!(src.poll_ready(cx))?;
            self.buf = Some(ready!(pool::poll_acquire(cx)));
        }
        let buf = self.buf.as_mut().expect("acquired above");
        let mut rb = ReadBuf::new(&mut buf[self.end..]);
        match src.poll_read_into(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n > 0))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.end == 0 {
                    self.buf = None; // spurious readiness: wait again without a buffer
                }
                Poll::Pending
            }
        }
    }

    /// Decodes buffered frames into output runs, rewriting headers in place.
    fn decode_batch(&mut self) -> Result<(), FrameError> {
        let buf = self.buf.as_mut().expect("bytes imply a buffer");
        self.out.clear();
        self.out_idx = 0;
        self.out_off = 0;
        let mut hdr = [0u8; MAX_HEADER_LEN];
        while self.start < self.end && self.out.len() < MAX_BATCH {
            let base = self.start;
            let Some((item, used)) = self.dec.decode_slice(&mut buf[base..self.end])? else {
                break;
            };
            self.start += used;
            match item {
                SliceItem::Data(c) => {
                    self.bytes += c.payload.len() as u64;
                    self.mid_frame = !c.last;
                    let (p0, p1) = (base + c.payload.start, base + c.payload.end);
                    if c.first {
                        let h = frame::encode_header(c.fin, c.opcode, None, c.frame_len, &mut hdr);
                        buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                        self.out.push(p0 - h..p1);
                    } else if p1 > p0 {
                        self.out.push(p0..p1);
                    }
                }
                SliceItem::Control { opcode, payload } => {
                    let (p0, p1) = (base + payload.start, base + payload.end);
                    if opcode == OpCode::Close {
                        frame::parse_close(&buf[p0..p1])?;
                    }
                    let h = frame::encode_header(true, opcode, None, (p1 - p0) as u64, &mut hdr);
                    buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                    self.out.push(p0 - h..p1);
                    if opcode == OpCode::Close {
                        // Nothing may follow a Close; whatever the peer sent after it is dropped.
                        self.start = self.end;
                        self.ending = Some(DirEnd::Closed);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn poll_write_out<D: AsyncWrite + Unpin>(&mut self, cx: &mut Context<'_>, dst: &mut D) -> Poll<io::Result<()>> {
        let buf = self.buf.as_ref().expect("output lives in the buffer");
        let mut slices = [IoSlice::new(&[]); MAX_BATCH];
        let mut k = 0;
        for (i, r) in self.out[self.out_idx..].iter().enumerate() {
            let skip = if i == 0 { self.out_off } else { 0 };
            slices[k] = IoSlice::new(&buf[r.start + skip..r.end]);
            k += 1;
        }
        let mut n = ready!(Pin::new(&mut *dst).poll_write_vectored(cx, &slices[..k]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        while n > 0 {
            let r = &self.out[self.out_idx];
            let left = r.len() - self.out_off;
            if n >= left {
                n -= left;
                self.out_idx += 1;
                self.out_off = 0;
            } else {
                self.out_off += n;
                n = 0;
            }
        }
        if self.out_idx == self.out.len() {
            self.out.clear();
            self.out_idx = 0;
            self.need_flush = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// A buffer holding `bytes` (handshake leftovers): from the pool if it has room, else
/// allocated outside it, since these bytes cannot wait.
pub fn preloaded(bytes: &[u8]) -> PoolBuf {
    let waker = std::task::Waker::noop();
    let mut buf = match pool::poll_acquire(&mut Context::from_waker(waker)) {
        Poll::Ready(b) if b.len() >= bytes.len() => b,
        _ => PoolBuf::unpooled(bytes.len().max(pool::BUF_SIZE)),
    };
    buf[..bytes.len()].copy_from_slice(bytes);
    buf
}

/// A read side that can wait for input without a buffer.
pub trait ReadySource {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
}

impl ReadySource for Stream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

impl ReadySource for tokio::net::TcpStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
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

    /// Closes both legs (TLS close_notify, FIN), best effort, within 2 s.
    pub async fn shutdown_legs(mut self) -> TunnelStats {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.sender.shutdown().await;
            let _ = self.listener.shutdown().await;
        })
        .await;
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
