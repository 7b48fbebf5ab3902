//! Per-worker buffer pool with a memory budget.
//!
//! Every data-plane read goes into a [`PoolBuf`] taken from the worker's pool only once
//! the socket is readable, and the buffer goes back as soon as its bytes are written on,
//! so an idle connection holds no data buffer. The pool is thread-local: buffers are
//! taken and returned on the worker's own thread without locks.
//!
//! Budget: at most `budget / size` buffers are out at once per worker. When the budget is
//! spent, [`Acquire::poll`] queues the task; each buffer that comes back is granted to
//! the longest waiter, and only that one is woken (a burst of closing tunnels wakes each
//! waiter once, not every waiter per buffer). A grant is a reservation under the budget:
//! newcomers cannot take it, and an [`Acquire`] dropped with an unclaimed grant passes it
//! on. Freed buffers are kept for reuse, as many as were out at once in the last second
//! (at least a small reserve), and [`trim`], called by the counter flush each second,
//! releases the rest to the allocator: a worker under steady load reuses its buffers
//! (a buffer from the allocator is zeroed, 64 KiB of memset, and its malloc and free cost
//! more again), one that went quiet gives them back within two seconds.
//!
//! Invariant the engines keep with it: a direction holds a buffer only while the buffer
//! holds bytes it has yet to use (write on, or decode), never while it waits for input or
//! for a second buffer. So every buffer out is on its way back, and a spent pool delays
//! tunnels but cannot stall them (issue 9, item 2).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

/// Size of one buffer: 64 KiB (a full TLS record plus WebSocket headers fits); the unit of
/// the budget setting.
pub const BUF_SIZE: usize = crate::config::runtime::BUFFER_SIZE;
/// Default memory budget per worker. Default: 64 MiB (1024 buffers).
pub const DEFAULT_BUDGET: usize = crate::config::runtime::DEFAULT_BUDGET_PER_WORKER;
/// Freed buffers kept for reuse per worker, at least.
const RESERVE: usize = 32;

struct Pool {
    free: Vec<Box<[u8]>>,
    /// Buffers out plus grants not yet claimed.
    out: usize,
    max_out: usize,
    high_water: usize,
    /// Most buffers out at once since the last [`trim`].
    peak: usize,
    /// Freed buffers kept for reuse: the last interval's peak, at least [`RESERVE`].
    keep: usize,
    /// Waiting tasks, oldest first (dead entries are skipped when met).
    queue: VecDeque<Weak<Ticket>>,
}

/// A place in the queue of tasks waiting for a buffer.
struct Ticket {
    waker: RefCell<Waker>,
    granted: Cell<bool>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            free: Vec::new(),
            out: 0,
            max_out: DEFAULT_BUDGET / BUF_SIZE,
            high_water: 0,
            peak: 0,
            keep: RESERVE,
            queue: VecDeque::new(),
        })
    };
}

impl Pool {
    /// A buffer for a slot already counted in `out`.
    fn take_counted(&mut self) -> PoolBuf {
        self.high_water = self.high_water.max(self.out);
        self.peak = self.peak.max(self.out);
        let mem = self
            .free
            .pop()
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        PoolBuf {
            mem: Some(mem),
            pooled: true,
            _not_send: PhantomData,
        }
    }

    /// Gives back one slot of the budget: to the longest waiter if there is one.
    fn release_slot(&mut self) {
        self.out -= 1;
        while self.out < self.max_out {
            let Some(w) = self.queue.pop_front() else { break };
            if let Some(t) = w.upgrade() {
                t.granted.set(true);
                self.out += 1;
                t.waker.borrow().wake_by_ref();
            }
        }
    }

    /// Queues a waiter; drops queue entries of waiters that went away if there are many.
    fn enqueue(&mut self, t: &Rc<Ticket>) {
        if self.queue.len() >= 64 && self.queue.len().is_power_of_two() {
            self.queue.retain(|w| w.strong_count() > 0);
        }
        self.queue.push_back(Rc::downgrade(t));
    }
}

/// Sets this thread's budget in bytes (at least one buffer). Call once at worker start.
pub fn set_budget(bytes: usize) {
    POOL.with(|p| p.borrow_mut().max_out = (bytes / BUF_SIZE).max(1));
}

