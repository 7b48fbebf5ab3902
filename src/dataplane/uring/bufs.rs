//! Buffers of the completion backend, and owned output for vectored writes.
//!
//! A read that starts at a frame boundary asks the kernel to pick a buffer from the
//! worker's *provided-buffer ring* when data arrives (io_uring `IOSQE_BUFFER_SELECT`), so
//! a connection waiting for input holds no buffer — the same rule as the epoll pool. The
//! ring is small ([`ring_size`]): the kernel hands its buffers out in turn, so every
//! buffer in it becomes resident. When it is empty (`ENOBUFS`) the read falls back to a
//! buffer from the worker's [`pool`](crate::dataplane::pool), whose budget is the rest of
//! the worker's budget, and which parks the reader when that is spent. A read that must
//! continue a partial header or control frame reads into the buffer it already holds, as
//! the epoll engines do. On IOCP the runtime takes the "ring" buffer when the read is
//! submitted, so there an idle connection holds one.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut, Range};

use compio::buf::{IoBuf, IoBufMut, IoVectoredBuf, SetLen};
use compio::driver::BufferRef;

use crate::dataplane::pool::{BUF_SIZE, PoolBuf};
use crate::proto::frame::MAX_HEADER_LEN;

/// Most buffers in a worker's provided-buffer ring. Default: 64 (4 MiB).
pub const RING_MAX: usize = 64;

/// Buffers in the ring for a per-worker budget of `budget` bytes: half the budget, at
/// most [`RING_MAX`], a power of two (what io_uring wants), at least one.
pub fn ring_size(budget: usize) -> usize {
    let half = (budget / BUF_SIZE / 2).clamp(1, RING_MAX);
    1 << half.ilog2()
}

thread_local! {
    static RING_OUT: Cell<usize> = const { Cell::new(0) };
    static RING_LEN: Cell<usize> = const { Cell::new(0) };
}

/// Ring buffers handed out on this worker now.
pub fn ring_in_use() -> usize {
    RING_OUT.with(Cell::get)
}

/// Buffers in this worker's ring.
pub fn ring_len() -> usize {
    RING_LEN.with(Cell::get)
}

/// Records the size of this worker's ring.
pub fn set_ring_len(n: usize) {
    RING_LEN.with(|c| c.set(n));
}

/// A ring buffer, counted while it is out.
#[derive(Debug)]
pub struct RingBuf(BufferRef);

impl RingBuf {
    pub fn new(b: BufferRef) -> Self {
        RING_OUT.with(|c| c.set(c.get() + 1));
        Self(b)
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        // The BufferRef goes back to the ring when dropped right after this.
        let _ = RING_OUT.try_with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// A pool buffer with the count of its initialized bytes.
#[derive(Debug)]
pub struct PoolChunk {
    buf: PoolBuf,
    len: usize,
}

/// Bytes read from a socket: `[..len]` of whichever buffer holds them.
#[derive(Debug)]
pub enum Chunk {
    Ring(RingBuf),
    Pool(PoolChunk),
    /// Outside the budget: handshake leftovers and control frames.
    Heap(Vec<u8>),
}

impl Chunk {
    pub fn pool(buf: PoolBuf) -> Self {
        Chunk::Pool(PoolChunk { buf, len: 0 })
    }

    /// A heap buffer holding `bytes`, with room to read a full buffer after them.
    pub fn heap(bytes: &[u8]) -> Self {
        Self::heap2(bytes, &[])
    }

    /// A heap buffer holding `a` then `b`, with room to read a full buffer after them.
    pub fn heap2(a: &[u8], b: &[u8]) -> Self {
        let mut v = Vec::with_capacity((a.len() + b.len()).max(BUF_SIZE));
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        Chunk::Heap(v)
    }

    /// Keeps the first `n` initialized bytes.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(<Chunk as IoBuf>::as_init(self).len());
        // SAFETY: shrinking: the first `n` bytes are initialized.
        unsafe { self.set_len(n) };
    }

    /// Puts `head` in front of the initialized bytes. There must be room for both.
    pub fn prepend(&mut self, head: &[u8]) {
        let (n, s) = (<Chunk as IoBuf>::as_init(self).len(), head.len());
        if s == 0 {
            return;
        }
        if let Chunk::Heap(v) = self {
            v.splice(0..0, head.iter().copied());
            return;
        }
        let room = self.as_uninit();
        assert!(n + s <= room.len(), "no room to prepend {s} bytes to {n}");
        let p = room.as_mut_ptr().cast::<u8>();
        // SAFETY: `p` points to `room.len() >= n + s` bytes owned by this chunk, of which
        // the first `n` are initialized; `copy` handles the overlap of moving them up by
        // `s`, and `head` (a separate borrow) fills the first `s`. All `n + s` are then
        // initialized, which is what `set_len` requires.
        unsafe {
            std::ptr::copy(p, p.add(s), n);
            std::ptr::copy_nonoverlapping(head.as_ptr(), p, s);
            self.set_len(n + s);
        }
    }

    /// Keeps `[range]` of the initialized bytes, moved to the front.
    pub fn keep(&mut self, range: Range<usize>) {
        let n = range.len();
        <[u8]>::copy_within(self, range, 0);
        // SAFETY: shrinking: the first `n` bytes are initialized (just copied there).
        unsafe { self.set_len(n) };
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_init()
    }
}

impl DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl IoBuf for Chunk {
    fn as_init(&self) -> &[u8] {
        match self {
            Chunk::Ring(r) => &r.0,
            Chunk::Pool(p) => &p.buf[..p.len],
            Chunk::Heap(v) => v,
        }
    }
}

impl SetLen for Chunk {
    unsafe fn set_len(&mut self, len: usize) {
        match self {
            // SAFETY: forwarded under the caller's guarantee.
            Chunk::Ring(r) => unsafe { r.0.set_len(len) },
            Chunk::Pool(p) => p.len = len.min(p.buf.len()),
            // SAFETY: forwarded under the caller's guarantee.
            Chunk::Heap(v) => unsafe { v.set_len(len) },
        }
    }
}

impl IoBufMut for Chunk {
    fn as_uninit(&mut self) -> &mut [MaybeUninit<u8>] {
        match self {
            Chunk::Ring(r) => r.0.as_uninit(),
            Chunk::Pool(p) => {
                let s: &mut [u8] = &mut p.buf;
                // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and every
                // byte written through the result is a valid `u8`.
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
            }
            Chunk::Heap(v) => v.as_uninit(),
        }
    }
}

/// Owned output of one write: an optional frame header, then runs of a chunk. Between
/// writes a direction keeps its read buffer and run list in one (`DirBuf`), so that what
/// a write takes while the kernel has it is not held a second time.
#[derive(Debug, Default)]
pub struct Out {
    head: [u8; MAX_HEADER_LEN],
    head_len: u8,
    /// Bytes of the output already written.
    done: usize,
    pub chunk: Option<Chunk>,
    pub runs: Vec<Range<usize>>,
}

impl Out {
    /// `runs` of `chunk`, after `head`.
    pub fn new(head: &[u8], chunk: Chunk, runs: Vec<Range<usize>>) -> Self {
        let mut o = Self {
            chunk: Some(chunk),
            runs,
            ..Self::default()
        };
        o.begin(head);
        o
    }

