//! HTTP request/response mode on the relay: plain HTTP(S) senders on
//! `/{hybrid connection}[/path][?query]` (hc-protocol.md §6).
//!
//! The worker has already read the first request head with the relay's own parser (the
//! WebSocket fast path); a connection whose first request names a hybrid connection is
//! handed to hyper (HTTP/1.1: keep-alive, chunked bodies, `Expect: 100-continue`, HEAD)
//! with that head and whatever followed it replayed in front. Each request is
//! authenticated on its own (Send right, §6.1 token rules), stripped of `sb-hc-*`
//! parameters, credentials and hop-by-hop headers, and sent to a listener by
//! `exchange`. Requests the relay answers itself carry no `Via`; listener answers do.
//!
//! A refused request's unread body is drained (bounded) before the answer, and a closing
//! connection is shut down for writing and drained, so a client still sending sees the
//! status rather than a reset.
//!
//! - [`wire`]: what crosses the relay (sans-IO);
//! - [`pending`]: requests waiting for a listener;
//! - `exchange`: one request's trip;
//! - `rendezvous`: the listener's `sb-hc-action=request` connections.

pub mod config;
mod exchange;
pub mod pending;
mod rendezvous;
pub mod stats;
pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) use self::rendezvous::serve as serve_rendezvous;
use super::Ctx;
use super::auth::{Demand, authorize};
use super::conn::Incoming as Accepted;
use super::limits::AuthPending;
use crate::proto::address::{self, Target};
use crate::proto::control::HttpRequest;
use crate::proto::handshake::RequestHead;
use crate::proto::sas::{Rights, unix_now};
use crate::telemetry::metrics as m;
use crate::transport::Stream;
use crate::transport::http_body::{RelayBody, Rewind};

/// A refused request's body is read up to this much before the answer, and a closing
/// connection up to this much after it: clients such as curl send a whole body before
/// they read, and a close with unread bytes resets the connection. Default: 16 MiB.
const DRAIN_BYTES: usize = 16 << 20;
/// … each for at most this long. Default: 5 s.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// HTTP-mode state shared by every worker: the requests in flight and the counts.
#[derive(Debug, Default)]
pub(crate) struct HttpRt {
    pub table: Arc<pending::Table>,
    pub stats: Arc<stats::Stats>,
}

impl HttpRt {
    /// Hands an inline `response` from listener `listener` to its request (see
    /// [`pending::Table::respond`]).
    pub fn respond(&self, listener: u64, inline: pending::Inline) -> bool {
        self.table.respond(listener, inline)
    }
}

/// What every request of one connection shares.
struct Conn {
    peer: SocketAddr,
    /// Counts the connection as unauthenticated until a request passes.
    pending: Mutex<Option<AuthPending>>,
    /// The rendezvous kept for this connection's next request (`exchange`).
    kept: exchange::KeptSlot,
}

/// Serves a connection whose first request is a plain request for a hybrid connection.
pub(crate) async fn serve(stream: Stream, inc: Accepted, ctx: Arc<Ctx>) {
    let Accepted {
        buf,
        head,
        peer,
        slot,
        pending,
    } = inc;
    let replay = replay_bytes(&head, buf);
    let conn = Arc::new(Conn {
        peer,
        pending: Mutex::new(Some(pending)),
        kept: Default::default(),
    });
    let kept = conn.kept.clone();
    let svc = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| {
            let (conn, ctx) = (conn.clone(), ctx.clone());
            // Boxed so the connection is `Unpin` and can hand its stream back at the end.
            Box::pin(async move { Ok::<_, Infallible>(handle(req, &conn, &ctx).await) })
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.cfg.handshake_timeout)
        .max_buf_size(ctx.cfg.max_head.max(8192))
        .max_headers(crate::proto::handshake::MAX_HEADERS);
    let io = TokioIo::new(Rewind::new(replay, stream));
    let mut connection = builder.serve_connection(io, svc);
    let mut draining = false;
    let ended = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => break r,
            _ = ctx.drain.cancelled(), if !draining => {
                draining = true;
                std::pin::Pin::new(&mut connection).graceful_shutdown();
            }
            _ = ctx.shutdown.cancelled() => return,
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
    let (_, stream) = connection.into_parts().io.into_inner().into_parts();
    exchange::connection_ended(&kept).await;
    close_gracefully(stream).await;
    drop(slot);
}

/// The head as the client sent it (version, target, headers) and the bytes after it.
fn replay_bytes(head: &RequestHead, rest: BytesMut) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + rest.len());
    let version = if head.version == 0 { "HTTP/1.0" } else { "HTTP/1.1" };
    out.extend_from_slice(format!("{} {} {version}\r\n", head.method, head.target).as_bytes());
    for (n, v) in &head.headers.0 {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&rest);
    out.freeze()
}

