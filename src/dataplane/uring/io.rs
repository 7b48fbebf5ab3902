//! Socket halves of the completion backend as poll-style state machines, so the engines
//! can be written like their epoll twins (one future per tunnel polling both directions).
//!
//! An operation, once submitted, owns its buffer until the kernel completes it; its future
//! is kept across polls and never dropped while the tunnel runs (dropping it would cancel
//! the operation and could lose bytes already read). Each reader and writer clones the
//! socket handle (a shared descriptor), so no future borrows the tunnel.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use compio::BufResult;
use compio::buf::{IntoInner, IoBuf, IoVectoredBuf, Slice};
use compio::driver::op::{SendFlags, SendVectored};
use compio::driver::{BufferRef, SharedFd, ToSharedFd};
use compio::io::{AsyncRead, AsyncReadManaged};
use compio::net::TcpStream;

use super::bufs::{Chunk, Out, RingBuf};
use crate::dataplane::io::{STASH_LEN, Stash};
use crate::dataplane::pool::{self, BUF_SIZE};
use crate::transport::tls_session::{Record, TlsSession};

type Fut<T> = Pin<Box<dyn Future<Output = T>>>;

enum ReadOp {
    Idle,
    /// Waiting for data with no buffer: the kernel picks one from the ring when data
    /// arrives, on the reader's multishot receive ([`Reader::multi`]; Linux).
    #[cfg(target_os = "linux")]
    Multi,
    /// The same with a one-shot receive (a TLS leg, and on IOCP).
    Managed(Fut<io::Result<Option<BufferRef>>>),
    /// The ring was empty: waiting, with no buffer, until the socket is readable.
    Readable(Fut<io::Result<()>>),
    /// Readable, and the ring was empty: waiting for a pool buffer.
    WaitPool,
    /// Reading into a buffer we hold.
    Plain(Fut<BufResult<usize, Slice<Chunk>>>),
}

/// A multishot receive into the worker's buffer ring: armed once, it completes with a
/// ring buffer each time data arrives until it ends (EOF, an error, or the ring running
/// empty), so a stream of reads costs one submission rather than one each.
#[cfg(target_os = "linux")]
type MultiRecv = Pin<Box<dyn futures_util::Stream<Item = io::Result<Option<BufferRef>>>>>;

/// The read side of a socket.
pub struct Reader {
    sock: TcpStream,
    op: ReadOp,
    /// The armed multishot receive, if any. Never armed while a read into a buffer of ours
    /// (`ReadOp::Plain`) is in flight: the two would race for the socket's bytes. It ends
    /// itself when the ring runs empty, which is what leads to such a read.
    #[cfg(target_os = "linux")]
    multi: Option<MultiRecv>,
    /// False for a TLS leg: its reads continue a partial record (up to 16 KiB) in the
    /// buffer they hold, which an armed multishot receive would race, so each ring read is
    /// a one-shot receive.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    multishot: bool,
    /// Bytes kept from the last read (a partial frame header or control frame) while the
    /// next read waits without a buffer; they go in front of what it brings.
    stash: Stash,
    /// Our place in line for a pool buffer while the ring is empty and the budget spent.
    acquire: pool::Acquire,
}

