//! HTTP/1.1 heads and the WebSocket opening handshake (RFC 6455 §4), sans-IO.
//!
//! Requests and responses are parsed with `httparse` from a buffer; an incomplete head is
//! `Ok(None)`. Header names keep their original case (the relay forwards them to listeners
//! in `connectHeaders`), lookups are case-insensitive.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

/// Most header lines accepted in one head.
pub const MAX_HEADERS: usize = 96;
/// Default cap on the size of a request or response head. Default: 16 KiB.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// One way an HTTP head can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes are not HTTP/1.x.
    #[error("malformed HTTP head: {0}")]
    Malformed(String),
    /// The head is longer than the configured limit.
    #[error("HTTP head exceeds {0} bytes")]
    TooLarge(usize),
    /// More header lines than [`MAX_HEADERS`].
    #[error("too many header lines")]
    TooManyHeaders,
    /// A WebSocket upgrade that lacks a required header or has a wrong value.
    #[error("bad WebSocket upgrade: {0}")]
    BadUpgrade(&'static str),
}

/// A header list in arrival order, original case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True if some comma-separated element of some `name` header equals `token`
    /// (case-insensitive), as for `Connection: keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Headers merged by name (first occurrence's case), repeated values joined with `", "`.
    pub fn merged(&self) -> Vec<(String, String)> {
        self.merged_without(&[])
    }

    /// [`Headers::merged`] without the headers named in `leave_out` (case-insensitive):
    /// each header is copied once.
    pub fn merged_without(&self, leave_out: &[&str]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(self.0.len());
        for (n, v) in &self.0 {
            if leave_out.iter().any(|l| n.eq_ignore_ascii_case(l)) {
                continue;
            }
            match out.iter_mut().find(|(m, _)| m.eq_ignore_ascii_case(n)) {
                Some((_, acc)) => {
                    acc.push_str(", ");
                    acc.push_str(v);
                }
                None => out.push((n.clone(), v.clone())),
            }
        }
        out
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// The request target exactly as sent (origin-form, still percent-encoded).
    pub target: String,
    pub headers: Headers,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

fn header_list(raw: &[httparse::Header<'_>]) -> Headers {
    Headers(
        raw.iter()
            .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    )
}

fn map_err(e: httparse::Error) -> HandshakeError {
    match e {
        httparse::Error::TooManyHeaders => HandshakeError::TooManyHeaders,
        other => HandshakeError::Malformed(other.to_string()),
    }
}

/// Parses a request head from `buf`; returns it and the number of bytes it used.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(RequestHead, usize)>, HandshakeError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    match req.parse(buf).map_err(map_err)? {
        httparse::Status::Partial if buf.len() >= max_head => Err(HandshakeError::TooLarge(max_head)),
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) if n > max_head => Err(HandshakeError::TooLarge(max_head)),
        httparse::Status::Complete(n) => {
            let head = RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                version: req.version.unwrap_or(1),
                target: req.path.unwrap_or_default().to_owned(),
                headers: header_list(req.headers),
            };
            Ok(Some((head, n)))
        }
    }
}

/// Parses a response head from `buf`; returns it and the number of bytes it used.
pub fn parse_response(buf: &[u8], max_head: usize) -> Result<Option<(ResponseHead, usize)>, HandshakeError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    match resp.parse(buf).map_err(map_err)? {
        httparse::Status::Partial if buf.len() >= max_head => Err(HandshakeError::TooLarge(max_head)),
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) if n > max_head => Err(HandshakeError::TooLarge(max_head)),
        httparse::Status::Complete(n) => {
            let head = ResponseHead {
                status: resp.code.unwrap_or_default(),
                reason: resp.reason.unwrap_or_default().to_owned(),
                headers: header_list(resp.headers),
            };
            Ok(Some((head, n)))
        }
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WS_GUID.as_bytes());
    B64.encode(ctx.finish().as_ref())
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    B64.encode(rand::random::<[u8; 16]>())
}

