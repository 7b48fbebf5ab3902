//! One HTTP request's trip to a listener and back (hc-protocol.md §6.3, §6.4, §12 "HTTP
//! request").
//!
//! 1. Plan: a body known to fit in `[http] inline_max_bytes` (64 KiB; by `Content-Length`,
//!    or a chunked body that ends within [`INLINE_WAIT`]) goes inline; anything larger or
//!    slower goes through a rendezvous, with what was read so far sent first. A body is
//!    never buffered beyond that limit.
//! 2. Deliver: one registry call picks the listener (the same rule as `connect`) and queues
//!    the `request` and its body as one unit; a listener reached through another relay
//!    node gets the rendezvous-only form.
//! 3. Wait, until the response deadline: an inline `response`, or the listener's
//!    rendezvous (it fetches the request there, or upgrades its response to it). The
//!    listener's control channel going away first is a 502, the deadline a 504.
//! 4. On a rendezvous, the request body is uploaded while the response is read, and the
//!    response body is streamed to the sender frame by frame.
//! 5. After that, a rendezvous on which the relay pushed the request (so the listener
//!    reads requests there: hyco-https, our hcm), of a listener of this node, is kept for
//!    the next request of the same sender connection to that hybrid connection ([`Kept`],
//!    §6.4 "Persistence"), and used only while that listener is still registered; any
//!    other is closed (1000). The next request goes on the kept rendezvous if its body is
//!    already in hand (at most `inline_max_bytes`): a listener that closes the
//!    rendezvous with a Close frame instead of answering (.NET closes after every
//!    response) never handled it, so it is sent afresh, and nothing is lost. A larger or
//!    streamed body closes the kept rendezvous and goes the usual way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::pending::{Inline, Leg};
use super::wire;
use crate::proto::control::{self, Command, HttpRequest, Request, Response};
use crate::proto::frame::{Role, close_code};
use crate::proto::handshake;
use crate::relay::Ctx;
use crate::relay::control::{Delivered, ListenerCmd, Refusal};
use crate::transport::Stream;
use crate::transport::http_body::{self, BodyError, RelayBody, write_body_message};
use crate::transport::ws::{Message, WsReader, WsWriter};

/// How long a chunked body of unknown size may take to end before it goes through a
/// rendezvous instead. Default: 100 ms.
pub const INLINE_WAIT: Duration = Duration::from_millis(100);

/// A request ready to leave, minus its body.
#[derive(Debug)]
pub struct Outbound {
    /// The hybrid connection's name.
    pub entity: String,
    /// `requestTarget`, `method`, `requestHeaders`, `remoteEndpoint` (its `body` is set here).
    pub http: HttpRequest,
    /// Path after `/` as sent, for the rendezvous address.
    pub raw_path: String,
    pub app_query: Vec<String>,
    /// A HEAD request: the answer has no body, whatever the listener sends.
    pub head: bool,
}

/// An answer made by the relay itself (no `Via`: the sender can tell).
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

impl Refused {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// The listener's answer: its `response` and a body to stream.
#[derive(Debug)]
pub struct Answer {
    pub response: Response,
    pub body: RelayBody,
}

/// How the request body travels.
enum Plan {
    Inline(Bytes),
    Rendezvous { prefix: Bytes, rest: Option<Incoming> },
}

/// What is pushed on a rendezvous: the full `request` and its body.
struct Push {
    text: String,
    body: bool,
    prefix: Bytes,
    rest: Option<Incoming>,
}

/// A listener's rendezvous kept after it answered a request pushed on it, for the next
/// request of the same sender connection.
pub struct Kept {
    /// Lower-cased name of the hybrid connection.
    entity: String,
    /// The listener's registration key on this node (only this node's listeners' are kept).
    listener: u64,
    /// The base of rendezvous addresses the listener was given.
    base_url: String,
    reader: Reader,
    writer: Writer,
    slot: crate::relay::limits::ConnSlot,
    since: Instant,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("entity", &self.entity)
            .field("listener", &self.listener)
            .finish()
    }
}

/// A sender connection's place for its kept rendezvous (at most one).
pub type KeptSlot = Arc<Mutex<Place>>;

/// What a sender connection holds: its kept rendezvous, if any, and whether the
/// connection has ended (then nothing more is kept).
#[derive(Debug, Default)]
pub struct Place {
    kept: Option<Kept>,
    ended: bool,
}

