//! Connection admission on the relay: a global cap, a per-source-IP cap and a cap on
//! connections that have not authenticated yet (still in TLS, the HTTP head or auth).
//!
//! Checked right after `accept`, before TLS, so a flood costs one task and no handshake.
//! A connection over a cap is closed at once. Every count taken is handed back by a
//! guard's `Drop` ([`ConnSlot`], [`AuthPending`]), so no exit path can leak one.
//!
//! The workers are separate threads: totals are atomics; the per-IP map is a `Mutex`
//! touched once at accept and once at close (never per frame). Its size is bounded by
//! the number of open connections, since an entry is removed when its count reaches 0.
//!
//! Refusals are logged at debug each, plus one info line at most every
//! [`REFUSAL_LOG_PERIOD`] with how many were refused since the last one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shortest time between two info lines about refused connections. Default: 10 s.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Which cap a connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `max_connections` connections are open.
    #[error("the relay's connection limit is reached")]
    Total,
    /// `max_connections_per_ip` connections from this address are open.
    #[error("the per-address connection limit is reached")]
    PerIp,
    /// `max_unauthenticated` connections have not authenticated yet.
    #[error("the limit of connections not yet authenticated is reached")]
    Unauthenticated,
}

/// The caps, taken from [`super::config::RelayConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_ip: usize,
    pub unauthenticated: usize,
}

/// Counters shared by every worker.
#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    total: AtomicUsize,
    unauthenticated: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    log: RefusalLog,
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            total: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            log: RefusalLog::new(),
        })
    }

    /// Takes a slot for a new connection from `ip` and marks it unauthenticated, or says
    /// which cap is full (and logs it, rate-limited).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(ConnSlot, AuthPending), Refused> {
        let ip = ip.to_canonical();
        let r = self.try_admit(ip);
        if let Err(why) = r {
            self.log.refused(ip, why);
        }
        r
    }

    fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<(ConnSlot, AuthPending), Refused> {
        if !take(&self.total, self.caps.total) {
            return Err(Refused::Total);
        }
        let slot = ConnSlot {
            adm: self.clone(),
            ip: None,
        };
        let slot = self.take_ip(ip, slot)?;
        if !take(&self.unauthenticated, self.caps.unauthenticated) {
            return Err(Refused::Unauthenticated);
        }
        let pending = AuthPending {
            adm: Some(self.clone()),
        };
        Ok((slot, pending))
    }

    /// Marks an admitted connection unauthenticated again (its next request, the `reuse`
    /// extension), or refuses it (and logs it, rate-limited) when that cap is full.
    pub fn pending(self: &Arc<Self>, ip: IpAddr) -> Result<AuthPending, Refused> {
        if !take(&self.unauthenticated, self.caps.unauthenticated) {
            self.log.refused(ip.to_canonical(), Refused::Unauthenticated);
            return Err(Refused::Unauthenticated);
        }
        Ok(AuthPending {
            adm: Some(self.clone()),
        })
    }

    /// Counts `ip` into `slot` (which then gives it back), or refuses (dropping `slot`
    /// gives the global count back).
    fn take_ip(&self, ip: IpAddr, mut slot: ConnSlot) -> Result<ConnSlot, Refused> {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.caps.per_ip {
            if *n == 0 {
                map.remove(&ip);
            }
            return Err(Refused::PerIp);
        }
        *n += 1;
        slot.ip = Some(ip);
        Ok(slot)
    }

    fn release_ip(&self, ip: IpAddr) {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Open connections, connections not yet authenticated, and source addresses tracked.
    pub fn counts(&self) -> (usize, usize, usize) {
        let ips = self.per_ip.lock().unwrap_or_else(|e| e.into_inner()).len();
        (
            self.total.load(Ordering::Relaxed),
            self.unauthenticated.load(Ordering::Relaxed),
            ips,
        )
    }
}

/// Increments `c` unless it is at `max`.
fn take(c: &AtomicUsize, max: usize) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// One open connection: counted in the global and per-IP totals while it lives.
#[derive(Debug)]
#[must_use = "dropping the slot ends the connection's count"]
pub struct ConnSlot {
    adm: Arc<Admission>,
    /// Set once the per-IP count was taken.
    ip: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.adm.release_ip(ip);
        }
        self.adm.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection that has not authenticated yet. [`AuthPending::done`] (or dropping it)
/// takes it out of the unauthenticated count.
#[derive(Debug)]
#[must_use = "dropping it marks the connection authenticated"]
pub struct AuthPending {
    adm: Option<Arc<Admission>>,
}

impl AuthPending {
    /// The connection authenticated (or needs no authentication): stop counting it.
    pub fn done(&mut self) {
        if let Some(a) = self.adm.take() {
            a.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for AuthPending {
    fn drop(&mut self) {
        self.done();
    }
}

/// Rate-limited logging of refusals.
#[derive(Debug)]
struct RefusalLog {
    origin: Instant,
    /// Milliseconds since `origin` before which no info line is written.
    next_info_ms: AtomicU64,
    /// Refusals since the last info line.
    since: AtomicU64,
}

impl RefusalLog {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            next_info_ms: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }

    fn refused(&self, ip: IpAddr, why: Refused) {
        tracing::debug!(event = "connection_refused", peer = %ip, reason = %why, "connection refused");
        let n = self.since.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.origin.elapsed().as_millis() as u64;
        let next = self.next_info_ms.load(Ordering::Relaxed);
        let period = REFUSAL_LOG_PERIOD.as_millis() as u64;
        if now >= next
            && self
                .next_info_ms
                .compare_exchange(next, now + period, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.since.fetch_sub(n, Ordering::Relaxed);
            tracing::info!(event = "connections_refused", count = n, last_reason = %why, "connections refused over a limit (at most one such line per 10 s)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(total: usize, per_ip: usize, unauthenticated: usize) -> Arc<Admission> {
        Admission::new(Caps {
            total,
            per_ip,
            unauthenticated,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn caps_and_release_on_every_path() {
        let a = adm(3, 2, 10);
        let c1 = a.admit(A).unwrap();
        let c2 = a.admit(A).unwrap();
        assert_eq!(a.admit(A).unwrap_err(), Refused::PerIp);
        let c3 = a.admit(B).unwrap();
        assert_eq!(a.admit(B).unwrap_err(), Refused::Total);
        assert_eq!(a.counts(), (3, 3, 2));
        drop(c1);
        let c4 = a.admit(B).unwrap();
        drop((c2, c3, c4));
        assert_eq!(a.counts(), (0, 0, 0), "every count handed back, per-IP map emptied");
    }

    #[test]
    fn unauthenticated_cap_frees_on_auth() {
        let a = adm(10, 10, 2);
        let (s1, mut p1) = a.admit(A).unwrap();
        let _c2 = a.admit(B).unwrap();
        assert_eq!(a.admit(A).unwrap_err(), Refused::Unauthenticated);
        assert_eq!(a.counts(), (2, 2, 2), "a refusal gives back the slots it took");
        p1.done();
        p1.done();
        let _c3 = a.admit(A).unwrap();
        assert_eq!(a.counts(), (3, 2, 2));
        drop((s1, p1));
        assert_eq!(a.counts(), (2, 2, 2));
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let a = adm(10, 1, 10);
        let _c = a.admit(A).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(a.admit(mapped).unwrap_err(), Refused::PerIp);
    }
}
