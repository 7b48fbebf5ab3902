//! The relay's tunnel on the completion backend: the twin of
//! [`crate::dataplane::reframe`], with the same rules.
//!
//! Frames are decoded in place ([`Decoder::decode_slice`] unmasks payloads where they lie),
//! each frame's masked header is overwritten with the shorter unmasked one right in front
//! of its payload, and the runs are written with one vectored send that owns the buffer
//! until the kernel is done with it. Close is forwarded, not answered; a source that
//! vanishes or breaks the protocol gets Close(1001) sent on, and one that breaks the
//! protocol is cut with 1009/1002 at the other direction's next frame boundary; after an
//! abnormal end the survivor has [`ABANDON_GRACE`] to answer; `gone`/`shutdown` end both
//! directions with 1001.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::bufs::{Chunk, Out};
use super::io::{Reader, Writer, sleep};
use crate::dataplane::io::MAX_BATCH;
use crate::dataplane::reframe::{self, ABANDON_GRACE, DirEnd, TunnelStats};
use crate::dataplane::stats::ActiveGuard;
use crate::proto::frame::{self, Decoder, FrameError, MAX_HEADER_LEN, OpCode, Role, SliceItem};

/// What is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    Nothing,
    /// Runs of the read buffer; it comes back when they are out.
    Data,
    /// The Close this direction ends with.
    Final,
}

/// A Close frame to send before a direction ends.
fn close_frame(code: u16, reason: &str) -> Out {
    let (bytes, len) = reframe::close_frame(code, reason);
    Out::bytes(&bytes[..len])
}

/// One direction of a relay tunnel: frames from `src` re-sent unmasked to `dst`.
#[derive(Debug)]
pub struct Direction {
    dec: Decoder,
    /// The read buffer; `None` while a read or a write owns it, or when nothing is held.
    buf: Option<Chunk>,
    /// Undecoded bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    runs: Vec<Range<usize>>,
    out: Option<Out>,
    writing: Writing,
    mid_frame: bool,
    ending: Option<DirEnd>,
    final_frame: Option<Out>,
    stop_requested: Option<DirEnd>,
    pub bytes: u64,
}

impl Direction {
    pub fn new(max_frame: u64, preload: &[u8]) -> Self {
        let buf = (!preload.is_empty()).then(|| Chunk::heap(preload));
        Self {
            dec: Decoder::new(Role::Server, max_frame),
            buf,
            start: 0,
            end: preload.len(),
            runs: Vec::new(),
            out: None,
            writing: Writing::Nothing,
            mid_frame: false,
            ending: None,
            final_frame: None,
            stop_requested: None,
            bytes: 0,
        }
    }

    /// Ends at the next frame boundary with Close(1001).
    pub fn stop(&mut self) {
        self.stop_requested.get_or_insert(DirEnd::Stopped);
    }

    /// Ends at the next frame boundary with Close(`code`): the destination broke the protocol.
    pub fn cut(&mut self, code: u16) {
        self.stop_requested = Some(DirEnd::Cut(code));
    }

    fn abort(&mut self, end: DirEnd) {
        if self.ending.is_some() {
            return;
        }
        if !self.mid_frame {
            let (code, reason) = end.close_to_send();
            self.final_frame = Some(close_frame(code, reason));
        }
        self.ending = Some(end);
    }

