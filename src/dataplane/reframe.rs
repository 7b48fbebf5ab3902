//! The relay's tunnel on the epoll engine: WebSocket → WebSocket forwarding without copying
//! payload bytes.
//!
//! The rules (Close forwarded, 1001 for a vanished or broken source, the 1009/1002 cut of
//! an offender, the abandon grace) live once, sans-IO, in [`crate::session::forward`]; this
//! file only moves bytes for them. Each direction reads into a pooled buffer (taken only
//! once the source is readable), has the rules decode frames in place (payloads unmasked
//! where they lie, each masked header overwritten with the shorter unmasked one right in
//! front of its payload), and writes the resulting runs with one vectored write. A frame's
//! payload is streamed chunk by chunk as it arrives; nothing is buffered whole. When a
//! buffer's bytes are all written, the buffer goes back to the pool.
//!
//! Both directions are polled by one future (`RelayTunnel`, see
//! `dataplane::drive::Tunnel`), so the two legs — joined on one worker — need no locks and
//! no channels. Backpressure is natural: a direction does not read again until its
//! previous output is written.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

use super::drive::{self, TunnelLegs};
use super::io::{InBuf, ReadySource, Runs, TokioTimer};
use super::stats::ActiveGuard;
pub use crate::session::forward::{ABANDON_GRACE, DirEnd};
use crate::session::forward::{Dir, Forward, Step};
use crate::session::wire::SmallFrame;
use crate::transport::Stream;
use crate::transport::stream::linger_close;

/// How long a tunnel's legs are read to their peers' EOF when the tunnel ends, and how
/// many bytes at most (shared by the epoll and io_uring engines).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
pub(crate) const LINGER_MAX: usize = 1 << 20;

/// Byte counts and how a relay tunnel ended.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Payload bytes sender → listener.
    pub up: u64,
    /// Payload bytes listener → sender.
    pub down: u64,
    pub end: String,
}

/// The epoll engine's legs of a relay tunnel: the sender's and the listener's WebSocket
/// (plain or TLS), with each direction's buffers.
pub struct EpollTunnel {
    sender: Stream,
    listener: Stream,
    up: DirIo,
    down: DirIo,
}

/// The relay tunnel future on the epoll engine.
pub(crate) type RelayTunnel = drive::Tunnel<EpollTunnel, TokioTimer>;

impl RelayTunnel {
    /// `sender`/`listener` with the bytes that came after their handshakes; `gone`: the
    /// hybrid connection was deleted, `shutdown`: the relay stops.
    pub fn new(
        sender: (Stream, &[u8]),
        listener: (Stream, &[u8]),
        max_frame: u64,
        gone: &CancellationToken,
        shutdown: &CancellationToken,
        active: Option<ActiveGuard>,
    ) -> Self {
        let (mut up, mut down) = (DirIo::default(), DirIo::default());
        up.input.preload(sender.1);
        down.input.preload(listener.1);
        let legs = EpollTunnel {
            sender: sender.0,
            listener: listener.0,
            up,
            down,
        };
        Self::with_legs(legs, TokioTimer::default(), max_frame, gone, shutdown, active)
    }

    /// The legs, each with what its source sent after its Close (the start of its next
    /// request, on a connection kept for another tunnel), and the stats; for a tunnel that
    /// [`closed_cleanly`](drive::Tunnel::closed_cleanly).
    pub fn into_legs(self) -> ((Stream, BytesMut), (Stream, BytesMut), TunnelStats) {
        let stats = self.stats();
        let legs = self.legs;
        let (mut up, mut down) = (legs.up, legs.down);
        (
            (legs.sender, up.input.take_rest()),
            (legs.listener, down.input.take_rest()),
            stats,
        )
    }

    /// Closes both legs (TLS close_notify, FIN) lingering, within 2 s: each is read to its
    /// peer's EOF first, so a frame that arrived after the last one forwarded (a ping sent
    /// just after a Close) cannot turn the close into a reset that destroys the tail of
    /// what this leg was sent ([`linger_close`]).
    pub async fn shutdown_legs(mut self) -> TunnelStats {
        let legs = &mut self.legs;
        tokio::join!(
            linger_close(&mut legs.sender, LINGER, LINGER_MAX),
            linger_close(&mut legs.listener, LINGER, LINGER_MAX)
        );
        self.stats()
    }
}

impl TunnelLegs for EpollTunnel {
    fn poll_dir(&mut self, cx: &mut Context<'_>, d: Dir, rules: &mut Forward) -> Poll<DirEnd> {
        match d {
            Dir::Up => self.up.poll(cx, rules, &mut self.sender, &mut self.listener),
            Dir::Down => self.down.poll(cx, rules, &mut self.listener, &mut self.sender),
        }
    }
}

/// One direction's buffers: undecoded input, the runs of it to write, the final Close.
#[derive(Debug, Default)]
struct DirIo {
    input: InBuf,
    out: Runs,
    need_flush: bool,
    /// The Close this direction ends with, and how much of it is out (boxed: written once
    /// per tunnel, not worth a place in every idle one).
    final_frame: Option<Box<(SmallFrame, usize)>>,
}

impl DirIo {
    /// Moves frames from `src` to `dst` as `rules` say; `Ready` once the direction ended.
    fn poll<S, D>(&mut self, cx: &mut Context<'_>, rules: &mut Forward, src: &mut S, dst: &mut D) -> Poll<DirEnd>
    where
        S: ReadySource,
        D: AsyncWrite + Unpin,
    {
        let end = loop {
            if self.out.pending() {
                if let Err(e) = ready!(self.out.poll_write(cx, dst, self.input.buf())) {
                    tracing::trace!(error = %e, "relay leg write failed");
                    break DirEnd::WriteFailed;
                }
                self.need_flush |= !self.out.pending();
                continue;
            }
            if let Some(f) = &mut self.final_frame {
                let (f, pos) = &mut **f;
                let bytes = f.as_bytes();
                while *pos < bytes.len() {
                    match ready!(Pin::new(&mut *dst).poll_write(cx, &bytes[*pos..])) {
                        Ok(0) | Err(_) => return Poll::Ready(self.end(DirEnd::WriteFailed)),
                        Ok(n) => *pos += n,
                    }
                }
                self.final_frame = None;
                self.need_flush = true;
            }
            if self.need_flush {
                if ready!(Pin::new(&mut *dst).poll_flush(cx)).is_err() {
                    break DirEnd::WriteFailed;
                }
                self.need_flush = false;
            }
            match rules.poll_step(self.input.has_bytes()) {
                Step::Final(f) => self.final_frame = Some(Box::new((f, 0))),
                Step::End(e) => break e,
                Step::Decode => {
                    let (buf, start, end) = self.input.split();
                    rules.decode(buf, start, end, &mut self.out);
                }
                Step::Read => rules.handle_read(ready!(self.input.poll_fill(cx, src))),
            }
        };
        Poll::Ready(self.end(end))
    }

    /// The direction is over: its buffer goes back, unless bytes came after its Close
    /// (they are the next request on a connection kept for another tunnel, taken by
    /// `RelayTunnel::into_legs`; otherwise they go with the buffer when the tunnel ends).
    fn end(&mut self, e: DirEnd) -> DirEnd {
        if !(e == DirEnd::Closed && self.input.has_bytes()) {
            self.input.release();
        }
        e
    }
}