/// What a valid WebSocket upgrade request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub key: String,
    /// Offered subprotocols in order.
    pub protocols: Vec<String>,
}

/// True if the request asks for a WebSocket upgrade at all.
pub fn wants_websocket(req: &RequestHead) -> bool {
    req.headers.has_token("Upgrade", "websocket")
}

/// Validates a WebSocket upgrade request (§4.2.1).
pub fn validate_upgrade(req: &RequestHead) -> Result<Upgrade, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::BadUpgrade("method must be GET"));
    }
    if !req.headers.has_token("Connection", "upgrade") {
        return Err(HandshakeError::BadUpgrade("Connection must include Upgrade"));
    }
    if req.headers.get("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Err(HandshakeError::BadUpgrade("Sec-WebSocket-Version must be 13"));
    }
    let key = req
        .headers
        .get("Sec-WebSocket-Key")
        .map(str::trim)
        .filter(|k| B64.decode(k).map(|d| d.len() == 16).unwrap_or(false))
        .ok_or(HandshakeError::BadUpgrade("missing or malformed Sec-WebSocket-Key"))?;
    let protocols = req
        .headers
        .0
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
        .flat_map(|(_, v)| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(Upgrade {
        key: key.to_owned(),
        protocols,
    })
}

/// The `101 Switching Protocols` answer. Never carries `Sec-WebSocket-Extensions`.
pub fn switching_protocols(client_key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(client_key)
    );
    if let Some(p) = protocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(&sanitize_header_value(p));
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete non-upgrade response that closes the connection.
///
/// The reason phrase is sanitized (no CR/LF/control characters); `body` is sent as is.
pub fn response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        sanitize_header_value(reason),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Replaces control characters so that a peer-supplied string can sit in a header line.
pub fn sanitize_header_value(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    out.truncate(out.trim_end().len());
    out
}

/// The client's upgrade request for `target` (origin-form) on `host`.
pub fn client_request(host: &str, target: &str, key: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(&sanitize_header_value(v));
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_key_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_upgrade_in_pieces_and_keeps_leftover() {
        let req = client_request("ns:443", "/$hc/a?sb-hc-action=listen", &new_key(), &[("X-A", "1")]);
        let mut bytes = req.clone();
        bytes.extend_from_slice(b"\x82\x80");
        assert_eq!(parse_request(&bytes[..10], DEFAULT_MAX_HEAD).unwrap(), None);
        let (head, used) = parse_request(&bytes, DEFAULT_MAX_HEAD).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(head.target, "/$hc/a?sb-hc-action=listen");
        assert_eq!(head.headers.get("x-a"), Some("1"));
        let up = validate_upgrade(&head).unwrap();
        assert!(up.protocols.is_empty());
    }

    #[test]
    fn rejects_oversized_and_bad_upgrades() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20000));
        assert_eq!(
            parse_request(big.as_bytes(), DEFAULT_MAX_HEAD),
            Err(HandshakeError::TooLarge(DEFAULT_MAX_HEAD))
        );
        let req = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (head, _) = parse_request(req, DEFAULT_MAX_HEAD).unwrap().unwrap();
        assert!(wants_websocket(&head));
        assert!(validate_upgrade(&head).is_err());
    }

    #[test]
    fn merged_headers_join_repeats() {
        let h = Headers(vec![
            ("A".into(), "1".into()),
            ("b".into(), "x".into()),
            ("a".into(), "2".into()),
        ]);
        assert_eq!(h.merged(), vec![("A".into(), "1, 2".into()), ("b".into(), "x".into())]);
        assert_eq!(h.merged_without(&["B"]), vec![("A".into(), "1, 2".into())]);
        assert_eq!(h.merged_without(&["x", "a"]), vec![("b".into(), "x".into())]);
    }

    #[test]
    fn response_reason_cannot_inject_headers() {
        let r = response(404, "no\r\nSet-Cookie: x", "text/plain", b"");
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 no  Set-Cookie: x\r\n"));
    }
}
