//! The protocol steps: the WebSocket upgrade on `/$hc/{entity}` and the token (tried for
//! the right its rule should have).
//!
//! Which right a string's rule has is not in the string; it is guessed from the key name
//! (`defaultListener` → listen, `defaultSender` → send, any other name: listen, then send
//! if the relay answers 403). A listen test opens a control channel and closes it at once;
//! a send test is a real connect, so if a listener accepts, it meets the endpoint once.

use std::time::Duration;

use tokio::io::split;

use super::{Checkup, Step, StepResult, Verdict};
use crate::client::{self, Management, ManagementError};
use crate::proto::connstr::Credential;
use crate::proto::frame::{Role, close_code};
use crate::proto::sas::{SasToken, unix_now};
use crate::transport::ws::{self, ClientWs, ConnectError, WsReader, WsWriter};

/// Lifetime of the tokens minted for the checks.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// Entity named in the upgrade test of a namespace-wide string.
const PLACEHOLDER_ENTITY: &str = "hyrelay-doctor-probe";
/// Longest wait for the relay to end a test connection after our Close.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// A right the token is tested for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Right {
    Listen,
    Send,
}

impl Right {
    fn action(self) -> &'static str {
        match self {
            Right::Listen => "listen",
            Right::Send => "connect",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Right::Listen => "Listen",
            Right::Send => "Send",
        }
    }

    /// The `hyrelay hc connection-string` flag for a string with this right.
    fn flag(self) -> &'static str {
        match self {
            Right::Listen => "--listen",
            Right::Send => "--send",
        }
    }

    /// Rights to try for a key name, most likely first.
    fn to_try(key_name: &str) -> &'static [Right] {
        let k = key_name.to_ascii_lowercase();
        if k.contains("listen") {
            &[Right::Listen]
        } else if k.contains("send") {
            &[Right::Send]
        } else {
            &[Right::Listen, Right::Send]
        }
    }
}

/// Step 4: the relay answers a WebSocket upgrade on `/$hc/{entity}` (no token: any status).
pub(super) async fn upgrade(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = &c.relay_blocked {
        return StepResult::skip(Step::Upgrade, format!("skipped: {why}"));
    }
    let entity = c.entity().unwrap_or(PLACEHOLDER_ENTITY).to_owned();
    let url = client::hc_url(c.cs(), &entity, "listen", &test_id());
    let note = if c.entity().is_none() {
        ", a placeholder name as the string is namespace-wide,"
    } else {
        ""
    };
    match ws::connect_via(&url, c.tls.as_ref(), &c.opts.proxy, &[], c.opts.timeout).await {
        Ok(conn) => {
            close_at_once(conn, c.opts.timeout).await;
            StepResult::ok(
                Step::Upgrade,
                format!("the relay upgraded /$hc/{entity}{note} with 101"),
            )
        }
        Err(ConnectError::Rejected { status, reason }) => StepResult::ok(
            Step::Upgrade,
            format!("the relay answers WebSocket upgrades on /$hc/{entity}{note} (without a token: {status} {reason})"),
        ),
        Err(e) => {
            c.relay_blocked = Some("the relay does not answer WebSocket upgrades".into());
            upgrade_failure(c, e)
        }
    }
}

fn upgrade_failure(c: &Checkup<'_>, e: ConnectError) -> StepResult {
    let ep = &c.cs().endpoint;
    let (host, port) = (&ep.host, ep.port);
    let port_fix = format!(
        "check that Endpoint names the relay's port and scheme (sb:// for TLS, ws:// for a plain relay), and that no proxy between here and {host}:{port} drops WebSocket upgrades"
    );
    let (finding, fix) = match e {
        ConnectError::Timeout(_) => (
            format!("no answer to the WebSocket upgrade within {}", c.timeout_text()),
            format!(
                "a proxy or firewall may hold or block WebSocket upgrades: allow outbound WebSocket (HTTP Upgrade) to {host}:{port}"
            ),
        ),
        ConnectError::Handshake(h) => (format!("the answer to the upgrade is not HTTP: {h}"), port_fix),
        ConnectError::Io(io) => (
            format!("the connection ended before an answer to the upgrade: {io}"),
            port_fix,
        ),
        ConnectError::BadAccept => (
            "wrong Sec-WebSocket-Accept: something between here and the relay rewrites the upgrade".into(),
            format!("bypass the proxy for {host}"),
        ),
        e => (
            format!("the upgrade failed: {e}"),
            "rerun; the relay stopped answering between steps".into(),
        ),
    };
    StepResult::fail(Step::Upgrade, finding, fix)
}

