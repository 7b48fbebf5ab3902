//! Step 0: the outbound proxy. With one in effect for the relay's host (`--proxy`, else
//! `HTTPS_PROXY`/`ALL_PROXY`, minus `NO_PROXY`), it asks the proxy to `CONNECT` to the
//! relay; the tunnel then stands in for the relay TCP connection, and every later relay
//! step goes through the proxy too. Without one, it says so and why.

use std::time::Instant;

use super::{Checkup, Step, StepResult};
use crate::transport::proxy::{self, ProxyError};

/// Step 0: the proxy, if any, opens a tunnel to the relay.
pub(super) async fn proxy(c: &mut Checkup<'_>) -> StepResult {
    let ep = c.cs().endpoint.clone();
    let Some(p) = c.opts.proxy.for_host(&ep.host).cloned() else {
        let finding = match c.opts.proxy.proxy() {
            Some(p) => format!(
                "{} matches NO_PROXY: the relay is reached directly, not through {p}",
                ep.host
            ),
            None => "none: the relay is reached directly (no --proxy, HTTPS_PROXY and ALL_PROXY unset)".to_owned(),
        };
        return StepResult::ok(Step::Proxy, finding);
    };
    let started = Instant::now();
    let target = proxy::connect::authority(&ep.host, ep.port);
    match c.within(proxy::tunnel(&p, &ep.host, ep.port)).await {
        Some(Ok(tcp)) => {
            c.relay_tcp = Some(tcp);
            c.via_proxy = Some(p.to_string());
            StepResult::ok(
                Step::Proxy,
                format!(
                    "{p} opened a tunnel to {target} in {} ms",
                    started.elapsed().as_millis()
                ),
            )
        }
        Some(Err(e)) => {
            c.relay_blocked = Some(format!("the proxy {p} opened no tunnel to the relay"));
            let fix = fix_for(&e, &target);
            StepResult::fail(Step::Proxy, e.to_string(), fix)
        }
        None => {
            c.relay_blocked = Some(format!("the proxy {p} did not answer"));
            StepResult::fail(
                Step::Proxy,
                format!("no answer from {p} to CONNECT {target} within {}", c.timeout_text()),
                "check the proxy's address and that it lets this host open tunnels (CONNECT)",
            )
        }
    }
}

fn fix_for(e: &ProxyError, target: &str) -> String {
    match e {
        ProxyError::Unreachable { .. } => {
            "check the proxy URL (--proxy, HTTPS_PROXY, ALL_PROXY) and that this host may reach the proxy".into()
        }
        ProxyError::AuthRequired { .. } => "give credentials: --proxy http://USER:PASSWORD@HOST:PORT".into(),
        ProxyError::AuthRejected { .. } => {
            "check the user and password in the proxy URL (percent-encode @ : / in them)".into()
        }
        ProxyError::Refused { status, .. } if e.is_unreachable() => format!(
            "the proxy could not reach {target} ({status}): check the relay's address, or ask the proxy's admins whether it may reach it"
        ),
        ProxyError::Refused { .. } => format!(
            "the proxy's rules forbid tunnels to {target}: ask its admins to allow CONNECT to that host and port, or list the relay in NO_PROXY if it is reachable directly"
        ),
        _ => "check that the proxy URL names an HTTP proxy that supports CONNECT".into(),
    }
}