impl Reader {
    pub fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            op: ReadOp::Idle,
            #[cfg(target_os = "linux")]
            multi: None,
            multishot: true,
            stash: Stash::default(),
            acquire: pool::Acquire::default(),
        }
    }

    /// Reads more bytes. With `held` set (bytes kept from the last read), the new bytes
    /// come after them; a few kept bytes wait in a stash rather than in a buffer, so the
    /// read holds no buffer until data arrives (the kernel picks a ring buffer then). The
    /// buffer is in `held` again once this is ready; `Ok(0)` is EOF.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, held: &mut Option<Chunk>) -> Poll<io::Result<usize>> {
        loop {
            match &mut self.op {
                ReadOp::Idle => match held.take() {
                    Some(c) if self.stash.keep(&c) => {
                        drop(c);
                        self.start_managed();
                    }
                    Some(c) => self.start_plain(c),
                    None => self.start_managed(),
                },
                #[cfg(target_os = "linux")]
                ReadOp::Multi => {
                    let multi = match &mut self.multi {
                        Some(m) => m,
                        None => self.multi.insert(arm_multi(&self.sock)?),
                    };
                    let r = ready!(multi.as_mut().poll_next(cx));
                    self.op = ReadOp::Idle;
                    match r {
                        Some(Ok(Some(b))) if !b.is_empty() => return Poll::Ready(Ok(self.ring_chunk(b, held))),
                        // EOF.
                        Some(Ok(_)) => {
                            self.multi = None;
                            self.stash = Stash::default();
                            return Poll::Ready(Ok(0));
                        }
                        // The ring is empty (which ends the receive): wait for data
                        // without a buffer, then read into a pool buffer.
                        Some(Err(e)) if ring_empty(&e) => {
                            self.multi = None;
                            self.start_readable();
                        }
                        Some(Err(e)) => {
                            self.multi = None;
                            return Poll::Ready(Err(e));
                        }
                        // The kernel ended the receive without a result: arm it again.
                        None => {
                            self.multi = None;
                            self.op = ReadOp::Multi;
                        }
                    }
                }
                ReadOp::Managed(f) => {
                    let r = ready!(f.as_mut().poll(cx));
                    self.op = ReadOp::Idle;
                    match r {
                        Ok(Some(b)) => return Poll::Ready(Ok(self.ring_chunk(b, held))),
                        Ok(None) => {
                            self.stash = Stash::default();
                            return Poll::Ready(Ok(0));
                        }
                        // The kernel may refuse before any data is there: wait for data
                        // first, so that no pool buffer waits on an idle socket.
                        Err(e) if ring_empty(&e) => self.start_readable(),
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                ReadOp::Readable(f) => {
                    let r = ready!(f.as_mut().poll(cx));
                    self.op = ReadOp::Idle;
                    r?;
                    self.op = ReadOp::WaitPool;
                }
                ReadOp::WaitPool => {
                    let mut c = Chunk::pool(ready!(self.acquire.poll(cx)));
                    c.prepend(self.stash.as_slice());
                    self.stash = Stash::default();
                    self.start_plain(c);
                }
                ReadOp::Plain(f) => {
                    let BufResult(r, slice) = ready!(f.as_mut().poll(cx));
                    self.op = ReadOp::Idle;
                    *held = Some(slice.into_inner());
                    return Poll::Ready(r);
                }
            }
        }
    }

    /// Reads with one-shot receives only (a TLS leg: see `multishot`).
    pub fn one_shot(mut self) -> Self {
        self.multishot = false;
        self
    }

    /// A read into a ring buffer, leaving room in it for the stash.
    fn start_managed(&mut self) {
        #[cfg(target_os = "linux")]
        if self.multishot {
            self.op = ReadOp::Multi;
            return;
        }
        let s = self.sock.clone();
        self.op = ReadOp::Managed(Box::pin(async move {
            let mut r = &s;
            r.read_managed(RING_READ).await
        }));
    }

    /// The ring buffer `b` as the read's result, after the stashed bytes.
    fn ring_chunk(&mut self, b: BufferRef, held: &mut Option<Chunk>) -> usize {
        let n = b.len();
        let mut c = Chunk::Ring(RingBuf::new(b));
        c.prepend(self.stash.as_slice());
        self.stash = Stash::default();
        *held = Some(c);
        n
    }

    fn start_readable(&mut self) {
        let fd = self.sock.to_shared_fd();
        self.op = ReadOp::Readable(Box::pin(async move {
            let op = compio::driver::op::PollOnce::new(fd, compio::driver::op::Interest::Readable);
            compio::runtime::submit(op).await.0.map(drop)
        }));
    }

    fn start_plain(&mut self, c: Chunk) {
        // The two would race for the socket's bytes (see `multi`): a plain leg keeps at
        // most a stash's worth, and a TLS leg never arms the multishot receive.
        #[cfg(target_os = "linux")]
        debug_assert!(
            self.multi.is_none(),
            "a read into our buffer with the multishot receive armed"
        );
        let s = self.sock.clone();
        let at = c.buf_len();
        let slice = c.slice(at..);
        self.op = ReadOp::Plain(Box::pin(async move {
            let mut r = &s;
            r.read(slice).await
        }));
    }
}

/// The most bytes a ring read takes: room is left for the stash in front.
const RING_READ: usize = BUF_SIZE - STASH_LEN;

/// Arms a multishot receive on `sock` into the worker's buffer ring.
#[cfg(target_os = "linux")]
fn arm_multi(sock: &TcpStream) -> io::Result<MultiRecv> {
    use compio::driver::op::{RecvFlags, RecvMulti};
    let rt = compio::runtime::Runtime::current();
    let pool = rt.buffer_pool()?;
    let op = RecvMulti::new(sock.to_shared_fd(), &pool, RING_READ, RecvFlags::empty())?;
    Ok(Box::pin(rt.submit_multi(op).into_managed(pool)))
}

/// The ring had no buffer for a read (`ENOBUFS`).
fn ring_empty(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ResourceBusy || e.raw_os_error() == Some(ENOBUFS)
}

