//! HTTP request/response mode in the hcm: each `request` from the relay becomes an
//! HTTP/1.1 request to the hybrid connection's endpoint (hc-protocol.md §6, §13).
//!
//! - An inline request (body, if any, already read from the control channel) is sent at
//!   once; a rendezvous-only one is fetched from its address first, its body streamed to
//!   the endpoint as it arrives.
//! - The endpoint sees the request target without the hybrid connection's name
//!   (`/hc/api/x?a=1` → `/api/x?a=1`), its own `Host` (or `http_host` from the config),
//!   `X-Forwarded-For` and `Forwarded` from the sender's address, and no hop-by-hop
//!   header.
//! - The answer goes back inline on the control channel when its body is known to fit in
//!   64 KiB; otherwise on a rendezvous (the request's own, or its address dialed to upgrade
//!   the response), streamed frame by frame.
//! - An endpoint that refuses, fails or is slow gives the sender 502 or 504 with the
//!   reason (logged); one outside `allowed_endpoints`, 403.
//!
//! Connections to endpoints are kept alive in a small `Pool` per endpoint, usable from
//! every worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::{HcRt, HcmCtx};
use crate::proto::control::{self, Command, HttpRequest, Request, Response};
use crate::proto::frame::{OpCode, Role, close_code};
use crate::proto::hop;
use crate::proto::metadata::HostPort;
use crate::telemetry::metrics as m;
use crate::transport::Stream;
use crate::transport::http_body::{self, RelayBody, write_body_message};
use crate::transport::ws::{self, ConnectError, Message, WsReader, WsUrl, WsWriter};

/// Largest response body sent inline on the control channel. Default: 64 KiB.
pub const INLINE_MAX: u64 = 64 * 1024;
/// Idle keep-alive connections kept per endpoint. Default: 32.
const POOL_IDLE: usize = 32;
/// Largest body moved in either direction. Default: 1 GiB (as the relay's default).
const MAX_BODY: u64 = 1 << 30;

/// A `response` (and its body) for the control channel, written as one unit.
#[derive(Debug)]
pub(crate) struct Reply {
    pub text: String,
    pub body: Option<Bytes>,
}

/// Where answers go for the control channel's session.
pub(crate) type ReplyTx = mpsc::Sender<Reply>;

/// Keep-alive HTTP/1.1 connections per endpoint.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<String, Vec<SendRequest<RelayBody>>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<SendRequest<RelayBody>>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection ready for a request: an idle one, else a new one.
    async fn get(&self, ep: &HostPort, dial_timeout: Duration) -> Result<(SendRequest<RelayBody>, bool), Failure> {
        if let Some(s) = self.take_ready(&ep.to_string()) {
            return Ok((s, true));
        }
        let tcp = match tokio::time::timeout(dial_timeout, ws::dial(&ep.host, ep.port)).await {
            Err(_) => {
                return Err(Failure::new(
                    504,
                    format!("{ep} did not answer within {dial_timeout:?}"),
                ));
            }
            Ok(Err(ConnectError::Resolve { source, .. })) => {
                return Err(Failure::new(502, format!("cannot resolve {}: {source}", ep.host)));
            }
            Ok(Err(ConnectError::Connect { source, .. })) => {
                return Err(Failure::new(502, format!("cannot connect to {ep}: {source}")));
            }
            Ok(Err(e)) => return Err(Failure::new(502, format!("cannot connect to {ep}: {e}"))),
            Ok(Ok(t)) => t,
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Failure::new(502, format!("HTTP handshake with {ep} failed: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "endpoint HTTP connection ended");
            }
        });
        Ok((sender, false))
    }

    fn take_ready(&self, key: &str) -> Option<SendRequest<RelayBody>> {
        let mut map = self.lock();
        let list = map.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        let i = list.iter().position(|s| s.is_ready())?;
        Some(list.swap_remove(i))
    }

    /// Keeps a connection for later requests (it becomes ready once its response is read).
    fn put(&self, ep: &HostPort, s: SendRequest<RelayBody>) {
        if s.is_closed() {
            return;
        }
        let mut map = self.lock();
        let list = map.entry(ep.to_string()).or_default();
        if list.len() < POOL_IDLE {
            list.push(s);
        }
    }
}

