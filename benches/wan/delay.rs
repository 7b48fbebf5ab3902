//! A user-space delay line between two TAP devices, in place of `sch_netem` (which this
//! kernel lacks): every Ethernet frame read from one device is written to the other after a
//! fixed one-way delay, behind a serializing link of a settable rate.
//!
//! Model (netem's `delay` + `rate`): a frame of `len` bytes starts transmission when the
//! previous one has finished (`start = max(now, busy_until)`), takes `len * 8 / rate`, and
//! arrives `delay` after its transmission ends. At most [`QUEUE_LIMIT`] frames may wait for
//! transmission (tail drop, like netem's default `limit 1000`); frames already on the "wire"
//! are not limited. Rate 0 means unlimited (no serialization, no drops).
//!
//! Invariant: frames leave in the order they came, each direction on its own thread; the
//! thread ends when `stop` is set (checked at least every 50 ms).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Frames waiting for transmission at most; more are dropped.
pub const QUEUE_LIMIT: usize = 1000;

/// A link's settings, shared with its two direction threads.
#[derive(Debug, Default)]
pub struct Shape {
    /// Bits per second; 0 = unlimited.
    pub rate_bps: AtomicU64,
    /// Frames dropped at the queue limit, both directions.
    pub dropped: AtomicU64,
}

/// Runs one direction: `from` → `to` with `delay`, until `stop`.
pub fn run(from: Arc<OwnedFd>, to: Arc<OwnedFd>, delay: Duration, shape: Arc<Shape>, stop: Arc<AtomicBool>) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) on this thread only; 1 ns asks for precise wake-ups.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
    let mut queue: VecDeque<(Instant, Instant, Vec<u8>)> = VecDeque::new(); // (tx end, due, frame)
    let mut busy_until = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = queue
            .front()
            .map(|(_, due, _)| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        if poll_readable(&from, wait) {
            read_all(&from, &mut buf, |frame| {
                let now = Instant::now();
                let rate = shape.rate_bps.load(Ordering::Relaxed);
                // Transmission ends are in order: those still waiting are at the back.
                let waiting = queue.len() - queue.partition_point(|(tx_end, _, _)| *tx_end <= now);
                if rate > 0 && waiting >= QUEUE_LIMIT {
                    shape.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let tx_end = match (frame.len() as u64 * 8 * 1_000_000_000).checked_div(rate) {
                    None => now,
                    Some(ns) => busy_until.max(now) + Duration::from_nanos(ns),
                };
                busy_until = tx_end;
                queue.push_back((tx_end, tx_end + delay, frame.to_vec()));
            });
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(_, due, _)| *due <= now) {
            let (_, _, frame) = queue.pop_front().expect("checked");
            // SAFETY: write(2) of an initialized buffer to a TAP descriptor we own.
            unsafe { libc::write(to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        }
    }
}

/// Waits up to `wait` for `fd` to be readable (ppoll: nanosecond timeout).
fn poll_readable(fd: &OwnedFd, wait: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: ppoll(2) on one pollfd we own, with a valid timespec and no signal mask.
    let n = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// Reads frames (one per read(2)) until the non-blocking descriptor has none left.
fn read_all(fd: &OwnedFd, buf: &mut [u8], mut each: impl FnMut(&[u8])) {
    loop {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        each(&buf[..n as usize]);
    }
}
