//! A listener's control channel on a relay worker (hc-protocol.md §4, §12 LISTEN).
//!
//! Registration happens before the 101 leaves, so a listener that sees the upgrade
//! complete is already eligible for senders. The task then multiplexes: frames from the
//! listener (`renewToken`, pings, close), commands from the control plane (`accept`
//! notifications, close), its keep-alive timer (`session::Keepalive`), the token's expiry (plus grace) and changes
//! of the relay's state (a regenerated key closes the channel after a grace, 1008).
//!
//! Invariants:
//! - the registration is a guard ([`super::control::Registration`]): whatever way the task
//!   ends, a panic included, the listener is unregistered;
//! - every write to the listener is bounded in time: it must be done before the listener
//!   would count as dead (two ping periods after it was last heard), else the listener is
//!   dropped and its pending senders go to other listeners. A listener that stops reading
//!   cannot keep a channel "connected" (issue 9 item 3);
//! - no timer deadline is computed from a peer's number without saturating (a token that
//!   expires in the year 500 billion is just "far away", issue 9 item 4).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::Ctx;
use super::auth::{Demand, Granted, authorize};
use super::conn::{Incoming, describe, respond};
use super::control::{ListenerCmd, ListenerInfo, Refusal};
use crate::proto::address::HcRequest;
use crate::proto::control::{self, Command};
use crate::proto::frame::{self, OpCode, Role, close_code};
use crate::proto::handshake;
use crate::proto::ids::new_id;
use crate::proto::sas::{Rights, unix_now};
use crate::session::Keepalive;
use crate::transport::Stream;
use crate::transport::ws::{Message, WsReader};

/// Most queued commands written with one write.
const MAX_BATCH: usize = 64;
/// Longest wait for anything: deadlines further out are capped here (about 30 years).
const FAR: Duration = Duration::from_secs(30 * 365 * 86_400);

/// Handles `sb-hc-action=listen`.
pub(super) async fn serve(mut stream: Stream, mut inc: Incoming, req: HcRequest, ctx: Arc<Ctx>) {
    let (head, peer) = (&inc.head, inc.peer);
    let tracking = req.id.as_deref();
    let upgrade = match handshake::validate_upgrade(head) {
        Ok(u) => u,
        Err(e) => return respond(&mut stream, 400, &e.to_string(), "").await,
    };
    let state = ctx.state.load();
    let entity = match state.resolve(&req.path) {
        Some((e, "")) => e.clone(),
        _ => return respond(&mut stream, 404, &describe("Endpoint does not exist.", tracking), "").await,
    };
    let host = head.headers.get("Host");
    let tokens: Vec<&str> = req
        .token
        .as_deref()
        .into_iter()
        .chain(head.headers.get("ServiceBusAuthorization"))
        .collect();
    let demand = Demand {
        entity: Some(&entity),
        path: &entity.name,
        hosts: ctx.hosts(),
        right: Rights::LISTEN,
        now: unix_now(),
    };
    let granted = match authorize(&state, &tokens, &demand) {
        Ok(g) => g,
        Err(e) => {
            inc.auth_failed(&ctx, &e);
            tracing::info!(event = "listener_refused", hc = %entity.name, %peer, status = e.status(), reason = %e, "listener refused");
            return respond(&mut stream, e.status(), &describe(&e.to_string(), tracking), "").await;
        }
    };
    drop(state);
    inc.pending.done();
    let info = ListenerInfo {
        id: req.id.clone().unwrap_or_else(new_id),
        remote: Some(peer),
        base_url: format!("{}://{}", ctx.scheme(), host.unwrap_or("localhost")),
        connected_at: SystemTime::now(),
    };
    let listener_id = info.id.clone();
    // Subscribed before registering, so no change of the state can slip in between.
    let changes = ctx.state.subscribe();
    let mut reg = match ctx.ctl.register(&entity.name, info).await {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                Refusal::NotFound => 404,
                Refusal::ShuttingDown => 503,
                _ => 403,
            };
            return respond(&mut stream, status, &describe(&e.to_string(), tracking), "").await;
        }
    };
    let upgrade_written = tokio::time::timeout(
        ctx.cfg.handshake_timeout,
        super::conn::write_flush(
            &mut stream,
            &ctx.pool.advertise(handshake::switching_protocols(&upgrade.key, None)),
        ),
    )
    .await;
    if !matches!(upgrade_written, Ok(Ok(()))) {
        tracing::debug!(%peer, "listener went away during the upgrade");
        return; // `reg` unregisters
    }
    tracing::info!(event = "listener_registered", hc = %entity.name, listener = %listener_id, %peer, "listener registered");
    let (r, w) = tokio::io::split(stream);
    let max_message = ctx.cfg.max_control_message;
    let mut chan = Channel {
        reader: WsReader::new(r, inc.buf, Role::Server, max_message as u64),
        writer: w,
        entity_name: entity.name.clone(),
        max_message,
        keep: Keepalive::new(Instant::now().into_std(), ctx.cfg.ping_interval),
        granted,
        revoked_at: None,
        key: reg.key,
        awaiting_body: None,
        owed_close: None,
    };
    let (why, end) = chan.run(&mut reg.commands, changes, &ctx).await;
    metrics::counter!(crate::telemetry::metrics::RELAY_CONTROL_CLOSED, "reason" => why).increment(1);
    // Unregistered before the listener's Close is answered: once it has the answer, no
    // sender is sent to it and the runtime information no longer counts it.
    drop(reg);
    if let Some(code) = chan.owed_close {
        chan.send(OpCode::Close, &frame::close_payload(code, "")).await.ok();
        crate::transport::ws::close_tls(&mut chan.writer).await;
    }
    tracing::info!(event = "listener_unregistered", hc = %entity.name, listener = %listener_id, %peer, reason = %end, "listener unregistered");
}

