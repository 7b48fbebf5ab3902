//! A joined tunnel: frames relayed between the sender's and the listener's WebSockets
//! (hc-protocol.md §5.5). The forwarding engine is [`crate::dataplane::reframe`].
//!
//! Message boundaries, opcodes and FIN bits are kept; pings and pongs pass through, so the
//! two ends see each other's keep-alives. Close is forwarded, not answered: a Close from
//! one side goes to the other, whose own Close later comes back the same way. That gives
//! half-close semantics (one side may keep sending after the other said it is done). A
//! side that vanishes without a Close gets 1001 sent to the survivor, which then has a few
//! seconds to answer before both connections are closed. Both legs are closed lingering
//! (read to the peer's EOF, bounded), so input that arrived after the last frame forwarded
//! cannot make the close a reset that loses the tail of the other direction.
//!
//! With the completion backend the tunnel runs on a completion worker instead
//! ([`crate::dataplane::offload`]), TLS legs with their sessions, under the same rules.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::limits::ConnSlot;
use crate::dataplane::reframe::{LINGER, LINGER_MAX, RelayTunnel, TunnelStats};
use crate::dataplane::{offload, stats};
use crate::transport::Stream;
use crate::transport::stream::linger_close;

/// One side of a tunnel about to be joined: the connection, the bytes read past its
/// handshake, its connection slot, and what becomes of it after a clean end.
pub(super) struct TunnelLeg {
    pub stream: Stream,
    pub leftover: BytesMut,
    pub slot: ConnSlot,
    pub then: Then,
}

/// What becomes of a leg's connection when the tunnel ends with the close handshake
/// complete in both directions (the `reuse` extension, promised on its 101); after any
/// other end it is closed.
pub(super) enum Then {
    /// Closed (no promise was made).
    Close,
    /// A sender's: read for its next request, from this address (the bridge's next
    /// connect, [`super::conn::serve_again`]).
    ReadNext(SocketAddr),
    /// A pooled listener's: back in the pool ([`super::pool::rejoin`]), if both Closes
    /// were normal (1000 or none), as the hcm expects then; closed otherwise.
    Repool(Box<super::pool::Repool>),
}

impl Then {
    fn keeps(&self) -> bool {
        !matches!(self, Then::Close)
    }
}