    /// Drives the direction; `Ready` once it has ended.
    pub fn poll(&mut self, cx: &mut Context<'_>, src: &mut Reader, dst: &mut Writer) -> Poll<DirEnd> {
        loop {
            if self.writing != Writing::Nothing {
                let r = ready!(dst.poll_write_all(cx, &mut self.out));
                let out = self.out.take();
                if std::mem::replace(&mut self.writing, Writing::Nothing) == Writing::Data {
                    self.take_back(out);
                }
                if r.is_err() {
                    return Poll::Ready(self.finish(DirEnd::WriteFailed));
                }
                continue;
            }
            if !self.runs.is_empty() {
                let chunk = self.buf.take().expect("runs live in the buffer");
                self.out = Some(Out::new(&[], chunk, std::mem::take(&mut self.runs)));
                self.writing = Writing::Data;
                continue;
            }
            if let Some(f) = self.final_frame.take() {
                self.out = Some(f);
                self.writing = Writing::Final;
                continue;
            }
            if let Some(end) = self.ending.take() {
                return Poll::Ready(self.finish(end));
            }
            if let Some(end) = self.stop_requested.take() {
                self.abort(end);
                continue;
            }
            if self.buf.is_some() && self.start < self.end {
                match self.decode_batch() {
                    Ok(()) if !self.runs.is_empty() || self.ending.is_some() => continue,
                    Ok(()) => {}
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

    /// The buffer (and the run vector, for reuse) back from a finished write.
    fn take_back(&mut self, out: Option<Out>) {
        if let Some(mut o) = out {
            let mut runs = std::mem::take(&mut o.runs);
            runs.clear();
            self.runs = runs;
            self.buf = o.into_chunk();
        }
    }

    fn finish(&mut self, end: DirEnd) -> DirEnd {
        self.buf = None;
        self.start = 0;
        self.end = 0;
        end
    }

    /// Reads more input. `Ok(false)` on EOF. Holds no buffer while waiting at a frame
    /// boundary; keeps a partial header or control frame and reads after it.
    fn poll_fill(&mut self, cx: &mut Context<'_>, src: &mut Reader) -> Poll<std::io::Result<bool>> {
        if let Some(buf) = &mut self.buf {
            if self.start == self.end {
                self.buf = None;
            } else if self.start > 0 {
                buf.keep(self.start..self.end);
            }
            self.end -= self.start;
            self.start = 0;
        }
        let n = ready!(src.poll_read(cx, &mut self.buf))?;
        self.end = self.buf.as_ref().map_or(0, |b| b.len());
        if self.end == 0 {
            self.buf = None; // EOF into a fresh pool buffer
        }
        Poll::Ready(Ok(n > 0))
    }

    /// Decodes buffered frames into output runs, rewriting headers in place.
    fn decode_batch(&mut self) -> Result<(), FrameError> {
        let buf: &mut [u8] = self.buf.as_mut().expect("bytes imply a buffer");
        self.runs.clear();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        while self.start < self.end && self.runs.len() < MAX_BATCH {
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
                        self.runs.push(p0 - h..p1);
                    } else if p1 > p0 {
                        self.runs.push(p0..p1);
                    }
                }
                SliceItem::Control { opcode, payload } => {
                    let (p0, p1) = (base + payload.start, base + payload.end);
                    if opcode == OpCode::Close {
                        frame::parse_close(&buf[p0..p1])?;
                    }
                    let h = frame::encode_header(true, opcode, None, (p1 - p0) as u64, &mut hdr);
                    buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                    self.runs.push(p0 - h..p1);
                    if opcode == OpCode::Close {
                        self.start = self.end;
                        self.ending = Some(DirEnd::Closed);
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One leg: its reader and writer.
pub struct Leg {
    pub r: Reader,
    pub w: Writer,
}

/// Both directions of a joined tunnel, polled together.
pub struct RelayTunnel {
    sender: Leg,
    listener: Leg,
    up: Direction,
    down: Direction,
    up_end: Option<DirEnd>,
    down_end: Option<DirEnd>,
    deadline: Option<Pin<Box<dyn Future<Output = ()>>>>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    stopped: bool,
    active: ActiveGuard,
    counted: (u64, u64),
}

impl RelayTunnel {
    pub fn new(
        sender: (Leg, &[u8]),
        listener: (Leg, &[u8]),
        max_frame: u64,
        gone: &CancellationToken,
        shutdown: &CancellationToken,
        active: ActiveGuard,
    ) -> Self {
        Self {
            up: Direction::new(max_frame, sender.1),
            down: Direction::new(max_frame, listener.1),
            sender: sender.0,
            listener: listener.0,
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

    fn on_end(&mut self, e: &DirEnd, up: bool) {
        if *e != DirEnd::Closed && self.deadline.is_none() {
            self.deadline = Some(sleep(ABANDON_GRACE));
        }
        if let DirEnd::ProtocolError(code, _) = e {
            let other = if up { &mut self.down } else { &mut self.up };
            other.cut(*code);
        }
    }

    fn count(&mut self) {
        let c = self.active.counters();
        c.add_up(self.up.bytes - self.counted.0);
        c.add_down(self.down.bytes - self.counted.1);
        self.counted = (self.up.bytes, self.down.bytes);
    }

    /// Closes both legs (FIN) lingering, within 2 s: the epoll engine's
    /// [`crate::dataplane::reframe::RelayTunnel::shutdown_legs`] rule.
    pub async fn shutdown_legs(mut self) -> TunnelStats {
        use crate::dataplane::reframe::{LINGER, LINGER_MAX};
        futures_util::future::join(
            self.sender.w.linger_within(LINGER, LINGER_MAX),
            self.listener.w.linger_within(LINGER, LINGER_MAX),
        )
        .await;
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
            if this.deadline.is_none() {
                this.deadline = Some(sleep(ABANDON_GRACE));
            }
        }
        if this.up_end.is_none()
            && let Poll::Ready(e) = this.up.poll(cx, &mut this.sender.r, &mut this.listener.w)
        {
            this.on_end(&e, true);
            this.up_end = Some(e);
        }
        if this.down_end.is_none()
            && let Poll::Ready(e) = this.down.poll(cx, &mut this.listener.r, &mut this.sender.w)
        {
            this.on_end(&e, false);
            this.down_end = Some(e);
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