/// Counters of this thread's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Buffers handed out now (and granted to waiters, not yet claimed).
    pub in_use: usize,
    /// Most buffers ever out at once.
    pub high_water: usize,
    /// Buffers allowed out at once.
    pub budget: usize,
    /// Freed buffers kept for reuse.
    pub reserve: usize,
}

/// Releases the freed buffers this thread's pool keeps beyond what was out at once since
/// the last call (at least a reserve of 32). The counter flush calls it once a second.
pub fn trim() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.keep = p.peak.max(RESERVE);
        p.peak = p.out;
        let keep = p.keep;
        p.free.truncate(keep);
    });
}

/// This thread's pool counters.
pub fn stats() -> PoolStats {
    POOL.with(|p| {
        let p = p.borrow();
        PoolStats {
            in_use: p.out,
            high_water: p.high_water,
            budget: p.max_out,
            reserve: p.free.len(),
        }
    })
}

/// A buffer from this thread's pool; returns itself when dropped. Stays on its thread.
pub struct PoolBuf {
    mem: Option<Box<[u8]>>,
    pooled: bool,
    /// A buffer counts against the pool of the thread it came from.
    _not_send: PhantomData<Rc<()>>,
}

impl PoolBuf {
    /// A buffer outside the pool and its budget, for the rare bytes that cannot wait
    /// (data that arrived with a handshake). Freed to the allocator when dropped.
    pub fn unpooled(len: usize) -> Self {
        Self {
            mem: Some(vec![0u8; len].into_boxed_slice()),
            pooled: false,
            _not_send: PhantomData,
        }
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBuf({} bytes)", self.len())
    }
}

/// Takes a buffer now if the budget allows and nobody is waiting.
pub fn try_acquire() -> Option<PoolBuf> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        (p.out < p.max_out).then(|| {
            p.out += 1;
            p.take_counted()
        })
    })
}

/// One task's claim on a buffer: polled until it yields one, it keeps the task's place in
/// the queue. Keep it across polls (in the direction that wants the buffer); dropping it
/// gives up the place, or passes on a grant it did not claim.
#[derive(Default)]
pub struct Acquire {
    ticket: Option<Rc<Ticket>>,
}

impl std::fmt::Debug for Acquire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acquire")
            .field("queued", &self.ticket.is_some())
            .finish()
    }
}

