//! Step 6: how many listeners (hcms) serve the hybrid connection, from the runtime
//! information GET (`hyrelay::client::runtime_info`); for a namespace-wide Manage string,
//! from the management list the token step fetched.
//!
//! The runtime information also carries the `endpoint` metadata the endpoint steps use.

use super::probe::create_fix;
use super::{Checkup, Step, StepResult};
use crate::client::{self, InfoError};
use crate::transport::ws::ConnectError;

/// Hybrid connections named in the namespace-wide listener line.
const LIST_SHOWN: usize = 10;

/// Step 6: the listener count.
pub(super) async fn listeners(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = c.relay_blocked.as_ref().or(c.token_blocked.as_ref()) {
        return StepResult::skip(Step::Listeners, format!("skipped: {why}"));
    }
    match c.entity().map(str::to_owned) {
        Some(entity) => entity_listeners(c, &entity).await,
        None => namespace_listeners(c),
    }
}

async fn entity_listeners(c: &mut Checkup<'_>, entity: &str) -> StepResult {
    let Some(tls) = c.tls.clone() else {
        return c.no_tls(Step::Listeners);
    };
    let info = match client::runtime_info(c.cs(), entity, &tls, &c.opts.proxy, c.opts.timeout).await {
        Ok(info) => info,
        Err(e) => return info_failure(c, entity, e),
    };
    let n = info.listener_count;
    let open = if info.requires_client_authorization {
        ""
    } else {
        "; senders need no token"
    };
    c.info = Some(info);
    if n == 0 {
        return StepResult::fail(
            Step::Listeners,
            format!("no listener is connected to {entity}: senders get 404 \"no listeners\"{open}"),
            "start an hcm with this hybrid connection's Listen connection string (hyrelay hcm add \"<Listen connection string>\", then hyrelay hcm run)",
        );
    }
    StepResult::ok(
        Step::Listeners,
        format!("{} connected to {entity}{open}", super::count(n as usize, "listener")),
    )
}

fn info_failure(c: &Checkup<'_>, entity: &str, e: InfoError) -> StepResult {
    match e {
        InfoError::Auth { status, reason } => StepResult::warn(
            Step::Listeners,
            format!("the relay does not show this key the runtime information: {status} {reason}"),
            "run doctor with the hybrid connection's Listen connection string",
        ),
        InfoError::NotFound(_) => StepResult::fail(
            Step::Listeners,
            format!("hybrid connection {entity} does not exist"),
            create_fix(entity),
        ),
        InfoError::Unreachable(ConnectError::Timeout(_)) => StepResult::fail(
            Step::Listeners,
            format!("no answer to the runtime-information GET within {}", c.timeout_text()),
            "rerun with a longer --timeout",
        ),
        e => StepResult::fail(
            Step::Listeners,
            format!("runtime information: {e}"),
            "rerun; if it persists, see the relay's log",
        ),
    }
}

/// The listener counts from the management list of a namespace-wide Manage string.
fn namespace_listeners(c: &Checkup<'_>) -> StepResult {
    let Some(list) = &c.namespace_list else {
        return StepResult::skip(
            Step::Listeners,
            "namespace-wide string: add ;EntityPath=NAME to check one hybrid connection's listeners",
        );
    };
    if list.is_empty() {
        return StepResult::warn(
            Step::Listeners,
            "the relay has no hybrid connections",
            "create one: hyrelay hc create NAME --endpoint HOST:PORT",
        );
    }
    let counts: Vec<(&str, u64)> = list
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("?"),
                v["listenerCount"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let idle: Vec<&str> = counts.iter().filter(|(_, n)| *n == 0).map(|(name, _)| *name).collect();
    let mut shown: Vec<String> = counts
        .iter()
        .take(LIST_SHOWN)
        .map(|(name, n)| format!("{name}: {n}"))
        .collect();
    if counts.len() > LIST_SHOWN {
        shown.push(format!("… {} more", counts.len() - LIST_SHOWN));
    }
    let all = shown.join(", ");
    if idle.is_empty() {
        return StepResult::ok(Step::Listeners, format!("listeners per hybrid connection: {all}"));
    }
    StepResult::warn(
        Step::Listeners,
        format!(
            "{} of {} hybrid connections have no listener ({all})",
            idle.len(),
            counts.len()
        ),
        "start an hcm with the Listen connection string of each (hyrelay hc connection-string NAME --listen)",
    )
}
