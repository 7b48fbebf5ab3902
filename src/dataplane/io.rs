//! The two halves every epoll engine direction is made of: an input buffer filled from a
//! readable source ([`InBuf`]) and runs of that buffer waiting to be written ([`Runs`]).
//!
//! It also holds the epoll engines' timer ([`TokioTimer`]).
//!
//! `InBuf` takes a pooled buffer only once its source is readable and gives it back as
//! soon as every byte in it has been used, so an idle connection holds none. A partial
//! frame header (or control frame) left at the end is moved to the front before the next
//! read; payload is never left behind, since engines stream it as it arrives. If the
//! source has nothing more yet, those few bytes move to a small [`Stash`] inside the
//! `InBuf` and the buffer goes back: a peer that stops mid-header holds no buffer.

use std::future::Future;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{self, PoolBuf};
use crate::proto::frame;
use crate::transport::Stream;

/// Most runs written by one vectored write.
pub const MAX_BATCH: usize = crate::session::wire::MAX_RUNS;

/// tokio's timer, for the rules' one deadline (keep-alive, the relay's grace). Nothing is
/// allocated until a deadline is first armed: a relay tunnel arms one only when it ends.
#[derive(Default)]
pub struct TokioTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    at: Option<std::time::Instant>,
}

impl super::drive::Timer for TokioTimer {
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    fn poll_until(&mut self, cx: &mut Context<'_>, at: std::time::Instant) -> Poll<()> {
        let at_tokio = tokio::time::Instant::from_std(at);
        let sleep = self.sleep.get_or_insert_with(|| {
            self.at = Some(at);
            Box::pin(tokio::time::sleep_until(at_tokio))
        });
        if self.at != Some(at) {
            sleep.as_mut().reset(at_tokio);
            self.at = Some(at);
        }
        sleep.as_mut().poll(cx)
    }
}

/// A read side that can wait for input without a buffer.
pub trait ReadySource {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
}

impl ReadySource for Stream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

impl ReadySource for tokio::net::TcpStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

/// A buffer holding `bytes` (handshake leftovers): from the pool if it has room, else
/// allocated outside it, since these bytes cannot wait.
pub fn preloaded(bytes: &[u8]) -> PoolBuf {
    let mut buf = match pool::try_acquire() {
        Some(b) if b.len() >= bytes.len() => b,
        _ => PoolBuf::unpooled(bytes.len().max(pool::BUF_SIZE)),
    };
    buf[..bytes.len()].copy_from_slice(bytes);
    buf
}

/// Most bytes a direction may keep between reads: a partial frame header or a partial
/// control frame (14-byte header, 125-byte payload).
pub const STASH_LEN: usize = frame::MAX_HEADER_LEN + frame::MAX_CONTROL_PAYLOAD;

/// The unused tail of a read kept without a buffer while the source is quiet. Its bytes
/// are on the heap only while it keeps some: a connection that waits holds none, and a
/// tunnel has one per reading side in each process.
#[derive(Debug, Default)]
pub struct Stash {
    bytes: Option<Box<[u8; STASH_LEN]>>,
    len: u8,
}

impl Stash {
    /// Keeps `bytes` if they fit; false (and nothing kept) if they do not.
    pub fn keep(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > STASH_LEN {
            return false;
        }
        if bytes.is_empty() {
            *self = Self::default();
            return true;
        }
        let kept = self.bytes.get_or_insert_with(|| Box::new([0; STASH_LEN]));
        kept[..bytes.len()].copy_from_slice(bytes);
        self.len = bytes.len() as u8;
        true
    }

    pub fn as_slice(&self) -> &[u8] {
        self.bytes.as_deref().map_or(&[], |b| &b[..self.len as usize])
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the kept bytes to the front of `buf` and forgets them; returns their length.
    pub fn restore(&mut self, buf: &mut [u8]) -> usize {
        let n = self.len();
        buf[..n].copy_from_slice(self.as_slice());
        *self = Self::default();
        n
    }
}

/// Input read from a source and not yet consumed: `buf[start..end]`.
#[derive(Debug, Default)]
pub struct InBuf {
    buf: Option<PoolBuf>,
    pub start: usize,
    pub end: usize,
    /// Unconsumed bytes kept without a buffer while the source is quiet.
    stash: Stash,
    /// Our place in line while the pool's budget is spent.
    acquire: pool::Acquire,
}

impl InBuf {
    /// Starts with bytes that arrived with a handshake.
    pub fn preload(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.buf = Some(preloaded(bytes));
            self.start = 0;
            self.end = bytes.len();
        }
    }

