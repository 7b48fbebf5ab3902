//! A joined tunnel: frames relayed between the sender's and the listener's WebSockets
//! (hc-protocol.md §5.5).
//!
//! Each direction is a pump that unmasks the incoming client frames and re-sends them
//! unmasked, streaming payload chunks as they arrive (a frame is never buffered whole).
//! Message boundaries, opcodes and FIN bits are kept; pings and pongs pass through, so the
//! two ends see each other's keep-alives.
//!
//! Close is forwarded, not answered: a Close from one side goes to the other, whose own
//! Close later comes back the same way. That gives half-close semantics (one side may keep
//! sending after the other said it is done). A side that vanishes without a Close gets
//! 1001 sent to the survivor; the survivor then has a few seconds to answer.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::proto::frame::{Item, OpCode, Role, close_code};
use crate::transport::Stream;
use crate::transport::ws::{WsReader, WsWriter};

/// How long the surviving side gets to answer after its peer vanished. Default: 5 s.
const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// Byte counts and how the tunnel ended.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Payload bytes sender → listener.
    pub up: u64,
    /// Payload bytes listener → sender.
    pub down: u64,
    pub end: String,
}

/// How one pump ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PumpEnd {
    /// A Close was forwarded.
    Closed,
    /// The source ended without Close; 1001 was sent on.
    Vanished,
    /// The source broke the protocol; 1001 was sent on.
    ProtocolError(String),
    /// Writing to the destination failed.
    WriteFailed,
    /// Stopped by entity deletion or shutdown; 1001 was sent on.
    Stopped,
}

impl PumpEnd {
    fn abnormal(&self) -> bool {
        !matches!(self, PumpEnd::Closed)
    }
}

/// Relays until both sides have closed, one side failed and the other had its grace, or
/// `gone`/`shutdown` fires.
pub async fn run(
    sender: (Stream, BytesMut),
    listener: (Stream, BytesMut),
    max_frame: u64,
    gone: &CancellationToken,
    shutdown: &CancellationToken,
) -> TunnelStats {
    let stop = CancellationToken::new();
    let (sr, sw) = tokio::io::split(sender.0);
    let (lr, lw) = tokio::io::split(listener.0);
    let mut s_reader = WsReader::new(sr, sender.1, Role::Server, max_frame);
    let mut l_reader = WsReader::new(lr, listener.1, Role::Server, max_frame);
    let mut s_writer = WsWriter::new(sw, Role::Server);
    let mut l_writer = WsWriter::new(lw, Role::Server);
    let mut stats = TunnelStats::default();
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    {
        let up = pump(&mut s_reader, &mut l_writer, &stop, &mut up_bytes);
        let down = pump(&mut l_reader, &mut s_writer, &stop, &mut down_bytes);
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (None, None);
        let mut deadline: Option<tokio::time::Instant> = None;
        while up_end.is_none() || down_end.is_none() {
            tokio::select! {
                e = &mut up, if up_end.is_none() => {
                    if e.abnormal() { deadline.get_or_insert(tokio::time::Instant::now() + ABANDON_GRACE); }
                    up_end = Some(e);
                }
                e = &mut down, if down_end.is_none() => {
                    if e.abnormal() { deadline.get_or_insert(tokio::time::Instant::now() + ABANDON_GRACE); }
                    down_end = Some(e);
                }
                _ = sleep_until_opt(deadline) => break,
                _ = gone.cancelled(), if !stop.is_cancelled() => {
                    stop.cancel();
                    deadline.get_or_insert(tokio::time::Instant::now() + ABANDON_GRACE);
                }
                _ = shutdown.cancelled(), if !stop.is_cancelled() => {
                    stop.cancel();
                    deadline.get_or_insert(tokio::time::Instant::now() + ABANDON_GRACE);
                }
            }
        }
        stats.end = format!("up: {up_end:?}, down: {down_end:?}");
    }
    stats.up = up_bytes;
    stats.down = down_bytes;
    // Best effort: TLS close_notify and FIN on both legs.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = s_writer.get_mut().shutdown().await;
        let _ = l_writer.get_mut().shutdown().await;
    })
    .await;
    stats
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Moves frames from `from` to `to` until a Close passes or something fails.
async fn pump<R, W>(from: &mut WsReader<R>, to: &mut WsWriter<W>, stop: &CancellationToken, bytes: &mut u64) -> PumpEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                to.send_close(close_code::GOING_AWAY, "The hybrid connection was deleted or the relay is shutting down.").await.ok();
                return PumpEnd::Stopped;
            }
            // Cancel-safe: the reader keeps partial frames in its own buffer.
            i = from.next_item() => i,
        };
        let written = match item {
            Ok(Some(Item::Data(chunk))) => {
                *bytes += chunk.payload.len() as u64;
                let w = if chunk.first {
                    to.write_unmasked(chunk.fin, chunk.opcode, chunk.frame_len, &chunk.payload).await
                } else {
                    to.get_mut().write_all(&chunk.payload).await
                };
                match w {
                    Ok(()) if !from.has_buffered() => to.flush().await,
                    other => other,
                }
            }
            Ok(Some(Item::Control { opcode, payload })) => {
                if opcode == OpCode::Close {
                    if crate::proto::frame::parse_close(&payload).is_err() {
                        to.send_close(close_code::GOING_AWAY, "The peer sent an invalid close frame.").await.ok();
                        return PumpEnd::ProtocolError("invalid close frame".into());
                    }
                    let w = to.write_unmasked(true, opcode, payload.len() as u64, &payload).await;
                    let _ = to.flush().await;
                    return if w.is_ok() { PumpEnd::Closed } else { PumpEnd::WriteFailed };
                }
                let w = to.write_unmasked(true, opcode, payload.len() as u64, &payload).await;
                match w {
                    Ok(()) => to.flush().await,
                    e => e,
                }
            }
            Ok(None) | Err(crate::transport::ws::WsError::UnexpectedEof) | Err(crate::transport::ws::WsError::Io(_)) => {
                to.send_close(close_code::GOING_AWAY, "The peer went away.").await.ok();
                return PumpEnd::Vanished;
            }
            Err(e) => {
                to.send_close(close_code::GOING_AWAY, "The peer broke the WebSocket protocol.").await.ok();
                return PumpEnd::ProtocolError(e.to_string());
            }
        };
        if written.is_err() {
            return PumpEnd::WriteFailed;
        }
    }
}