    /// Nothing to write yet, holding `chunk` (a direction's read buffer).
    pub fn holding(chunk: Option<Chunk>) -> Self {
        Self {
            chunk,
            ..Self::default()
        }
    }

    /// Starts a new output of the runs, after `head`, nothing written yet.
    pub fn begin(&mut self, head: &[u8]) {
        self.head[..head.len()].copy_from_slice(head);
        self.head_len = head.len() as u8;
        self.done = 0;
    }

    /// A small frame (control frames), copied into a buffer of its own.
    pub fn bytes(frame: &[u8]) -> Self {
        Self::vec(frame.to_vec())
    }

    /// All of `v` (sealed TLS records).
    #[allow(clippy::single_range_in_vec_init)] // one run, not the range's numbers
    pub fn vec(v: Vec<u8>) -> Self {
        let n = v.len();
        Self::new(&[], Chunk::Heap(v), vec![0..n])
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.total().saturating_sub(self.done)
    }

    fn total(&self) -> usize {
        usize::from(self.head_len) + self.runs.iter().map(|r| r.len()).sum::<usize>()
    }

    /// Records `n` more bytes written; true when everything is.
    pub fn advance(&mut self, n: usize) -> bool {
        self.done += n;
        self.done >= self.total()
    }
}

impl IoVectoredBuf for Out {
    fn iter_slice(&self) -> impl Iterator<Item = &[u8]> {
        let chunk: &[u8] = self.chunk.as_deref().unwrap_or_default();
        let mut skip = self.done;
        std::iter::once(&self.head[..usize::from(self.head_len)])
            .chain(self.runs.iter().map(move |r| &chunk[r.clone()]))
            .filter_map(move |s| {
                if skip >= s.len() {
                    skip -= s.len();
                    None
                } else {
                    let out = &s[skip..];
                    skip = 0;
                    Some(out)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_a_power_of_two_within_the_budget() {
        assert_eq!(ring_size(BUF_SIZE), 1);
        assert_eq!(ring_size(6 * BUF_SIZE), 2);
        assert_eq!(ring_size(64 << 20), RING_MAX);
        assert!(ring_size(usize::MAX / 2).is_power_of_two());
    }

    #[test]
    fn out_skips_what_was_written() {
        let chunk = Chunk::heap(b"0123456789");
        let mut o = Out::new(b"HH", chunk, vec![1..3, 5..9]);
        let all: Vec<u8> = o.iter_slice().flatten().copied().collect();
        assert_eq!(all, b"HH125678");
        assert!(!o.advance(3));
        let rest: Vec<u8> = o.iter_slice().flatten().copied().collect();
        assert_eq!(rest, b"25678");
        assert!(o.advance(5));
        assert_eq!(o.iter_slice().count(), 0);
    }

    #[test]
    fn prepend_puts_bytes_in_front() {
        let mut c = Chunk::pool(crate::dataplane::pool::PoolBuf::unpooled(BUF_SIZE));
        c.prepend(b"ab");
        assert_eq!(&c[..], b"ab");
        let mut h = Chunk::heap(b"cdef");
        h.prepend(b"ab");
        assert_eq!(&h[..], b"abcdef");
    }

    #[test]
    fn keep_moves_bytes_to_the_front() {
        let mut c = Chunk::heap(b"abcdef");
        c.keep(4..6);
        assert_eq!(&c[..], b"ef");
    }
}