    /// True if unconsumed bytes are waiting in the buffer.
    pub fn has_bytes(&self) -> bool {
        self.start < self.end
    }

    /// True if a pooled (or preloaded) buffer is held.
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    /// The whole buffer (unconsumed bytes at `start..end`). Panics without bytes.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().expect("bytes imply a buffer")
    }

    /// The whole buffer and the consumed-up-to mark, borrowed apart, for decoding in place:
    /// `(buf, start, end)`. Panics without bytes.
    pub fn split(&mut self) -> (&mut [u8], &mut usize, usize) {
        let buf = self.buf.as_deref_mut().expect("bytes imply a buffer");
        (buf, &mut self.start, self.end)
    }

    /// The whole buffer, for writing runs out of it.
    pub fn buf(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }

    /// Gives the buffer back (the direction ended), and any place in the pool's queue.
    pub fn release(&mut self) {
        *self = Self::default();
    }

    /// The unconsumed bytes, copied out (what followed a Close: the next request or
    /// `accept` on a connection kept for another tunnel), and the buffer given back.
    pub fn take_rest(&mut self) -> bytes::BytesMut {
        let rest = match self.buf.as_deref() {
            Some(b) if self.start < self.end => bytes::BytesMut::from(&b[self.start..self.end]),
            _ => bytes::BytesMut::new(),
        };
        self.release();
        rest
    }

    /// Gives the buffer back, keeping the unconsumed bytes in the stash if they fit.
    fn park(&mut self) {
        let Some(buf) = &self.buf else { return };
        if self.stash.keep(&buf[self.start..self.end]) {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more input. `Ok(false)` on EOF. Holds no buffer while waiting for readiness
    /// or for the pool.
    pub fn poll_fill<S: ReadySource>(&mut self, cx: &mut Context<'_>, src: &mut S) -> Poll<io::Result<bool>> {
        // Keep a partial header or control frame; release the buffer when nothing is left.
        if self.start == self.end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            let (start, end) = (self.start, self.end);
            self.buf_mut().copy_within(start..end, 0);
            self.end -= start;
            self.start = 0;
        }
        if self.buf.is_none() {
            ready!(src.poll_ready(cx))?;
            let mut buf = ready!(self.acquire.poll(cx));
            self.end = self.stash.restore(&mut buf);
            self.buf = Some(buf);
        }
        let end = self.end;
        let buf = self.buf_mut();
        let mut rb = ReadBuf::new(&mut buf[end..]);
        match src.poll_read_into(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                if n == 0 {
                    self.release(); // EOF: nothing more will be decoded
                }
                Poll::Ready(Ok(n > 0))
            }
            Poll::Ready(Err(e)) => {
                self.release();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Spurious readiness, or the peer stopped mid-frame: wait without a buffer.
                self.park();
                Poll::Pending
            }
        }
    }
}

impl crate::session::wire::RunSink for Runs {
    fn has_room(&self) -> bool {
        Runs::has_room(self)
    }

    fn push(&mut self, run: Range<usize>) {
        Runs::push(self, run);
    }

    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn clear(&mut self) {
        Runs::clear(self);
    }
}

/// Runs of a buffer waiting to be written, and the progress through them.
#[derive(Debug, Default)]
pub struct Runs {
    runs: Vec<Range<usize>>,
    idx: usize,
    off: usize,
}

impl Runs {
    /// True while some run is not fully written.
    pub fn pending(&self) -> bool {
        self.idx < self.runs.len()
    }

    /// True if room is left for another run in this batch.
    pub fn has_room(&self) -> bool {
        self.runs.len() < MAX_BATCH
    }

    pub fn push(&mut self, r: Range<usize>) {
        self.runs.push(r);
    }

    pub fn clear(&mut self) {
        self.runs.clear();
        self.idx = 0;
        self.off = 0;
    }