/// The sender connection ended: closes its kept rendezvous, and none is kept after.
pub async fn connection_ended(place: &KeptSlot) {
    let last = {
        let mut p = place.lock().unwrap_or_else(|e| e.into_inner());
        p.ended = true;
        p.kept.take()
    };
    if let Some(k) = last {
        close_kept(k).await;
    }
}

/// Bound on writing a kept rendezvous' Close (a listener that stopped reading).
const KEPT_CLOSE: Duration = Duration::from_secs(5);

/// What became of a request sent on a kept rendezvous.
enum Reuse {
    Done(Result<Answer, Refused>),
    /// The listener closed the rendezvous without answering: it never handled the request.
    Closed,
}

/// Sends the request to a listener of `out.entity` and waits for its answer. `kept` is
/// the sender connection's kept rendezvous, used and refilled here.
pub async fn run(ctx: &Arc<Ctx>, mut out: Outbound, body: Incoming, kept: &KeptSlot) -> Result<Answer, Refused> {
    let cfg = &ctx.cfg.http;
    let plan = plan(body, cfg.inline_max, cfg.body_idle_timeout).await?;
    let entity = out.entity.to_lowercase();
    if let Some((k, counted)) = take_kept(ctx, kept, &entity) {
        match &plan {
            Plan::Inline(b) => match reuse(ctx, (k, counted), &out, b.clone(), kept).await {
                Reuse::Done(r) => return r,
                Reuse::Closed => {
                    count_rendezvous(&out.entity, "closed_by_listener");
                }
            },
            Plan::Rendezvous { .. } => {
                tokio::spawn(close_kept(k));
            }
        }
    }
    let mut ticket = ctx.http.table.open();
    let (id, secret) = (ticket.id.clone(), ticket.secret.clone());
    let (inline_body, prefix, rest) = match plan {
        // With inline requests off, even a body-less request takes the rendezvous-only form.
        Plan::Inline(b) if cfg.inline_max > 0 => (Some(b.clone()), b, None),
        Plan::Inline(b) => (None, b, None),
        Plan::Rendezvous { prefix, rest } => (None, prefix, rest),
    };
    out.http.body = !prefix.is_empty() || rest.is_some();
    let mut sent_inline = false;
    let mut sent_address = String::new();
    let mut sent_to = (0, String::new());
    let delivered = ctx
        .ctl
        .deliver(&out.entity, cfg.max_requests_per_listener, |d| {
            ctx.http.table.bind(&id, d.key);
            let address = wire::rendezvous_address(d.base_url, &out.raw_path, &out.app_query, &id, &secret);
            sent_inline = inline_body.is_some() && d.inline_ok;
            sent_address.clone_from(&address);
            sent_to = (d.key, d.base_url.to_owned());
            let req = Request {
                address,
                id: id.clone(),
                http: sent_inline.then(|| out.http.clone()),
            };
            ListenerCmd::Request {
                text: req.encode(),
                body: inline_body.clone().filter(|b| sent_inline && !b.is_empty()),
            }
        })
        .await;
    let delivered = match delivered {
        Ok(d) => d,
        Err(Refusal::Busy) => {
            return Err(Refused::new(
                503,
                "Every listener of the endpoint is at its request limit; retry later.",
            ));
        }
        Err(Refusal::ShuttingDown) => return Err(Refused::new(503, "The relay is shutting down.")),
        Err(_) => return Err(Refused::new(404, "There are no listeners connected for the endpoint.")),
    };
    tracing::debug!(event = "http_request_dispatched", hc = %out.entity, request = %id, inline = sent_inline, "HTTP request sent to a listener");
    let deadline = Instant::now() + cfg.response_timeout;
    let push = (!sent_inline).then(|| Push {
        text: Request {
            address: sent_address,
            id: id.clone(),
            http: Some(out.http.clone()),
        }
        .encode(),
        body: out.http.body,
        prefix,
        rest,
    });
    tokio::select! {
        r = &mut ticket.response => match r {
            Ok(inline) => Ok(inline_answer(inline)),
            Err(_) => Err(Refused::new(502, "The listener went away before it answered.")),
        },
        l = &mut ticket.leg => match l {
            Ok(leg) => {
                // Kept afterwards only if the request was pushed on it (the listener reads
                // requests there) and the listener is this node's (whose registration
                // can be checked before each reuse).
                let keep = (push.is_some() && sent_to.0 != 0).then(|| KeepAs {
                    slot: kept.clone(),
                    entity,
                    listener: sent_to.0,
                    base_url: sent_to.1,
                });
                rendezvous(ctx, &out.entity, leg, push, deadline, keep).await
            }
            Err(_) => Err(Refused::new(502, "The listener went away before it answered.")),
        },
        _ = delivered.gone.cancelled() => Err(Refused::new(502, "The listener went away before it answered.")),
        _ = tokio::time::sleep_until(deadline) => Err(timeout()),
    }
}

