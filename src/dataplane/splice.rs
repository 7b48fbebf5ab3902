//! Splicing a client-side WebSocket (hcm's rendezvous, bridge's sender connection) to a
//! TCP connection, byte-exact, with half-close.
//!
//! Mapping between TCP and WebSocket ends:
//! - TCP EOF from the local side → WebSocket Close(1000); we keep reading the WebSocket.
//! - WebSocket Close from the peer → TCP shutdown(write); we keep reading TCP, and send our
//!   Close when TCP reaches EOF.
//! - The WebSocket vanishing or breaking the protocol, a TCP error, or two ping periods of
//!   silence → both ends are closed (1001 / the protocol's code).
//!
//! The two directions run as two futures in one task. The reading side hands what it owes
//! the peer (pong, close) to the writing side as [`Obligation`]s, so only one future ever
//! writes to the WebSocket. TCP → WebSocket frames are built in place: data is read into a
//! buffer after [`HEADROOM`] bytes, the header is written just before it and the payload is
//! masked in place, so every frame is one write and no payload byte is copied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proto::frame::{self, Item, OpCode, Role, close_code};
use crate::proto::mask::apply_mask;
use crate::transport::Stream;
use crate::transport::ws::{WsError, WsReader, WsWriter};

/// Bytes kept free in front of the payload for the frame header.
pub const HEADROOM: usize = frame::MAX_HEADER_LEN;
/// Largest TCP read, hence largest frame we send. Default: 64 KiB.
pub const CHUNK: usize = 64 * 1024 - HEADROOM;

/// Tunables of a splice.
#[derive(Debug, Clone)]
pub struct SpliceConfig {
    /// Ping the peer this often; two periods without any frame from it end the tunnel.
    /// Default: 30 s.
    pub ping_interval: Duration,
    /// Largest data frame accepted from the peer. Default: 1 MiB.
    pub max_frame: u64,
}

impl Default for SpliceConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            max_frame: frame::DEFAULT_MAX_FRAME,
        }
    }
}

/// How a splice ended and what it moved.
#[derive(Debug, Clone, Default)]
pub struct SpliceStats {
    /// Payload bytes WebSocket → TCP.
    pub to_tcp: u64,
    /// Payload bytes TCP → WebSocket.
    pub to_ws: u64,
    /// Close code the peer sent, if it sent one.
    pub peer_close: Option<u16>,
    /// Why the splice ended, for logs.
    pub end: String,
}

/// When the peer was last heard from; shared by the two directions (a `Send` cell).
struct LastHeard {
    base: Instant,
    millis: AtomicU64,
}

impl LastHeard {
    fn new() -> Self {
        Self { base: Instant::now(), millis: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.millis.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.base.elapsed().saturating_sub(Duration::from_millis(self.millis.load(Ordering::Relaxed)))
    }
}

/// What the reading side owes the peer.
#[derive(Debug)]
enum Obligation {
    Pong(Bytes),
    /// The peer sent Close; answer it once local TCP is done.
    PeerClosed,
    /// End now, sending Close with this code.
    Abort(u16, String),
}

/// Runs the splice to completion. `stop` ends it with Close(1001).
pub async fn ws_tcp(
    ws: Stream,
    leftover: BytesMut,
    tcp: TcpStream,
    cfg: &SpliceConfig,
    stop: &CancellationToken,
) -> SpliceStats {
    let (ws_r, ws_w) = tokio::io::split(ws);
    let (tcp_r, tcp_w) = tcp.into_split();
    let mut reader = WsReader::new(ws_r, leftover, Role::Client, cfg.max_frame);
    let mut writer = WsWriter::new(ws_w, Role::Client);
    let (tx, rx) = mpsc::channel(16);
    let last_heard = LastHeard::new();
    let done = CancellationToken::new();
    let mut stats = SpliceStats::default();
    let (inbound, outbound) = tokio::join!(
        ws_to_tcp(&mut reader, tcp_w, tx, &last_heard, &done),
        tcp_to_ws(tcp_r, &mut writer, rx, &last_heard, cfg.ping_interval, stop, &done),
    );
    stats.to_tcp = inbound.bytes;
    stats.peer_close = inbound.peer_close;
    stats.to_ws = outbound.bytes;
    stats.end = format!("{}; {}", inbound.end, outbound.end);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.get_mut().shutdown()).await;
    stats
}

struct Half {
    bytes: u64,
    peer_close: Option<u16>,
    end: String,
}