/// Why the endpoint gave no answer: the status the sender gets and the reason.
#[derive(Debug)]
struct Failure {
    status: u16,
    reason: String,
}

impl Failure {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

/// Serves one `request` (with its inline body, if any) to the end of its response; a
/// rendezvous-only one, and any further requests on its rendezvous.
pub(crate) async fn handle(
    req: Request,
    body: Option<Bytes>,
    reply: ReplyTx,
    hc: Arc<HcRt>,
    endpoint: HostPort,
    ctx: Arc<HcmCtx>,
) {
    let _inflight = ctx.inflight.enter();
    match req.http.clone() {
        Some(http) => {
            let started = Instant::now();
            let inbound = body.map(RelayBody::full).unwrap_or(RelayBody::Empty);
            let answer = forward(&http, inbound, &hc, &endpoint, &ctx).await;
            let code = answer_inline_request(&req, answer, &reply, &ctx).await;
            record(&hc, started, code);
        }
        None => serve_rendezvous(&req, &hc, &endpoint, &ctx).await,
    }
}

/// Counts a request served (`code` is None when the relay connection failed).
fn record(hc: &HcRt, started: Instant, code: Option<u16>) {
    let name = hc.entry.name().to_owned();
    let last = match code {
        Some(c) => format!("{c} at {}", crate::clock::now_rfc3339()),
        None => format!("no answer (relay connection failed) at {}", crate::clock::now_rfc3339()),
    };
    hc.update(|s| {
        s.http_requests += 1;
        s.last_http = Some(last);
    });
    let label = code.map_or("error", crate::proto::hop::code_label);
    metrics::counter!(m::HCM_HTTP_REQUESTS, "hc" => name.clone(), "code" => label).increment(1);
    metrics::histogram!(m::HCM_HTTP_SECONDS, "hc" => name).record(started.elapsed().as_secs_f64());
}

/// Sends the request to the endpoint; the response head, or why there is none.
async fn forward(
    http: &HttpRequest,
    body: RelayBody,
    hc: &HcRt,
    endpoint: &HostPort,
    ctx: &HcmCtx,
) -> Result<(hyper::Response<Incoming>, bool), Failure> {
    let name = hc.entry.name();
    super::channel::check_allowed(endpoint, ctx).map_err(|why| Failure::new(403, format!("hyrelay hcm: {why}")))?;
    let host = hc.entry.http_host.clone().unwrap_or_else(|| endpoint.to_string());
    let req = endpoint_request(http, name, &host, body).map_err(|e| Failure::new(400, e))?;
    let (mut sender, reused) = ctx.http_pool.get(endpoint, ctx.cfg.dial_timeout).await?;
    let t = ctx.cfg.http_timeout;
    let resp = match tokio::time::timeout(t, sender.send_request(req)).await {
        Err(_) => return Err(Failure::new(504, format!("{endpoint} sent no response within {t:?}"))),
        Ok(Err(e)) => return Err(Failure::new(502, format!("{endpoint} failed the request: {e}"))),
        Ok(Ok(r)) => r,
    };
    ctx.http_pool.put(endpoint, sender);
    Ok((resp, reused))
}

/// The request as the endpoint gets it.
fn endpoint_request(
    http: &HttpRequest,
    entity: &str,
    host: &str,
    body: RelayBody,
) -> Result<hyper::Request<RelayBody>, String> {
    let target = strip_entity(&http.request_target, entity);
    let method = hyper::Method::from_bytes(http.method.as_bytes()).map_err(|_| "bad method".to_owned())?;
    let mut b = hyper::Request::builder().method(method).uri(target);
    let conn_tokens = hop::connection_tokens(
        http.request_headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v.as_str()),
    );
    let mut xff = None;
    let mut fwd = None;
    for (n, v) in &http.request_headers {
        if hop::is_hop_by_hop(n, &conn_tokens) {
            continue;
        }
        if n.eq_ignore_ascii_case("x-forwarded-for") {
            xff = Some(v.as_str());
        } else if n.eq_ignore_ascii_case("forwarded") {
            fwd = Some(v.as_str());
        } else {
            b = b.header(n.as_str(), v.as_str());
        }
    }
    b = b.header(hyper::header::HOST, host);
    if let Some((ip, _)) = &http.remote_endpoint {
        let append = |prev: Option<&str>, me: String| match prev {
            Some(p) if !p.trim().is_empty() => format!("{p}, {me}"),
            _ => me,
        };
        b = b.header("x-forwarded-for", append(xff, ip.clone()));
        let node = if ip.contains(':') {
            format!("\"[{ip}]\"")
        } else {
            ip.clone()
        };
        b = b.header("forwarded", append(fwd, format!("for={node}")));
    }
    b.body(body).map_err(|e| e.to_string())
}