#[cfg(unix)]
const ENOBUFS: i32 = libc::ENOBUFS;
#[cfg(not(unix))]
const ENOBUFS: i32 = 10055; // WSAENOBUFS

/// A send of an [`Out`] as submitted to the driver.
type Send = compio::runtime::Submit<SendVectored<Out, SharedFd<socket2::Socket>>>;

/// A peer that went away is an error of the send, not a SIGPIPE (as compio's own sends).
#[cfg(target_os = "linux")]
const SEND_FLAGS: SendFlags = SendFlags::NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: SendFlags = SendFlags::empty();

/// A send slot: the send in flight (`Some` inside), allocated at the first write and
/// reused by every later one, so a send costs no boxed future of its own. Freeing it after
/// each send instead would take 0.24 KiB off each idle tunnel in each process, but cost the
/// busy gateway 2–7 % more CPU per request (five paired runs, 2026-12-05).
type SendSlot = Option<Pin<Box<Option<Send>>>>;

/// The write side of a socket.
pub struct Writer {
    sock: TcpStream,
    send: SendSlot,
    /// TLS: the caller's output is sealed, its records written or being written.
    took: bool,
}

impl Writer {
    pub fn new(sock: TcpStream) -> Self {
        Self {
            sock,
            send: None,
            took: false,
        }
    }

    /// Writes all of `out`: as it is, or on a TLS leg (`tls`) sealed into records after
    /// whatever the session had queued (a key update, an alert). A plain `out` is taken
    /// from the slot while the kernel has it and put back when this is ready, whether it
    /// succeeded or not; a sealed one stays in the slot (the records are a copy).
    pub fn poll_write_all(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Option<Out>,
        tls: Option<&mut TlsSession>,
    ) -> Poll<io::Result<()>> {
        let Some(tls) = tls else {
            return poll_send(&self.sock, &mut self.send, cx, out);
        };
        if !self.took {
            if let Some(o) = out.as_ref() {
                let want = o.remaining();
                tls.reserve(want);
                if tls.seal_slices(o.iter_slice(), usize::MAX)? < want {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the TLS session takes no more data (closed, or its key worn out)",
                    )));
                }
            }
            self.took = true;
        }
        let r = ready!(self.poll_flush_tls(cx, tls));
        self.took = false;
        Poll::Ready(r)
    }

    /// Writes the records `tls` has queued (each buffer is freed once written). A send in
    /// flight owns its records; finished, they are dropped here.
    pub fn poll_flush_tls(&mut self, cx: &mut Context<'_>, tls: &mut TlsSession) -> Poll<io::Result<()>> {
        loop {
            let mut records = None;
            if !self.send.as_ref().is_some_and(|s| s.is_some()) {
                let tx = tls.take_tx();
                if tx.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                records = Some(Out::vec(tx));
            }
            ready!(poll_send(&self.sock, &mut self.send, cx, &mut records))?;
        }
    }

    /// Ends our side of the connection once the writes before it completed: on a TLS leg
    /// `close_notify` (after any record still queued) first, then FIN.
    pub async fn close(&mut self, tls: Option<&mut TlsSession>) -> io::Result<()> {
        if let Some(tls) = tls {
            tls.close()?;
            std::future::poll_fn(|cx| self.poll_flush_tls(cx, tls)).await?;
        }
        self.shutdown()
    }

    /// Shuts down the write side (FIN), by a direct call: the kernel never completes an
    /// io_uring shutdown inline but hands each to an io-wq worker thread (a thread wake-up
    /// and switch per socket, 8 % of all CPU samples in the setup workload), and a TCP
    /// shutdown does not block. Call it only once the writes before it completed.
    pub fn shutdown(&self) -> io::Result<()> {
        shutdown_write(&self.sock)
    }

    /// Makes the socket's close a reset (RST) instead of a FIN.
    pub fn reset_on_close(&self) {
        crate::dataplane::splice::reset_on_close(&self.sock);
    }

    /// Closes our side ([`Writer::close`]), then reads and discards the peer's input until
    /// its EOF, `max` bytes or `limit` in all: the lingering close of
    /// [`crate::transport::stream::linger_close`], for the same reason.
    pub async fn linger_within(&mut self, tls: Option<&mut TlsSession>, limit: std::time::Duration, max: usize) {
        let s = self.sock.clone();
        let _ = compio::time::timeout(limit, async {
            self.close(tls).await?;
            let mut buf = Vec::with_capacity(4096);
            let mut left = max;
            while left > 0 {
                let mut r = &s;
                let BufResult(n, b) = r.read(buf).await;
                buf = b;
                buf.clear();
                match n? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            io::Result::Ok(())
        })
        .await;
    }
}

