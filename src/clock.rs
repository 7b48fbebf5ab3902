//! Wall-clock time as the state file, the status pages and the protocol write it:
//! RFC 3339 UTC with seconds precision.

use std::time::SystemTime;

/// `t` as RFC 3339 UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The current time as RFC 3339 UTC, seconds precision.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}