    /// Writes as much as one vectored write takes. `Ok` after progress; check
    /// [`Runs::pending`] for more.
    pub fn poll_write<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        buf: &[u8],
    ) -> Poll<io::Result<()>> {
        let mut slices = [IoSlice::new(&[]); MAX_BATCH];
        let mut k = 0;
        for (i, r) in self.runs[self.idx..].iter().enumerate() {
            let skip = if i == 0 { self.off } else { 0 };
            slices[k] = IoSlice::new(&buf[r.start + skip..r.end]);
            k += 1;
        }
        let mut n = ready!(Pin::new(&mut *dst).poll_write_vectored(cx, &slices[..k]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        while n > 0 {
            let left = self.runs[self.idx].len() - self.off;
            if n >= left {
                n -= left;
                self.idx += 1;
                self.off = 0;
            } else {
                self.off += n;
                n = 0;
            }
        }
        if !self.pending() {
            self.clear();
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A source that hands out scripted reads: `Some(bytes)` (empty = EOF) or `None`
    /// (would block).
    struct Script(VecDeque<Option<Vec<u8>>>);

    impl ReadySource for Script {
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.0.front() {
                Some(Some(_)) => Poll::Ready(Ok(())),
                Some(None) => {
                    self.0.pop_front();
                    Poll::Pending
                }
                None => Poll::Pending,
            }
        }

        fn poll_read_into(&mut self, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            match self.0.pop_front() {
                Some(Some(b)) => {
                    buf.put_slice(&b);
                    Poll::Ready(Ok(()))
                }
                _ => Poll::Pending,
            }
        }
    }

    fn fill(input: &mut InBuf, src: &mut Script) -> Poll<io::Result<bool>> {
        input.poll_fill(&mut Context::from_waker(std::task::Waker::noop()), src)
    }

    #[test]
    fn a_peer_that_stops_mid_header_holds_no_buffer() {
        std::thread::spawn(|| {
            let mut src = Script(VecDeque::from([
                Some(vec![0x82, 0x7e, 0x01]),
                None,
                Some(vec![0x00, 7, 7]),
            ]));
            let mut input = InBuf::default();
            assert!(matches!(fill(&mut input, &mut src), Poll::Ready(Ok(true))));
            assert_eq!(pool::stats().in_use, 1);
            // The decoder would use nothing of a 3-byte header; the source goes quiet.
            assert!(fill(&mut input, &mut src).is_pending());
            assert!(!input.holds_buffer() && !input.has_bytes());
            assert_eq!(pool::stats().in_use, 0, "the buffer went back");
            // More arrives: the kept bytes come first.
            assert!(matches!(fill(&mut input, &mut src), Poll::Ready(Ok(true))));
            assert_eq!(&input.buf()[input.start..input.end], &[0x82, 0x7e, 0x01, 0x00, 7, 7]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_stash_is_on_the_heap_only_while_it_keeps_bytes() {
        // Inline, its 139 bytes were part of every reading side of every tunnel.
        assert!(
            std::mem::size_of::<Stash>() <= 16,
            "{} bytes",
            std::mem::size_of::<Stash>()
        );
        let mut s = Stash::default();
        assert!(s.keep(&[]) && s.bytes.is_none());
        assert!(
            !s.keep(&[0; STASH_LEN + 1]) && s.bytes.is_none(),
            "too long: nothing kept"
        );
        assert!(s.keep(&[0x82, 0x7e, 0x01]));
        assert_eq!(s.as_slice(), &[0x82, 0x7e, 0x01]);
        assert!(
            s.keep(&[9; STASH_LEN]) && s.len() == STASH_LEN,
            "a whole control frame fits"
        );
        let mut buf = [0u8; STASH_LEN + 4];
        assert_eq!(s.restore(&mut buf), STASH_LEN);
        assert_eq!(&buf[..STASH_LEN], &[9; STASH_LEN]);
        assert!(s.is_empty() && s.bytes.is_none(), "restored: the heap bytes went back");
    }

    #[test]
    fn eof_and_errors_give_the_buffer_back() {
        std::thread::spawn(|| {
            let mut src = Script(VecDeque::from([Some(vec![])]));
            let mut input = InBuf::default();
            assert!(matches!(fill(&mut input, &mut src), Poll::Ready(Ok(false))));
            assert!(!input.holds_buffer());
            assert_eq!(pool::stats().in_use, 0);
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn runs_survive_partial_writes() {
        let buf: Vec<u8> = (0..=255u8).collect();
        let mut runs = Runs::default();
        runs.push(10..20);
        runs.push(100..103);
        runs.push(200..256);
        // A writer that takes 7 bytes at a time.
        struct Trickle(Vec<u8>);
        impl AsyncWrite for Trickle {
            fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
                let n = b.len().min(7);
                self.0.extend_from_slice(&b[..n]);
                Poll::Ready(Ok(n))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut w = Trickle(Vec::new());
        let mut rounds = 0;
        while runs.pending() && rounds < 100 {
            std::future::poll_fn(|cx| runs.poll_write(cx, &mut w, &buf))
                .await
                .unwrap();
            rounds += 1;
        }
        let want: Vec<u8> = buf[10..20]
            .iter()
            .chain(&buf[100..103])
            .chain(&buf[200..256])
            .copied()
            .collect();
        assert_eq!(w.0, want);
        assert!(runs.has_room() && !runs.pending());
    }
}
