//! The two halves every epoll engine direction is made of: an input buffer filled from a
//! readable source ([`InBuf`]) and runs of that buffer waiting to be written ([`Runs`]).
//!
//! `InBuf` takes a pooled buffer only once its source is readable and gives it back as
//! soon as every byte in it has been used, so an idle connection holds none. A partial
//! frame header (or control frame) left at the end is moved to the front before the next
//! read; payload is never left behind, since engines stream it as it arrives.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{self, PoolBuf};
use crate::transport::Stream;

/// Most runs written by one vectored write.
pub const MAX_BATCH: usize = 64;

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
    let waker = std::task::Waker::noop();
    let mut buf = match pool::poll_acquire(&mut Context::from_waker(waker)) {
        Poll::Ready(b) if b.len() >= bytes.len() => b,
        _ => PoolBuf::unpooled(bytes.len().max(pool::BUF_SIZE)),
    };
    buf[..bytes.len()].copy_from_slice(bytes);
    buf
}

/// Input read from a source and not yet consumed: `buf[start..end]`.
#[derive(Debug, Default)]
pub struct InBuf {
    buf: Option<PoolBuf>,
    pub start: usize,
    pub end: usize,
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

    /// True if unconsumed bytes are waiting.
    pub fn has_bytes(&self) -> bool {
        self.start < self.end
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

    /// Gives the buffer back (the direction ended).
    pub fn release(&mut self) {
        *self = Self::default();
    }

    /// Reads more input. `Ok(false)` on EOF. Holds no buffer while waiting for readiness.
    pub fn poll_fill<S: ReadySource>(&mut self, cx: &mut Context<'_>, src: &mut S) -> Poll<io::Result<bool>> {
        // Keep a partial header or control frame; release the buffer when nothing is left.
        if self.start == self.end {
            self.release();
        } else if self.start > 0 {
            let (start, end) = (self.start, self.end);
            self.buf_mut().copy_within(start..end, 0);
            self.end -= start;
            self.start = 0;
        }
        if self.buf.is_none() {
            ready!(src.poll_ready(cx))?;
            self.buf = Some(ready!(pool::poll_acquire(cx)));
        }
        let end = self.end;
        let buf = self.buf_mut();
        let mut rb = ReadBuf::new(&mut buf[end..]);
        match src.poll_read_into(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n > 0))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.end == 0 {
                    self.buf = None; // spurious readiness: wait again without a buffer
                }
                Poll::Pending
            }
        }
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
    use super::*;

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
