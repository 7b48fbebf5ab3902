//! Per-worker buffer pool with a memory budget.
//!
//! Every data-plane read goes into a [`PoolBuf`] taken from the worker's pool only once
//! the socket is readable, and the buffer goes back as soon as its bytes are written on,
//! so an idle connection holds no data buffer. The pool is thread-local: buffers are
//! taken and returned on the worker's own thread without locks.
//!
//! Budget: at most `budget / size` buffers are out at once per worker. When the budget is
//! spent, [`poll_acquire`] parks the task until a buffer comes back — backpressure instead
//! of unbounded growth. Freed buffers are kept for reuse up to a small reserve; beyond it
//! they are released to the allocator.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll, Waker};

/// Size of one buffer. Default: 64 KiB (a full TLS record plus WebSocket headers fits).
pub const BUF_SIZE: usize = 64 * 1024;
/// Default memory budget per worker. Default: 64 MiB (1024 buffers).
pub const DEFAULT_BUDGET: usize = 64 << 20;
/// Freed buffers kept for reuse per worker.
const RESERVE: usize = 32;

struct Pool {
    free: Vec<Box<[u8]>>,
    out: usize,
    max_out: usize,
    high_water: usize,
    waiters: Vec<Waker>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            free: Vec::new(),
            out: 0,
            max_out: DEFAULT_BUDGET / BUF_SIZE,
            high_water: 0,
            waiters: Vec::new(),
        })
    };
}

/// Sets this thread's budget in bytes (at least one buffer). Call once at worker start.
pub fn set_budget(bytes: usize) {
    POOL.with(|p| p.borrow_mut().max_out = (bytes / BUF_SIZE).max(1));
}

/// Counters of this thread's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Buffers handed out now.
    pub in_use: usize,
    /// Most buffers ever out at once.
    pub high_water: usize,
    /// Buffers allowed out at once.
    pub budget: usize,
    /// Freed buffers kept for reuse.
    pub reserve: usize,
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

/// A buffer from this thread's pool; returns itself when dropped.
pub struct PoolBuf {
    mem: Option<Box<[u8]>>,
    pooled: bool,
}

impl PoolBuf {
    /// A buffer outside the pool and its budget, for the rare bytes that cannot wait
    /// (data that arrived with a handshake). Freed to the allocator when dropped.
    pub fn unpooled(len: usize) -> Self {
        Self {
            mem: Some(vec![0u8; len].into_boxed_slice()),
            pooled: false,
        }
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBuf({} bytes)", self.len())
    }
}

/// Takes a buffer, or registers the task to be woken when one is returned.
pub fn poll_acquire(cx: &mut Context<'_>) -> Poll<PoolBuf> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.out >= p.max_out {
            if !p.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                p.waiters.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        p.out += 1;
        p.high_water = p.high_water.max(p.out);
        let mem = p.free.pop().unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice());
        Poll::Ready(PoolBuf {
            mem: Some(mem),
            pooled: true,
        })
    })
}

/// Takes a buffer, waiting while the budget is spent.
pub async fn acquire() -> PoolBuf {
    std::future::poll_fn(poll_acquire).await
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
            p.out -= 1;
            if p.free.len() < RESERVE {
                p.free.push(mem);
            }
            // Wake everyone waiting; the first to run gets the buffer, the rest re-register.
            for w in p.waiters.drain(..) {
                w.wake();
            }
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
    use super::*;

    #[test]
    fn budget_parks_and_release_wakes() {
        std::thread::spawn(|| {
            set_budget(2 * BUF_SIZE);
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let a = match poll_acquire(&mut cx) {
                Poll::Ready(b) => b,
                Poll::Pending => panic!("first buffer"),
            };
            let b = match poll_acquire(&mut cx) {
                Poll::Ready(b) => b,
                Poll::Pending => panic!("second buffer"),
            };
            assert_eq!(a.len(), BUF_SIZE);
            assert!(poll_acquire(&mut cx).is_pending(), "budget of two buffers");
            assert_eq!(stats().in_use, 2);
            drop(a);
            assert!(poll_acquire(&mut cx).is_ready(), "a returned buffer is reused");
            drop(b);
            let s = stats();
            assert_eq!((s.in_use, s.high_water, s.budget), (0, 2, 2));
        })
        .join()
        .unwrap();
    }
}
