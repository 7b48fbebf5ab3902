//! One hybrid connection's control channel, as a listener (hc-protocol.md §13).
//!
//! Loop: resolve the endpoint (config override, else the entity's metadata from the
//! runtime-information GET), connect with a fresh token, then serve `accept`s until the
//! channel ends; reconnect with exponential backoff and jitter. The token is renewed over
//! the channel at 80 % of its lifetime; the relay is pinged every ping period and a channel
//! silent for two periods is dropped.
//!
//! An endpoint outside the config's `allowed_endpoints` ends the attempt before the control
//! channel is opened (logged as `endpoint_not_allowed`, shown as the status's last error);
//! it is retried with the same backoff, since the metadata may change.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::state::ChannelState;
use super::{HcRt, HcmCtx};
use crate::client;
use crate::proto::control::{self, Command, MAX_CONTROL_MESSAGE};
use crate::proto::frame::{OpCode, Role, close_code};
use crate::proto::metadata::{self, HostPort};
use crate::session::{Keepalive, Renewal};
use crate::transport::ws::{self, Message, WsReader, WsWriter};

/// Reconnect delays: the first retry within 1 s, then doubling with jitter up to a cap;
/// reset after a stable connection.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Self { attempt: 0, cap }
    }

    /// The next delay: attempt 0 is uniform in [0, 1 s); attempt n ≥ 1 is uniform in
    /// [b/2, b) with b = min(cap, 2ⁿ s).
    pub fn next_delay(&mut self) -> Duration {
        let n = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        let base = Duration::from_secs(1u64 << n.min(20)).min(self.cap);
        let lo = if n == 0 { Duration::ZERO } else { base / 2 };
        let span = (base - lo).as_millis().max(1) as u64;
        lo + Duration::from_millis(rand::random_range(0..span))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Why a session ended; `unreachable` when the relay could not be reached at all;
/// `connected` when the control channel was up, and since when.
struct End {
    reason: String,
    unreachable: bool,
    connected: Option<Instant>,
}

impl End {
    /// A bounded reason word for metrics.
    fn kind(&self) -> &'static str {
        let r = self.reason.as_str();
        if self.unreachable {
            "unreachable"
        } else if r.contains("relay answered 401")
            || r.contains("relay answered 403")
            || r.contains("refused the credentials")
        {
            "auth_failed"
        } else if r.contains("1008") {
            "token_expired"
        } else if r.contains("relay closed") {
            "closed_by_relay"
        } else if r.contains("silent") {
            "dead"
        } else if r.contains("does not exist") || r.contains("no endpoint metadata") || r.contains("not allowed") {
            "configuration"
        } else {
            "error"
        }
    }
}

impl From<String> for End {
    fn from(reason: String) -> Self {
        Self {
            reason,
            unreachable: false,
            connected: None,
        }
    }
}

/// Longest wait between attempts while the relay cannot be reached at all: probing a
/// closed port is cheap, and a restarted relay gets its listeners back within 2 s.
const UNREACHABLE_RETRY: Duration = Duration::from_millis(1500);

