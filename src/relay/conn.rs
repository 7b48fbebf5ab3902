//! One accepted TCP connection on a relay worker: admission against the connection caps
//! (before any byte is read), TLS, the HTTP head (both within the handshake timeout), the
//! auth-failure delay for the source address, then dispatch on the request target.
//!
//! The connection holds a [`super::limits::ConnSlot`] for its whole life and an [`AuthPending`] until the
//! handler it is routed to has authenticated it (or decided it needs no token).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Ctx;
use super::limits::{AuthPending, ConnSlot};
use crate::proto::address::{self, Action, Target};
use crate::proto::handshake::{self, HandshakeError, RequestHead};
use crate::transport::Stream;
use crate::transport::sock::{Sock, tune_accepted};
use crate::transport::tls_conn::TlsConn;
use crate::transport::ws::{HeadError, read_request_head};

/// Serves one connection to completion.
pub(crate) async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    // Over a cap: close at once (no TLS, no response); the refusal is logged rate-limited.
    let Ok((slot, pending)) = ctx.admission.admit(peer.ip()) else {
        return;
    };
    handshake_and_route(tcp, peer, slot, pending, ctx).await;
}

async fn handshake_and_route(tcp: TcpStream, peer: SocketAddr, slot: ConnSlot, pending: AuthPending, ctx: Arc<Ctx>) {
    tune_accepted(&tcp);
    let deadline = tokio::time::Instant::now() + ctx.cfg.handshake_timeout;
    let stream = match &ctx.tls {
        None => Stream::Plain(Sock::Live(tcp)),
        // Boxed, as the handlers are in `route`: the handshake's state is not carried in
        // every connection's task.
        Some(cfg) => {
            match tokio::time::timeout_at(deadline, Box::pin(TlsConn::accept(cfg.clone(), Sock::Live(tcp)))).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let fresh = (peer, slot, pending, None);
    read_head_and_route(stream, BytesMut::with_capacity(4096), deadline, fresh, ctx).await;
}

/// Serves the next request on a connection whose tunnel ended with its close handshake
/// complete (the `reuse` extension, [`crate::proto::extensions`]): as a new connection
/// would be after TLS, with `leftover` (what came after its Close) as the start of the
/// head, within a new handshake timeout, counted as unauthenticated again. It keeps its
/// connection slot and TLS session. `hc`: the hybrid connection of the tunnel it carried
/// (for the metric). Spawned on this worker.
pub(crate) fn serve_again(
    stream: Stream,
    leftover: BytesMut,
    (peer, slot): (SocketAddr, ConnSlot),
    hc: Arc<str>,
    ctx: Arc<Ctx>,
) {
    tokio::task::spawn_local(async move {
        let mut stream = stream;
        // Over the unauthenticated cap: closed as a new connection would be.
        let Ok(pending) = ctx.admission.pending(peer.ip()) else {
            crate::transport::stream::linger_close(&mut stream, Duration::from_secs(2), 1 << 20).await;
            return;
        };
        let deadline = tokio::time::Instant::now() + ctx.cfg.handshake_timeout;
        let mut buf = leftover;
        buf.reserve(4096);
        // Boxed: the task waits here between tunnels and must stay small.
        Box::pin(read_head_and_route(
            stream,
            buf,
            deadline,
            (peer, slot, pending, Some(hc)),
            ctx,
        ))
        .await;
    });
}

/// Reads the request head (what `buf` holds first) within `deadline` and routes it;
/// `kept`: the connection carried a tunnel of that hybrid connection before.
async fn read_head_and_route(
    mut stream: Stream,
    mut buf: BytesMut,
    deadline: tokio::time::Instant,
    (peer, slot, pending, kept): (SocketAddr, ConnSlot, AuthPending, Option<Arc<str>>),
    ctx: Arc<Ctx>,
) {
    let head = match tokio::time::timeout_at(deadline, read_request_head(&mut stream, &mut buf, ctx.cfg.max_head)).await
    {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        // Too many header lines is the same complaint as too many bytes of them.
        Ok(Err(HeadError::Http(HandshakeError::TooLarge(_) | HandshakeError::TooManyHeaders))) => {
            return respond(&mut stream, 431, "Request Header Fields Too Large", "").await;
        }
        Ok(Err(HeadError::Http(e))) => {
            return respond(&mut stream, 400, "Bad Request", &e.to_string()).await;
        }
        Ok(Err(HeadError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "connection failed before the request head");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "request head not received within the handshake timeout");
            return respond(&mut stream, 408, "Request Timeout", "").await;
        }
    };
    if let Some(hc) = kept {
        metrics::counter!(crate::telemetry::metrics::RELAY_KEPT_REQUESTS, "hc" => hc.to_string()).increment(1);
    }
    let inc = Incoming {
        buf,
        head,
        peer,
        slot,
        pending,
    };
    route(stream, inc, ctx).await;
}

/// A request whose head has been read, on its way to a handler.
pub(crate) struct Incoming {
    /// Bytes read past the head.
    pub buf: BytesMut,
    pub head: RequestHead,
    pub peer: SocketAddr,
    /// Counts the connection while it lives; moves with it into a tunnel.
    pub slot: ConnSlot,
    /// Counts the connection as unauthenticated until the handler calls `done()`.
    pub pending: AuthPending,
}

impl Incoming {
    /// Counts a failed token check against the source address (see [`super::throttle`]).
    /// A request without any token guesses no secret (a probe, a health check, `doctor`'s
    /// upgrade test) and is not counted.
    pub fn auth_failed(&self, ctx: &Ctx, e: &super::auth::AuthError) {
        if e.presented_a_credential() {
            ctx.throttle.failed(self.peer.ip());
        }
    }
}

async fn route(mut stream: Stream, inc: Incoming, ctx: Arc<Ctx>) {
    let target = match address::parse_target(&inc.head.target) {
        Ok(t) => t,
        Err(e) => return respond(&mut stream, 400, &e.to_string(), "").await,
    };
    let rendezvous = matches!(&target, Target::Hc(r) if matches!(r.action, Some(Action::Accept | Action::Request)));
    if !rendezvous {
        // Rendezvous addresses carry their own capability and are never throttled, so a
        // listener behind the same NAT as a guesser still completes its accepts.
        delay_if_failing(&inc, &ctx).await;
    }
    match target {
        Target::Hc(req) => {
            if !handshake::wants_websocket(&inc.head) {
                return respond(&mut stream, 400, "A WebSocket upgrade is required on /$hc/", "").await;
            }
            // Each handler's future is boxed: the connection's task then stays small
            // (the largest handler's state would otherwise be copied into and within
            // every connection's task, several KiB each time).
            match req.action {
                Some(Action::Listen) if super::pool::is_pool_request(&inc.head) => {
                    Box::pin(super::pool::serve(stream, inc, req, ctx)).await
                }
                Some(Action::Listen) => Box::pin(super::listener::serve(stream, inc, req, ctx)).await,
                Some(Action::Connect) => Box::pin(super::sender::serve_connect(stream, inc, req, ctx)).await,
                Some(Action::Accept) => Box::pin(super::sender::serve_accept(stream, inc, req, ctx)).await,
                Some(Action::Request) => Box::pin(super::http::serve_rendezvous(stream, inc, req, ctx)).await,
                None => respond(&mut stream, 400, "Missing sb-hc-action", "").await,
            }
        }
        Target::Plain(p) => Box::pin(super::mgmt::serve(stream, inc, p, ctx)).await,
    }
}

/// Waits out the auth-failure delay of the request's source address, if any.
async fn delay_if_failing(inc: &Incoming, ctx: &Ctx) {
    let delay = ctx.throttle.delay(inc.peer.ip());
    if !delay.is_zero() {
        tracing::debug!(peer = %inc.peer, delay_ms = delay.as_millis() as u64, "delaying a request after repeated auth failures");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.shutdown.cancelled() => {}
        }
    }
}