/// Shuts the stream down for writing, then reads (bounded) until the client closes, so
/// unread request bytes do not turn the close into a reset.
async fn close_gracefully(mut s: Stream) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        s.shutdown().await.ok();
        let mut sink = vec![0u8; 16 * 1024];
        let mut left = DRAIN_BYTES;
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Serves one request; counts it.
async fn handle(req: Request<Incoming>, conn: &Conn, ctx: &Arc<Ctx>) -> Response<RelayBody> {
    let started = std::time::Instant::now();
    let (resp, hc) = route(req, conn, ctx).await;
    if let Some(hc) = &hc {
        let by_relay = !resp.headers().contains_key(hyper::header::VIA);
        ctx.http.stats.answered(hc, resp.status().as_u16(), by_relay);
    }
    let code = wire::code_label(resp.status().as_u16());
    let label = hc.unwrap_or_else(|| m::UNKNOWN_HC.to_owned());
    metrics::counter!(m::RELAY_HTTP_REQUESTS, "hc" => label.clone(), "code" => code).increment(1);
    metrics::histogram!(m::RELAY_HTTP_SECONDS, "hc" => label).record(started.elapsed().as_secs_f64());
    resp
}

/// Authenticates, strips and forwards; returns the answer and the hybrid connection's name.
async fn route(req: Request<Incoming>, conn: &Conn, ctx: &Arc<Ctx>) -> (Response<RelayBody>, Option<String>) {
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    if parts.method == hyper::Method::CONNECT {
        return (refuse(body, 405, "CONNECT is not allowed.", true).await, None);
    }
    if parts.headers.contains_key(hyper::header::UPGRADE) {
        let msg = "A WebSocket upgrade goes to /$hc/ on a new connection.";
        return (refuse(body, 400, msg, true).await, None);
    }
    let plain = match address::parse_target(&target) {
        Ok(Target::Plain(p)) => p,
        Ok(Target::Hc(_)) | Err(_) => {
            let msg = "This request needs a connection of its own.";
            return (refuse(body, 400, msg, true).await, None);
        }
    };
    if plain
        .raw_path
        .get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("/$hyrelay"))
        || plain
            .raw_path
            .get(..11)
            .is_some_and(|p| p.eq_ignore_ascii_case("/%24hyrelay"))
    {
        let msg = format!("{} is not allowed on the management API.", parts.method);
        return (refuse(body, 405, &msg, true).await, None);
    }
    let delay = ctx.throttle.delay(conn.peer.ip());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let state = ctx.state.load();
    let Some((entity, _)) = state.resolve(&plain.path) else {
        return (refuse(body, 404, "Endpoint does not exist.", true).await, None);
    };
    let entity = entity.clone();
    let name = Some(entity.name.clone());
    let wants_info = plain.query.iter().any(|(k, _)| k.eq_ignore_ascii_case("api-version"));
    if parts.method == hyper::Method::GET && wants_info {
        let msg = "The runtime-information request needs a connection of its own.";
        return (refuse(body, 400, msg, true).await, name);
    }
    let Some(split) = wire::split_target(&target) else {
        return (refuse(body, 400, "Bad request target.", true).await, name);
    };
    let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
    let creds = wire::credentials(
        split.token.as_deref(),
        header("ServiceBusAuthorization"),
        header("Authorization"),
        entity.requires_client_authorization,
    );
    let host = header("Host").map(str::to_owned);
    if entity.requires_client_authorization {
        let tokens: Vec<&str> = creds.tokens.iter().map(String::as_str).collect();
        let demand = Demand {
            entity: Some(&entity),
            path: plain.path.trim_matches('/'),
            hosts: ctx.hosts(),
            right: Rights::SEND,
            now: unix_now(),
        };
        if let Err(e) = authorize(&state, &tokens, &demand) {
            if e.presented_a_credential() {
                ctx.throttle.failed(conn.peer.ip());
            }
            tracing::info!(event = "http_sender_refused", hc = %entity.name, peer = %conn.peer, status = e.status(), reason = %e, "HTTP sender refused");
            return (refuse(body, e.status(), &e.to_string(), true).await, name);
        }
    }
    drop(state);
    if let Some(mut p) = conn.pending.lock().unwrap_or_else(|e| e.into_inner()).take() {
        p.done();
    }
    let max_body = ctx.cfg.http.max_body;
    if body.size_hint().exact().is_some_and(|n| n > max_body) {
        let msg = format!("The request body exceeds the relay's limit of {max_body} bytes.");
        return (refuse(body, 413, &msg, true).await, name);
    }
    let via_host = ctx
        .cfg
        .public_url
        .as_ref()
        .map(|p| p.host.clone())
        .or(host)
        .unwrap_or_else(|| "hyrelay".into());
    let out = exchange::Outbound {
        entity: entity.name.clone(),
        http: HttpRequest {
            request_target: split.request_target,
            method: parts.method.as_str().to_owned(),
            request_headers: forward_headers(&parts.headers, creds.authorization_used, &via_host),
            remote_endpoint: Some((conn.peer.ip().to_string(), conn.peer.port())),
            body: false,
        },
        raw_path: split.raw_path,
        app_query: split.app_query,
        head: parts.method == hyper::Method::HEAD,
    };
    let head = out.head;
    let _in_flight = ctx.http.stats.enter(&entity.name);
    let resp = match exchange::run(ctx, out, body, &conn.kept).await {
        Ok(answer) => to_sender(answer, &via_host, head),
        Err(r) => {
            tracing::info!(event = "http_request_failed", hc = %entity.name, peer = %conn.peer, status = r.status, reason = %r.reason, "HTTP request not answered by a listener");
            plain_response(r.status, &r.reason, false)
        }
    };
    (resp, name)
}