/// `/{entity}[/rest][?q]` → `/[rest][?q]`; a target outside the entity stays as it is.
pub fn strip_entity(target: &str, entity: &str) -> String {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let want: Vec<&str> = entity.split('/').collect();
    let matches = segs.len() >= want.len()
        && want.iter().zip(&segs).all(|(w, s)| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .is_ok_and(|d| d.eq_ignore_ascii_case(w))
        });
    if !matches {
        return target.to_owned();
    }
    let mut out = format!("/{}", segs[want.len()..].join("/"));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The `response` for an endpoint's answer (body not included).
fn response_of(id: &str, resp: &hyper::Response<Incoming>, body: bool) -> Response {
    let desc = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| resp.status().canonical_reason().map(str::to_owned));
    let headers = resp.headers();
    let conn_tokens = hop::connection_tokens(
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let mut out: Vec<(String, String)> = Vec::new();
    for (n, v) in headers {
        let keep_length = !body && n == hyper::header::CONTENT_LENGTH;
        if hop::is_hop_by_hop(n.as_str(), &conn_tokens) && !keep_length {
            continue;
        }
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match out.iter_mut().find(|(k, _)| k == n.as_str()) {
            Some((_, acc)) => {
                acc.push_str(", ");
                acc.push_str(&v);
            }
            None => out.push((n.as_str().to_owned(), v)),
        }
    }
    Response {
        request_id: id.to_owned(),
        status_code: resp.status().as_u16(),
        status_description: desc,
        response_headers: out,
        body,
    }
}

/// The `response` the sender gets when the endpoint did not answer.
fn failure_response(id: &str, f: &Failure) -> (Response, Bytes) {
    let r = Response {
        request_id: id.to_owned(),
        status_code: f.status,
        status_description: Some(hop::reason_phrase(&f.reason)),
        response_headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        body: true,
    };
    (r, Bytes::from(format!("{}\n", f.reason)))
}

/// What to send for an endpoint's answer: a body small enough to go whole, or a stream.
enum Outgoing {
    Whole(Response, Bytes),
    Streamed(Response, Incoming),
}

/// Reads the endpoint's answer far enough to know how it travels.
async fn outgoing(
    id: &str,
    method: &str,
    answer: Result<(hyper::Response<Incoming>, bool), Failure>,
    idle: Duration,
) -> (Outgoing, Option<u16>) {
    let (resp, _) = match answer {
        Ok(a) => a,
        Err(f) => {
            let (r, b) = failure_response(id, &f);
            return (Outgoing::Whole(r, b), Some(f.status));
        }
    };
    let status = resp.status().as_u16();
    let bodiless = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    if bodiless || resp.body().is_end_stream() {
        let r = response_of(id, &resp, false);
        return (Outgoing::Whole(r, Bytes::new()), Some(status));
    }
    let small = resp.body().size_hint().exact().is_some_and(|n| n <= INLINE_MAX);
    let r = response_of(id, &resp, true);
    if !small {
        return (Outgoing::Streamed(r, resp.into_body()), Some(status));
    }
    match tokio::time::timeout(idle, resp.into_body().collect()).await {
        Ok(Ok(c)) => (Outgoing::Whole(r, c.to_bytes()), Some(status)),
        _ => {
            let f = Failure::new(502, "the endpoint's response body failed");
            let (r, b) = failure_response(id, &f);
            (Outgoing::Whole(r, b), Some(502))
        }
    }
}