async fn ws_to_tcp<R: AsyncRead + Unpin>(
    reader: &mut WsReader<R>,
    mut tcp: tokio::net::tcp::OwnedWriteHalf,
    tx: mpsc::Sender<Obligation>,
    last_heard: &LastHeard,
    done: &CancellationToken,
) -> Half {
    let mut half = Half { bytes: 0, peer_close: None, end: String::new() };
    loop {
        let item = tokio::select! {
            _ = done.cancelled() => {
                half.end = "stopped".into();
                return half;
            }
            // Cancel-safe: partial frames stay in the reader.
            i = reader.next_item() => i,
        };
        last_heard.touch();
        match item {
            Ok(Some(Item::Data(chunk))) => {
                half.bytes += chunk.payload.len() as u64;
                if let Err(e) = tcp.write_all(&chunk.payload).await {
                    tx.send(Obligation::Abort(close_code::GOING_AWAY, "The endpoint connection failed.".into())).await.ok();
                    half.end = format!("TCP write failed: {e}");
                    return half;
                }
            }
            Ok(Some(Item::Control { opcode: OpCode::Ping, payload })) => {
                tx.send(Obligation::Pong(payload.freeze())).await.ok();
            }
            Ok(Some(Item::Control { opcode: OpCode::Pong, .. })) => {}
            Ok(Some(Item::Control { payload, .. })) => {
                let close = frame::parse_close(&payload);
                half.peer_close = close.as_ref().ok().and_then(|c| c.code);
                let _ = tcp.shutdown().await;
                match close {
                    Ok(c) => {
                        tx.send(Obligation::PeerClosed).await.ok();
                        half.end = format!("peer closed ({})", c.code.unwrap_or(1005));
                    }
                    Err(e) => {
                        tx.send(Obligation::Abort(e.close_code(), e.to_string())).await.ok();
                        half.end = format!("peer sent a bad close: {e}");
                    }
                }
                return half;
            }
            Ok(None) | Err(WsError::UnexpectedEof) | Err(WsError::Io(_)) => {
                let _ = tcp.shutdown().await;
                tx.send(Obligation::Abort(close_code::GOING_AWAY, String::new())).await.ok();
                half.end = "WebSocket connection lost".into();
                return half;
            }
            Err(e) => {
                tx.send(Obligation::Abort(e.close_code(), e.to_string())).await.ok();
                half.end = format!("WebSocket protocol error: {e}");
                return half;
            }
        }
    }
}

async fn tcp_to_ws<W: AsyncWrite + Unpin>(
    mut tcp: tokio::net::tcp::OwnedReadHalf,
    ws: &mut WsWriter<W>,
    mut rx: mpsc::Receiver<Obligation>,
    last_heard: &LastHeard,
    ping_interval: Duration,
    stop: &CancellationToken,
    done: &CancellationToken,
) -> Half {
    let mut half = Half { bytes: 0, peer_close: None, end: String::new() };
    let mut buf = vec![0u8; HEADROOM + CHUNK];
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    let mut peer_closed = false;
    let mut close_sent = false;
    let mut rx_open = true;
    let finish = |half: &mut Half, why: String| {
        half.end = why;
        done.cancel();
    };
    loop {
        tokio::select! {
            biased;
            obl = rx.recv(), if rx_open => match obl {
                Some(Obligation::Pong(p)) => {
                    if !close_sent && ws.send(true, OpCode::Pong, &p).await.is_err() {
                        finish(&mut half, "WebSocket write failed".into());
                        return half;
                    }
                }
                Some(Obligation::PeerClosed) => {
                    peer_closed = true;
                    if close_sent {
                        half.end = "closed both ways".into();
                        return half;
                    }
                }
                Some(Obligation::Abort(code, reason)) => {
                    if !close_sent && (code != close_code::GOING_AWAY || !reason.is_empty()) {
                        ws.send_close(code, &reason).await.ok();
                    }
                    finish(&mut half, "aborted".into());
                    return half;
                }
                None => rx_open = false,
            },
            n = tcp.read(&mut buf[HEADROOM..]), if !close_sent => match n {
                Ok(0) => {
                    // Local side finished sending: Close(1000). After a peer Close this is the
                    // echo and we are done; otherwise the peer may keep sending.
                    ws.send_close(close_code::NORMAL, "").await.ok();
                    close_sent = true;
                    if peer_closed || !rx_open {
                        half.end = "closed both ways".into();
                        return half;
                    }
                }
                Ok(n) => {
                    half.bytes += n as u64;
                    if let Err(e) = send_in_place(ws, &mut buf, n).await {
                        finish(&mut half, format!("WebSocket write failed: {e}"));
                        return half;
                    }
                }
                Err(e) => {
                    ws.send_close(close_code::GOING_AWAY, "The local connection failed.").await.ok();
                    finish(&mut half, format!("TCP read failed: {e}"));
                    return half;
                }
            },
            _ = ping.tick(), if !peer_closed => {
                if last_heard.silent_for() >= ping_interval * 2 {
                    finish(&mut half, "peer silent for two ping periods".into());
                    return half;
                }
                // Pings are control frames, allowed after our Close: they keep detecting a
                // dead peer while a half-closed tunnel still carries data our way.
                if ws.send(true, OpCode::Ping, b"").await.is_err() {
                    finish(&mut half, "WebSocket write failed".into());
                    return half;
                }
            }
            _ = stop.cancelled() => {
                if !close_sent {
                    ws.send_close(close_code::GOING_AWAY, "Shutting down.").await.ok();
                }
                finish(&mut half, "stopped".into());
                return half;
            }
        }
    }
}

/// Frames `buf[HEADROOM..HEADROOM + n]` in place and writes it as one binary frame.
async fn send_in_place<W: AsyncWrite + Unpin>(ws: &mut WsWriter<W>, buf: &mut [u8], n: usize) -> io::Result<()> {
    let key = ws.masks().then(rand::random::<[u8; 4]>);
    let mut hdr = [0u8; frame::MAX_HEADER_LEN];
    let h = frame::encode_header(true, OpCode::Binary, key, n as u64, &mut hdr);
    let start = HEADROOM - h;
    buf[start..HEADROOM].copy_from_slice(&hdr[..h]);
    if let Some(k) = key {
        apply_mask(&mut buf[HEADROOM..HEADROOM + n], k, 0);
    }
    let w = ws.get_mut();
    w.write_all(&buf[start..HEADROOM + n]).await?;
    w.flush().await
}
