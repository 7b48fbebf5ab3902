//! The sender's connect and the listener's rendezvous (hc-protocol.md §5, §12 CONNECT).
//!
//! The sender's upgrade is held open until a listener accepts (101 to both, then the
//! tunnel runs on the sender's worker), rejects (the listener's status to the sender, 410
//! to the listener), or the accept timeout passes (404 to the sender).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::Ctx;
use super::auth::{Demand, authorize};
use super::conn::{Incoming, describe, refuse_rendezvous, respond, write_flush};
use super::control::{ConnectReq, Leg, Outcome, Refusal};
use super::tunnel::{Then, TunnelLeg};
use crate::proto::address::HcRequest;
use crate::proto::client_id;
use crate::proto::handshake;
use crate::proto::sas::{Rights, unix_now};
use crate::transport::Stream;

/// Headers never forwarded to a listener in `connectHeaders`.
const STRIPPED: &[&str] = &[
    "ServiceBusAuthorization",
    crate::proto::extensions::EARLY_HEADER,
    crate::proto::extensions::REUSE_HEADER,
];

/// Most bytes a sender may send before its upgrade is answered.
const EARLY_BYTES_LIMIT: usize = 64 * 1024;

/// Handles `sb-hc-action=connect`.
pub(super) async fn serve_connect(mut stream: Stream, mut inc: Incoming, req: HcRequest, ctx: Arc<Ctx>) {
    let (head, peer) = (&inc.head, inc.peer);
    let tracking = req.id.as_deref();
    let upgrade = match handshake::validate_upgrade(head) {
        Ok(u) => u,
        Err(e) => return respond(&mut stream, 400, &e.to_string(), "").await,
    };
    let state = ctx.state.load();
    let Some((entity, _suffix)) = state.resolve(&req.path) else {
        count_connect(&ctx, None, "not_found", "");
        return respond(&mut stream, 404, &describe("Endpoint does not exist.", tracking), "").await;
    };
    let entity_name = entity.name.clone();
    let mut key_name = None;
    if entity.requires_client_authorization {
        let hosts = ctx.hosts();
        let tokens: Vec<&str> = req
            .token
            .as_deref()
            .into_iter()
            .chain(head.headers.get("ServiceBusAuthorization"))
            .collect();
        let demand = Demand {
            entity: Some(entity),
            path: &req.path,
            hosts,
            right: Rights::SEND,
            now: unix_now(),
        };
        match authorize(&state, &tokens, &demand) {
            Ok(granted) => key_name = Some(granted.key_name),
            Err(e) => {
                inc.auth_failed(&ctx, &e);
                count_connect(&ctx, Some(&entity_name), "auth_failed", &e.to_string());
                tracing::info!(event = "sender_refused", hc = %entity_name, %peer, status = e.status(), reason = %e, "sender refused");
                return respond(&mut stream, e.status(), &describe(&e.to_string(), tracking), "").await;
            }
        }
    }
    // Who this sender is, for the hybrid connection's usage (issue 14 item 10).
    let who = super::usage::SenderKey {
        remote: peer.ip(),
        key_name,
        client_id: client_id::client_id(head.headers.get(client_id::CLIENT_ID_HEADER)),
    };
    drop(state);
    inc.pending.done();
    let headers = head.headers.merged_without(STRIPPED);
    // hyrelay extension: an opted-in sender (our bridge) gets a pooled rendezvous if one
    // waits; everyone else, and everyone when none waits, goes the standard way.
    if super::pool::sender_opted_in(&inc.head)
        && ctx.pool.enabled()
        && let Some((leg, listener_load)) = super::pool::take(&ctx, &entity_name).await
    {
        let accept = (req.id.clone().unwrap_or_else(crate::proto::ids::new_id), headers, who);
        return join_pooled(stream, inc, upgrade, accept, (leg, listener_load), &entity_name, &ctx).await;
    }
    let connect = ConnectReq {
        entity: entity_name.clone(),
        raw_path: req.raw_path.clone(),
        app_query: req.app_query.clone(),
        id: req.id.clone(),
        headers,
        remote: Some(peer),
    };
    let mut pending = match ctx.ctl.connect(connect).await {
        Ok(p) => p,
        Err(e) => {
            let status = match e {
                Refusal::ShuttingDown | Refusal::Busy => 503,
                Refusal::TooLarge => 414,
                _ => 404,
            };
            count_connect(&ctx, Some(&entity_name), "no_listener", &e.to_string());
            tracing::info!(event = "sender_no_listener", hc = %entity_name, %peer, "no listener for sender");
            return respond(&mut stream, status, &describe(&e.to_string(), tracking), "").await;
        }
    };
    let tracking = Some(pending.tracking_id.as_str());
    let dispatched = std::time::Instant::now();
    let mut buf = inc.buf;
    let outcome = tokio::select! {
        o = tokio::time::timeout(ctx.cfg.accept_timeout, &mut pending.outcome) => o,
        _ = sender_gone(&mut stream, &mut buf) => {
            ctx.ctl.cancel(&pending.secret);
            count_connect(&ctx, Some(&entity_name), "abandoned", "the sender left before a listener accepted");
            tracing::debug!(hc = %entity_name, %peer, "sender left before the listener accepted");
            return;
        }
    };
    match outcome {
        Ok(Ok(Outcome::Accepted(leg))) => {
            count_connect(&ctx, Some(&entity_name), "accepted", "");
            metrics::histogram!(crate::telemetry::metrics::RELAY_RENDEZVOUS_SECONDS, "hc" => entity_name.clone())
                .record(dispatched.elapsed().as_secs_f64());
            let counted = (
                Counted::new(&pending.listener_load),
                Counted::new(&pending.entity_tunnels),
            );
            let sender = Sender {
                stream,
                buf,
                head: inc.head,
                key: upgrade.key,
                slot: inc.slot,
                peer,
            };
            let usage = ctx.usage.opened(&entity_name, who);
            join(sender, leg, &entity_name, (counted, usage), &pending.entity_gone, &ctx).await;
        }
        Ok(Ok(Outcome::Rejected { status, description })) => {
            count_connect(&ctx, Some(&entity_name), "rejected", &format!("{status} {description}"));
            tracing::info!(event = "sender_rejected", hc = %entity_name, %peer, status, reason = %description, "listener rejected the sender");
            respond(&mut stream, status, &description, "").await;
        }
        Ok(Err(_)) => {
            // The rendezvous was dropped: the listener went away with no other to take over,
            // or the hybrid connection was deleted.
            let msg = "There are no listeners connected for the endpoint.";
            count_connect(&ctx, Some(&entity_name), "no_listener", msg);
            respond(&mut stream, 404, &describe(msg, tracking), "").await;
        }
        Err(_) => {
            ctx.ctl.cancel(&pending.secret);
            tracing::info!(event = "sender_timeout", hc = %entity_name, %peer, "no listener accepted in time");
            let msg = "None of the connected listeners accepted the connection within the allowed timeout.";
            count_connect(&ctx, Some(&entity_name), "timeout", msg);
            respond(&mut stream, 404, &describe(msg, tracking), "").await;
        }
    }
}

