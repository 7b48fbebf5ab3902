//! Keep-alive of a WebSocket, sans-IO: ping every period, and the peer is dead after two
//! periods in which nothing at all was heard from it.
//!
//! The driver owns one timer. It arms it at [`Keepalive::poll_timeout`], reports what it
//! read with [`Keepalive::handle_heard`] and a fired timer with
//! [`Keepalive::handle_timeout`], then asks [`Keepalive::poll_ping`] (write a Ping now)
//! and [`Keepalive::is_dead`]. Time is passed in, never read here, so tests drive it with
//! made-up instants.
//!
//! A half-closed WebSocket changes what silence means (the splice rules say which):
//! - after the peer's Close it cannot answer, but still hears us: [`Keepalive::ping_only`]
//!   keeps the pings going (traffic for the middleboxes of a quiet half-closed tunnel, and
//!   a sign of life for the peer) and never calls the peer dead;
//! - after our own Close we send nothing more, not even a ping, and the peer owes us
//!   nothing until its own Close: [`Keepalive::after_our_close`] calls it dead only once it
//!   has shown it pings on its own ([`Keepalive::handle_pinged`]; ours do after a Close
//!   they received) and then falls silent for two periods. Data alone does not arm this:
//!   a peer may send part of an answer and think for minutes before the rest. A peer that
//!   never pings (Microsoft's clients) is never called dead for silence then; a vanished
//!   relay leg still ends it (TCP keepalive, or the relay's 1001).

use std::time::{Duration, Instant};

/// The shortest ping period; shorter ones are raised to it (configs refuse 0 already).
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

/// The keep-alive rules of one WebSocket.
#[derive(Debug, Clone)]
pub struct Keepalive {
    period: Duration,
    next_ping: Instant,
    heard: Instant,
    ping_due: bool,
    dead: bool,
    stopped: bool,
    /// Silence is no death (the peer cannot answer): [`Keepalive::ping_only`].
    deaf_peer: bool,
    /// Our Close is out: we may not ping ([`Keepalive::after_our_close`]).
    our_close: bool,
    /// A ping came from the peer after our Close: silence counts again.
    peer_pings: bool,
}

impl Keepalive {
    /// Starts at `now` with a ping every `period` (at least [`MIN_PERIOD`]).
    pub fn new(now: Instant, period: Duration) -> Self {
        let period = period.max(MIN_PERIOD);
        Self {
            period,
            next_ping: now + period,
            heard: now,
            ping_due: false,
            dead: false,
            stopped: false,
            deaf_peer: false,
            our_close: false,
            peer_pings: false,
        }
    }