/// Serves the hybrid connection until its `stop` token fires.
pub(crate) async fn run(hc: Arc<HcRt>, ctx: Arc<HcmCtx>) {
    let mut backoff = Backoff::new(ctx.cfg.max_backoff);
    let name = hc.entry.name().to_owned();
    loop {
        hc.set_state(ChannelState::Connecting);
        // Not raced against `stop`: the session watches it and, once connected, closes the
        // channel properly (WebSocket Close, TLS close_notify) before it returns.
        let end = session(&hc, &ctx).await;
        if hc.stop.is_cancelled() {
            hc.set_state(ChannelState::Stopped);
            tracing::info!(hc = %name, "control channel stopped");
            return;
        }
        // A channel that was up for a while and then lost (a relay restart, a drain) is
        // retried at once, however many times that happened before (issue 9 item 11); one
        // dropped right after it opened keeps backing off.
        if end.connected.is_some_and(|at| at.elapsed() >= ctx.cfg.stable_after) {
            backoff.reset();
        }
        let mut delay = backoff.next_delay();
        if end.unreachable {
            delay = delay.min(UNREACHABLE_RETRY);
        }
        metrics::gauge!(crate::telemetry::metrics::HCM_CHANNEL_UP, "hc" => name.clone()).set(0.0);
        metrics::counter!(crate::telemetry::metrics::HCM_RECONNECTS, "hc" => name.clone(), "reason" => end.kind())
            .increment(1);
        let end = end.reason;
        hc.update(|s| {
            s.reconnects += 1;
            s.last_error = Some(end.clone());
            s.note_error(super::state::Segment::Relay, &end);
        });
        hc.set_state(ChannelState::Disconnected);
        tracing::warn!(event = "control_channel_down", hc = %name, reason = %end, retry_in_ms = delay.as_millis() as u64, "control channel down; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = hc.stop.cancelled() => {
                hc.set_state(ChannelState::Stopped);
                return;
            }
        }
    }
}

async fn endpoint(hc: &HcRt, ctx: &HcmCtx) -> Result<HostPort, End> {
    if let Some(e) = &hc.entry.endpoint {
        return Ok(e.clone());
    }
    let info = client::runtime_info(
        &hc.entry.connection_string,
        hc.entry.name(),
        &ctx.tls,
        &ctx.cfg.proxy,
        ctx.cfg.relay_timeout,
    )
    .await
    .map_err(|e| End {
        unreachable: matches!(&e, client::InfoError::Unreachable(c) if c.is_unreachable()),
        reason: e.to_string(),
        connected: None,
    })?;
    match metadata::endpoint_from_user_metadata(&info.user_metadata) {
        Ok(Some(ep)) => Ok(ep),
        Ok(None) => Err(End::from(format!(
            "hybrid connection {:?} has no endpoint metadata; set `endpoint` for it in the hcm config",
            hc.entry.name()
        ))),
        Err(e) => Err(End::from(format!("hybrid connection {:?}: {e}", hc.entry.name()))),
    }
}

/// Refuses an endpoint outside the config's `allowed_endpoints`, with the status text.
pub(crate) fn check_allowed(endpoint: &HostPort, ctx: &HcmCtx) -> Result<(), String> {
    if ctx.allowed.read().unwrap_or_else(|e| e.into_inner()).allows(endpoint) {
        Ok(())
    } else {
        Err(format!(
            "endpoint {endpoint} is not allowed by this hcm's allowed_endpoints"
        ))
    }
}

/// One connection of the control channel; returns why it ended.
async fn session(hc: &Arc<HcRt>, ctx: &Arc<HcmCtx>) -> End {
    let mut connected = None;
    match serve_session(hc, ctx, &mut connected).await {
        Ok(reason) => End {
            reason,
            unreachable: false,
            connected,
        },
        Err(e) => e,
    }
}

/// Whether a write to the relay finished in time: it must be done before the relay would
/// count as silent for two ping periods, or the relay is not reading and the channel is
/// dropped (the relay-side twin of issue 9 item 3).
async fn bounded(deadline: Instant, io: impl std::future::Future<Output = std::io::Result<()>>) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write to the relay failed: {e}")),
        Err(_) => Err("the relay stopped reading (write not done within two ping periods)".into()),
    }
}

