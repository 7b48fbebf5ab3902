//! HTTP bodies carried as WebSocket messages (HTTP mode, hc-protocol.md §6), shared by the
//! relay and the hcm: a body is ONE binary message, possibly fragmented into many frames,
//! streamed frame by frame and never buffered whole.
//!
//! - [`write_body_message`] sends a hyper body as one message (first frame Binary, then
//!   Continuation frames, FIN on the last one).
//! - [`pump_message`] reads one data message frame by frame into a [`ChannelBody`], the
//!   bounded-channel body hyper then sends on; the channel's capacity is the only buffer.
//! - [`Rewind`] replays bytes already read in front of a stream, so hyper can take over a
//!   connection whose head another parser has read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::ws::{WsError, WsReader, WsWriter};
use crate::proto::frame::{Item, OpCode};

/// Chunks of a streamed body queued between its reader and hyper. Default: 8 (each at
/// most one frame's payload, so a few hundred KiB at worst).
pub const CHANNEL_CHUNKS: usize = 8;

/// Largest frame written for a streamed body. Default: 64 KiB (what .NET uses).
pub const WRITE_FRAME: usize = 64 * 1024;

/// One way moving a body between HTTP and a WebSocket message can fail.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the WebSocket failed.
    #[error("reading the body message: {0}")]
    Read(#[from] WsError),
    /// Writing the WebSocket failed.
    #[error("writing the body message: {0}")]
    Write(io::Error),
    /// The peer closed, or sent a Close or a text message, in the middle of the body.
    #[error("the body message ended early: {0}")]
    Truncated(&'static str),
    /// No frame for the idle timeout.
    #[error("no body data for {0:?}")]
    Idle(Duration),
    /// More bytes than the configured limit.
    #[error("the body exceeds {0} bytes")]
    TooLarge(u64),
    /// The HTTP side failed (the client went away, bad chunked encoding, …).
    #[error("the HTTP body failed: {0}")]
    Http(String),
    /// Whoever consumed the body is gone.
    #[error("the body's consumer went away")]
    Gone,
}

/// A hyper body fed through a bounded channel by a task that reads it from elsewhere.
/// An `Err` on the channel aborts the body (hyper then aborts the message).
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BodyError>>,
}

/// A sender and the body it feeds.
pub fn channel() -> (mpsc::Sender<Result<Bytes, BodyError>>, ChannelBody) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// A body relayed by hyrelay: none, one buffer, or a stream.
#[derive(Debug)]
pub enum RelayBody {
    Empty,
    Full(Option<Bytes>),
    Stream(ChannelBody),
}

impl RelayBody {
    /// A whole body (empty buffers become [`RelayBody::Empty`]).
    pub fn full(b: Bytes) -> Self {
        if b.is_empty() { Self::Empty } else { Self::Full(Some(b)) }
    }
}

impl From<String> for RelayBody {
    fn from(s: String) -> Self {
        Self::full(Bytes::from(s))
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RelayBody::Empty => Poll::Ready(None),
            RelayBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RelayBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Empty => true,
            RelayBody::Full(b) => b.is_none(),
            RelayBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Empty => SizeHint::with_exact(0),
            RelayBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RelayBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Sends `prefix` and then `rest` as ONE binary message of at most `limit` bytes; each
/// wait for the next piece of `rest`, and each frame written (a peer that stops reading),
/// is bounded by `idle`. Returns the bytes sent. On error the message is left unfinished:
/// the caller closes the connection.
pub async fn write_body_message<W, B>(
    w: &mut WsWriter<W>,
    prefix: Bytes,
    mut rest: Option<B>,
    limit: u64,
    idle: Duration,
) -> Result<u64, BodyError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = FrameOut {
        opcode: OpCode::Binary,
        sent: 0,
        limit,
        idle,
    };
    out.write(w, prefix).await?;
    while let Some(body) = rest.as_mut() {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| BodyError::Idle(idle))?;
        match frame {
            None => break,
            Some(Err(e)) => return Err(BodyError::Http(e.to_string())),
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    out.write(w, data).await?;
                }
            }
        }
    }
    send_within(w, true, out.opcode, b"", idle).await?;
    Ok(out.sent)
}

/// The frames of one message being written: Binary first, Continuation after.
struct FrameOut {
    opcode: OpCode,
    sent: u64,
    limit: u64,
    /// Longest wait for one frame to be written.
    idle: Duration,
}

/// One frame written within `idle`; a peer that does not read for that long is an error.
async fn send_within<W: AsyncWrite + Unpin>(
    w: &mut WsWriter<W>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    idle: Duration,
) -> Result<(), BodyError> {
    match tokio::time::timeout(idle, w.send(fin, opcode, payload)).await {
        Ok(r) => r.map_err(BodyError::Write),
        Err(_) => Err(BodyError::Write(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer read nothing for {idle:?}"),
        ))),
    }
}