    /// Something (any frame, or any bytes) came from the peer at `now`.
    pub fn handle_heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// The timer fired (or the driver polls anyway) at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stopped || self.dead {
            return;
        }
        if self.silence_counts() && now.saturating_duration_since(self.heard) >= self.period * 2 {
            self.dead = true;
            return;
        }
        if !self.our_close && now >= self.next_ping {
            self.ping_due = true;
            // One ping per period even if the driver was late: the next one is the first
            // period boundary after `now` (computed, not stepped to, however late it is).
            let late = now.duration_since(self.next_ping).as_nanos();
            let step = self.period.as_nanos();
            let ahead = step - late % step;
            self.next_ping = now + Duration::from_nanos(u64::try_from(ahead).unwrap_or(u64::MAX));
        }
    }

    /// The rules no longer apply (the session ends).
    pub fn stop(&mut self) {
        self.stopped = true;
        self.ping_due = false;
    }

    /// The peer's Close arrived: it can no longer answer. Pings go on, silence is no death.
    pub fn ping_only(&mut self) {
        self.deaf_peer = true;
    }

    /// Our Close is out: no more pings; the peer is dead only if it pings after this and
    /// then falls silent for two periods (see the module doc).
    pub fn after_our_close(&mut self) {
        self.our_close = true;
        self.ping_due = false;
    }

    /// A Ping came from the peer at `now` (which is also something heard).
    pub fn handle_pinged(&mut self, now: Instant) {
        self.peer_pings |= self.our_close;
        self.handle_heard(now);
    }

    /// Whether two silent periods mean death now.
    fn silence_counts(&self) -> bool {
        !self.deaf_peer && (!self.our_close || self.peer_pings)
    }

    /// When the driver's timer must fire next; `None` once stopped or dead, or when
    /// neither a ping nor a death can be due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped || self.dead {
            return None;
        }
        let ping = (!self.our_close).then_some(self.next_ping);
        let death = self.silence_counts().then(|| self.dead_at());
        ping.into_iter().chain(death).min()
    }

    /// True once per period: write a Ping now.
    pub fn poll_ping(&mut self) -> bool {
        std::mem::take(&mut self.ping_due)
    }

    /// When the peer counts as dead if nothing is heard before: two periods after it was
    /// last heard (also the limit for a write to it, whose peer may have stopped reading).
    pub fn dead_at(&self) -> Instant {
        self.heard + self.period * 2
    }

    /// True if the peer was silent for two periods.
    pub fn is_dead(&self) -> bool {
        self.dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(30);

    #[test]
    fn pings_each_period_while_the_peer_talks() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        assert_eq!(k.poll_timeout(), Some(t0 + P));
        k.handle_timeout(t0 + P / 2);
        assert!(!k.poll_ping());
        for i in 1..=5u32 {
            let now = t0 + P * i;
            k.handle_heard(now - Duration::from_secs(1));
            k.handle_timeout(now);
            assert!(k.poll_ping(), "ping {i}");
            assert!(!k.poll_ping(), "once");
            assert!(!k.is_dead());
        }
    }

    #[test]
    fn two_silent_periods_are_death_and_one_is_not() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.handle_timeout(t0 + P);
        assert!(k.poll_ping() && !k.is_dead());
        k.handle_timeout(t0 + P * 2 - Duration::from_millis(1));
        assert!(!k.is_dead());
        assert_eq!(k.poll_timeout(), Some(t0 + P * 2));
        k.handle_timeout(t0 + P * 2);
        assert!(k.is_dead());
        assert_eq!(k.poll_timeout(), None);
    }

    #[test]
    fn hearing_anything_moves_the_deadline() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.handle_heard(t0 + P + P / 2);
        k.handle_timeout(t0 + P * 2);
        assert!(!k.is_dead());
        assert_eq!(k.poll_timeout(), Some(t0 + P * 3));
        k.handle_timeout(t0 + P * 3 + P / 2);
        assert!(k.is_dead());
    }

    #[test]
    fn a_late_driver_gets_one_ping_not_a_burst() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.handle_heard(t0 + P * 5);
        k.handle_timeout(t0 + P * 5);
        assert!(k.poll_ping());
        assert!(!k.poll_ping());
        assert_eq!(k.poll_timeout(), Some(t0 + P * 6));
    }

    #[test]
    fn stopped_rules_never_fire() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.stop();
        k.handle_timeout(t0 + P * 10);
        assert!(!k.poll_ping() && !k.is_dead());
        assert_eq!(k.poll_timeout(), None);
    }

    #[test]
    fn a_peer_that_closed_is_pinged_but_never_dead() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.ping_only();
        for i in 1..=10u32 {
            assert_eq!(k.poll_timeout(), Some(t0 + P * i), "only the ping is timed");
            k.handle_timeout(t0 + P * i);
            assert!(k.poll_ping(), "ping {i}");
            assert!(!k.is_dead(), "ten silent periods are no death");
        }
    }

    #[test]
    fn after_our_close_a_peer_that_never_pings_is_never_dead() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.handle_pinged(t0 + P / 4); // a ping before our Close does not count
        k.after_our_close();
        assert_eq!(k.poll_timeout(), None, "no ping and no death to time");
        k.handle_timeout(t0 + P * 10);
        assert!(!k.poll_ping() && !k.is_dead());
        // Data after our Close (part of an answer) does not arm it either.
        k.handle_heard(t0 + P * 11);
        k.handle_timeout(t0 + P * 20);
        assert!(!k.is_dead());
    }

    #[test]
    fn after_our_close_a_peer_that_pings_is_dead_two_periods_after_it_falls_silent() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0, P);
        k.after_our_close();
        for i in 1..=5u32 {
            k.handle_pinged(t0 + P * i);
            k.handle_timeout(t0 + P * i + P / 2);
            assert!(!k.poll_ping() && !k.is_dead(), "heard each period ({i})");
        }
        assert_eq!(k.poll_timeout(), Some(t0 + P * 7));
        k.handle_timeout(t0 + P * 7 - Duration::from_millis(1));
        assert!(!k.is_dead());
        k.handle_timeout(t0 + P * 7);
        assert!(k.is_dead());
    }

    #[test]
    fn a_driver_late_by_a_million_periods_costs_one_step() {
        let t0 = Instant::now();
        // A zero period is raised to the minimum; the next ping is computed, not stepped to.
        let mut k = Keepalive::new(t0, Duration::ZERO);
        let late = t0 + Duration::from_secs(1_000) + Duration::from_micros(300);
        k.handle_heard(late);
        k.handle_timeout(late);
        assert!(k.poll_ping() && !k.is_dead());
        let next = k.poll_timeout().unwrap();
        assert_eq!(next - late, MIN_PERIOD - Duration::from_micros(300));
    }
}