/// The response deadline's answer.
fn timeout() -> Refused {
    Refused::new(
        504,
        "The request was routed to the listener but the listener did not respond in the required time.",
    )
}

/// The connection's kept rendezvous if it serves `entity`, is fresh, and its listener is
/// still registered here (a listener whose control channel closed, for a revoked key
/// say, gets no more requests) and below `max_requests_per_listener`, with the request
/// counted against that listener; any other is closed (in the background), and the
/// request goes the usual way (another listener, or 503 when all are at the limit).
fn take_kept(ctx: &Ctx, kept: &KeptSlot, entity: &str) -> Option<(Kept, Delivered)> {
    let k = kept.lock().unwrap_or_else(|e| e.into_inner()).kept.take()?;
    if k.entity == entity && k.since.elapsed() < ctx.cfg.http.kept_idle {
        // Still registered here and below its request limit: the request counts against it
        // while it runs, as one dispatched the usual way does.
        let max = ctx.cfg.http.max_requests_per_listener;
        if let Some(counted) = ctx.ctl.count_request(entity, k.listener, max) {
            return Some((k, counted));
        }
    }
    tokio::spawn(close_kept(k));
    None
}

/// Closes the rendezvous kept at `since` if it is still unused after `idle`
/// (`[http] kept_rendezvous_idle`), and counts it (`how="idle_closed"`).
async fn reap(place: std::sync::Weak<Mutex<Place>>, since: Instant, idle: Duration) {
    tokio::time::sleep(idle).await;
    let Some(place) = place.upgrade() else { return };
    let unused = {
        let mut p = place.lock().unwrap_or_else(|e| e.into_inner());
        match p.kept.as_ref() {
            Some(k) if k.since == since => p.kept.take(),
            _ => None,
        }
    };
    if let Some(k) = unused {
        count_rendezvous(&k.entity, "idle_closed");
        close_kept(k).await;
    }
}

/// Closes a kept rendezvous (1000), the write bounded by [`KEPT_CLOSE`].
async fn close_kept(k: Kept) {
    let Kept { mut writer, slot, .. } = k;
    tokio::time::timeout(KEPT_CLOSE, writer.send_close(close_code::NORMAL, ""))
        .await
        .ok();
    drop(slot);
}

/// Sends the request, whose whole body is `body`, on the kept rendezvous `k`.
async fn reuse(
    ctx: &Arc<Ctx>,
    (k, _counted): (Kept, Delivered),
    out: &Outbound,
    body: Bytes,
    kept: &KeptSlot,
) -> Reuse {
    let Kept {
        entity,
        listener,
        base_url,
        reader,
        writer,
        slot,
        ..
    } = k;
    let cfg = &ctx.cfg.http;
    let mut ticket = ctx.http.table.open();
    ctx.http.table.bind(&ticket.id, listener);
    let mut http = out.http.clone();
    http.body = !body.is_empty();
    let address = wire::rendezvous_address(&base_url, &out.raw_path, &out.app_query, &ticket.id, &ticket.secret);
    let push = Push {
        text: Request {
            address,
            id: ticket.id.clone(),
            http: Some(http.clone()),
        }
        .encode(),
        body: http.body,
        prefix: body,
        rest: None,
    };
    tracing::debug!(event = "http_rendezvous_reused", hc = %out.entity, request = %ticket.id, "request sent on the kept rendezvous");
    let deadline = Instant::now() + cfg.response_timeout;
    let keep = KeepAs {
        slot: kept.clone(),
        entity,
        listener,
        base_url,
    };
    let upload = tokio::spawn(upload(writer, Some(push), cfg.max_body, cfg.body_idle_timeout));
    let exchange = on_rendezvous(ctx, reader, upload, deadline, slot, Some(keep));
    tokio::pin!(exchange);
    // The listener may also answer inline or on the request's own address.
    let r = tokio::select! {
        r = &mut exchange => r,
        i = &mut ticket.response => match i {
            Ok(inline) => return Reuse::Done(Ok(inline_answer(inline))),
            Err(_) => exchange.await,
        },
        l = &mut ticket.leg => match l {
            Ok(leg) => return Reuse::Done(rendezvous(ctx, &out.entity, leg, None, deadline, None).await),
            Err(_) => exchange.await,
        },
    };
    match r {
        Ok(a) => {
            count_rendezvous(&out.entity, "reused");
            Reuse::Done(Ok(a))
        }
        Err(Failed::ClosedByListener) => Reuse::Closed,
        Err(Failed::Refused(r)) => Reuse::Done(Err(r)),
    }
}

