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

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use crate::dataplane::reframe::{RelayTunnel, TunnelStats};
use crate::dataplane::{offload, stats};
use crate::transport::Stream;

/// Starts relaying on a task of its own, on this worker, and returns at once.
///
/// The task holds only the two connections and `keep` (connection slots, load counters),
/// so the memory of the handshake that led here is freed. It relays until both sides have
/// closed, one side failed and the other had its grace, or `gone`/`shutdown` fires, and
/// counts into the worker's counters for hybrid connection `hc`; at the end, `usage` gets
/// the tunnel's bytes (the sender's usage, issue 14 item 10).
#[allow(clippy::too_many_arguments)]
pub fn spawn<K: Send + 'static>(
    hc: &str,
    peer: SocketAddr,
    sender: (Stream, BytesMut),
    listener: (Stream, BytesMut),
    max_frame: u64,
    gone: &CancellationToken,
    shutdown: &CancellationToken,
    keep: K,
    usage: super::usage::Ticket,
) {
    let hc_name: std::sync::Arc<str> = hc.into();
    let log_end = move |s: TunnelStats| {
        tracing::debug!(event = "tunnel_closed", hc = %hc_name, %peer, up = s.up, down = s.down, end = %s.end, "tunnel closed");
        usage.closed(s.up, s.down);
    };
    // The completion backend chosen (and both legs able to leave): the tunnel runs there,
    // and `keep` and `log_end` go with it.
    let (sender, listener, keep, log_end) =
        match offload::relay(hc, sender, listener, max_frame, gone, shutdown, keep, log_end) {
            Ok(()) => return,
            Err(back) => back,
        };
    let active = stats::ActiveGuard::new(stats::for_hc(hc));
    let mut t = RelayTunnel::new(
        (sender.0, &sender.1),
        (listener.0, &listener.1),
        max_frame,
        gone,
        shutdown,
        Some(active),
    );
    drop((sender.1, listener.1));
    tokio::task::spawn_local(async move {
        (&mut t).await;
        // Boxed: the closing's state (two lingering reads) is needed only at the end, and
        // inline it would be part of the task for the tunnel's whole life.
        log_end(Box::pin(t.shutdown_legs()).await);
        // Not `let _keep = keep` up front: a task keeps what it captured and, apart, what
        // it moved into a local, so the guards would be in it twice.
        drop(keep);
    });
}
