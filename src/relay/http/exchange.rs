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
//! 4. On a rendezvous, the request body is uploaded while the response is read; the
//!    response body is streamed to the sender frame by frame and the rendezvous closed
//!    (1000) after it, so each rendezvous carries one request.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::io::WriteHalf;
use tokio::time::Instant;

use super::pending::{Inline, Leg};
use super::wire;
use crate::proto::control::{self, Command, HttpRequest, Request, Response};
use crate::proto::frame::{Role, close_code};
use crate::proto::handshake;
use crate::relay::Ctx;
use crate::relay::control::{ListenerCmd, Refusal};
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

/// Sends the request to a listener of `out.entity` and waits for its answer.
pub async fn run(ctx: &Arc<Ctx>, mut out: Outbound, body: Incoming) -> Result<Answer, Refused> {
    let cfg = &ctx.cfg.http;
    let plan = plan(body, cfg.inline_max, cfg.body_idle_timeout).await?;
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
    let delivered = ctx
        .ctl
        .deliver(&out.entity, cfg.max_requests_per_listener, |d| {
            ctx.http.table.bind(&id, d.key);
            let address = wire::rendezvous_address(d.base_url, &out.raw_path, &out.app_query, &id, &secret);
            sent_inline = inline_body.is_some() && d.inline_ok;
            sent_address.clone_from(&address);
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
    let timeout = || {
        Refused::new(
            504,
            "The request was routed to the listener but the listener did not respond in the required time.",
        )
    };
    tokio::select! {
        r = &mut ticket.response => match r {
            Ok(inline) => Ok(inline_answer(inline)),
            Err(_) => Err(Refused::new(502, "The listener went away before it answered.")),
        },
        l = &mut ticket.leg => match l {
            Ok(leg) => rendezvous(ctx, leg, push, deadline).await,
            Err(_) => Err(Refused::new(502, "The listener went away before it answered.")),
        },
        _ = delivered.gone.cancelled() => Err(Refused::new(502, "The listener went away before it answered.")),
        _ = tokio::time::sleep_until(deadline) => Err(timeout()),
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

/// Serves the request over the listener's rendezvous connection.
async fn rendezvous(ctx: &Arc<Ctx>, leg: Leg, push: Option<Push>, deadline: Instant) -> Result<Answer, Refused> {
    let lost = || Refused::new(502, "The listener's rendezvous connection failed.");
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
    let (r, w) = tokio::io::split(stream);
    // Frames are streamed in pieces, never held whole: a body may come as one frame
    // (hyco-https sends a 10 MiB response so), so the body limit is the frame limit.
    let mut reader = WsReader::new(r, leftover, Role::Server, ctx.cfg.http.max_body);
    let writer = WsWriter::new(w, Role::Server);
    let cfg = ctx.cfg.http.clone();
    let mut upload = tokio::spawn(upload(writer, push, cfg.max_body, cfg.body_idle_timeout));
    let mut uploaded: Option<Writer> = None;
    let response = loop {
        tokio::select! {
            m = reader.next_message(ctx.cfg.max_control_message) => match m {
                Ok(Some(Message::Text(t))) => match control::decode(&t) {
                    Ok(Command::Response(r)) => break r,
                    _ => return Err(Refused::new(502, "The listener sent something other than a response.")),
                },
                // A stray empty binary message, or pings: nothing to do.
                Ok(Some(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Ok(Some(Message::Close(_)) | None) | Err(_) => return Err(lost()),
            },
            u = &mut upload, if uploaded.is_none() => match u {
                Ok(Ok(w)) => uploaded = Some(w),
                Ok(Err(BodyError::TooLarge(n))) => {
                    return Err(Refused::new(413, format!("The request body exceeds {n} bytes.")));
                }
                Ok(Err(e)) => return Err(Refused::new(502, format!("Sending the request to the listener failed: {e}"))),
                Err(_) => return Err(lost()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Refused::new(504, "The request was routed to the listener but the listener did not respond in the required time."));
            }
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
    tokio::spawn(async move {
        if let Some(tx) = tx
            && let Err(e) = http_body::pump_message(&mut reader, &tx, cfg.max_body, cfg.body_idle_timeout).await
        {
            tracing::debug!(error = %e, "streaming a response body from a rendezvous failed");
        }
        if let Some(mut w) = writer.get().await {
            // Bounded: a listener that stops reading cannot hold the rendezvous.
            tokio::time::timeout(cfg.body_idle_timeout, w.send_close(close_code::NORMAL, ""))
                .await
                .ok();
        }
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