/// The sender's headers as the listener gets them: end-to-end ones only, merged by name,
/// `Authorization` only if it was not the relay token, `Via` annotated.
fn forward_headers(headers: &hyper::HeaderMap, authorization_used: bool, via_host: &str) -> Vec<(String, String)> {
    let conn_tokens = wire::connection_tokens(
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let n = name.as_str();
        if wire::is_stripped(n, &conn_tokens) || n == "via" || (authorization_used && n == "authorization") {
            continue;
        }
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.iter_mut().find(|(k, _)| k == n) {
            Some((_, acc)) => {
                acc.push_str(", ");
                acc.push_str(&v);
            }
            None => out.push((n.to_owned(), v)),
        }
    }
    let existing: Vec<&str> = headers
        .get_all(hyper::header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let existing = (!existing.is_empty()).then(|| existing.join(", "));
    out.push(("via".into(), wire::via(existing.as_deref(), via_host)));
    out
}

/// The listener's answer as the sender gets it.
fn to_sender(answer: exchange::Answer, via_host: &str, head_request: bool) -> Response<RelayBody> {
    let r = &answer.response;
    let Ok(status) = StatusCode::from_u16(r.status_code)
        .map_err(|_| ())
        .and_then(|s| if s.is_informational() { Err(()) } else { Ok(s) })
    else {
        return plain_response(502, "The listener answered with an invalid status.", false);
    };
    let no_body = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let body = if no_body { RelayBody::Empty } else { answer.body };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    for (n, v) in wire::sender_headers(&r.response_headers, no_body, via_host) {
        // A name or value that is not valid HTTP is dropped.
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(&v)) {
            headers.append(name, value);
        }
    }
    set_reason(&mut resp, r.status_description.as_deref());
    resp
}

fn set_reason(resp: &mut Response<RelayBody>, desc: Option<&str>) {
    let Some(d) = desc.map(wire::reason_phrase).filter(|d| !d.is_empty()) else {
        return;
    };
    if resp.status().canonical_reason() == Some(d.as_str()) {
        return;
    }
    if let Ok(p) = hyper::ext::ReasonPhrase::try_from(d.into_bytes()) {
        resp.extensions_mut().insert(p);
    }
}

/// An answer from the relay itself: the description as reason phrase and body.
fn plain_response(status: u16, reason: &str, close: bool) -> Response<RelayBody> {
    let mut resp = Response::new(RelayBody::from(format!("{reason}\n")));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        h.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    set_reason(&mut resp, Some(reason));
    resp
}

/// Refuses a request: its unread body is drained first (bounded); if it could not be,
/// the connection closes after the answer.
async fn refuse(mut body: Incoming, status: u16, reason: &str, close: bool) -> Response<RelayBody> {
    let mut drained = body.is_end_stream();
    if !drained {
        let mut left = DRAIN_BYTES;
        drained = tokio::time::timeout(DRAIN_TIME, async {
            while left > 0 {
                match body.frame().await {
                    None => return true,
                    Some(Ok(f)) => left = left.saturating_sub(f.data_ref().map_or(0, |d| d.len())),
                    Some(Err(_)) => return false,
                }
            }
            false
        })
        .await
        .unwrap_or(false);
    }
    plain_response(status, reason, close || !drained)
}