/// Writes a complete response (description in the reason phrase and the body) and closes.
pub(crate) async fn respond(stream: &mut Stream, status: u16, reason: &str, body: &str) {
    let body = if body.is_empty() { reason } else { body };
    let bytes = handshake::response(status, reason, "text/plain; charset=utf-8", body.as_bytes());
    send_and_close(stream, &bytes).await;
}

/// The 403 for a rendezvous address without its secret, or (`known_form`) one that names
/// no waiting rendezvous: invalid, expired or already used (single use, hc-protocol.md §3.1).
pub(crate) async fn refuse_rendezvous(stream: &mut Stream, known_form: bool) {
    let why = if known_form {
        "The rendezvous address is invalid, expired or already used."
    } else {
        "The rendezvous address is invalid."
    };
    respond(stream, 403, why, "").await
}

/// Writes `bytes` and flushes within 5 s, then closes lingering
/// ([`crate::transport::stream::linger_close`]: at most 16 MiB, 5 s — curl sends a whole
/// body before it reads) so that closing with unread request bytes does not reset the
/// connection before the client has read the answer (issue 12 item 6).
pub(crate) async fn send_and_close(stream: &mut Stream, bytes: &[u8]) {
    let sent = tokio::time::timeout(Duration::from_secs(5), write_flush(stream, bytes)).await;
    if matches!(sent, Ok(Ok(()))) {
        crate::transport::stream::linger_close(stream, Duration::from_secs(5), 16 << 20).await;
    }
}

/// `msg` with Azure's tracking suffix when the client sent an id.
pub(crate) fn describe(msg: &str, tracking: Option<&str>) -> String {
    match tracking {
        Some(id) => format!("{msg} TrackingId:{}", handshake::sanitize_header_value(id)),
        None => msg.to_owned(),
    }
}

/// Writes and flushes.
pub(crate) async fn write_flush(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    /// Every connection's task is spawned, moved and changes stage with its whole future
    /// copied each time: the handlers (the largest, a sender's connect, 3.3 KiB) and the TLS
    /// handshake (2 KiB) are boxed, so the task does not carry them (4,768 bytes before).
    #[test]
    fn a_connection_task_does_not_carry_its_handler() {
        crate::test_support::assert_future_at_most(&super::serve, 2304, "a relay connection");
    }
}
