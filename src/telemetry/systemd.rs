//! systemd integration for `Type=notify` units, through the small `sd-notify` crate (one
//! datagram to `$NOTIFY_SOCKET` per call): `READY=1` once a role serves (its ports bound,
//! its workers and control plane running), `STOPPING=1` when a drain starts, `STATUS=`
//! lines for `systemctl status`, and watchdog pings for `WatchdogSec=`.
//!
//! Invariants: outside systemd (`NOTIFY_SOCKET` unset) every call does nothing; a failed
//! send is logged at debug and never stops a role. A watchdog ping is sent only after the
//! role answered a request for its hybrid connections within half the watchdog period
//! (for the relay a round trip through its control-plane thread; for the hcm and the
//! bridge a read of their shared state), so a control plane that hangs stops the pings
//! and systemd restarts the unit. The network (a relay that is down) never delays a ping.

use std::sync::Arc;
use std::time::Duration;

use super::admin::StatusSource;

/// Tells systemd the role serves, with a status line.
pub fn ready(status: &str) {
    #[cfg(unix)]
    send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
    #[cfg(not(unix))]
    let _ = status;
}

/// Tells systemd the role is draining (stop requested).
pub fn stopping() {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
}

#[cfg(unix)]
fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// The watchdog period, when the unit has one (`WatchdogSec=`; `WATCHDOG_USEC` for this pid).
pub fn watchdog_period() -> Option<Duration> {
    #[cfg(unix)]
    return sd_notify::watchdog_enabled();
    #[cfg(not(unix))]
    None
}

/// If the unit has a watchdog, pings it every half period from a thread of its own, each
/// time after `source` answered within that half period. The thread runs until the
/// process ends.
pub fn spawn_watchdog(source: Arc<dyn StatusSource>) {
    let Some(period) = watchdog_period() else {
        return;
    };
    let half = (period / 2).max(Duration::from_millis(50));
    let spawned = std::thread::Builder::new()
        .name("hyrelay-watchdog".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return tracing::error!("cannot start the watchdog runtime; no watchdog pings");
            };
            rt.block_on(watchdog_loop(source, half));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the watchdog thread; no watchdog pings");
    }
}

async fn watchdog_loop(source: Arc<dyn StatusSource>, half: Duration) {
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tokio::time::timeout(half, source.hybrid_connections()).await.is_ok() {
            #[cfg(unix)]
            send(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                role = source.role(),
                "the control plane did not answer within half the watchdog period; no watchdog ping"
            );
        }
    }
}