/// Step 5: the token, from the key or given, and whether the relay accepts it.
pub(super) async fn token(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = c.relay_blocked.clone() {
        c.token_blocked = Some(why.clone());
        return StepResult::skip(Step::Token, format!("skipped: {why}"));
    }
    let entity = c.entity().map(str::to_owned);
    let r = match token_facts(c, entity.as_deref().unwrap_or("")) {
        Err(r) => r,
        Ok(facts) => match &entity {
            Some(entity) => entity_token(c, entity, &facts).await,
            None => namespace_token(c, &facts).await,
        },
    };
    if r.verdict == Verdict::Fail {
        c.token_blocked = Some("the token was not accepted".into());
    }
    r
}

/// The token and what can be said about it without the relay.
struct Facts {
    token: String,
    key_name: String,
    /// "key K, scope S, expires in T (minted from the key)".
    summary: String,
}

fn token_facts(c: &mut Checkup<'_>, entity: &str) -> Result<Facts, StepResult> {
    let token = client::token(c.cs(), entity, TOKEN_TTL);
    c.remember_token(&token);
    let origin = match c.cs().credential {
        Credential::Key { .. } => "minted from the key",
        Credential::Token(_) => "the given SharedAccessSignature",
    };
    let t = SasToken::parse(&token).map_err(|e| {
        let fix = "paste the whole token, from 'SharedAccessSignature sr=' to the key name, or use SharedAccessKeyName and SharedAccessKey";
        StepResult::fail(Step::Token, format!("{origin} is malformed: {e}"), fix)
    })?;
    let now = unix_now();
    if t.expired_at(now) {
        let ago = minutes(now - t.expiry);
        let fix = "mint a fresh token, or use a connection string with SharedAccessKeyName and SharedAccessKey";
        return Err(StepResult::fail(
            Step::Token,
            format!("{origin} (key {}) expired {ago} ago", t.key_name),
            fix,
        ));
    }
    let summary = format!(
        "key {}, scope {}, expires in {} ({origin})",
        t.key_name,
        t.resource,
        minutes(t.expiry - now)
    );
    Ok(Facts {
        token,
        key_name: t.key_name,
        summary,
    })
}

/// Tests the token on the hybrid connection for each plausible right.
async fn entity_token(c: &Checkup<'_>, entity: &str, facts: &Facts) -> StepResult {
    let rights = Right::to_try(&facts.key_name);
    let mut i = 0;
    loop {
        let right = rights[i];
        match test_right(c, entity, &facts.token, right).await {
            Ok(how) => {
                return StepResult::ok(
                    Step::Token,
                    format!("{}; accepted for {}: {how}", facts.summary, right.action()),
                );
            }
            // A rule of unknown rights refused for listen: perhaps a Send rule.
            Err(ConnectError::Rejected { status: 403, reason }) if i + 1 < rights.len() && !is_quota(&reason) => i += 1,
            Err(e) => return judge(c, entity, right, facts, e),
        }
    }
}

