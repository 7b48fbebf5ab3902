//! WebSocket ⇄ TCP splice on the completion backend: the driver of
//! `crate::session::splice`'s rules over io_uring/IOCP, as
//! [`crate::dataplane::splice`] is over epoll (same mapping between the two ends).
//!
//! TCP → WebSocket: the kernel fills a ring buffer when TCP data arrives; the rules mask
//! the payload in place and it is sent after its header with one vectored send.
//! WebSocket → TCP: frames are decoded in place and their payload runs sent with one
//! vectored send. Control frames the reading side owes (pong, close) go out between data
//! frames. Over TLS (`wss://`) the WebSocket's records are opened in the buffer they
//! arrive in, and what is sent to it is sealed on the way out.

use std::task::{Context, Poll, ready};

use tokio_util::sync::CancellationToken;

use super::io::{CompioTimer, DirBuf, Reader, Writer};
use crate::dataplane::drive::{self, SpliceLegs};
use crate::dataplane::splice::SpliceConfig;
use crate::dataplane::stats::ActiveGuard;
use crate::session::close::DownEnd;
use crate::session::splice::{DownStep, SpliceRules, UpEnd, UpStep};
use crate::transport::tls_session::TlsSession;

/// The completion engine's legs of a splice, with each direction's buffers.
pub struct UringSplice {
    ws_r: Reader,
    ws_w: Writer,
    /// The WebSocket's TLS session, if it has one.
    ws_tls: Option<Box<TlsSession>>,
    tcp_r: Reader,
    tcp_w: Writer,
    /// TCP → WebSocket: what TCP gave, framed.
    up: DirBuf,
    /// WebSocket → TCP: undecoded input and payload runs.
    down: DirBuf,
}

/// The splice future on the completion backend.
pub(crate) type Splice = drive::Splice<UringSplice, CompioTimer>;

impl Splice {
    /// `ws`: its halves, its TLS session if any and its input so far (read past its
    /// handshake).
    pub fn new(
        ws: (Reader, Writer, Option<Box<TlsSession>>, DirBuf),
        tcp: (Reader, Writer),
        cfg: &SpliceConfig,
        stop: &CancellationToken,
        active: ActiveGuard,
    ) -> Self {
        let legs = UringSplice {
            ws_r: ws.0,
            ws_w: ws.1,
            ws_tls: ws.2,
            tcp_r: tcp.0,
            tcp_w: tcp.1,
            up: DirBuf::new(&[]),
            down: ws.3,
        };
        Self::with_legs(legs, CompioTimer::default(), cfg, stop, Some(active))
    }

    /// The WebSocket's write side and TLS session, for closing after the splice;
    /// everything else (the TCP connection among it) is closed now.
    pub fn into_ws_writer(self) -> (Writer, Option<Box<TlsSession>>) {
        (self.legs.ws_w, self.legs.ws_tls)
    }
}

impl SpliceLegs for UringSplice {
    fn poll_down(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<DownEnd> {
        let io = &mut self.down;
        let end = loop {
            if ready!(io.poll_write(cx, &mut self.tcp_w, true, None)).is_err() {
                break DownEnd::TcpWriteFailed;
            }
            match rules.down.poll_step(&rules.ctrl, io.has_bytes()) {
                DownStep::Finish { fin } => {
                    if fin {
                        let _ = self.tcp_w.shutdown();
                    }
                    break DownEnd::PeerClosed;
                }
                DownStep::Decode => {
                    let (buf, start, end, runs) = io.split();
                    if let Err(e) = rules.down.decode(&mut rules.ctrl, buf, start, end, runs) {
                        break e;
                    }
                }
                DownStep::Read => {
                    let r = ready!(io.poll_fill(cx, &mut self.ws_r, self.ws_tls.as_deref_mut())).map(|n| n > 0);
                    if let Err(e) = rules.down.handle_read(r) {
                        break e;
                    }
                }
            }
        };
        io.release();
        Poll::Ready(end)
    }

    fn poll_up(&mut self, cx: &mut Context<'_>, rules: &mut SpliceRules) -> Poll<UpEnd> {
        let io = &mut self.up;
        loop {
            // The buffer is dropped after its frame is out: it goes back while TCP is quiet.
            if ready!(io.poll_write(cx, &mut self.ws_w, false, self.ws_tls.as_deref_mut())).is_err() {
                return Poll::Ready(UpEnd::WsWriteFailed);
            }
            rules.up.handle_written(&mut rules.ctrl);
            match rules.up.poll_step(&mut rules.ctrl) {
                UpStep::Write(f) => io.queue_small(f.as_bytes()),
                UpStep::Done => return Poll::Ready(UpEnd::Done),
                // Woken again when the reading side, a timer or the stop has news.
                UpStep::Idle => return Poll::Pending,
                UpStep::ReadTcp => {
                    let r = ready!(io.poll_fill(cx, &mut self.tcp_r, None));
                    match rules.up.handle_tcp_read(&mut rules.ctrl, r) {
                        Some(_) => {
                            let h = rules.up.frame(io.read_bytes());
                            io.queue_read(h.as_bytes());
                        }
                        None => io.release(),
                    }
                }
            }
        }
    }

    fn reset_tcp_on_close(&mut self) {
        self.tcp_w.reset_on_close();
    }
}