struct Channel {
    reader: WsReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
    entity_name: String,
    /// Largest message the listener may send (`limits.max_control_message_bytes`).
    max_message: usize,
    /// Ping each period; the listener is dead after two silent periods (sans-IO).
    keep: Keepalive,
    /// The token that holds the channel open (the first, or the last renewal).
    granted: Granted,
    /// Set when the key behind `granted` was regenerated: the channel closes then.
    revoked_at: Option<(Instant, String)>,
    /// This listener's registration key (HTTP-mode responses must come from the listener
    /// their request went to).
    key: u64,
    /// An HTTP-mode `response` whose body message comes next.
    awaiting_body: Option<control::Response>,
    /// The listener closed with this code: the answer goes out once it is unregistered.
    owed_close: Option<u16>,
}

/// `now + after`, or [`FAR`] from now if that is further (never overflows).
fn deadline_in(after: Duration) -> Instant {
    Instant::now() + after.min(FAR)
}

/// When a token that expires at `expiry` (Unix seconds) stops holding the channel open.
fn expiry_deadline(expiry: u64, grace: Duration) -> Instant {
    deadline_in(Duration::from_secs(expiry.saturating_sub(unix_now())).saturating_add(grace))
}

/// Why a write to the listener did not complete.
#[derive(Debug)]
enum WriteFailed {
    Io(std::io::Error),
    /// Not done before the listener would have counted as dead: it is not reading.
    Stalled,
}

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteFailed::Io(e) => write!(f, "write failed: {e}"),
            WriteFailed::Stalled => {
                f.write_str("the listener stopped reading (write not done within two ping periods)")
            }
        }
    }
}

impl WriteFailed {
    fn reason(&self) -> &'static str {
        match self {
            WriteFailed::Io(_) => "io_error",
            WriteFailed::Stalled => "stalled",
        }
    }
}

impl Channel {
    /// Two ping periods after the listener was last heard: silent until then means dead.
    fn dead_at(&self) -> Instant {
        Instant::from_std(self.keep.dead_at())
    }