async fn serve_session(hc: &Arc<HcRt>, ctx: &Arc<HcmCtx>, connected: &mut Option<Instant>) -> Result<String, End> {
    let entry = &hc.entry;
    let cs = &entry.connection_string;
    let endpoint = tokio::select! {
        e = endpoint(hc, ctx) => e?,
        _ = hc.stop.cancelled() => return Ok("stopped".into()),
    };
    hc.update(|s| s.endpoint = Some(endpoint.to_string()));
    if let Err(why) = check_allowed(&endpoint, ctx) {
        tracing::warn!(event = "endpoint_not_allowed", hc = %entry.name(), %endpoint, "endpoint is not in allowed_endpoints; not opening the control channel");
        return Err(End::from(why));
    }
    let ttl = ctx.cfg.token_ttl;
    let token = client::token(cs, entry.name(), ttl);
    let url = client::hc_url(cs, entry.name(), "listen", &hc.listener_id);
    let auth = [("ServiceBusAuthorization", token.as_str())];
    let connect = ws::connect_via(&url, Some(&ctx.tls), &ctx.cfg.proxy, &auth, ctx.cfg.relay_timeout);
    let conn = match tokio::select! {
        c = connect => c,
        _ = hc.stop.cancelled() => return Ok("stopped".into()),
    } {
        Ok(c) => c,
        Err(e) => {
            return Err(End {
                unreachable: e.is_unreachable(),
                reason: format!("cannot open the control channel: {e}"),
                connected: None,
            });
        }
    };
    *connected = Some(Instant::now());
    // hyrelay extension: pooled rendezvous connections while this session lasts.
    let _pool = super::pool::start_if_offered(hc, ctx, &endpoint, &conn.response);
    hc.set_state(ChannelState::Connected);
    hc.update(|s| {
        s.last_error = None;
        s.token_expires = super::state::token_expiry(entry, ttl);
    });
    metrics::gauge!(crate::telemetry::metrics::HCM_CHANNEL_UP, "hc" => entry.name().to_owned()).set(1.0);
    tracing::info!(event = "control_channel_up", hc = %entry.name(), relay = %cs.endpoint.authority(), endpoint = %endpoint, "control channel connected");
    let (r, w) = tokio::io::split(conn.stream);
    let mut reader = WsReader::new(r, conn.leftover, Role::Client, MAX_CONTROL_MESSAGE as u64);
    let mut writer = WsWriter::new(w, Role::Client);
    // HTTP mode: answers to write back, and an inline request waiting for its body.
    let (reply_tx, mut replies) = tokio::sync::mpsc::channel::<super::http::Reply>(64);
    let mut awaiting_body: Option<control::Request> = None;
    // The session rules (sans-IO): ping each period, the relay dead after two silent
    // periods, and the token renewed at 80 % of its lifetime. Each write is bounded by the
    // dead-peer deadline, so a relay that stops reading cannot hold the channel.
    let now = || Instant::now().into_std();
    let mut keep = Keepalive::new(now(), ctx.cfg.ping_interval);
    let mut renewal = Renewal::new(now(), ttl, ctx.cfg.renew_tokens && entry.has_key());
    let mut timer_at = keep.poll_timeout().unwrap_or(keep.dead_at());
    let timer = tokio::time::sleep_until(timer_at.into());
    tokio::pin!(timer);
    loop {
        if let Some(at) = keep.poll_timeout()
            && at != timer_at
        {
            timer_at = at;
            timer.as_mut().reset(at.into());
        }
        let limit = Instant::from_std(keep.dead_at());
        let renew_at = renewal.poll_timeout().map(Instant::from_std);
        tokio::select! {
            // Frames first, so that one that arrived counts before the dead-peer check.
            biased;
            // Cancel-safe: the reader keeps its state.
            m = reader.next_message(MAX_CONTROL_MESSAGE) => {
                keep.handle_heard(now());
                let limit = Instant::from_std(keep.dead_at());
                match m {
                    Ok(Some(Message::Text(t))) => match control::decode(&t) {
                        Ok(Command::Accept(a)) => {
                            let (hc, ctx, ep) = (hc.clone(), ctx.clone(), endpoint.clone());
                            ctx.workers.clone().spawn(move || super::accept::handle(a, hc, ep, ctx));
                        }
                        Ok(Command::Request(r)) => {
                            if r.http.as_ref().is_some_and(|h| h.body) {
                                awaiting_body = Some(r);
                            } else {
                                spawn_request(r, None, &reply_tx, hc, ctx, &endpoint);
                            }
                        }
                        Ok(Command::Unknown(name)) => {
                            tracing::debug!(hc = %entry.name(), command = %name, "ignoring unknown control command");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(hc = %entry.name(), error = %e, "ignoring malformed control message"),
                    },
                    Ok(Some(Message::Ping(p))) => {
                        if let Err(e) = bounded(limit, writer.send(true, OpCode::Pong, &p)).await {
                            return Ok(e);
                        }
                    }
                    // The body of an inline request; other binary messages are ignored.
                    Ok(Some(Message::Binary(b))) => {
                        if let Some(r) = awaiting_body.take() {
                            spawn_request(r, Some(b), &reply_tx, hc, ctx, &endpoint);
                        }
                    }
                    Ok(Some(Message::Pong(_))) => {}
                    Ok(Some(Message::Close(c))) => {
                        bounded(limit, writer.send_close(c.code.unwrap_or(close_code::NORMAL), "")).await.ok();
                        ws::close_tls(writer.get_mut()).await;
                        return Ok(format!("relay closed the control channel ({} {})", c.code.unwrap_or(1005), c.reason));
                    }
                    Ok(None) => return Ok("relay closed the connection".into()),
                    Err(e) => {
                        bounded(limit, writer.send_close(e.close_code(), "")).await.ok();
                        return Ok(format!("control channel error: {e}"));
                    }
                }
            }
            // Cancel-safe: a reply stays queued until received.
            Some(reply) = replies.recv() => {
                let sent = async {
                    writer.send_text(&reply.text).await?;
                    if let Some(b) = &reply.body {
                        writer.send(true, OpCode::Binary, b).await?;
                    }
                    Ok::<_, std::io::Error>(())
                };
                // Bounded like every write here: a relay that stops reading cannot hold it.
                if let Err(e) = bounded(limit, sent).await {
                    return Ok(e);
                }
            }
            _ = tokio::time::sleep_until(renew_at.unwrap_or(limit)), if renew_at.is_some() => {
                if renewal.handle_timeout(now()) {
                    let fresh = client::token(cs, entry.name(), ttl);
                    if let Err(e) = bounded(limit, writer.send_text(&control::encode_renew_token(&fresh))).await {
                        return Ok(format!("cannot renew the token: {e}"));
                    }
                    tracing::info!(event = "token_renewed", hc = %entry.name(), "listener token renewed");
                    hc.update(|s| s.token_expires = super::state::token_expiry(entry, ttl));
                    renewal.handle_renewed(now());
                }
            }
            () = &mut timer => {
                keep.handle_timeout(now());
                if keep.is_dead() {
                    return Ok("relay silent for two ping periods".into());
                }
                if keep.poll_ping()
                    && let Err(e) = bounded(limit, writer.send(true, OpCode::Ping, b"")).await
                {
                    return Ok(e);
                }
            }
            _ = hc.stop.cancelled() => {
                bounded(Instant::now() + Duration::from_secs(2), writer.send_close(close_code::NORMAL, "hcm stopping")).await.ok();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(Some(m)) = reader.next_message(MAX_CONTROL_MESSAGE).await {
                        if matches!(m, Message::Close(_)) { break; }
                    }
                }).await;
                ws::close_tls(writer.get_mut()).await;
                return Ok("stopped".into());
            }
        }
    }
}

/// Serves an HTTP-mode request on a data-plane worker.
fn spawn_request(
    r: control::Request,
    body: Option<bytes::Bytes>,
    replies: &super::http::ReplyTx,
    hc: &Arc<HcRt>,
    ctx: &Arc<HcmCtx>,
    endpoint: &HostPort,
) {
    let (replies, hc, ctx2, ep) = (replies.clone(), hc.clone(), ctx.clone(), endpoint.clone());
    ctx.workers
        .clone()
        .spawn(move || super::http::handle(r, body, replies, hc, ep, ctx2));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_shape() {
        let mut b = Backoff::new(Duration::from_secs(30));
        assert!(b.next_delay() < Duration::from_secs(1), "first retry within 1 s");
        let d = b.next_delay();
        assert!(d >= Duration::from_secs(1) && d < Duration::from_secs(2));
        for _ in 0..10 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_secs(1));
    }
}