/// Answers a request that came on the control channel.
async fn answer_inline_request(
    req: &Request,
    answer: Result<(hyper::Response<Incoming>, bool), Failure>,
    reply: &ReplyTx,
    ctx: &HcmCtx,
) -> Option<u16> {
    if let Err(f) = &answer {
        tracing::warn!(event = "endpoint_http_failed", request = %req.id, status = f.status, reason = %f.reason, "endpoint gave no HTTP answer");
    }
    let method = req.http.as_ref().map_or("GET", |h| h.method.as_str());
    let (out, code) = outgoing(&req.id, method, answer, ctx.cfg.http_timeout).await;
    match out {
        Outgoing::Whole(r, b) => {
            let body = r.body.then_some(b);
            reply.send(Reply { text: r.encode(), body }).await.ok();
        }
        Outgoing::Streamed(r, body) => {
            // Too big for the control channel: upgrade the response to the request's address.
            match open_rendezvous(&req.address, ctx).await {
                Ok((_, mut w)) => {
                    let _ = send_streamed(&mut w, &r, body, ctx).await;
                    sent_within(ctx, w.send_close(close_code::NORMAL, "")).await;
                }
                Err(e) => {
                    tracing::warn!(request = %req.id, error = %e, "cannot open the rendezvous for a large response")
                }
            }
        }
    }
    code
}

type RvReader = WsReader<tokio::io::ReadHalf<Stream>>;
type RvWriter = WsWriter<tokio::io::WriteHalf<Stream>>;

async fn open_rendezvous(address: &str, ctx: &HcmCtx) -> Result<(RvReader, RvWriter), String> {
    let url = WsUrl::parse(address)?;
    let c = ws::connect(&url, Some(&ctx.tls), &[], ctx.cfg.relay_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let (r, w) = tokio::io::split(c.stream);
    Ok((
        // Frames are streamed in pieces, never held whole: the body limit is the frame limit.
        WsReader::new(r, c.leftover, Role::Client, MAX_BODY),
        WsWriter::new(w, Role::Client),
    ))
}

/// A write to the relay on a rendezvous, done within the relay timeout: a relay that stops
/// reading cannot hold the request (and its endpoint connection) for ever.
async fn sent_within(ctx: &HcmCtx, write: impl std::future::Future<Output = std::io::Result<()>>) -> bool {
    matches!(tokio::time::timeout(ctx.cfg.relay_timeout, write).await, Ok(Ok(())))
}

/// The response JSON, then its body streamed as one message (each frame written within
/// the body idle timeout).
async fn send_streamed(w: &mut RvWriter, r: &Response, body: Incoming, ctx: &HcmCtx) -> bool {
    if !sent_within(ctx, w.send_text(&r.encode())).await {
        return false;
    }
    match write_body_message(w, Bytes::new(), Some(body), MAX_BODY, ctx.cfg.http_timeout).await {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(request = %r.request_id, error = %e, "streaming a response body to the relay failed");
            false
        }
    }
}

/// What came next on a rendezvous.
enum Next {
    Request(Box<Request>),
    /// The relay closed it.
    Closed,
    /// Nothing in time, or something that is not a request, or the connection failed.
    Over,
}

async fn next_request(r: &mut RvReader, wait: Duration) -> Next {
    loop {
        match tokio::time::timeout(wait, r.next_message(control::MAX_CONTROL_MESSAGE)).await {
            Ok(Ok(Some(Message::Text(t)))) => match control::decode(&t) {
                Ok(Command::Request(full)) if full.http.is_some() => return Next::Request(Box::new(full)),
                _ => return Next::Over,
            },
            Ok(Ok(Some(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Ok(Some(Message::Close(_)))) => return Next::Closed,
            _ => return Next::Over,
        }
    }
}

/// Serves a rendezvous: fetches the rendezvous-only request `req` from its address and
/// answers on the same connection; then serves the further requests the relay sends
/// there (a hyrelay relay keeps a rendezvous for the same sender connection's next
/// requests, hc-protocol.md §6.4) until the relay closes it or none comes within
/// `http_rendezvous_idle` (60 s by default); then closes it. Each request is counted on
/// its own.
async fn serve_rendezvous(req: &Request, hc: &HcRt, endpoint: &HostPort, ctx: &HcmCtx) {
    let started = Instant::now();
    let (mut r, mut w) = match open_rendezvous(&req.address, ctx).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(request = %req.id, error = %e, "cannot open the request's rendezvous");
            return record(hc, started, None);
        }
    };
    let mut first = true;
    let mut idle = false;
    loop {
        let wait = if first {
            ctx.cfg.relay_timeout
        } else {
            ctx.cfg.http_rendezvous_idle
        };
        let full = match next_request(&mut r, wait).await {
            Next::Request(full) => full,
            Next::Closed => break,
            // The request this rendezvous was opened for never came.
            Next::Over if first => return record(hc, started, None),
            Next::Over => {
                idle = true;
                break;
            }
        };
        first = false;
        let started = Instant::now();
        let (code, back) = serve_on_rendezvous(&full, r, &mut w, hc, endpoint, ctx).await;
        record(hc, started, code);
        match back {
            Some(reader) => r = reader,
            None => break,
        }
    }
    sent_within(ctx, w.send_close(close_code::NORMAL, "")).await;
    if idle {
        // Counted once its Close is out: the relay may learn of it from then on.
        metrics::counter!(m::HCM_HTTP_RENDEZVOUS_IDLE, "hc" => hc.entry.name().to_owned()).increment(1);
    }
}

