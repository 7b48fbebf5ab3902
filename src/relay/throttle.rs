//! Slowing down repeated authentication failures from one source address.
//!
//! Each failed token check (401/403 at the listen, connect, runtime-information and
//! management auth points) counts against the client's IP. Once an address has
//! `threshold` failures with no gap longer than `window` between them, every further
//! request from it waits before it is authorized or refused: `BASE_DELAY` doubling with
//! each failure past the threshold, up to `max_delay`. A success does not clear the count
//! (a client with one valid token cannot buy fresh guesses for itself or others); the
//! count expires `window` after the last failure.
//!
//! State is bounded: at most [`MAX_TRACKED`] addresses; when full, expired entries are
//! dropped, then the one idle longest. The map is behind a `Mutex` touched only at auth
//! points, never on the data path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most source addresses tracked at once. Default: 10 000 (about 0.5 MiB).
pub const MAX_TRACKED: usize = 10_000;
/// The first delay once the threshold is reached. Default: 250 ms.
pub const BASE_DELAY: Duration = Duration::from_millis(250);

/// When delays start and how long they grow.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures before requests are delayed. Default: 5.
    pub threshold: u32,
    /// Failures further apart than this start a new count. Default: 60 s.
    pub window: Duration,
    /// Longest delay. Default: 5 s.
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Per-address failure counts.
#[derive(Debug)]
pub struct AuthThrottle {
    cfg: ThrottleConfig,
    capacity: usize,
    map: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthThrottle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self::with_capacity(cfg, MAX_TRACKED)
    }

    fn with_capacity(cfg: ThrottleConfig, capacity: usize) -> Self {
        Self {
            cfg,
            capacity: capacity.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// How long a request from `ip` waits before it is answered.
    pub fn delay(&self, ip: IpAddr) -> Duration {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip.to_canonical()) {
            Some(f) if f.last.elapsed() <= self.cfg.window => self.delay_for(f.count),
            _ => Duration::ZERO,
        }
    }

    fn delay_for(&self, count: u32) -> Duration {
        let Some(excess) = count.checked_sub(self.cfg.threshold) else {
            return Duration::ZERO;
        };
        BASE_DELAY
            .saturating_mul(1u32 << excess.min(16))
            .min(self.cfg.max_delay)
    }

    /// Counts a failure from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&ip) && map.len() >= self.capacity {
            self.make_room(&mut map, now);
        }
        let f = map.entry(ip).or_insert(Failures { count: 0, last: now });
        if now.duration_since(f.last) > self.cfg.window {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count == self.cfg.threshold {
            tracing::info!(event = "auth_failures_throttled", peer = %ip, failures = f.count, "repeated authentication failures; delaying this address's requests");
        }
    }

    /// Drops expired entries; if none were, the entry idle longest.
    fn make_room(&self, map: &mut HashMap<IpAddr, Failures>, now: Instant) {
        map.retain(|_, f| now.duration_since(f.last) <= self.cfg.window);
        if map.len() >= self.capacity
            && let Some(oldest) = map.iter().min_by_key(|(_, f)| f.last).map(|(ip, _)| *ip)
        {
            map.remove(&oldest);
        }
    }

    /// Addresses tracked.
    pub fn tracked(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            threshold: 3,
            window: Duration::from_secs(60),
            max_delay: Duration::from_secs(2),
        }
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn delay_grows_after_threshold_and_is_capped() {
        let t = AuthThrottle::new(cfg());
        let delays: Vec<Duration> = (0..8)
            .map(|_| {
                let d = t.delay(ip(1));
                t.failed(ip(1));
                d
            })
            .collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 0, 0, 250, 500, 1000, 2000, 2000]);
        assert_eq!(t.delay(ip(2)), Duration::ZERO, "other addresses are not affected");
    }

    #[test]
    fn failures_expire_after_the_window() {
        let t = AuthThrottle::new(ThrottleConfig {
            window: Duration::from_millis(50),
            ..cfg()
        });
        for _ in 0..5 {
            t.failed(ip(1));
        }
        assert!(t.delay(ip(1)) > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.delay(ip(1)), Duration::ZERO);
        t.failed(ip(1));
        assert_eq!(t.delay(ip(1)), Duration::ZERO, "a new run of failures starts from one");
    }

    #[test]
    fn state_is_bounded() {
        let t = AuthThrottle::with_capacity(cfg(), 100);
        for _ in 0..5 {
            t.failed(ip(0));
        }
        for n in 1..10_000 {
            t.failed(ip(n));
        }
        assert!(t.tracked() <= 100);
        assert_eq!(t.delay(ip(0)), Duration::ZERO, "the longest-idle entry was evicted");
        assert_eq!(t.delay(ip(9_999)), Duration::ZERO);
    }
}