    /// Writes `bytes` (whole frames) and flushes, by [`Channel::dead_at`] at the latest.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), WriteFailed> {
        let deadline = self.dead_at();
        let w = &mut self.writer;
        let io = async move {
            w.write_all(bytes).await?;
            w.flush().await
        };
        bounded(deadline, io).await
    }

    async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), WriteFailed> {
        let f = frame::encode_frame(true, opcode, None, payload);
        self.write(&f).await
    }

    async fn run(
        &mut self,
        commands: &mut tokio::sync::mpsc::Receiver<ListenerCmd>,
        mut changes: tokio::sync::watch::Receiver<Arc<super::store::State>>,
        ctx: &Ctx,
    ) -> (&'static str, String) {
        // One timer for the keep-alive rules: the next ping or the dead-peer check.
        let mut timer_at = self.keep.poll_timeout().unwrap_or(self.keep.dead_at());
        let timer = tokio::time::sleep_until(timer_at.into());
        tokio::pin!(timer);
        let mut expires = expiry_deadline(self.granted.expiry, ctx.cfg.token_grace);
        let mut batch = Vec::new();
        loop {
            if let Some(at) = self.keep.poll_timeout()
                && at != timer_at
            {
                timer_at = at;
                timer.as_mut().reset(at.into());
            }
            let revoke = self
                .revoked_at
                .as_ref()
                .map(|(at, _)| *at)
                .unwrap_or_else(|| deadline_in(FAR));
            tokio::select! {
                // Frames first, so that one that arrived counts before the dead-peer check.
                biased;
                // Cancel-safe: the reader keeps its state in the struct.
                msg = self.reader.next_message(self.max_message) => {
                    self.keep.handle_heard(Instant::now().into_std());
                    match msg {
                        Ok(Some(Message::Text(t))) => match control::decode(&t) {
                            Ok(Command::RenewToken { token }) => match self.renew(&token, ctx) {
                                Ok(g) => {
                                    metrics::counter!(crate::telemetry::metrics::RELAY_TOKEN_RENEWALS, "result" => "ok").increment(1);
                                    expires = expiry_deadline(g.expiry, ctx.cfg.token_grace);
                                    tracing::info!(event = "token_renewed", hc = %self.entity_name, expiry = g.expiry, "listener token renewed");
                                    self.granted = g;
                                    self.revoked_at = None;
                                }
                                Err(reason) => {
                                    metrics::counter!(crate::telemetry::metrics::RELAY_TOKEN_RENEWALS, "result" => "rejected").increment(1);
                                    tracing::info!(event = "token_rejected", hc = %self.entity_name, %reason, "renewToken rejected");
                                    return ("token_rejected", self.close(close_code::POLICY, &reason).await);
                                }
                            },
                            Ok(Command::Response(r)) => self.response(r, ctx),
                            Ok(_) => {} // other commands (injectFault, …) are ignored
                            Err(e) => tracing::debug!(hc = %self.entity_name, error = %e, "ignoring malformed control message"),
                        },
                        // A response's body; any other binary message (hyco-https sends an
                        // empty one after every body-less response) is ignored.
                        Ok(Some(Message::Binary(b))) => {
                            if let Some(r) = self.awaiting_body.take() {
                                self.deliver(r, b, ctx);
                            }
                        }
                        Ok(Some(Message::Pong(_))) => {}
                        Ok(Some(Message::Ping(p))) => {
                            if let Err(e) = self.send(OpCode::Pong, &p).await {
                                return (e.reason(), e.to_string());
                            }
                        }
                        Ok(Some(Message::Close(c))) => {
                            let code = c.code.unwrap_or(close_code::NORMAL);
                            self.owed_close = Some(code);
                            return ("listener_closed", format!("closed by listener ({code})"));
                        }
                        Ok(None) => return ("connection_lost", "connection closed without a close frame".into()),
                        // The connection went away (no Close frame): not the peer's protocol fault.
                        Err(crate::transport::ws::WsError::Io(e)) => {
                            return ("connection_lost", format!("connection lost without a close frame: {e}"));
                        }
                        Err(e) => {
                            self.send(OpCode::Close, &frame::close_payload(e.close_code(), &e.to_string())).await.ok();
                            return ("protocol_error", format!("protocol error: {e}"));
                        }
                    }
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else {
                        return ("shutdown", self.close(close_code::GOING_AWAY, "The relay is shutting down.").await);
                    };
                    // Everything already queued goes out with one write.
                    batch.clear();
                    let mut close = None;
                    let mut next = Some(cmd);
                    let mut n = 0;
                    while let Some(c) = next.take() {
                        match c {
                            ListenerCmd::Send(text) => batch.extend_from_slice(&frame::encode_frame(true, OpCode::Text, None, text.as_bytes())),
                            // A request and its body back to back, in the same write.
                            ListenerCmd::Request { text, body } => {
                                batch.extend_from_slice(&frame::encode_frame(true, OpCode::Text, None, text.as_bytes()));
                                if let Some(b) = body {
                                    batch.extend_from_slice(&frame::encode_frame(true, OpCode::Binary, None, &b));
                                }
                            }
                            ListenerCmd::Close(code, reason) => {
                                close = Some((code, reason));
                                break;
                            }
                        }
                        n += 1;
                        if n < MAX_BATCH {
                            next = commands.try_recv().ok();
                        }
                    }
                    if !batch.is_empty() {
                        let bytes = std::mem::take(&mut batch);
                        let written = self.write(&bytes).await;
                        batch = bytes;
                        if let Err(e) = written {
                            tracing::info!(hc = %self.entity_name, error = %e, "dropping a listener that does not take its messages");
                            return (e.reason(), e.to_string());
                        }
                    }
                    if let Some((code, reason)) = close {
                        return ("closed_by_relay", self.close(code, &reason).await);
                    }
                }
                () = &mut timer => {
                    self.keep.handle_timeout(Instant::now().into_std());
                    if self.keep.is_dead() {
                        return ("dead", "silent for two ping periods".into());
                    }
                    if self.keep.poll_ping()
                        && let Err(e) = self.send(OpCode::Ping, b"").await
                    {
                        return (e.reason(), e.to_string());
                    }
                }
                _ = tokio::time::sleep_until(expires) => {
                    tracing::info!(event = "token_expired", hc = %self.entity_name, "listener token expired; closing control channel");
                    return ("token_expired", self.close(close_code::POLICY, "The listener token expired.").await);
                }
                Ok(()) = changes.changed() => {
                    let state = changes.borrow_and_update().clone();
                    self.recheck_key(&state, ctx.cfg.revoked_key_grace);
                }
                _ = tokio::time::sleep_until(revoke), if self.revoked_at.is_some() => {
                    let why = self.revoked_at.take().map(|(_, w)| w).unwrap_or_default();
                    tracing::info!(event = "key_revoked", hc = %self.entity_name, reason = %why, "closing a control channel whose key was regenerated");
                    return ("key_revoked", self.close(close_code::POLICY, &why).await);
                }
                _ = ctx.drain.cancelled() => {
                    return ("shutdown", self.close(close_code::GOING_AWAY, "The relay is shutting down.").await);
                }
            }
        }
    }

    /// An HTTP-mode `response` on the control channel; with `body:true` its body is the
    /// next binary message.
    fn response(&mut self, r: control::Response, ctx: &Ctx) {
        // A response announced with a body but followed by another text message: empty.
        if let Some(prev) = self.awaiting_body.take() {
            self.deliver(prev, bytes::Bytes::new(), ctx);
        }
        if r.body {
            self.awaiting_body = Some(r);
        } else {
            self.deliver(r, bytes::Bytes::new(), ctx);
        }
    }

    fn deliver(&self, response: control::Response, body: bytes::Bytes, ctx: &Ctx) {
        let id = response.request_id.clone();
        let inline = super::http::pending::Inline { response, body };
        if !ctx.http.respond(self.key, inline) {
            tracing::debug!(hc = %self.entity_name, request = %id, "response for no request of this listener (late or unknown); ignored");
        }
    }

    /// After a change of the relay's state: if the key this channel authenticated with is
    /// gone, the channel closes `grace` from now (issue 9 item 10).
    fn recheck_key(&mut self, state: &super::store::State, grace: Duration) {
        match super::auth::still_valid(state, &self.entity_name, &self.granted) {
            Ok(()) => self.revoked_at = None,
            Err(why) if self.revoked_at.is_none() => {
                tracing::info!(hc = %self.entity_name, reason = %why, grace_ms = grace.as_millis() as u64, "a listener's key was revoked; closing its control channel after the grace");
                self.revoked_at = Some((deadline_in(grace), why));
            }
            Err(_) => {}
        }
    }

    fn renew(&self, token: &str, ctx: &Ctx) -> Result<Granted, String> {
        let state = ctx.state.load();
        let entity = state
            .entity(&self.entity_name)
            .ok_or("The hybrid connection was deleted.")?;
        let demand = Demand {
            entity: Some(entity),
            path: &entity.name,
            hosts: ctx.hosts(),
            right: Rights::LISTEN,
            now: unix_now(),
        };
        authorize(&state, &[token], &demand).map_err(|e| e.to_string())
    }

    /// Sends Close, waits briefly for the echo, and reports why.
    async fn close(&mut self, code: u16, reason: &str) -> String {
        let payload = frame::close_payload(code, reason);
        // The close gets its own short bound: the channel is ending either way.
        let f = frame::encode_frame(true, OpCode::Close, None, &payload);
        let w = &mut self.writer;
        let sent = tokio::time::timeout(Duration::from_secs(2), async move {
            w.write_all(&f).await?;
            w.flush().await
        })
        .await;
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(m)) = self.reader.next_message(self.max_message).await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            crate::transport::ws::close_tls(&mut self.writer).await;
        }
        format!("closed by relay ({code} {reason})")
    }
}

/// Runs a write that must be done by `deadline`.
async fn bounded(deadline: Instant, io: impl Future<Output = std::io::Result<()>>) -> Result<(), WriteFailed> {
    match tokio::time::timeout_at(deadline, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteFailed::Io(e)),
        Err(_) => Err(WriteFailed::Stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 4: `se` near 2^64 used to overflow `Instant + Duration` and panic.
    #[test]
    fn far_future_expiry_does_not_overflow() {
        let d = expiry_deadline(u64::MAX, Duration::from_secs(300));
        assert!(d > Instant::now() + Duration::from_secs(365 * 86_400));
        let d = expiry_deadline(u64::MAX - 1, Duration::MAX);
        assert!(d <= Instant::now() + FAR + Duration::from_secs(1));
        assert!(expiry_deadline(0, Duration::ZERO) <= Instant::now());
    }
}