/// Sends all of `out` on `sock` through `slot` (taken from `out` while the kernel has it,
/// put back when this is ready, whether it succeeded or not). A send already in flight is
/// finished first, into `out`.
fn poll_send(
    sock: &TcpStream,
    slot: &mut SendSlot,
    cx: &mut Context<'_>,
    out: &mut Option<Out>,
) -> Poll<io::Result<()>> {
    loop {
        let slot = slot.get_or_insert_with(|| Box::pin(None));
        if let Some(f) = slot.as_mut().as_pin_mut() {
            let BufResult(r, mut o) = ready!(f.poll(cx)).into_inner();
            slot.set(None);
            let r = match r {
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                Ok(n) if o.advance(n) => Ok(()),
                Ok(_) => {
                    *out = Some(o);
                    continue;
                }
                Err(e) => Err(e),
            };
            *out = Some(o);
            return Poll::Ready(r);
        }
        let o = out.take().expect("output to write");
        let op = SendVectored::new(sock.to_shared_fd(), o, SEND_FLAGS);
        slot.set(Some(compio::runtime::submit(op)));
    }
}

/// The completion runtime's timer for the rules' one deadline (keep-alive, the relay's
/// grace): an entry in its worker's [`Deadlines`], not a runtime timer of its own.
#[derive(Default)]
pub struct CompioTimer {
    /// The deadline registered and its key, until this timer is ready or dropped. A task's
    /// waker never changes, so the entry wakes whichever poll comes.
    entry: Option<(Instant, u64)>,
}

impl crate::dataplane::drive::Timer for CompioTimer {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn poll_until(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        let now = self.now();
        if now >= at {
            self.cancel();
            return Poll::Ready(());
        }
        match self.entry {
            // Armed for `at` or earlier and not yet due: the entry wakes this task then (a
            // deadline moved later is re-armed when the earlier one wakes it).
            Some((armed, _)) if armed <= at && now < armed => {}
            _ => {
                self.cancel();
                self.entry = Some(DEADLINES.with(|d| d.borrow_mut().add(at, cx.waker())));
            }
        }
        Poll::Pending
    }
}

impl CompioTimer {
    fn cancel(&mut self) {
        if let Some(key) = self.entry.take() {
            // Not while the worker's thread-locals are being torn down.
            let _ = DEADLINES.try_with(|d| d.borrow_mut().due.remove(&key));
        }
    }
}

impl Drop for CompioTimer {
    fn drop(&mut self) {
        self.cancel();
    }
}

thread_local! {
    static DEADLINES: std::cell::RefCell<Deadlines> = std::cell::RefCell::default();
}

/// Every tunnel deadline of one completion worker, woken by one runtime timer set for the
/// earliest ([`drive_deadlines`]). A runtime timer per tunnel cost its boxed sleep and the
/// runtime's own entry (0.1 KiB more per idle splice in each process than an entry here,
/// measured: RESULTS, "One timer per completion worker"), and a new sleep whenever the
/// deadline moved.
#[derive(Default)]
struct Deadlines {
    due: std::collections::BTreeMap<(Instant, u64), std::task::Waker>,
    next_key: u64,
    /// The driving task, once started, and the deadline its runtime timer is set for.
    driver: Option<std::task::Waker>,
    armed: Option<Instant>,
}

impl Deadlines {
    /// Wakes `waker` at `at`; the entry's key.
    fn add(&mut self, at: Instant, waker: &std::task::Waker) -> (Instant, u64) {
        let key = (at, self.next_key);
        self.next_key += 1;
        self.due.insert(key, waker.clone());
        if self.armed.is_none_or(|armed| at < armed) {
            self.armed = Some(at);
            match &self.driver {
                Some(d) => d.wake_by_ref(),
                None => {
                    // The first deadline on this thread: its driver starts (it is woken
                    // from then on, never ends and holds no entry).
                    self.driver = Some(std::task::Waker::noop().clone());
                    compio::runtime::spawn(drive_deadlines()).detach();
                }
            }
        }
        key
    }

    /// Moves the wakers of the entries due by `now` to `out`; the earliest deadline left.
    fn take_due(&mut self, now: Instant, out: &mut Vec<std::task::Waker>) -> Option<Instant> {
        while let Some(e) = self.due.first_entry() {
            if e.key().0 > now {
                return Some(e.key().0);
            }
            out.push(e.remove());
        }
        None
    }
}