/// Opens a listener control channel or a sender connection with `token`, and closes it.
async fn test_right(c: &Checkup<'_>, entity: &str, token: &str, right: Right) -> Result<&'static str, ConnectError> {
    let url = client::hc_url(c.cs(), entity, right.action(), &test_id());
    let headers = [("ServiceBusAuthorization", token)];
    let conn = ws::connect_via(&url, c.tls.as_ref(), &c.opts.proxy, &headers, c.opts.timeout).await?;
    close_at_once(conn, c.opts.timeout).await;
    Ok(match right {
        Right::Listen => "a control channel opened and was closed at once",
        Right::Send => "a listener accepted the test connection, closed at once",
    })
}

/// The verdict on a refused or unanswered token test.
fn judge(c: &Checkup<'_>, entity: &str, right: Right, facts: &Facts, e: ConnectError) -> StepResult {
    let (summary, action) = (&facts.summary, right.action());
    let fresh = format!(
        "copy a fresh {} connection string (hyrelay hc connection-string {entity} {})",
        right.name(),
        right.flag()
    );
    match e {
        ConnectError::Rejected { status: 401, reason } => StepResult::fail(
            Step::Token,
            format!("{summary}; refused for {action}: 401 {reason}"),
            format!("the key is wrong or was regenerated, or the token expired: {fresh}, and check this host's clock"),
        ),
        ConnectError::Rejected { status: 403, reason } if is_quota(&reason) => StepResult::warn(
            Step::Token,
            format!("{summary}; accepted, but the hybrid connection has its maximum of listeners: {reason}"),
            "stop hcms that are no longer needed, or raise max_listeners on the relay",
        ),
        ConnectError::Rejected { status: 403, reason } => StepResult::fail(
            Step::Token,
            format!("{summary}; refused for {action}: 403 {reason}"),
            format!(
                "the key's rule lacks the {} right or the token is for another hybrid connection or host: {fresh}",
                right.name()
            ),
        ),
        ConnectError::Rejected { status: 404, reason } if reason.contains("does not exist") => StepResult::fail(
            Step::Token,
            format!("hybrid connection {entity} does not exist: 404 {reason}"),
            create_fix(entity),
        ),
        ConnectError::Rejected { status, reason } if right == Right::Send => StepResult::ok(
            Step::Token,
            format!("{summary}; accepted for connect (the test connection got {status} {reason})"),
        ),
        ConnectError::Rejected { status, reason } => StepResult::warn(
            Step::Token,
            format!("{summary}; the relay answered the {action} test with {status} {reason}"),
            "rerun; if it persists, see the relay's log",
        ),
        ConnectError::Timeout(_) if right == Right::Send => StepResult::warn(
            Step::Token,
            format!(
                "{summary}; no answer to the connect test within {}: the relay probably accepted the token and is waiting for a listener to accept",
                c.timeout_text()
            ),
            "check the hcm serving this hybrid connection (hyrelay hcm list): it does not accept connections",
        ),
        e => StepResult::fail(
            Step::Token,
            format!("{summary}; the {action} test failed: {e}"),
            "rerun with a longer --timeout; if it persists, see the relay's log",
        ),
    }
}

fn is_quota(reason: &str) -> bool {
    reason.contains("QuotaExceeded")
}

pub(super) fn create_fix(entity: &str) -> String {
    format!("check EntityPath, or create it: hyrelay hc create {entity} --endpoint HOST:PORT")
}

/// A namespace-wide string: the management API needs Manage; that is all one can test.
async fn namespace_token(c: &mut Checkup<'_>, facts: &Facts) -> StepResult {
    let Some(tls) = c.tls.clone() else {
        return c.no_tls(Step::Token);
    };
    let summary = format!("{} (namespace-wide string, no EntityPath)", facts.summary);
    let listing = Management::new(c.cs().clone(), tls).with_proxy(c.opts.proxy.clone());
    let without_entity = "add ;EntityPath=NAME to test the string for one hybrid connection";
    match c.within(listing.list()).await {
        Some(Ok(v)) => {
            let list = v.as_array().cloned().unwrap_or_default();
            let n = list.len();
            c.namespace_list = Some(list);
            StepResult::ok(
                Step::Token,
                format!(
                    "{summary}; accepted for Manage (lists {})",
                    super::count(n, "hybrid connection")
                ),
            )
        }
        Some(Err(ManagementError::Refused { status: 401, message })) => StepResult::fail(
            Step::Token,
            format!("{summary}; refused: 401 {message}"),
            "the key is wrong or was regenerated, or the token expired: copy a fresh connection string, and check this host's clock",
        ),
        Some(Err(ManagementError::Refused { status: 403, message })) => StepResult::warn(
            Step::Token,
            format!(
                "{summary}; the signature is valid, but the rule lacks Manage, so nothing more can be tested: {message}"
            ),
            without_entity,
        ),
        Some(Err(ManagementError::Refused { status, message })) => StepResult::warn(
            Step::Token,
            format!("{summary}; the relay has no hyrelay management API ({status} {message})"),
            without_entity,
        ),
        Some(Err(e)) => StepResult::fail(Step::Token, format!("{summary}; {e}"), "rerun with a longer --timeout"),
        None => StepResult::fail(
            Step::Token,
            format!(
                "{summary}; no answer from the management API within {}",
                c.timeout_text()
            ),
            "rerun with a longer --timeout",
        ),
    }
}

/// Sends Close and waits (bounded) for the relay to end the connection: by then a listen
/// test's control channel is unregistered, so the listener count that follows is exact.
async fn close_at_once(conn: ClientWs, limit: Duration) {
    let ClientWs { stream, leftover, .. } = conn;
    let (r, w) = split(stream);
    let mut writer = WsWriter::new(w, Role::Client);
    let mut reader = WsReader::new(r, leftover, Role::Client, 1 << 20);
    let closing = async {
        if writer.send_close(close_code::NORMAL, "hyrelay doctor").await.is_ok() {
            while let Ok(Some(_)) = reader.next_message(1 << 20).await {}
        }
    };
    let _ = tokio::time::timeout(limit.min(CLOSE_WAIT), closing).await;
}

/// `sb-hc-id` of the test connections, so they can be told apart in the relay's log.
fn test_id() -> String {
    format!("hyrelay-doctor-{}", crate::proto::ids::new_id())
}

/// Whole minutes (or seconds under two minutes), for expiry texts.
fn minutes(secs: u64) -> String {
    let d = if secs >= 120 {
        Duration::from_secs(secs / 60 * 60)
    } else {
        Duration::from_secs(secs)
    };
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_from_key_names() {
        assert_eq!(Right::to_try("defaultListener"), &[Right::Listen]);
        assert_eq!(Right::to_try("defaultSender"), &[Right::Send]);
        assert_eq!(
            Right::to_try("RootManageSharedAccessKey"),
            &[Right::Listen, Right::Send]
        );
    }

    #[test]
    fn minute_texts() {
        assert_eq!(minutes(599), "9m");
        assert_eq!(minutes(90), "1m 30s");
        assert_eq!(minutes(7_260), "2h 1m");
    }
}
