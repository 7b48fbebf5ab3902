//! Token renewal of a listener's control channel, sans-IO: a fresh token is sent over the
//! channel (`renewToken`, hc-protocol.md §4.4) when [`RENEW_AT`] of the current token's
//! lifetime has passed, so the relay never sees it expire.
//!
//! The driver arms its timer at [`Renewal::poll_timeout`], calls
//! [`Renewal::handle_timeout`] when it fires — true means "send a fresh token now" — and
//! [`Renewal::handle_renewed`] once it was sent.

use std::time::{Duration, Instant};

/// The share of a token's lifetime after which it is renewed.
pub const RENEW_AT: f64 = 0.8;

/// The renewal rule of one control channel.
#[derive(Debug, Clone)]
pub struct Renewal {
    ttl: Duration,
    at: Option<Instant>,
}

impl Renewal {
    /// A channel whose token, issued at `now`, lives `ttl`; `enabled` false (no key to
    /// sign with, or renewal turned off) never renews.
    pub fn new(now: Instant, ttl: Duration, enabled: bool) -> Self {
        Self {
            ttl,
            at: enabled.then(|| now + ttl.mul_f64(RENEW_AT)),
        }
    }

    /// When the driver's timer must fire; `None` if the channel never renews.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.at
    }

    /// The timer fired at `now`: true if a fresh token is due.
    pub fn handle_timeout(&self, now: Instant) -> bool {
        self.at.is_some_and(|at| now >= at)
    }

    /// A fresh token (lifetime `ttl`) went out at `now`.
    pub fn handle_renewed(&mut self, now: Instant) {
        if self.at.is_some() {
            self.at = Some(now + self.ttl.mul_f64(RENEW_AT));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    #[test]
    fn renews_at_eighty_percent_and_again_after_each_renewal() {
        let t0 = Instant::now();
        let mut r = Renewal::new(t0, TTL, true);
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(2880)));
        assert!(!r.handle_timeout(t0 + Duration::from_secs(2879)));
        let t1 = t0 + Duration::from_secs(2880);
        assert!(r.handle_timeout(t1));
        r.handle_renewed(t1 + Duration::from_secs(1));
        assert_eq!(r.poll_timeout(), Some(t1 + Duration::from_secs(2881)));
        assert!(
            !r.handle_timeout(t1 + Duration::from_secs(2)),
            "not twice for one token"
        );
    }

    #[test]
    fn a_channel_without_a_key_never_renews() {
        let t0 = Instant::now();
        let mut r = Renewal::new(t0, TTL, false);
        assert_eq!(r.poll_timeout(), None);
        assert!(!r.handle_timeout(t0 + TTL * 2));
        r.handle_renewed(t0);
        assert_eq!(r.poll_timeout(), None);
    }
}
