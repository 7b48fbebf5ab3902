//! The relay's side of the hyrelay extensions (`proto::extensions`): pooled rendezvous
//! connections and early data, advertised on every 101 this relay sends.
//!
//! A pooled connection is a `listen` upgrade with `X-Hyrelay-Pool: 1`: authenticated with a
//! Listen token for its hybrid connection exactly like a control channel, answered with
//! 101, then held silent ([`serve`]). A sender that opted in (`X-Hyrelay-Early: 1`, our
//! bridge) takes one ([`take`]); the relay writes the `accept` JSON to it as one text
//! frame, answers the sender's upgrade and joins the two into a tunnel at once, so the
//! sender's early frames go out right behind the `accept` ([`greet`]; `sender.rs` then
//! starts the tunnel).
//!
//! Invariants:
//! - a pooled connection serves at most once: [`take`] removes it from the table under
//!   the lock before it is claimed, and its task hands the stream over exactly once;
//! - its Listen token is checked when it opens and again when it is taken, so a key
//!   regenerated meanwhile retires it;
//! - it serves only senders of the hybrid connection it authenticated for, on this relay
//!   node (the table is per process: in a cluster a node uses its own pool);
//! - it never causes an `accept` by itself: only a sender's connect does, so the endpoint
//!   sees a connection only when an app opened one;
//! - it counts against the connection caps like any connection (its slot moves into the
//!   tunnel) and shows in `hyrelay_relay_warm_connections{hc}`; at most
//!   [`MAX_PER_HC`] wait per hybrid connection, each at most [`MAX_IDLE`].
//! - Microsoft's clients never send the opt-in headers, so they get the standard protocol.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Ctx;
use super::auth::{Demand, authorize};
use super::conn::{Incoming, describe, respond, write_flush};
use crate::proto::address::HcRequest;
use crate::proto::control::Accept;
use crate::proto::extensions::{self, Advertised};
use crate::proto::frame::{self, OpCode, close_code};
use crate::proto::handshake::{self, RequestHead, Upgrade};
use crate::proto::sas::{Rights, unix_now};
use crate::transport::Stream;

/// Pooled connections waiting per hybrid connection at most; more are refused (503).
pub const MAX_PER_HC: usize = 64;
/// How long a pooled connection may wait; then the relay closes it (1000). Listeners
/// renew theirs well before.
pub const MAX_IDLE: Duration = Duration::from_secs(120);
/// How long a sender waits for a claimed pooled connection to be handed over.
const HANDOVER: Duration = Duration::from_secs(1);

/// A sender's claim on a pooled connection: where to send the leg, and the worker thread
/// the sender's task runs on (a task never leaves the worker it was spawned on).
type Claim = (oneshot::Sender<PooledLeg>, std::thread::ThreadId);

/// A pooled connection handed to a sender: its stream (parked, unless the sender is on the
/// pooled connection's worker), bytes read past its upgrade, and its connection slot.
pub(super) struct PooledLeg {
    pub stream: Stream,
    pub leftover: BytesMut,
    pub slot: super::limits::ConnSlot,
    /// Set when its 101 promised reuse: how it waits in the pool again after a normal end
    /// of its tunnel ([`rejoin`]).
    pub kept: Option<Box<Repool>>,
}

/// What a pooled connection needs to wait in the pool again after its tunnel
/// ([`rejoin`]): the hybrid connection and listener it authenticated for and its
/// credentials (checked again whenever it is taken, as every pooled connection's are).
#[derive(Debug, Clone)]
pub(super) struct Repool {
    pub hc: String,
    pub listener: Option<String>,
    pub creds: Arc<Creds>,
}

/// The tokens a pooled connection authenticated with, and the check they passed: against
/// which state snapshot, and until when. Taking the connection checks them again unless
/// the state is that same snapshot (no key regenerated, no rule or hybrid connection
/// changed: any change publishes a new one) and the token has not expired since, when
/// the check would give the same answer.
#[derive(Debug)]
pub(super) struct Creds {
    tokens: Vec<crate::proto::Secret>,
    /// The snapshot the check passed under (held weakly: its address cannot be reused
    /// while this lives, and it is not kept alive by it).
    checked_under: std::sync::Weak<super::store::State>,
    /// The token's expiry, Unix seconds.
    expiry: u64,
}