/// The task behind a worker's [`Deadlines`]: wakes what is due, then sleeps until the
/// earliest deadline left (or until an earlier one is added).
async fn drive_deadlines() {
    /// The driver gone (its runtime dropped), the next deadline starts another.
    struct Gone;
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = DEADLINES.try_with(|d| {
                let mut d = d.borrow_mut();
                d.driver = None;
                d.armed = None;
            });
        }
    }
    let _gone = Gone;
    let mut sleep: Option<(Instant, Fut<()>)> = None;
    let mut due = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            let next = DEADLINES.with(|d| {
                let mut d = d.borrow_mut();
                d.driver = Some(cx.waker().clone());
                let next = d.take_due(Instant::now(), &mut due);
                d.armed = next;
                next
            });
            // Woken outside the borrow: nothing a wake does can reach the deadlines then.
            due.drain(..).for_each(std::task::Waker::wake);
            let Some(at) = next else {
                sleep = None;
                return Poll::<()>::Pending;
            };
            if sleep.as_ref().is_none_or(|(armed, _)| *armed != at) {
                sleep = Some((at, self::sleep(at.saturating_duration_since(Instant::now()))));
            }
            let (_, fut) = sleep.as_mut().expect("set above");
            if fut.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            sleep = None;
        }
    })
    .await
}

/// Shuts down `tcp`'s write side (FIN after what is queued); a TCP shutdown never blocks.
#[cfg(unix)]
fn shutdown_write<S: std::os::fd::AsFd>(tcp: &S) -> io::Result<()> {
    socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)
}

/// See the Unix version.
#[cfg(windows)]
fn shutdown_write<S: std::os::windows::io::AsSocket>(tcp: &S) -> io::Result<()> {
    socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write)
}

/// A timer as a boxed future (the runtime's sleep is an `async fn`).
pub fn sleep(d: std::time::Duration) -> Fut<()> {
    Box::pin(compio::time::sleep(d))
}

/// The runtime's handle of a standard socket. Call on the completion worker.
pub fn adopt(s: std::net::TcpStream) -> io::Result<TcpStream> {
    TcpStream::from_std(s)
}

/// What is being written from a [`DirBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    Nothing,
    /// Runs of the read buffer; it comes back when they are out.
    Data,
    /// A control frame in a buffer of its own.
    Small,
}

/// One direction's buffers on the completion engine: the read buffer with its undecoded
/// bytes `buf[start..end]` and the runs of it to write, which a write takes while the
/// kernel has them, or a control frame.
///
/// Reading a TLS leg, the buffer also holds received bytes not yet opened,
/// `buf[end..end + cipher]`: each whole record is opened where it landed and its plaintext
/// moved down to `end` (one copy, inside the buffer), so the rules see plaintext only and
/// write their runs from this same buffer.
pub struct DirBuf {
    /// The read buffer (`io.chunk`: `None` while a read or a write owns it, or when
    /// nothing is held) and the run list (`io.runs`), kept between writes: with a frame
    /// header they are a write's output, which the kernel owns while it is written.
    io: Out,
    start: usize,
    end: usize,
    /// TLS: received bytes after `end` not yet opened (part of a record, or records left
    /// for the next fill).
    cipher: usize,
    /// A control frame to write (boxed: a few per ping period, not worth a place in every
    /// idle tunnel).
    small: Option<Box<Out>>,
    writing: Writing,
}

impl DirBuf {
    /// A direction starting with `bytes` (read past a handshake) as its input.
    pub fn new(bytes: &[u8]) -> Self {
        Self::with_cipher(bytes, &[])
    }

    /// A TLS leg's direction starting with `plain` (read past the handshakes) as its
    /// input, and `cipher` received after it and not yet opened.
    pub fn with_cipher(plain: &[u8], cipher: &[u8]) -> Self {
        let held = plain.len() + cipher.len();
        Self {
            io: Out::holding((held > 0).then(|| Chunk::heap2(plain, cipher))),
            start: 0,
            end: plain.len(),
            cipher: cipher.len(),
            small: None,
            writing: Writing::Nothing,
        }
    }

    /// True if undecoded bytes are held.
    pub fn has_bytes(&self) -> bool {
        self.io.chunk.is_some() && self.start < self.end
    }

    /// The input and the run list, for the rules' decode.
    pub fn split(&mut self) -> (&mut [u8], &mut usize, usize, &mut Vec<std::ops::Range<usize>>) {
        let buf = self.io.chunk.as_deref_mut().expect("bytes imply a buffer");
        (buf, &mut self.start, self.end, &mut self.io.runs)
    }

    /// The bytes of the last read (a direction that frames what it reads).
    pub fn read_bytes(&mut self) -> &mut [u8] {
        let buf = self.io.chunk.as_deref_mut().expect("data implies a buffer");
        &mut buf[self.start..self.end]
    }

    /// Queues a control frame to write.
    pub fn queue_small(&mut self, frame: &[u8]) {
        self.small = Some(Box::new(Out::bytes(frame)));
        self.writing = Writing::Small;
    }