impl Acquire {
    /// Takes a buffer, or waits in line for one (woken when it is granted).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<PoolBuf> {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if let Some(t) = &self.ticket {
                if t.granted.get() {
                    self.ticket = None;
                    return Poll::Ready(p.take_counted());
                }
                let mut w = t.waker.borrow_mut();
                if !w.will_wake(cx.waker()) {
                    w.clone_from(cx.waker());
                }
                return Poll::Pending;
            }
            if p.out < p.max_out {
                p.out += 1;
                return Poll::Ready(p.take_counted());
            }
            let t = Rc::new(Ticket {
                waker: RefCell::new(cx.waker().clone()),
                granted: Cell::new(false),
            });
            p.enqueue(&t);
            self.ticket = Some(t);
            Poll::Pending
        })
    }

    /// True while queued (or granted and not yet claimed).
    pub fn is_waiting(&self) -> bool {
        self.ticket.is_some()
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take()
            && t.granted.get()
        {
            let _ = POOL.try_with(|p| p.borrow_mut().release_slot());
        }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let Some(mem) = self.mem.take() else { return };
        if !self.pooled {
            return;
        }
        // `try_with`: a buffer dropped during thread teardown just goes to the allocator.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.free.len() < p.keep.max(p.peak) {
                p.free.push(mem);
            }
            p.release_slot();
        });
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.mem.as_deref().unwrap_or_default()
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.mem.as_deref_mut().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn woken(c: &Count) -> usize {
        c.0.load(Ordering::Relaxed)
    }

    /// Runs `f` on a thread of its own, so each test has a fresh pool.
    fn on_fresh_pool(budget: usize, f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            set_budget(budget * BUF_SIZE);
            f();
        })
        .join()
        .unwrap();
    }

    /// Under load a worker keeps the buffers it used for reuse, as many as were out at once;
    /// once quiet, the second trim gives them back down to the reserve.
    #[test]
    fn freed_buffers_are_kept_while_used_and_released_when_quiet() {
        on_fresh_pool(1000, || {
            let burst = |n: usize| -> Vec<*const u8> {
                let bufs: Vec<PoolBuf> = (0..n).map(|_| try_acquire().unwrap()).collect();
                bufs.iter().map(|b| b.as_ptr()).collect()
            };
            let first = burst(100);
            assert_eq!(stats().reserve, 100, "all kept while the load lasts");
            trim();
            let mut again = burst(100);
            let mut first = first;
            again.sort();
            first.sort();
            assert_eq!(again, first, "the same buffers reused, none from the allocator");
            trim();
            assert_eq!(stats().reserve, 100, "the last second's peak is kept");
            trim();
            assert_eq!(stats().reserve, RESERVE, "a quiet second later, the reserve only");
            drop(burst(10));
            assert_eq!(stats().reserve, RESERVE);
        });
    }

    #[test]
    fn budget_parks_and_release_wakes() {
        on_fresh_pool(2, || {
            let a = try_acquire().expect("first buffer");
            let b = try_acquire().expect("second buffer");
            assert_eq!(a.len(), BUF_SIZE);
            assert!(try_acquire().is_none(), "budget of two buffers");
            let (count, waker) = counter();
            let mut want = Acquire::default();
            assert!(want.poll(&mut Context::from_waker(&waker)).is_pending());
            assert_eq!(stats().in_use, 2);
            drop(a);
            assert_eq!(woken(&count), 1);
            let c = want.poll(&mut Context::from_waker(&waker));
            assert!(c.is_ready(), "granted");
            drop(b);
            let s = stats();
            assert_eq!((s.in_use, s.high_water, s.budget), (1, 2, 2));
            drop(c);
            assert_eq!(stats().in_use, 0);
        });
    }

    #[test]
    fn each_returned_buffer_wakes_one_waiter_in_order() {
        on_fresh_pool(1, || {
            let held = try_acquire().unwrap();
            let waiters: Vec<_> = (0..100).map(|_| (counter(), Acquire::default())).collect();
            let mut waiters = waiters;
            for ((_, w), a) in &mut waiters {
                assert!(a.poll(&mut Context::from_waker(w)).is_pending());
            }
            drop(held);
            let wakes: Vec<usize> = waiters.iter().map(|((c, _), _)| woken(c)).collect();
            assert_eq!(wakes.iter().sum::<usize>(), 1, "one buffer, one wake-up");
            assert_eq!(wakes[0], 1, "the longest waiter first");
            // A newcomer cannot take the granted buffer.
            assert!(try_acquire().is_none());
            // The first waiter goes away without claiming it: the grant passes on.
            let first = waiters.remove(0);
            drop(first);
            assert_eq!(woken(&waiters[0].0.0), 1);
            let ((_, w), a) = &mut waiters[0];
            let got = a.poll(&mut Context::from_waker(w));
            assert!(got.is_ready());
            drop(got);
            assert_eq!(woken(&waiters[1].0.0), 1);
            let total: usize = waiters.iter().map(|((c, _), _)| woken(c)).sum();
            assert_eq!(total, 2, "two buffers returned, two wake-ups in all");
        });
    }

    #[test]
    fn waiters_that_left_are_skipped() {
        on_fresh_pool(1, || {
            let held = try_acquire().unwrap();
            for _ in 0..1000 {
                let (_, w) = counter();
                let mut a = Acquire::default();
                assert!(a.poll(&mut Context::from_waker(&w)).is_pending());
            }
            assert!(POOL.with(|p| p.borrow().queue.len()) < 1000, "pruned as it grows");
            let (count, w) = counter();
            let mut a = Acquire::default();
            assert!(a.poll(&mut Context::from_waker(&w)).is_pending());
            drop(held);
            assert_eq!(woken(&count), 1);
            assert!(a.poll(&mut Context::from_waker(&w)).is_ready());
        });
    }
}
