//! The relay's tunnel on the completion backend: the driver of
//! [`crate::session::forward`]'s rules over io_uring/IOCP, as
//! [`crate::dataplane::reframe`] is over epoll.
//!
//! Frames are decoded in place by the rules, and the runs are written with one vectored
//! send that owns the buffer until the kernel is done with it ([`DirBuf`]). A TLS leg's
//! records are opened in the buffer they arrive in and its writes sealed on the way out
//! ([`DirBuf::poll_fill`], [`super::io::Writer::poll_write_all`]).

use std::task::{Context, Poll, ready};

use tokio_util::sync::CancellationToken;

use super::io::{CompioTimer, DirBuf, Reader, Writer};
use crate::dataplane::drive::{self, TunnelLegs};
use crate::dataplane::reframe::{DirEnd, LINGER, LINGER_MAX, TunnelStats};
use crate::dataplane::stats::ActiveGuard;
use crate::session::forward::{Dir, Forward, Step};
use crate::transport::tls_session::TlsSession;

/// One leg: its reader and writer, and its TLS session if it has one.
pub struct Leg {
    pub r: Reader,
    pub w: Writer,
    pub tls: Option<Box<TlsSession>>,
}

/// The completion engine's legs of a relay tunnel, with each direction's buffers.
pub struct UringTunnel {
    sender: Leg,
    listener: Leg,
    up: DirBuf,
    down: DirBuf,
}

/// The relay tunnel future on the completion backend.
pub(crate) type RelayTunnel = drive::Tunnel<UringTunnel, CompioTimer>;

impl RelayTunnel {
    /// `sender`/`listener` with their input so far (what came after their handshakes).
    pub fn new(
        sender: (Leg, DirBuf),
        listener: (Leg, DirBuf),
        max_frame: u64,
        gone: &CancellationToken,
        shutdown: &CancellationToken,
        active: ActiveGuard,
    ) -> Self {
        let legs = UringTunnel {
            up: sender.1,
            down: listener.1,
            sender: sender.0,
            listener: listener.0,
        };
        Self::with_legs(legs, CompioTimer::default(), max_frame, gone, shutdown, Some(active))
    }

    /// Closes both legs (TLS `close_notify`, FIN) lingering, within 2 s: the epoll engine's
    /// [`crate::dataplane::reframe::RelayTunnel::shutdown_legs`] rule.
    pub async fn shutdown_legs(mut self) -> TunnelStats {
        let legs = &mut self.legs;
        futures_util::future::join(
            legs.sender
                .w
                .linger_within(legs.sender.tls.as_deref_mut(), LINGER, LINGER_MAX),
            legs.listener
                .w
                .linger_within(legs.listener.tls.as_deref_mut(), LINGER, LINGER_MAX),
        )
        .await;
        self.stats()
    }
}

impl TunnelLegs for UringTunnel {
    fn poll_dir(&mut self, cx: &mut Context<'_>, d: Dir, rules: &mut Forward) -> Poll<DirEnd> {
        let (io, src, dst) = match d {
            Dir::Up => (&mut self.up, &mut self.sender, &mut self.listener),
            Dir::Down => (&mut self.down, &mut self.listener, &mut self.sender),
        };
        let end = loop {
            if ready!(io.poll_write(cx, &mut dst.w, true, dst.tls.as_deref_mut())).is_err() {
                break DirEnd::WriteFailed;
            }
            match rules.poll_step(io.has_bytes()) {
                Step::Final(f) => io.queue_small(f.as_bytes()),
                Step::End(e) => break e,
                Step::Decode => {
                    let (buf, start, end, runs) = io.split();
                    rules.decode(buf, start, end, runs);
                }
                Step::Read => {
                    let r = ready!(io.poll_fill(cx, &mut src.r, src.tls.as_deref_mut()));
                    rules.handle_read(r.map(|n| n > 0));
                }
            }
        };
        io.release();
        Poll::Ready(end)
    }
}