    /// Queues the last read's bytes, after `head`, as one write; they are consumed.
    pub fn queue_read(&mut self, head: &[u8]) {
        assert!(self.io.chunk.is_some(), "data implies a buffer");
        self.io.runs.clear();
        self.io.runs.push(self.start..self.end);
        (self.start, self.end) = (0, 0);
        self.io.begin(head);
        self.writing = Writing::Data;
    }

    /// Writes what is queued: a control frame, or the runs the last decode left (with the
    /// buffer, which comes back afterwards if `keep` and is dropped otherwise). `Ok` once
    /// nothing is left to write.
    /// On a TLS leg (`tls`) what is written is sealed first ([`Writer::poll_write_all`]).
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut Writer,
        keep: bool,
        mut tls: Option<&mut TlsSession>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.writing {
                Writing::Small => {
                    // Unboxed for the write; boxed again only if it must wait with it.
                    let mut out = self.small.take().map(|b| *b);
                    let r = dst.poll_write_all(cx, &mut out, tls.as_deref_mut());
                    if r.is_pending() {
                        self.small = out.map(Box::new);
                        return Poll::Pending;
                    }
                    self.writing = Writing::Nothing;
                    ready!(r)?;
                }
                Writing::Data => {
                    // The write takes the buffer and the runs (a TLS leg's only while
                    // it seals them) and gives them back when it is done.
                    let mut out = Some(std::mem::take(&mut self.io));
                    let r = dst.poll_write_all(cx, &mut out, tls.as_deref_mut());
                    if let Some(o) = out {
                        self.io = o;
                    }
                    let r = ready!(r);
                    self.writing = Writing::Nothing;
                    self.io.runs.clear();
                    self.io.begin(&[]);
                    if !keep {
                        self.io.chunk = None;
                    }
                    r?;
                }
                Writing::Nothing if !self.io.runs.is_empty() => {
                    assert!(self.io.chunk.is_some(), "runs live in the buffer");
                    self.io.begin(&[]);
                    self.writing = Writing::Data;
                }
                Writing::Nothing => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Reads more input after the undecoded bytes; `Ok(n)` new bytes, 0 at EOF. Holds no
    /// buffer while waiting at a frame boundary; keeps a partial header or control frame
    /// and reads after it. On a TLS leg (`tls`) the new bytes are plaintext: records are
    /// opened first, and the socket is read only when no whole record is left; EOF is the
    /// peer's `close_notify` (a bare TCP EOF is an error).
    pub fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Reader,
        tls: Option<&mut TlsSession>,
    ) -> Poll<io::Result<usize>> {
        let Some(tls) = tls else {
            self.compact();
            let n = ready!(src.poll_read(cx, &mut self.io.chunk))?;
            self.end = self.io.chunk.as_ref().map_or(0, |b| b.len());
            if self.end == 0 {
                self.io.chunk = None; // EOF into a fresh buffer
            }
            return Poll::Ready(Ok(n));
        };
        loop {
            let n = self.open_records(tls)?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if !tls.readable()? {
                return Poll::Ready(Ok(0));
            }
            self.compact();
            let n = ready!(src.poll_read(cx, &mut self.io.chunk))?;
            let len = self.io.chunk.as_ref().map_or(0, |b| b.len());
            if n == 0 {
                tls.transport_eof(self.cipher > 0)?;
                return Poll::Ready(Ok(0));
            }
            self.cipher = len - self.end;
        }
    }