/// Starts relaying on a task of its own, on this worker, and returns at once.
///
/// The task holds only the two connections and `keep` (load counters), so the memory of
/// the handshake that led here is freed. It relays until both sides have closed, one side
/// failed and the other had its grace, or `gone`/the relay's shutdown fires, and counts
/// into the worker's counters for hybrid connection `hc`; at the end, `usage` gets the
/// tunnel's bytes (the sender's usage, issue 14 item 10), and each leg is closed or, after
/// a clean end, kept as its [`Then`] says.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn<K: Send + 'static>(
    hc: &str,
    peer: SocketAddr,
    sender: TunnelLeg,
    listener: TunnelLeg,
    gone: &CancellationToken,
    ctx: &Arc<Ctx>,
    keep: K,
    usage: super::usage::Ticket,
) {
    let hc_name: Arc<str> = hc.into();
    let kept_hc = hc_name.clone();
    let log_end = move |s: TunnelStats| {
        tracing::debug!(event = "tunnel_closed", hc = %hc_name, %peer, up = s.up, down = s.down, end = %s.end, "tunnel closed");
        usage.closed(s.up, s.down);
    };
    let max_frame = ctx.cfg.max_frame;
    // The completion backend chosen (and both legs able to leave): the tunnel runs there,
    // and the slots, `keep` and `log_end` go with it. Its tunnels end by closing, so the
    // relay promises no reuse there (`Pool::promise`).
    let (s, l) = ((sender.stream, sender.leftover), (listener.stream, listener.leftover));
    let keep = (keep, sender.slot, listener.slot);
    let (s, l, keep, log_end) = match offload::relay(hc, s, l, max_frame, gone, &ctx.shutdown, keep, log_end) {
        Ok(()) => return,
        Err(back) => back,
    };
    let (keep, sender_slot, listener_slot) = keep;
    let active = stats::ActiveGuard::new(stats::for_hc(hc));
    let mut t = RelayTunnel::new((s.0, &s.1), (l.0, &l.1), max_frame, gone, &ctx.shutdown, Some(active));
    drop((s.1, l.1));
    // On the heap, and only when a leg may be kept: an idle tunnel's task stays small.
    // Otherwise the slots end with the task, as `keep` does.
    let (kept, keep) = if sender.then.keeps() || listener.then.keeps() {
        let k = Kept {
            hc: kept_hc,
            sender: (sender_slot, sender.then),
            listener: (listener_slot, listener.then),
            ctx: ctx.clone(),
        };
        (Some(Box::new(k)), (keep, None))
    } else {
        (None, (keep, Some((sender_slot, listener_slot))))
    };
    tokio::task::spawn_local(async move {
        (&mut t).await;
        // Boxed: the closing's state (two lingering reads) is needed only at the end, and
        // inline it would be part of the task for the tunnel's whole life.
        let stats = match kept {
            Some(k) if t.closed_cleanly() && !k.ctx.drain.is_cancelled() && !k.ctx.shutdown.is_cancelled() => {
                Box::pin(k.hand_back(t)).await
            }
            // Not kept: the slots go with the task's end.
            _ => Box::pin(t.shutdown_legs()).await,
        };
        log_end(stats);
        // Not `let _keep = keep` up front: a task keeps what it captured and, apart, what
        // it moved into a local, so the guards would be in it twice.
        drop(keep);
    });
}

/// The legs' slots and promises, for a tunnel that may keep a leg.
struct Kept {
    hc: Arc<str>,
    sender: (ConnSlot, Then),
    listener: (ConnSlot, Then),
    ctx: Arc<Ctx>,
}

impl Kept {
    /// After a clean end: each promised leg goes on as its [`Then`] says, with what came
    /// after its Close; the others are closed lingering.
    async fn hand_back(self, t: RelayTunnel) -> TunnelStats {
        let normally = t.closed_normally();
        let ((s, s_rest), (l, l_rest), stats) = t.into_legs();
        let ctx = self.ctx;
        let close_s = keep_or_close(s, s_rest, self.sender, (&self.hc, normally), &ctx);
        let close_l = keep_or_close(l, l_rest, self.listener, (&self.hc, normally), &ctx);
        match (close_s, close_l) {
            (Some((mut a, _sa)), Some((mut b, _sb))) => {
                tokio::join!(
                    linger_close(&mut a, LINGER, LINGER_MAX),
                    linger_close(&mut b, LINGER, LINGER_MAX)
                );
            }
            (Some((mut a, _slot)), None) | (None, Some((mut a, _slot))) => {
                linger_close(&mut a, LINGER, LINGER_MAX).await
            }
            (None, None) => {}
        }
        stats
    }
}

/// Passes a leg on as `then` says, or returns it (with its slot) to be closed;
/// `normally`: both Closes were normal.
fn keep_or_close(
    stream: Stream,
    rest: BytesMut,
    (slot, then): (ConnSlot, Then),
    (hc, normally): (&Arc<str>, bool),
    ctx: &Arc<Ctx>,
) -> Option<(Stream, ConnSlot)> {
    match then {
        Then::ReadNext(peer) => super::conn::serve_again(stream, rest, (peer, slot), hc.clone(), ctx.clone()),
        Then::Repool(r) if normally => {
            metrics::counter!(crate::telemetry::metrics::RELAY_REPOOLED, "hc" => hc.to_string()).increment(1);
            super::pool::rejoin(stream, rest, slot, *r, ctx.clone())
        }
        Then::Close | Then::Repool(_) => return Some((stream, slot)),
    }
    None
}