struct Waiting {
    id: u64,
    /// The `sb-hc-id` of the listener (hcm) it belongs to.
    listener: Option<String>,
    tx: oneshot::Sender<Claim>,
    /// The worker thread its task runs on.
    worker: std::thread::ThreadId,
    expires: Instant,
    /// The tokens it authenticated with, checked again when it is taken (a key
    /// regenerated meanwhile retires it).
    creds: Arc<Creds>,
}

/// The table of pooled connections and what this relay advertises.
pub(crate) struct Pool {
    advertised: Advertised,
    /// The advertisement as a header line, written once (every 101 carries it).
    advert_line: Option<String>,
    waiting: Mutex<HashMap<String, Vec<Waiting>>>,
    next_id: AtomicU64,
}

impl Pool {
    /// `enabled` turns both extensions on; `head_timeout` is advertised for warm senders.
    pub fn new(enabled: bool, head_timeout: Duration) -> Self {
        let advertised = Advertised {
            rendezvous_pool: enabled,
            early_data: enabled,
            reuse: enabled,
            head_timeout_secs: Some(head_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
        };
        Self {
            advertised,
            advert_line: advertised
                .header_value()
                .map(|v| format!("{}: {v}\r\n", extensions::ADVERTISE_HEADER)),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn enabled(&self) -> bool {
        self.advertised.rendezvous_pool
    }

    /// Adds the `reuse` promise to `response` (a complete 101 head) if the request opted
    /// in and this relay can keep the connection after its tunnel: extensions on, and the
    /// tunnel not on the completion backend (whose tunnels end by closing). True if added.
    pub fn promise(&self, response: &mut Vec<u8>, request: &RequestHead) -> bool {
        let yes = self.advertised.reuse
            && extensions::flag_set(request.headers.get(extensions::REUSE_HEADER))
            && !crate::dataplane::offload::active();
        if yes {
            add_header(response, extensions::REUSE_HEADER, "1");
        }
        yes
    }

    /// `response` (a complete 101 head) with the advertisement added, if any.
    pub fn advertise(&self, mut response: Vec<u8>) -> Vec<u8> {
        if let Some(line) = &self.advert_line {
            add_line(&mut response, line);
        }
        response
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(
        &self,
        hc: &str,
        listener: Option<String>,
        expires: Instant,
        creds: Arc<Creds>,
    ) -> Option<(u64, oneshot::Receiver<Claim>)> {
        let mut map = self.lock();
        let list = map.entry(hc.to_lowercase()).or_default();
        if list.len() >= MAX_PER_HC {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        list.push(Waiting {
            id,
            listener,
            tx,
            worker: std::thread::current().id(),
            expires,
            creds,
        });
        gauge(hc, list.len());
        Some((id, rx))
    }

    /// Removes entry `id`; false if it was no longer there (a sender took it).
    fn unregister(&self, hc: &str, id: u64) -> bool {
        let mut map = self.lock();
        let Some(list) = map.get_mut(&hc.to_lowercase()) else {
            return false;
        };
        let before = list.len();
        list.retain(|w| w.id != id);
        gauge(hc, list.len());
        list.len() < before
    }

    /// Removes one live pooled connection of `hc` from the table, of the listener `choose`
    /// picks among those that have one (the relay's balance rule, applied to listeners, not
    /// to connections: an hcm with a bigger pool gets no bigger share): the oldest of that
    /// listener's on the calling worker, else its oldest. A connection on the sender's own
    /// worker joins the tunnel without a move between workers (no deregistration, no
    /// registration, no cross-thread wake-up).
    fn pop(&self, hc: &str, choose: impl FnOnce(&[Option<&str>]) -> usize) -> Option<Waiting> {
        let mut map = self.lock();
        let list = map.get_mut(&hc.to_lowercase())?;
        let now = Instant::now();
        list.retain(|w| w.expires > now && !w.tx.is_closed());
        let i = {
            // The distinct listeners, borrowed from the table (no copy of their ids).
            let mut listeners: Vec<Option<&str>> = list.iter().map(|w| w.listener.as_deref()).collect();
            listeners.sort_unstable();
            listeners.dedup();
            (!listeners.is_empty()).then(|| {
                let pick = listeners[choose(&listeners).min(listeners.len() - 1)];
                let here = std::thread::current().id();
                list.iter()
                    .position(|w| w.listener.as_deref() == pick && w.worker == here)
                    .or_else(|| list.iter().position(|w| w.listener.as_deref() == pick))
                    .unwrap_or(0)
            })
        };
        let w = i.map(|i| list.remove(i));
        gauge(hc, list.len());
        w
    }
}

fn gauge(hc: &str, n: usize) {
    metrics::gauge!(crate::telemetry::metrics::warm_connections("relay"), "hc" => hc.to_owned()).set(n as f64);
}

/// Adds `name: value` to the end of a response head.
fn add_header(response: &mut Vec<u8>, name: &str, value: &str) {
    add_line(response, &format!("{name}: {value}\r\n"));
}

/// Adds a header `line` (ending in CRLF) to the end of a response head.
fn add_line(response: &mut Vec<u8>, line: &str) {
    if response.ends_with(b"\r\n\r\n") {
        response.truncate(response.len() - 2);
        response.extend_from_slice(line.as_bytes());
        response.extend_from_slice(b"\r\n");
    }
}

/// True if the request is a pooled rendezvous connection (`listen` + `X-Hyrelay-Pool: 1`).
pub(super) fn is_pool_request(head: &RequestHead) -> bool {
    extensions::flag_set(head.headers.get(extensions::POOL_HEADER))
}

/// True if a sender opted in to early data and pooled rendezvous.
pub(super) fn sender_opted_in(head: &RequestHead) -> bool {
    extensions::flag_set(head.headers.get(extensions::EARLY_HEADER))
}

/// Serves a pooled rendezvous connection: authenticate as a listener, answer 101, wait to
/// be claimed (or closed, or expired).
pub(super) async fn serve(mut stream: Stream, mut inc: Incoming, req: HcRequest, ctx: Arc<Ctx>) {
    let tracking = req.id.as_deref();
    if !ctx.pool.enabled() {
        return respond(
            &mut stream,
            403,
            "The rendezvous pool extension is off on this relay.",
            "",
        )
        .await;
    }
    let upgrade = match handshake::validate_upgrade(&inc.head) {
        Ok(u) => u,
        Err(e) => return respond(&mut stream, 400, &e.to_string(), "").await,
    };
    let state = ctx.state.load();
    let Some((entity, "")) = state.resolve(&req.path) else {
        return respond(&mut stream, 404, &describe("Endpoint does not exist.", tracking), "").await;
    };
    let tokens: Vec<&str> = req
        .token
        .as_deref()
        .into_iter()
        .chain(inc.head.headers.get("ServiceBusAuthorization"))
        .collect();
    let granted = match listen_authorized(ctx.as_ref(), &state, entity, &tokens) {
        Ok(g) => g,
        Err(e) => {
            inc.auth_failed(&ctx, &e);
            return respond(&mut stream, e.status(), &describe(&e.to_string(), tracking), "").await;
        }
    };
    let hc = entity.name.clone();
    let creds = Arc::new(Creds {
        tokens: tokens.iter().map(|t| crate::proto::Secret::new(*t)).collect(),
        checked_under: Arc::downgrade(&state),
        expiry: granted.expiry,
    });
    drop(state);
    inc.pending.done();
    let mut answer = ctx.pool.advertise(handshake::switching_protocols(&upgrade.key, None));
    let kept = ctx.pool.promise(&mut answer, &inc.head).then(|| {
        Box::new(Repool {
            hc: hc.clone(),
            listener: req.id.clone(),
            creds: creds.clone(),
        })
    });
    let Some((id, claimed)) = ctx.pool.register(&hc, req.id.clone(), Instant::now() + MAX_IDLE, creds) else {
        return respond(&mut stream, 503, "The hybrid connection's rendezvous pool is full.", "").await;
    };
    let _registered = Unregister(&ctx.pool, &hc, id);
    let node = ctx.ctl.node_base().unwrap_or_else(|| {
        let host = inc.head.headers.get("Host").unwrap_or("localhost");
        format!("{}://{}", ctx.scheme(), handshake::sanitize_header_value(host))
    });
    add_header(&mut answer, extensions::NODE_HEADER, &node);
    if !matches!(
        tokio::time::timeout(ctx.cfg.handshake_timeout, write_flush(&mut stream, &answer)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    wait_for_claim(stream, (inc.buf, inc.slot, kept), claimed, (&hc, id), &ctx).await;
}

/// Puts a pooled connection whose tunnel ended normally back in the pool (the `reuse`
/// extension): registered again under its tokens, with no new request or 101 (the
/// listener waits for its next `accept` after the same end). Bytes it sent after its
/// Close are its request to retire (a ping): it gets Close(1000), as does one the pool has
/// no room for; one during a drain gets 1001. Spawned on this worker.
pub(super) fn rejoin(mut stream: Stream, rest: BytesMut, slot: super::limits::ConnSlot, r: Repool, ctx: Arc<Ctx>) {
    tokio::task::spawn_local(async move {
        let refusal = if ctx.drain.is_cancelled() {
            Some((close_code::GOING_AWAY, "The relay is shutting down."))
        } else if !rest.is_empty() {
            Some((close_code::NORMAL, "retired"))
        } else {
            None
        };
        let registered = match refusal {
            Some(_) => None,
            None => ctx
                .pool
                .register(&r.hc, r.listener.clone(), Instant::now() + MAX_IDLE, r.creds.clone()),
        };
        let Some((id, claimed)) = registered else {
            let close = refusal.unwrap_or((close_code::NORMAL, "The rendezvous pool is full."));
            return send_close(&mut stream, close).await;
        };
        let hc = r.hc.clone();
        let _registered = Unregister(&ctx.pool, &hc, id);
        // Boxed: the task waits here until claimed and must stay small.
        Box::pin(wait_for_claim(
            stream,
            (rest, slot, Some(Box::new(r))),
            claimed,
            (&hc, id),
            &ctx,
        ))
        .await;
    });
}

/// Removes a pooled connection from the table when its task ends, however it ends.
struct Unregister<'a>(&'a Pool, &'a str, u64);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister(self.1, self.2);
    }
}

/// What a pooled connection keeps while it waits: bytes read, its slot, its reuse.
type Held = (BytesMut, super::limits::ConnSlot, Option<Box<Repool>>);

async fn wait_for_claim(
    mut stream: Stream,
    (mut buf, slot, kept): Held,
    claimed: oneshot::Receiver<Claim>,
    (hc, id): (&str, u64),
    ctx: &Ctx,
) {
    let expired = tokio::time::sleep(MAX_IDLE);
    tokio::pin!(claimed, expired);
    let close = tokio::select! {
        c = &mut claimed => {
            if let Ok(reply) = c {
                hand_over(stream, (buf, slot, kept), reply);
            }
            return;
        }
        // A pooled connection stays silent until claimed; the listener's one message
        // (a ping) asks to retire it, EOF means it is gone. Cancel-safe: bytes stay in `buf`.
        r = stream.read_buf(&mut buf) => match r {
            Ok(0) | Err(_) => return,
            Ok(_) => (close_code::NORMAL, "retired"),
        },
        _ = &mut expired => (close_code::NORMAL, "pooled connection expired"),
        _ = ctx.drain.cancelled() => (close_code::GOING_AWAY, "The relay is shutting down."),
    };
    if !ctx.pool.unregister(hc, id) {
        // A sender took it meanwhile: it serves that sender after all (the listener keeps
        // reading after its retire request). What it sent is not tunnel data.
        buf.clear();
        if let Ok(Ok(reply)) = tokio::time::timeout(HANDOVER, claimed).await {
            hand_over(stream, (buf, slot, kept), reply);
        }
        return;
    }
    send_close(&mut stream, close).await;
}

/// Writes a Close (`code`, `why`) to a pooled connection the relay gives up, within 2 s.
async fn send_close(stream: &mut Stream, (code, why): (u16, &str)) {
    let bytes = frame::encode_frame(true, OpCode::Close, None, &frame::close_payload(code, why));
    let _ = tokio::time::timeout(Duration::from_secs(2), write_flush(stream, &bytes)).await;
}

/// Sends the stream to the sender that claimed it: as it is when the sender runs on this
/// worker, parked (to be registered on the sender's worker) otherwise.
fn hand_over(mut stream: Stream, (leftover, slot, kept): Held, (reply, worker): Claim) {
    if stream.park_for(worker).is_ok() {
        reply
            .send(PooledLeg {
                stream,
                leftover,
                slot,
                kept,
            })
            .ok();
    }
}

/// Claims a pooled connection of `hc` for a sender on this worker, choosing the listener
/// by the relay's balance rule; `None` when none is waiting (or none could be handed over
/// in time): the sender then goes the standard way. The returned load counter is the
/// chosen listener's (if it is registered here), to be held while the tunnel lives.
pub(super) async fn take(ctx: &Ctx, hc: &str) -> Option<(PooledLeg, Option<Arc<std::sync::atomic::AtomicUsize>>)> {
    // Bounded: every try removes one entry from the table.
    for _ in 0..MAX_PER_HC {
        let choose = |listeners: &[Option<&str>]| {
            let loads: Vec<Option<usize>> = listeners
                .iter()
                .map(|l| l.and_then(|id| ctx.ctl.listener_load(hc, id)))
                .map(|l| l.map(|n| n.load(Ordering::Relaxed)))
                .collect();
            super::control::choose_by(ctx.cfg.balance, &loads)
        };
        let w = ctx.pool.pop(hc, choose)?;
        let load = w.listener.as_deref().and_then(|id| ctx.ctl.listener_load(hc, id));
        if !still_authorized(ctx, hc, &w.creds) {
            continue; // dropping `w` ends its task, which closes the connection
        }
        let (reply, handed) = oneshot::channel();
        if w.tx.send((reply, std::thread::current().id())).is_err() {
            continue;
        }
        if let Ok(Ok(mut leg)) = tokio::time::timeout(HANDOVER, handed).await
            && leg.stream.unpark().is_ok()
        {
            return Some((leg, load));
        }
    }
    None
}

/// The Listen authorization of a pooled connection, checked again against the current
/// keys (see [`Creds`] for when the earlier check stands).
fn still_authorized(ctx: &Ctx, hc: &str, creds: &Creds) -> bool {
    let state = ctx.state.load();
    if std::ptr::eq(creds.checked_under.as_ptr(), Arc::as_ptr(&state)) && unix_now() <= creds.expiry {
        return true;
    }
    let Some(entity) = state.entity(hc) else {
        return false;
    };
    let tokens: Vec<&str> = creds.tokens.iter().map(|t| t.expose()).collect();
    listen_authorized(ctx, &state, entity, &tokens).is_ok()
}

/// Whether one of `tokens` grants Listen on `entity` now, as for a control channel.
fn listen_authorized(
    ctx: &Ctx,
    state: &super::store::State,
    entity: &super::store::Entity,
    tokens: &[&str],
) -> Result<super::auth::Granted, super::auth::AuthError> {
    let demand = Demand {
        entity: Some(entity),
        path: &entity.name,
        hosts: &ctx.audience,
        right: Rights::LISTEN,
        now: unix_now(),
    };
    authorize(state, tokens, &demand)
}

/// What the sender's side brings to [`greet`].
pub(super) struct SenderSide<'a> {
    pub stream: &'a mut Stream,
    pub upgrade: &'a Upgrade,
    pub request: &'a RequestHead,
    pub tracking_id: String,
    pub headers: Vec<(String, String)>,
    pub remote: std::net::SocketAddr,
}

/// Writes the `accept` to the pooled connection and the 101 to the sender; `Ok(true)` if
/// that 101 promised reuse. On `Err` the sender has been answered with an error already.
pub(super) async fn greet(s: SenderSide<'_>, leg: &mut PooledLeg, ctx: &Ctx) -> Result<bool, ()> {
    let accept = Accept {
        address: String::new(),
        id: s.tracking_id,
        connect_headers: s.headers,
        remote_endpoint: Some((s.remote.ip().to_string(), s.remote.port())),
    };
    let frame = frame::encode_frame(true, OpCode::Text, None, accept.encode().as_bytes());
    if write_flush(&mut leg.stream, &frame).await.is_err() {
        respond(s.stream, 502, "The listener's connection was lost.", "").await;
        return Err(());
    }
    // The listener answers as the standard rendezvous would: the first offered protocol.
    let protocol = s.upgrade.protocols.first().map(String::as_str);
    let mut answer = ctx
        .pool
        .advertise(handshake::switching_protocols(&s.upgrade.key, protocol));
    let kept = ctx.pool.promise(&mut answer, s.request);
    write_flush(s.stream, &answer).await.map(|()| kept).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials that never passed a check (the table does not look at them).
    fn creds() -> Arc<Creds> {
        Arc::new(Creds {
            tokens: vec![],
            checked_under: std::sync::Weak::new(),
            expiry: 0,
        })
    }

    #[test]
    fn advertisement_goes_into_the_head() {
        let p = Pool::new(true, Duration::from_secs(10));
        let r = String::from_utf8(p.advertise(handshake::switching_protocols("k", None))).unwrap();
        assert!(
            r.ends_with("X-Hyrelay-Extensions: rendezvous-pool, early-data, reuse, head-timeout=10\r\n\r\n"),
            "{r}"
        );
        let off = Pool::new(false, Duration::from_secs(10));
        let plain = handshake::switching_protocols("k", None);
        assert_eq!(off.advertise(plain.clone()), plain);
    }

    #[tokio::test]
    async fn a_pooled_connection_is_taken_once() {
        let first = |_: &[Option<&str>]| 0;
        let p = Pool::new(true, Duration::from_secs(10));
        let (a, _rx_a) = p.register("HC", None, Instant::now() + MAX_IDLE, creds()).unwrap();
        let (_b, rx_b) = p.register("hc", None, Instant::now() + MAX_IDLE, creds()).unwrap();
        assert!(p.pop("other", first).is_none(), "never another hybrid connection's");
        assert_eq!(p.pop("hc", first).map(|w| w.id), Some(a));
        drop(rx_b); // its task ended
        assert!(
            p.pop("hc", first).is_none(),
            "a closed one is skipped, and nothing is served twice"
        );
        p.unregister("hc", a);
        let (_, _rx) = p
            .register("hc", None, Instant::now() - Duration::from_secs(1), creds())
            .unwrap();
        assert!(p.pop("hc", first).is_none(), "an expired one is skipped");
    }

    /// The balance rule picks a listener, then that listener's oldest pooled connection:
    /// an hcm with more pooled connections gets no bigger share.
    #[tokio::test]
    async fn the_listener_is_chosen_not_the_connection() {
        let p = Pool::new(true, Duration::from_secs(10));
        let mut keep = Vec::new();
        for _ in 0..5 {
            keep.push(
                p.register("hc", Some("big".into()), Instant::now() + MAX_IDLE, creds())
                    .unwrap(),
            );
        }
        let (small, _rx) = p
            .register("hc", Some("small".into()), Instant::now() + MAX_IDLE, creds())
            .unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let w = p
            .pop("hc", |ls| {
                seen.lock().unwrap().extend(ls.iter().map(|l| l.map(str::to_owned)));
                ls.iter().position(|l| *l == Some("small")).unwrap()
            })
            .unwrap();
        assert_eq!(w.id, small);
        assert_eq!(
            *seen.lock().unwrap(),
            [Some("big".to_owned()), Some("small".to_owned())],
            "one choice per listener"
        );
    }

    /// Within the listener the balance rule chose, a connection on the sender's own worker
    /// thread goes first (it joins the tunnel without moving between workers); another
    /// listener's is never taken for that.
    #[tokio::test]
    async fn a_connection_on_the_senders_worker_is_preferred() {
        let p = Pool::new(true, Duration::from_secs(10));
        let elsewhere = |listener: &'static str| {
            std::thread::scope(|s| {
                s.spawn(|| p.register("hc", Some(listener.into()), Instant::now() + MAX_IDLE, creds()))
                    .join()
                    .unwrap()
                    .unwrap()
            })
        };
        let (older, _rx1) = elsewhere("a");
        let (_other, _rx2) = elsewhere("b");
        let (here, _rx3) = p
            .register("hc", Some("a".into()), Instant::now() + MAX_IDLE, creds())
            .unwrap();
        let (_here_b, _rx4) = p
            .register("hc", Some("b".into()), Instant::now() + MAX_IDLE, creds())
            .unwrap();
        let pick_a = |ls: &[Option<&str>]| ls.iter().position(|l| *l == Some("a")).unwrap();
        assert_eq!(p.pop("hc", pick_a).map(|w| w.id), Some(here), "this worker's first");
        assert_eq!(
            p.pop("hc", pick_a).map(|w| w.id),
            Some(older),
            "then its other worker's, not another listener's on this worker"
        );
    }
}