    /// Moves what is kept (undecoded plaintext and unopened bytes) to the front of the
    /// buffer, or gives the buffer back if nothing is.
    fn compact(&mut self) {
        if let Some(buf) = &mut self.io.chunk {
            let kept = self.start..self.end + self.cipher;
            if kept.is_empty() {
                self.io.chunk = None;
            } else if self.start > 0 {
                buf.keep(kept);
            }
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Opens the whole records in `buf[end..end + cipher]`, moving each one's plaintext
    /// down to `end`; returns the plaintext bytes added. An error after some plaintext is
    /// left in the session for the next fill.
    fn open_records(&mut self, tls: &mut TlsSession) -> io::Result<usize> {
        let Some(buf) = self.io.chunk.as_mut().filter(|_| self.cipher > 0) else {
            return Ok(0);
        };
        let stop = self.end + self.cipher;
        let (mut p, mut q) = (self.end, self.end);
        let mut failed = None;
        while tls.is_open() {
            match tls.open_record(&mut buf[q..stop]) {
                Ok(Record::Incomplete) => break,
                Ok(Record::Data { plain, len }) => {
                    buf.copy_within(q + plain.start..q + plain.end, p);
                    p += plain.len();
                    q += len;
                }
                Ok(Record::Consumed(len)) => q += len,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if q > p {
            buf.copy_within(q..stop, p);
        }
        let added = p - self.end;
        self.cipher = stop - q;
        self.end = p;
        buf.truncate(p + self.cipher);
        match failed {
            Some(e) if added == 0 => Err(e),
            _ => Ok(added),
        }
    }

    /// Gives the buffers back: the direction is over.
    pub fn release(&mut self) {
        self.io.chunk = None;
        (self.start, self.end, self.cipher) = (0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::drive::Timer;
    use crate::transport::tls_conn::tests::session_pair;
    use std::time::{Duration, Instant};

    #[test]
    fn a_direction_holds_its_buffer_and_runs_once() {
        // Between writes the read buffer and the run list are the next write's output,
        // not a second `Out` beside them (112 bytes of each direction of every idle
        // tunnel), and a control frame waits boxed.
        let (dir, out) = (std::mem::size_of::<DirBuf>(), std::mem::size_of::<Out>());
        assert!(
            dir <= out + 5 * std::mem::size_of::<usize>(),
            "DirBuf {dir} bytes, Out {out}"
        );
    }

    /// Feeds `wire` to a fresh reading session through a [`DirBuf`] in reads of the sizes in
    /// `cuts` (the rest in one), consuming the plaintext after each as the rules would;
    /// returns it, and how the session's read side ended.
    fn read_through(reader: &mut TlsSession, wire: &[u8], cuts: &[usize]) -> (Vec<u8>, io::Result<bool>) {
        let mut d = DirBuf::with_cipher(b"kept", &[]);
        let mut got = Vec::new();
        let mut at = 0;
        for &n in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let n = n.min(wire.len() - at);
            // A read: the new bytes after what the buffer keeps.
            d.compact();
            match &mut d.io.chunk {
                Some(Chunk::Heap(v)) => v.extend_from_slice(&wire[at..at + n]),
                None => d.io.chunk = Some(Chunk::heap(&wire[at..at + n])),
                Some(_) => unreachable!("heap buffers only here"),
            }
            d.cipher += n;
            at += n;
            let opened = d.open_records(reader);
            got.extend_from_slice(&d.io.chunk.as_deref().unwrap()[d.start..d.end]);
            d.start = d.end;
            if opened.is_err() {
                break;
            }
        }
        (got, reader.readable())
    }

    /// Records are opened where they landed and their plaintext moved down, whatever the
    /// reads cut (inside a header, inside a record, at a record's end), across key updates
    /// (the writer's key is renewed every two records) and up to `close_notify`.
    #[test]
    fn tls_records_open_in_the_read_buffer_wherever_the_reads_cut() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for cuts in [
            &[][..],
            &[1, 4, 1],
            &[3, 16_000, 400, 7],
            &[16_406],
            &[16_405, 2],
            &[30_000, 1, 1, 1],
        ] {
            let (mut w, mut r) = session_pair();
            w.sealer_mut().set_limit(2);
            w.seal_slices([&data[..20_000], &data[20_000..]].into_iter(), usize::MAX)
                .unwrap();
            w.close().unwrap();
            let wire = w.take_tx();
            let (got, end) = read_through(&mut r, &wire, cuts);
            assert_eq!(got.len(), 4 + data.len(), "cuts {cuts:?}");
            assert!(
                got[..4] == *b"kept" && got[4..] == data[..],
                "bytes differ, cuts {cuts:?}"
            );
            assert!(matches!(end, Ok(false)), "close_notify read: {end:?}");
        }
    }

    /// A record changed on the way is an error, never data, and the peer is owed a fatal
    /// alert; a TCP EOF without close_notify is an error too, not the end.
    #[test]
    fn a_tampered_tls_record_or_a_bare_eof_is_an_error() {
        let (mut w, mut r) = session_pair();
        w.seal_slices(std::iter::once(&[1u8; 100][..]), usize::MAX).unwrap();
        let mut wire = w.take_tx();
        wire[50] ^= 1;
        let (got, end) = read_through(&mut r, &wire, &[]);
        assert!(
            got == *b"kept",
            "no plaintext from a tampered record: {} bytes",
            got.len()
        );
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(!r.take_tx().is_empty(), "an alert queued for the peer");

        let (mut w, mut r) = session_pair();
        w.seal_slices(std::iter::once(&[1u8; 100][..]), usize::MAX).unwrap();
        let wire = w.take_tx();
        let (got, end) = read_through(&mut r, &wire, &[]);
        assert_eq!(got.len(), 104);
        assert!(matches!(end, Ok(true)));
        assert_eq!(r.transport_eof(false).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A deadline moved later is not reported early: the earlier entry wakes the task,
    /// which finds it not due and waits for the later one.
    #[test]
    fn a_deadline_moved_later_fires_at_the_later_one() {
        let rt = compio::runtime::Runtime::new().expect("a completion runtime");
        rt.block_on(async {
            let mut t = CompioTimer::default();
            let start = Instant::now();
            let (first, later) = (start + Duration::from_millis(30), start + Duration::from_millis(150));
            let mut polls = 0u32;
            let fired = compio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| {
                    polls += 1;
                    t.poll_until(cx, if polls == 1 { first } else { later })
                }),
            )
            .await;
            assert!(fired.is_ok(), "woken at the later deadline");
            assert!(Instant::now() >= later, "not before it");
            assert!(Instant::now() < start + Duration::from_secs(1), "not long after");
            assert!(
                polls >= 3,
                "woken once at the first deadline, then at the later: {polls}"
            );
        });
    }

    /// A worker's timers are entries under one runtime timer: each holds one entry while
    /// armed and none once ready or dropped; they fire in deadline order.
    #[test]
    fn timers_are_entries_of_their_worker_and_leave_none_behind() {
        let rt = compio::runtime::Runtime::new().expect("a completion runtime");
        rt.block_on(async {
            let entries = || DEADLINES.with(|d| d.borrow().due.len());
            let start = Instant::now();
            let mut idle: Vec<CompioTimer> = (0..100).map(|_| CompioTimer::default()).collect();
            let far = start + Duration::from_secs(60);
            std::future::poll_fn(|cx| {
                for t in &mut idle {
                    assert!(t.poll_until(cx, far).is_pending());
                }
                Poll::Ready(())
            })
            .await;
            assert_eq!(entries(), 100);
            drop(idle);
            assert_eq!(entries(), 0, "dropped timers leave no entry");
            // Three timers at once, later deadlines first: each ready at its own.
            let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let tasks: Vec<_> = [90u64, 50, 10]
                .into_iter()
                .map(|ms| {
                    let order = order.clone();
                    compio::runtime::spawn(async move {
                        let mut t = CompioTimer::default();
                        let at = start + Duration::from_millis(ms);
                        std::future::poll_fn(|cx| t.poll_until(cx, at)).await;
                        assert!(Instant::now() >= at);
                        order.borrow_mut().push(ms);
                    })
                })
                .collect();
            for t in tasks {
                compio::time::timeout(Duration::from_secs(5), t)
                    .await
                    .expect("each fires")
                    .expect("and its task ends");
            }
            assert_eq!(*order.borrow(), [10, 50, 90]);
            assert_eq!(entries(), 0, "ready timers leave no entry");
        });
    }

    /// A thread that runs a second runtime after the first is gone (its deadline driver
    /// with it) still gets its timers fired.
    #[test]
    fn timers_fire_under_a_second_runtime_on_the_same_thread() {
        for _ in 0..2 {
            let rt = compio::runtime::Runtime::new().expect("a completion runtime");
            rt.block_on(async {
                let mut t = CompioTimer::default();
                let at = Instant::now() + Duration::from_millis(20);
                let fired =
                    compio::time::timeout(Duration::from_secs(5), std::future::poll_fn(|cx| t.poll_until(cx, at)))
                        .await;
                assert!(fired.is_ok(), "the timer fired");
            });
        }
    }

    /// Polled again and again before its deadline (the polls that skip the runtime's timer
    /// tree), the timer is still woken by the runtime and ready at the deadline, not before;
    /// a deadline moved earlier is re-armed.
    #[test]
    fn the_timer_fires_at_its_deadline_however_often_it_is_polled() {
        let rt = compio::runtime::Runtime::new().expect("a completion runtime");
        rt.block_on(async {
            let mut t = CompioTimer::default();
            for (ahead, moved) in [(40, None), (400, Some(30))] {
                let start = Instant::now();
                let at = start + Duration::from_millis(ahead);
                let real = moved.map_or(at, |m| start + Duration::from_millis(m));
                let mut polls = 0u32;
                let fired = compio::time::timeout(
                    Duration::from_secs(5),
                    std::future::poll_fn(|cx| {
                        polls += 1;
                        let deadline = if polls > 3 { real } else { at };
                        let r = t.poll_until(cx, deadline);
                        if r.is_pending() && polls < 10 {
                            cx.waker().wake_by_ref();
                        }
                        r
                    }),
                )
                .await;
                assert!(fired.is_ok(), "the runtime woke the timer's task");
                assert!(Instant::now() >= real, "not before its deadline");
                assert!(Instant::now() < start + Duration::from_secs(1), "not long after");
                assert!(polls >= 10, "polled before its deadline: {polls}");
            }
        });
    }
}