/// Decides how the body travels, reading at most `inline_max` bytes of it.
async fn plan(mut body: Incoming, inline_max: usize, idle: Duration) -> Result<Plan, Refused> {
    if body.is_end_stream() {
        return Ok(Plan::Inline(Bytes::new()));
    }
    let known = body.size_hint().exact();
    if known.is_some_and(|n| n > inline_max as u64) {
        return Ok(Plan::Rendezvous {
            prefix: Bytes::new(),
            rest: Some(body),
        });
    }
    // A known small size waits as long as the body is not idle; an unknown one briefly.
    let mut buf = BytesMut::new();
    let window = if known.is_some() { idle } else { INLINE_WAIT };
    let until = Instant::now() + window;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(until) => {
                if known.is_some() {
                    return Err(Refused::new(408, "The request body did not arrive in time."));
                }
                return Ok(Plan::Rendezvous { prefix: buf.freeze(), rest: Some(body) });
            }
        };
        match frame {
            None => return Ok(Plan::Inline(buf.freeze())),
            Some(Err(e)) => return Err(Refused::new(400, format!("Reading the request body failed: {e}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
        }
        if buf.len() > inline_max {
            return Ok(Plan::Rendezvous {
                prefix: buf.freeze(),
                rest: Some(body),
            });
        }
    }
}

fn inline_answer(inline: Inline) -> Answer {
    let body = if inline.response.body {
        RelayBody::full(inline.body)
    } else {
        RelayBody::Empty
    };
    Answer {
        response: inline.response,
        body,
    }
}

type Writer = WsWriter<WriteHalf<Stream>>;
type Reader = WsReader<ReadHalf<Stream>>;

/// Where a rendezvous goes after its exchange, if it may be kept.
struct KeepAs {
    slot: KeptSlot,
    entity: String,
    listener: u64,
    base_url: String,
}

/// Why a rendezvous exchange gave no answer.
enum Failed {
    /// The listener sent Close before any response.
    ClosedByListener,
    Refused(Refused),
}

fn lost() -> Refused {
    Refused::new(502, "The listener's rendezvous connection failed.")
}

fn count_rendezvous(hc: &str, how: &'static str) {
    metrics::counter!(crate::telemetry::metrics::RELAY_HTTP_RENDEZVOUS, "hc" => hc.to_owned(), "how" => how)
        .increment(1);
}

/// Serves the request of hybrid connection `hc` over the listener's rendezvous connection.
async fn rendezvous(
    ctx: &Arc<Ctx>,
    hc: &str,
    leg: Leg,
    push: Option<Push>,
    deadline: Instant,
    keep: Option<KeepAs>,
) -> Result<Answer, Refused> {
    let Leg {
        mut stream,
        leftover,
        key,
        slot,
    } = leg;
    stream.unpark().map_err(|_| lost())?;
    crate::relay::conn::write_flush(&mut stream, &handshake::switching_protocols(&key, None))
        .await
        .map_err(|_| lost())?;
    tracing::debug!(
        event = "http_rendezvous",
        pushed = push.is_some(),
        "listener opened the request's rendezvous"
    );
    count_rendezvous(hc, "opened");
    let (r, w) = tokio::io::split(stream);
    // Frames are streamed in pieces, never held whole: a body may come as one frame
    // (hyco-https sends a 10 MiB response so), so the body limit is the frame limit.
    let reader = WsReader::new(r, leftover, Role::Server, ctx.cfg.http.max_body);
    let writer = WsWriter::new(w, Role::Server);
    let cfg = &ctx.cfg.http;
    let upload = tokio::spawn(upload(writer, push, cfg.max_body, cfg.body_idle_timeout));
    match on_rendezvous(ctx, reader, upload, deadline, slot, keep).await {
        Ok(a) => Ok(a),
        Err(Failed::ClosedByListener) => Err(lost()),
        Err(Failed::Refused(r)) => Err(r),
    }
}

/// Reads the listener's response on a rendezvous while `upload` sends the request, then
/// streams the response body to the sender from a task of its own, which afterwards
/// keeps the rendezvous (`keep`) or closes it.
async fn on_rendezvous(
    ctx: &Arc<Ctx>,
    mut reader: Reader,
    mut upload: tokio::task::JoinHandle<Result<Writer, BodyError>>,
    deadline: Instant,
    slot: crate::relay::limits::ConnSlot,
    keep: Option<KeepAs>,
) -> Result<Answer, Failed> {
    let refused = |r| Err(Failed::Refused(r));
    let mut uploaded: Option<Writer> = None;
    let response = loop {
        tokio::select! {
            m = reader.next_message(ctx.cfg.max_control_message) => match m {
                Ok(Some(Message::Text(t))) => match control::decode(&t) {
                    Ok(Command::Response(r)) => break r,
                    _ => return refused(Refused::new(502, "The listener sent something other than a response.")),
                },
                // A stray empty binary message, or pings: nothing to do.
                Ok(Some(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Ok(Some(Message::Close(_))) => return Err(Failed::ClosedByListener),
                Ok(None) | Err(_) => return refused(lost()),
            },
            u = &mut upload, if uploaded.is_none() => match u {
                Ok(Ok(w)) => uploaded = Some(w),
                Ok(Err(BodyError::TooLarge(n))) => {
                    return refused(Refused::new(413, format!("The request body exceeds {n} bytes.")));
                }
                Ok(Err(e)) => return refused(Refused::new(502, format!("Sending the request to the listener failed: {e}"))),
                Err(_) => return refused(lost()),
            },
            _ = tokio::time::sleep_until(deadline) => return refused(timeout()),
        }
    };
    let (tx, body) = if response.body {
        let (tx, body) = http_body::channel();
        (Some(tx), RelayBody::Stream(body))
    } else {
        (None, RelayBody::Empty)
    };
    let writer = match uploaded {
        Some(w) => Finish::Writer(w),
        None => Finish::Uploading(upload),
    };
    let cfg = ctx.cfg.http.clone();
    tokio::spawn(async move {
        let mut clean = true;
        if let Some(tx) = &tx
            && let Err(e) = http_body::pump_message(&mut reader, tx, cfg.max_body, cfg.body_idle_timeout).await
        {
            tracing::debug!(error = %e, "streaming a response body from a rendezvous failed");
            clean = false;
        }
        let Some(mut writer) = writer.get().await else { return };
        // Kept before the body's end reaches the sender, so the sender's next request
        // finds it.
        if clean && let Some(k) = keep {
            let mut place = k.slot.lock().unwrap_or_else(|e| e.into_inner());
            if place.kept.is_none() && !place.ended {
                let since = Instant::now();
                place.kept = Some(Kept {
                    entity: k.entity,
                    listener: k.listener,
                    base_url: k.base_url,
                    reader,
                    writer,
                    slot,
                    since,
                });
                tokio::spawn(reap(Arc::downgrade(&k.slot), since, cfg.kept_idle));
                return;
            }
        }
        drop(tx);
        // Bounded: a listener that stops reading cannot hold the rendezvous.
        tokio::time::timeout(cfg.body_idle_timeout, writer.send_close(close_code::NORMAL, ""))
            .await
            .ok();
        drop(slot);
    });
    Ok(Answer { response, body })
}

/// Sends the pushed request, if any, and hands the writer back.
async fn upload(mut w: Writer, push: Option<Push>, max_body: u64, idle: Duration) -> Result<Writer, BodyError> {
    let Some(p) = push else { return Ok(w) };
    match tokio::time::timeout(idle, w.send_text(&p.text)).await {
        Ok(r) => r.map_err(BodyError::Write)?,
        Err(_) => return Err(BodyError::Idle(idle)),
    }
    if p.body {
        write_body_message(&mut w, p.prefix, p.rest, max_body, idle).await?;
    }
    Ok(w)
}

/// The rendezvous writer once the upload is over.
enum Finish {
    Writer(Writer),
    Uploading(tokio::task::JoinHandle<Result<Writer, BodyError>>),
}

impl Finish {
    async fn get(self) -> Option<Writer> {
        match self {
            Finish::Writer(w) => Some(w),
            Finish::Uploading(h) => h.await.ok().and_then(Result::ok),
        }
    }
}
