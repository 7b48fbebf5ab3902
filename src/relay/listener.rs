//! A listener's control channel on a relay worker (hc-protocol.md §4, §12 LISTEN).
//!
//! Registration happens before the 101 leaves, so a listener that sees the upgrade
//! complete is already eligible for senders. The task then multiplexes: frames from the
//! listener (`renewToken`, pings, close), commands from the control plane (`accept`
//! notifications, close), its own ping timer and the token's expiry (plus grace).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::Ctx;
use super::auth::{Demand, authorize};
use super::conn::{Incoming, describe, respond};
use super::control::{ListenerCmd, ListenerInfo, Refusal};
use crate::proto::address::HcRequest;
use crate::proto::control::{self, Command};
use crate::proto::frame::{OpCode, Role, close_code};
use crate::proto::handshake;
use crate::proto::ids::new_id;
use crate::proto::sas::{Rights, unix_now};
use crate::transport::Stream;
use crate::transport::ws::{Message, WsReader, WsWriter};

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
    let hosts = ctx.hosts(host);
    let tokens: Vec<&str> = req
        .token
        .as_deref()
        .into_iter()
        .chain(head.headers.get("ServiceBusAuthorization"))
        .collect();
    let demand = Demand {
        entity: Some(&entity),
        path: &entity.name,
        hosts: &hosts,
        right: Rights::LISTEN,
        now: unix_now(),
    };
    let granted = match authorize(&state, &tokens, &demand) {
        Ok(g) => g,
        Err(e) => {
            inc.auth_failed(&ctx);
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
    let mut reg = match ctx.ctl.register(&entity.name, info) {
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
    if let Err(e) = super::conn::write_flush(&mut stream, &handshake::switching_protocols(&upgrade.key, None)).await {
        tracing::debug!(%peer, error = %e, "listener went away during the upgrade");
        ctx.ctl.unregister(&entity.name, reg.key);
        return;
    }
    tracing::info!(event = "listener_registered", hc = %entity.name, listener = %listener_id, %peer, "listener registered");
    let (r, w) = tokio::io::split(stream);
    let max_message = ctx.cfg.max_control_message;
    let mut chan = Channel {
        reader: WsReader::new(r, inc.buf, Role::Server, max_message as u64),
        writer: WsWriter::new(w, Role::Server),
        hosts,
        entity_name: entity.name.clone(),
        max_message,
    };
    let (why, end) = chan.run(&mut reg.commands, granted.expiry, &ctx).await;
    metrics::counter!(crate::telemetry::metrics::RELAY_CONTROL_CLOSED, "reason" => why).increment(1);
    ctx.ctl.unregister(&entity.name, reg.key);
    tracing::info!(event = "listener_unregistered", hc = %entity.name, listener = %listener_id, %peer, reason = %end, "listener unregistered");
}

struct Channel {
    reader: WsReader<ReadHalf<Stream>>,
    writer: WsWriter<WriteHalf<Stream>>,
    hosts: Vec<String>,
    entity_name: String,
    /// Largest message the listener may send (`limits.max_control_message_bytes`).
    max_message: usize,
}

/// When a token that expires at `expiry` (Unix seconds) stops holding the channel open.
fn expiry_deadline(expiry: u64, grace: Duration) -> Instant {
    let left = expiry.saturating_sub(unix_now());
    Instant::now() + Duration::from_secs(left) + grace
}

impl Channel {
    async fn run(
        &mut self,
        commands: &mut tokio::sync::mpsc::Receiver<ListenerCmd>,
        expiry: u64,
        ctx: &Ctx,
    ) -> (&'static str, String) {
        let period = ctx.cfg.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        // Dead after two ping periods without any frame: checked at exactly that moment.
        let mut heard = Instant::now();
        let dead = tokio::time::sleep_until(heard + period * 2);
        tokio::pin!(dead);
        let mut expires = expiry_deadline(expiry, ctx.cfg.token_grace);
        loop {
            tokio::select! {
                // Frames first, so that one that arrived counts before the dead-peer check.
                biased;
                // Cancel-safe: the reader keeps its state in the struct.
                msg = self.reader.next_message(self.max_message) => {
                    heard = Instant::now();
                    match msg {
                        Ok(Some(Message::Text(t))) => match control::decode(&t) {
                            Ok(Command::RenewToken { token }) => match self.renew(&token, ctx) {
                                Ok(exp) => {
                                    metrics::counter!(crate::telemetry::metrics::RELAY_TOKEN_RENEWALS, "result" => "ok").increment(1);
                                    expires = expiry_deadline(exp, ctx.cfg.token_grace);
                                    tracing::info!(event = "token_renewed", hc = %self.entity_name, expiry = exp, "listener token renewed");
                                }
                                Err(reason) => {
                                    metrics::counter!(crate::telemetry::metrics::RELAY_TOKEN_RENEWALS, "result" => "rejected").increment(1);
                                    tracing::info!(event = "token_rejected", hc = %self.entity_name, %reason, "renewToken rejected");
                                    return ("token_rejected", self.close(close_code::POLICY, &reason).await);
                                }
                            },
                            Ok(_) => {} // other commands (HTTP-mode responses, injectFault) are ignored
                            Err(e) => tracing::debug!(hc = %self.entity_name, error = %e, "ignoring malformed control message"),
                        },
                        Ok(Some(Message::Binary(_))) | Ok(Some(Message::Pong(_))) => {}
                        Ok(Some(Message::Ping(p))) => {
                            if self.writer.send(true, OpCode::Pong, &p).await.is_err() {
                                return ("io_error", "write failed".into());
                            }
                        }
                        Ok(Some(Message::Close(c))) => {
                            let code = c.code.unwrap_or(close_code::NORMAL);
                            self.writer.send_close(code, "").await.ok();
                            return ("listener_closed", format!("closed by listener ({code})"));
                        }
                        Ok(None) => return ("connection_lost", "connection closed without a close frame".into()),
                        Err(e) => {
                            self.writer.send_close(e.close_code(), &e.to_string()).await.ok();
                            return ("protocol_error", format!("protocol error: {e}"));
                        }
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some(ListenerCmd::Send(text)) => {
                        if let Err(e) = self.writer.send_text(&text).await {
                            return ("io_error", format!("write failed: {e}"));
                        }
                    }
                    Some(ListenerCmd::Close(code, reason)) => return ("closed_by_relay", self.close(code, &reason).await),
                    None => return ("shutdown", self.close(close_code::GOING_AWAY, "The relay is shutting down.").await),
                },
                _ = ping.tick() => {
                    if self.writer.send(true, OpCode::Ping, b"").await.is_err() {
                        return ("io_error", "write failed".into());
                    }
                }
                _ = &mut dead => {
                    if heard.elapsed() >= period * 2 {
                        return ("dead", "silent for two ping periods".into());
                    }
                    dead.as_mut().reset(heard + period * 2);
                }
                _ = tokio::time::sleep_until(expires) => {
                    tracing::info!(event = "token_expired", hc = %self.entity_name, "listener token expired; closing control channel");
                    return ("token_expired", self.close(close_code::POLICY, "The listener token expired.").await);
                }
                _ = ctx.drain.cancelled() => {
                    return ("shutdown", self.close(close_code::GOING_AWAY, "The relay is shutting down.").await);
                }
            }
        }
    }

    fn renew(&self, token: &str, ctx: &Ctx) -> Result<u64, String> {
        let state = ctx.state.load();
        let entity = state
            .entity(&self.entity_name)
            .ok_or("The hybrid connection was deleted.")?;
        let demand = Demand {
            entity: Some(entity),
            path: &entity.name,
            hosts: &self.hosts,
            right: Rights::LISTEN,
            now: unix_now(),
        };
        authorize(&state, &[token], &demand)
            .map(|g| g.expiry)
            .map_err(|e| e.to_string())
    }

    /// Sends Close, waits briefly for the echo, and reports why.
    async fn close(&mut self, code: u16, reason: &str) -> String {
        if self.writer.send_close(code, reason).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(m)) = self.reader.next_message(self.max_message).await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        format!("closed by relay ({code} {reason})")
    }
}
