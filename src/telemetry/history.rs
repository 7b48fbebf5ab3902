//! Short history per hybrid connection for the status page: one sample every
//! [`SAMPLE_EVERY`], the last [`KEEP`] kept (15 minutes), so the page can draw active
//! tunnels and throughput and tell "every sender fails lately" from "one failed once".
//!
//! Invariants: memory is bounded — at most [`KEEP`] samples per hybrid connection, and a
//! hybrid connection not sampled for [`KEEP`] periods is forgotten; counters in a sample
//! are cumulative (as the roles count them), rates are derived between samples, and a
//! counter that went backwards (a role restarted a count) gives a rate of zero, not a
//! wrap-around.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How often the admin thread samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept per hybrid connection: 15 minutes.
pub const KEEP: usize = 90;

/// One sample of a hybrid connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: SystemTime,
    /// Tunnels open at that moment.
    pub active: i64,
    /// Payload bytes so far, both directions.
    pub bytes: u64,
    /// Connects (relay: sender connects; hcm: endpoint dials; bridge: relay connects)
    /// that worked, so far.
    pub ok: u64,
    /// Those that failed, so far.
    pub failed: u64,
}

/// Samples per hybrid connection (keyed by name, case as the role reports it).
#[derive(Debug, Default)]
pub struct History {
    by_hc: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl History {
    /// Records one round of samples; hybrid connections missing from it for [`KEEP`]
    /// rounds are dropped.
    pub fn record(&self, round: Vec<(String, Sample)>) {
        let mut m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        let now = round.first().map(|(_, s)| s.at);
        for (hc, s) in round {
            let q = m.entry(hc).or_default();
            if q.len() == KEEP {
                q.pop_front();
            }
            q.push_back(s);
        }
        if let Some(now) = now {
            let horizon = SAMPLE_EVERY * KEEP as u32;
            m.retain(|_, q| {
                q.back()
                    .is_some_and(|s| now.duration_since(s.at).unwrap_or_default() < horizon)
            });
        }
    }

    /// The samples of `hc`, oldest first.
    pub fn series(&self, hc: &str) -> Vec<Sample> {
        let m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        m.get(hc).map(|q| q.iter().copied().collect()).unwrap_or_default()
    }

    /// The samples of `hc` followed by `now` (the values at this moment), for a chart
    /// that ends at the present. A hybrid connection with no samples yet is seeded with
    /// `now`, so a chart shows from the next look on rather than after the next round.
    pub fn series_with(&self, hc: &str, now: Sample) -> Vec<Sample> {
        let mut s = self.series(hc);
        if s.is_empty() {
            let mut m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(hc.to_owned()).or_default().push_back(now);
            return s;
        }
        if s.last().is_some_and(|l| l.at < now.at) {
            s.push(now);
        }
        s
    }

    /// True when, over the samples within `window` of the newest, connects failed and none
    /// worked: every sender (or dial) fails lately.
    pub fn failing(&self, hc: &str, window: Duration) -> bool {
        let s = self.series(hc);
        let Some(last) = s.last() else { return false };
        let first = s
            .iter()
            .find(|x| last.at.duration_since(x.at).unwrap_or_default() <= window)
            .unwrap_or(last);
        last.failed > first.failed && last.ok == first.ok
    }
}

/// Throughput in bytes per second between consecutive samples.
pub fn rates(s: &[Sample]) -> Vec<f64> {
    s.windows(2)
        .map(|w| {
            let secs = w[1].at.duration_since(w[0].at).unwrap_or_default().as_secs_f64();
            if secs <= 0.0 {
                0.0
            } else {
                w[1].bytes.saturating_sub(w[0].bytes) as f64 / secs
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64, active: i64, bytes: u64, ok: u64, failed: u64) -> Sample {
        Sample {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(t),
            active,
            bytes,
            ok,
            failed,
        }
    }

    #[test]
    fn bounded_and_forgetful() {
        let h = History::default();
        for i in 0..200u64 {
            h.record(vec![("a".into(), at(i * 10, 1, i, 0, 0))]);
        }
        assert_eq!(h.series("a").len(), KEEP);
        assert_eq!(h.series("a")[0].bytes, 200 - KEEP as u64);
        h.record(vec![("b".into(), at(200 * 10 + 1000, 0, 0, 0, 0))]);
        assert!(h.series("a").is_empty(), "not sampled for 15 min: dropped");
    }

    #[test]
    fn failing_and_rates() {
        let h = History::default();
        h.record(vec![("a".into(), at(0, 0, 0, 5, 0))]);
        h.record(vec![("a".into(), at(10, 0, 1000, 5, 3))]);
        assert!(h.failing("a", Duration::from_secs(120)));
        h.record(vec![("a".into(), at(20, 0, 500, 6, 4))]);
        assert!(!h.failing("a", Duration::from_secs(120)), "one worked");
        assert_eq!(rates(&h.series("a")), vec![100.0, 0.0]);
        assert!(!h.failing("nobody", Duration::from_secs(120)));
    }
}