/// Answers an opted-in sender from a pooled rendezvous connection (`relay::pool`): the
/// `accept` goes to the pooled connection, the 101 to the sender, and the tunnel starts at
/// once, so frames the sender sent early follow the `accept` without a wait.
async fn join_pooled(
    mut stream: Stream,
    inc: Incoming,
    upgrade: handshake::Upgrade,
    (tracking_id, headers, who): (String, Vec<(String, String)>, super::usage::SenderKey),
    (mut leg, listener_load): (super::pool::PooledLeg, Option<Arc<std::sync::atomic::AtomicUsize>>),
    entity: &str,
    ctx: &Arc<Ctx>,
) {
    let started = std::time::Instant::now();
    let Some((tunnels, gone)) = ctx.ctl.entity_handles(entity) else {
        count_connect(
            ctx,
            Some(entity),
            "no_listener",
            "the hybrid connection has no live state",
        );
        return respond(
            &mut stream,
            404,
            "There are no listeners connected for the endpoint.",
            "",
        )
        .await;
    };
    let side = super::pool::SenderSide {
        stream: &mut stream,
        upgrade: &upgrade,
        request: &inc.head,
        tracking_id,
        headers,
        remote: inc.peer,
    };
    let Ok(kept) = super::pool::greet(side, &mut leg, ctx).await else {
        count_connect(
            ctx,
            Some(entity),
            "abandoned",
            "the pooled rendezvous or the sender failed",
        );
        return;
    };
    count_connect(ctx, Some(entity), "accepted", "");
    metrics::counter!(crate::telemetry::metrics::RELAY_POOLED, "hc" => entity.to_owned()).increment(1);
    metrics::histogram!(crate::telemetry::metrics::RELAY_RENDEZVOUS_SECONDS, "hc" => entity.to_owned())
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(event = "tunnel_open", hc = %entity, peer = %inc.peer, pooled = true, "tunnel open");
    let sender = TunnelLeg {
        stream,
        leftover: inc.buf,
        slot: inc.slot,
        then: if kept { Then::ReadNext(inc.peer) } else { Then::Close },
    };
    let listener = TunnelLeg {
        stream: leg.stream,
        leftover: leg.leftover,
        slot: leg.slot,
        then: leg.kept.map_or(Then::Close, Then::Repool),
    };
    super::tunnel::spawn(
        entity,
        inc.peer,
        sender,
        listener,
        &gone,
        ctx,
        // The tunnel counts against its listener's load, as a standard one does.
        (Counted::new(&tunnels), listener_load.as_ref().map(Counted::new)),
        ctx.usage.opened(entity, who),
    );
}

