//! The HTTP step (only with `--http PATH`): one plain HTTP request through the relay to
//! the hybrid connection's listener, `GET https://relay/{hc}{PATH}` with a Send token
//! (HTTP request/response mode, hc-protocol.md §6).
//!
//! An answer with `Via` came from the listener (an hcm: from the endpoint); one without it
//! is the relay's own (no listener, token refused, deadline). A listener's 5xx is a warning:
//! the path works, the endpoint complains.

use std::time::Instant;

use super::{Checkup, Step, StepResult};
use crate::client;
use crate::transport::http::{Request, request};

/// Runs the HTTP step for `path` (starting with `/`, may carry a query).
pub(super) async fn http(c: &mut Checkup<'_>, path: &str) -> StepResult {
    if let Some(why) = &c.relay_blocked {
        return StepResult::skip(Step::Http, format!("skipped: {why}"));
    }
    let Some(entity) = c.entity().map(str::to_owned) else {
        return StepResult::skip(
            Step::Http,
            "skipped: a namespace-wide connection string names no hybrid connection",
        );
    };
    let Some(tls) = c.tls.clone() else {
        return c.no_tls(Step::Http);
    };
    let token = client::token(c.cs(), &entity, std::time::Duration::from_secs(600));
    c.remember_token(&token);
    let target = format!("/{}{}", client::encode_path(&entity), path);
    let started = Instant::now();
    let req = Request {
        method: "GET",
        target: &target,
        headers: &[("ServiceBusAuthorization", &token)],
        body: b"",
    };
    let sent = request(&c.cs().endpoint, Some(&tls), &c.opts.proxy, req, c.opts.timeout).await;
    let ms = started.elapsed().as_millis();
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            return StepResult::fail(
                Step::Http,
                format!("GET {target}: {e}"),
                "check the relay steps above; the relay must be reachable over plain HTTP(S) too",
            );
        }
    };
    let (status, reason) = (resp.head.status, resp.head.reason.clone());
    let from_listener = resp.head.headers.get("Via").is_some();
    verdict(&target, status, &reason, from_listener, ms)
}

/// The verdict for an answer.
fn verdict(target: &str, status: u16, reason: &str, from_listener: bool, ms: u128) -> StepResult {
    let line = format!("GET {target}: {status} {reason} in {ms} ms");
    match (from_listener, status) {
        (true, 500..=599) => StepResult::warn(
            Step::Http,
            format!("{line}, from the listener"),
            "the relay and the listener work; look at the endpoint (the hcm's log says why it failed)",
        ),
        (true, _) => StepResult::ok(Step::Http, format!("{line}, answered by the listener")),
        (false, 401 | 403) => StepResult::fail(
            Step::Http,
            format!("{line}: the relay refused the token"),
            "use the hybrid connection's Send connection string (hyrelay hc connection-string NAME --send)",
        ),
        (false, 404) => StepResult::fail(
            Step::Http,
            format!("{line}: no listener, or no such hybrid connection"),
            "start an hcm (or another listener) for the hybrid connection",
        ),
        (false, _) => StepResult::fail(
            Step::Http,
            format!("{line}, from the relay"),
            "a 502 means the listener went away, a 504 that it did not answer in time: see the hcm's log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn verdicts_tell_relay_from_listener() {
        assert_eq!(verdict("/a", 200, "OK", true, 3).verdict, Verdict::Ok);
        assert_eq!(verdict("/a", 404, "Not Found", true, 3).verdict, Verdict::Ok);
        assert_eq!(verdict("/a", 503, "x", true, 3).verdict, Verdict::Warn);
        assert_eq!(verdict("/a", 404, "x", false, 3).verdict, Verdict::Fail);
        assert_eq!(verdict("/a", 403, "x", false, 3).verdict, Verdict::Fail);
        assert_eq!(verdict("/a", 504, "x", false, 3).verdict, Verdict::Fail);
    }
}