/// Serves one request that came on a rendezvous and answers there. Hands the reader back
/// when its body was read to the end, so the next request can follow.
async fn serve_on_rendezvous(
    full: &Request,
    r: RvReader,
    w: &mut RvWriter,
    hc: &HcRt,
    endpoint: &HostPort,
    ctx: &HcmCtx,
) -> (Option<u16>, Option<RvReader>) {
    let Some(http) = full.http.clone() else {
        return (None, None);
    };
    let idle = ctx.cfg.http_timeout;
    // The reader: here, or reading the request body in a task that hands it back.
    let (body, reading) = if http.body {
        let (tx, body) = http_body::channel();
        let mut r = r;
        let reading = tokio::spawn(async move {
            match http_body::pump_message(&mut r, &tx, MAX_BODY, idle).await {
                Ok(_) => Some(r),
                Err(e) => {
                    tracing::debug!(error = %e, "reading a request body from the relay failed");
                    None
                }
            }
        });
        (RelayBody::Stream(body), Err(reading))
    } else {
        (RelayBody::Empty, Ok(r))
    };
    let answer = forward(&http, body, hc, endpoint, ctx).await;
    if let Err(f) = &answer {
        tracing::warn!(event = "endpoint_http_failed", request = %full.id, status = f.status, reason = %f.reason, "endpoint gave no HTTP answer");
    }
    let (out, code) = outgoing(&full.id, &http.method, answer, idle).await;
    let sent = match out {
        Outgoing::Whole(resp, b) => {
            sent_within(ctx, w.send_text(&resp.encode())).await
                && (!resp.body || sent_within(ctx, w.send(true, OpCode::Binary, &b)).await)
        }
        Outgoing::Streamed(resp, body) => send_streamed(w, &resp, body, ctx).await,
    };
    let reader = match reading {
        Ok(r) => Some(r),
        // The endpoint may answer before it read the whole body: the body still ends.
        Err(h) => tokio::time::timeout(idle, h).await.ok().and_then(Result::ok).flatten(),
    };
    (code, reader.filter(|_| sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entity_leaves_the_target() {
        assert_eq!(strip_entity("/hc1/api/x?a=1", "hc1"), "/api/x?a=1");
        assert_eq!(strip_entity("/HC1", "hc1"), "/");
        assert_eq!(strip_entity("/hc1/", "hc1"), "/");
        assert_eq!(strip_entity("/a/b/c", "a/b"), "/c");
        assert_eq!(strip_entity("/my%20hc/x", "my hc"), "/x");
        assert_eq!(strip_entity("/other/x", "hc1"), "/other/x");
    }

    #[test]
    fn the_endpoint_sees_its_host_and_the_sender_address() {
        let http = HttpRequest {
            request_target: "/hc1/x".into(),
            method: "POST".into(),
            request_headers: vec![
                ("connection".into(), "x-drop".into()),
                ("x-drop".into(), "1".into()),
                ("x-forwarded-for".into(), "10.1.1.1".into()),
                ("content-type".into(), "a/b".into()),
                ("via".into(), "1.1 ns".into()),
            ],
            remote_endpoint: Some(("2001:db8::1".into(), 5)),
            body: false,
        };
        let r = endpoint_request(&http, "hc1", "db:8080", RelayBody::Empty).unwrap();
        assert_eq!(r.uri(), "/x");
        let h = r.headers();
        assert_eq!(h["host"], "db:8080");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\"");
        assert_eq!(h["via"], "1.1 ns");
        assert!(h.get("x-drop").is_none() && h.get("connection").is_none());
    }
}