impl FrameOut {
    async fn write<W: AsyncWrite + Unpin>(&mut self, w: &mut WsWriter<W>, mut data: Bytes) -> Result<(), BodyError> {
        if self.sent + data.len() as u64 > self.limit {
            return Err(BodyError::TooLarge(self.limit));
        }
        self.sent += data.len() as u64;
        while data.has_remaining() {
            let piece = data.split_to(data.len().min(WRITE_FRAME));
            send_within(w, false, self.opcode, &piece, self.idle).await?;
            self.opcode = OpCode::Continuation;
        }
        Ok(())
    }
}

/// Reads ONE data message frame by frame and forwards its payload to `tx`, at most
/// `limit` bytes, each frame within `idle`. Control frames in between are skipped (the
/// rendezvous is short-lived; its peer's keepalive does not need answers). Returns the
/// bytes forwarded. On error the error is also sent to `tx`, so the body aborts.
pub async fn pump_message<R: AsyncRead + Unpin>(
    r: &mut WsReader<R>,
    tx: &mpsc::Sender<Result<Bytes, BodyError>>,
    limit: u64,
    idle: Duration,
) -> Result<u64, BodyError> {
    let result = pump(r, tx, limit, idle).await;
    if let Err(e) = &result
        && !matches!(e, BodyError::Gone)
    {
        tx.send(Err(BodyError::Truncated("the relay connection failed")))
            .await
            .ok();
    }
    result
}

async fn pump<R: AsyncRead + Unpin>(
    r: &mut WsReader<R>,
    tx: &mpsc::Sender<Result<Bytes, BodyError>>,
    limit: u64,
    idle: Duration,
) -> Result<u64, BodyError> {
    let mut got = 0u64;
    loop {
        let item = tokio::time::timeout(idle, r.next_item())
            .await
            .map_err(|_| BodyError::Idle(idle))??;
        match item {
            None => return Err(BodyError::Truncated("connection closed")),
            Some(Item::Control {
                opcode: OpCode::Close, ..
            }) => return Err(BodyError::Truncated("close frame")),
            Some(Item::Control { .. }) => {}
            Some(Item::Data(chunk)) => {
                if chunk.first && chunk.opcode == OpCode::Text {
                    return Err(BodyError::Truncated("text message instead of a body"));
                }
                got += chunk.payload.len() as u64;
                if got > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                let end = chunk.fin && chunk.last;
                if !chunk.payload.is_empty() {
                    tx.send(Ok(chunk.payload.freeze())).await.map_err(|_| BodyError::Gone)?;
                }
                if end {
                    return Ok(got);
                }
            }
        }
    }
}

/// A stream with bytes already read from it replayed first.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The stream and any replay bytes not consumed yet.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::Role;
    use bytes::BytesMut;

    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_the_body_within_the_idle_time() {
        // 4 KiB of room and nobody reading the other end.
        let (a, _b) = tokio::io::duplex(4096);
        let mut w = WsWriter::new(a, Role::Server);
        let body = Chunks(vec![Bytes::from(vec![7u8; 1 << 20])].into());
        let idle = Duration::from_millis(200);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            write_body_message(&mut w, Bytes::new(), Some(body), 1 << 30, idle),
        )
        .await
        .expect("a stalled write gives up, it does not hang");
        match r {
            Err(BodyError::Write(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_body_crosses_as_one_fragmented_message() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = WsWriter::new(a, Role::Server);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let body = Chunks(data.chunks(70_000).map(Bytes::copy_from_slice).collect());
        let idle = Duration::from_secs(5);
        let sent = write_body_message(&mut w, Bytes::from_static(b"pre"), Some(body), 1 << 20, idle)
            .await
            .unwrap();
        assert_eq!(sent, 200_003);
        let mut r = WsReader::new(b, BytesMut::new(), Role::Client, 1 << 20);
        let (tx, mut rx) = mpsc::channel(64);
        let got = pump_message(&mut r, &tx, 1 << 20, idle).await.unwrap();
        assert_eq!(got, 200_003);
        drop(tx);
        let mut all = Vec::new();
        while let Some(c) = rx.recv().await {
            all.extend_from_slice(&c.unwrap());
        }
        assert_eq!(&all[..3], b"pre");
        assert!(all[3..] == data[..]);
    }

    #[tokio::test]
    async fn limits_and_truncation_are_errors() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = WsWriter::new(a, Role::Server);
        let idle = Duration::from_secs(5);
        let none: Option<RelayBody> = None;
        let e = write_body_message(&mut w, Bytes::from(vec![1u8; 100]), none, 10, idle).await;
        assert!(matches!(e, Err(BodyError::TooLarge(10))));
        // A message cut by a Close frame.
        w.send(false, OpCode::Binary, b"abc").await.unwrap();
        w.send_close(1000, "").await.unwrap();
        let mut r = WsReader::new(b, BytesMut::new(), Role::Client, 1 << 20);
        let (tx, mut rx) = mpsc::channel(8);
        let e = pump_message(&mut r, &tx, 1 << 20, idle).await;
        assert!(matches!(e, Err(BodyError::Truncated(_))), "{e:?}");
        assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"abc");
        assert!(rx.recv().await.unwrap().is_err(), "the body aborts");
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    /// A body that yields the given chunks, one per poll.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }
}
