//! HTTP-mode counts per hybrid connection, for the status page: requests answered (by
//! status class), requests waiting for an answer now, and the latest one. Keys are names of
//! hybrid connections that exist (a request for an unknown one is not counted here), so
//! the map is as bounded as the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One hybrid connection's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HcHttp {
    /// Requests answered, whoever answered.
    pub requests: u64,
    /// Of those, answered by the relay itself (no listener, token, limits, 502, 504).
    pub by_relay: u64,
    /// Requests waiting for their response head now.
    pub in_flight: u64,
    /// The latest answer: when and its status.
    pub last: Option<(SystemTime, u16)>,
}

/// Counts for every hybrid connection, shared by the workers (a short lock per request).
#[derive(Debug, Default)]
pub struct Stats {
    map: Mutex<HashMap<String, HcHttp>>,
}

/// Counts one request as in flight while it lives.
#[derive(Debug)]
#[must_use = "dropping it ends the request's in-flight count"]
pub struct InFlight {
    stats: Arc<Stats>,
    hc: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = self.stats.lock().get_mut(&self.hc) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HcHttp>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request for `hc` is waiting for its answer.
    pub fn enter(self: &Arc<Self>, hc: &str) -> InFlight {
        let hc = hc.to_lowercase();
        self.lock().entry(hc.clone()).or_default().in_flight += 1;
        InFlight {
            stats: self.clone(),
            hc,
        }
    }

    /// A request for `hc` was answered with `status`, by the relay or by a listener.
    pub fn answered(&self, hc: &str, status: u16, by_relay: bool) {
        let mut map = self.lock();
        let e = map.entry(hc.to_lowercase()).or_default();
        e.requests += 1;
        e.by_relay += u64::from(by_relay);
        e.last = Some((SystemTime::now(), status));
    }

    /// The counts of `hc` (zero if none yet).
    pub fn get(&self, hc: &str) -> HcHttp {
        self.lock().get(&hc.to_lowercase()).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_in_flight() {
        let s = Arc::new(Stats::default());
        let g = s.enter("Api");
        assert_eq!(s.get("api").in_flight, 1);
        s.answered("api", 200, false);
        s.answered("API", 404, true);
        drop(g);
        let c = s.get("api");
        assert_eq!((c.requests, c.by_relay, c.in_flight), (2, 1, 0));
        assert_eq!(c.last.map(|l| l.1), Some(404));
        assert_eq!(s.get("other"), HcHttp::default());
    }
}