/// Counts a sender connect's result (metric, and the hybrid connection's status).
/// `hc` is `None` when the path named no hybrid connection: the peer's text is never a label.
fn count_connect(ctx: &Ctx, hc: Option<&str>, result: &'static str, detail: &str) {
    let label = hc.unwrap_or(crate::telemetry::metrics::UNKNOWN_HC).to_owned();
    metrics::counter!(crate::telemetry::metrics::RELAY_SENDER_CONNECTS, "hc" => label, "result" => result).increment(1);
    if let Some(hc) = hc {
        ctx.ctl.record_connect(hc, result, detail.to_owned());
    }
}

/// Resolves when the sender closes its connection (or floods it) before the upgrade is
/// answered. Cancel-safe: bytes read stay in `buf`.
async fn sender_gone(stream: &mut Stream, buf: &mut BytesMut) {
    loop {
        buf.reserve(1024);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if buf.len() > EARLY_BYTES_LIMIT => return,
            Ok(_) => {}
        }
    }
}

/// Increments a counter for as long as it lives.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn new(c: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sender's side of a tunnel about to be joined.
struct Sender {
    stream: Stream,
    buf: BytesMut,
    /// Its request head (for the `reuse` opt-in).
    head: handshake::RequestHead,
    key: String,
    slot: super::limits::ConnSlot,
    peer: SocketAddr,
}

/// Answers both upgrades and starts the tunnel on this worker.
async fn join(
    mut sender: Sender,
    mut leg: Leg,
    entity: &str,
    (counted, usage): ((Counted, Counted), super::usage::Ticket),
    gone: &tokio_util::sync::CancellationToken,
    ctx: &Arc<Ctx>,
) {
    let peer = sender.peer;
    if let Err(e) = leg.stream.unpark() {
        tracing::warn!(error = %e, "cannot move the listener's leg to this worker");
        return respond(&mut sender.stream, 502, "The listener's connection was lost.", "").await;
    }
    let protocol = leg.protocol.as_deref();
    if let Err(e) = write_flush(&mut leg.stream, &handshake::switching_protocols(&leg.key, protocol)).await {
        tracing::info!(hc = %entity, error = %e, "listener's rendezvous connection failed");
        return respond(&mut sender.stream, 502, "The listener's connection was lost.", "").await;
    }
    let mut answer = ctx
        .pool
        .advertise(handshake::switching_protocols(&sender.key, protocol));
    let kept = ctx.pool.promise(&mut answer, &sender.head);
    if let Err(e) = write_flush(&mut sender.stream, &answer).await {
        tracing::debug!(hc = %entity, %peer, error = %e, "sender went away during the upgrade");
        return;
    }
    tracing::debug!(event = "tunnel_open", hc = %entity, %peer, "tunnel open");
    let s = TunnelLeg {
        stream: sender.stream,
        leftover: sender.buf,
        slot: sender.slot,
        then: if kept { Then::ReadNext(peer) } else { Then::Close },
    };
    // A standard rendezvous connection is the listener's for one tunnel only.
    let l = TunnelLeg {
        stream: leg.stream,
        leftover: leg.leftover,
        slot: leg.slot,
        then: Then::Close,
    };
    super::tunnel::spawn(entity, peer, s, l, gone, ctx, counted, usage);
}

/// Handles `sb-hc-action=accept` (and its reject form).
pub(super) async fn serve_accept(mut stream: Stream, mut inc: Incoming, req: HcRequest, ctx: Arc<Ctx>) {
    let peer = inc.peer;
    let upgrade = handshake::validate_upgrade(&inc.head);
    let Some(secret) = req.rendezvous.as_deref() else {
        return refuse_rendezvous(&mut stream, false).await;
    };
    let Some((tx, waiter)) = ctx.ctl.rendezvous(secret) else {
        return refuse_rendezvous(&mut stream, true).await;
    };
    // The unguessable address is the capability (hc-protocol.md §3.1).
    inc.pending.done();
    if let Some(code) = &req.status_code {
        let status = code.trim().parse::<u16>().unwrap_or(400).clamp(400, 599);
        let description = req
            .status_description
            .as_deref()
            .map(handshake::sanitize_header_value)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "Rejected by the listener".into());
        tx.send(Outcome::Rejected { status, description }).ok();
        return respond(&mut stream, 410, "Gone", "Rejection delivered").await;
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            tx.send(Outcome::Rejected {
                status: 502,
                description: "The listener's rendezvous was malformed.".into(),
            })
            .ok();
            return respond(&mut stream, 400, &e.to_string(), "").await;
        }
    };
    if let Err(e) = stream.park_for(waiter) {
        tracing::warn!(%peer, error = %e, "cannot park the listener's leg");
        return;
    }
    let leg = Leg {
        stream,
        leftover: inc.buf,
        protocol: upgrade.protocols.into_iter().next(),
        key: upgrade.key,
        slot: inc.slot,
    };
    if let Err(Outcome::Accepted(mut leg)) = tx.send(Outcome::Accepted(leg))
        && leg.stream.unpark().is_ok()
    {
        respond(&mut leg.stream, 404, "The sender is no longer connected.", "").await;
    }
}
