//! WebSocket connections over any stream: a cancel-safe frame/message reader, a frame
//! writer, the client handshake and reading a server-side request head.
//!
//! The reader keeps all its state (read buffer, decoder, partial message) in the struct, so
//! dropping a pending `next_*` future inside `select!` loses nothing.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proxy::{DIRECT, ProxyConfig};
use super::stream::Stream;
use super::tls_conn::TlsConn;
use crate::proto::frame::{self, CloseFrame, Decoder, FrameError, Item, OpCode, Role};
use crate::proto::handshake::{self, HandshakeError, RequestHead, ResponseHead};

/// Bytes requested from the socket per read. Default: 64 KiB.
pub const READ_SIZE: usize = 64 * 1024;

/// A whole message or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    Close(CloseFrame),
}

/// One way reading a WebSocket can fail.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the framing rules.
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    UnexpectedEof,
    /// A message above the caller's limit.
    #[error("message larger than {0} bytes")]
    MessageTooLarge(usize),
    /// A text message that is not UTF-8.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
}

impl WsError {
    /// Close code to send the peer for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Frame(e) => e.close_code(),
            WsError::MessageTooLarge(_) => frame::close_code::TOO_BIG,
            WsError::InvalidUtf8 => frame::close_code::INVALID_DATA,
            WsError::Io(_) | WsError::UnexpectedEof => frame::close_code::GOING_AWAY,
        }
    }
}

/// Reads frames from `R`.
#[derive(Debug)]
pub struct WsReader<R> {
    io: R,
    buf: BytesMut,
    dec: Decoder,
    /// The message being reassembled: opcode, bytes so far, and (for text) how many of
    /// them are known to be valid UTF-8.
    partial: Option<(OpCode, BytesMut, usize)>,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// `leftover` holds bytes already read past the handshake.
    pub fn new(io: R, leftover: BytesMut, role: Role, max_frame: u64) -> Self {
        Self {
            io,
            buf: leftover,
            dec: Decoder::new(role, max_frame),
            partial: None,
        }
    }

    /// The next frame-level item; `Ok(None)` on EOF between frames. Cancel-safe.
    pub async fn next_item(&mut self) -> Result<Option<Item>, WsError> {
        loop {
            if let Some(item) = self.dec.decode(&mut self.buf)? {
                return Ok(Some(item));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(READ_SIZE);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() && self.dec.at_frame_boundary() {
                    Ok(None)
                } else {
                    Err(WsError::UnexpectedEof)
                };
            }
        }
    }

    /// The next message (data messages reassembled up to `max` bytes), control frames as
    /// they come. `Ok(None)` on EOF between frames. Cancel-safe.
    pub async fn next_message(&mut self, max: usize) -> Result<Option<Message>, WsError> {
        loop {
            let Some(item) = self.next_item().await? else {
                return Ok(None);
            };
            match item {
                Item::Control { opcode, payload } => {
                    let p = payload.freeze();
                    return Ok(Some(match opcode {
                        OpCode::Ping => Message::Ping(p),
                        OpCode::Pong => Message::Pong(p),
                        _ => Message::Close(frame::parse_close(&p)?),
                    }));
                }
                Item::Data(chunk) => {
                    let (op, mut acc, mut valid) = match self.partial.take() {
                        Some(p) => p,
                        None => (chunk.opcode, BytesMut::new(), 0),
                    };
                    if acc.len() + chunk.payload.len() > max {
                        return Err(WsError::MessageTooLarge(max));
                    }
                    if acc.is_empty() {
                        acc = chunk.payload;
                    } else {
                        acc.extend_from_slice(&chunk.payload);
                    }
                    let complete = chunk.last && chunk.fin;
                    if op == OpCode::Text {
                        // Fail fast: check text as it arrives, not when the message is whole.
                        valid = utf8_checked(&acc, valid, complete)?;
                    }
                    if !complete {
                        self.partial = Some((op, acc, valid));
                        continue;
                    }
                    return Ok(Some(match op {
                        // Validated above; `Vec::from(BytesMut)` takes the buffer without a copy.
                        OpCode::Text => {
                            Message::Text(String::from_utf8(Vec::from(acc)).map_err(|_| WsError::InvalidUtf8)?)
                        }
                        _ => Message::Binary(acc.freeze()),
                    }));
                }
            }
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// True if bytes are waiting in the read buffer (more items may be ready at once).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The stream and the bytes read past the last item, for a caller that takes over the
    /// connection (a partial message in progress is dropped).
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.io, self.buf)
    }
}

/// Checks `buf[valid..]` as UTF-8 and returns the new count of valid bytes. A sequence cut
/// at the end is fine until the message is `complete`; a byte that can never be valid is
/// an error at once.
fn utf8_checked(buf: &[u8], valid: usize, complete: bool) -> Result<usize, WsError> {
    match std::str::from_utf8(&buf[valid..]) {
        Ok(_) => Ok(buf.len()),
        Err(e) if e.error_len().is_none() && !complete => Ok(valid + e.valid_up_to()),
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

/// Writes frames to `W`; masks them when acting as a client.
#[derive(Debug)]
pub struct WsWriter<W> {
    io: W,
    mask: bool,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    /// `role` is our side: a client masks every frame.
    pub fn new(io: W, role: Role) -> Self {
        Self {
            io,
            mask: role == Role::Client,
        }
    }

    /// True if frames are masked (client side).
    pub fn masks(&self) -> bool {
        self.mask
    }

    /// Sends one complete frame and flushes. Copies the payload; for control frames and
    /// small messages.
    pub async fn send(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let key = self.mask.then(rand::random::<[u8; 4]>);
        let f = frame::encode_frame(fin, opcode, key, payload);
        self.io.write_all(&f).await?;
        self.io.flush().await
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(true, OpCode::Text, text.as_bytes()).await
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        self.send(true, OpCode::Close, &frame::close_payload(code, reason))
            .await
    }

    /// Writes an unmasked frame header and its payload in one vectored write (no copy),
    /// without flushing. Server side only.
    pub async fn write_unmasked(&mut self, fin: bool, opcode: OpCode, len: u64, payload: &[u8]) -> io::Result<()> {
        debug_assert!(!self.mask);
        let mut hdr = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(fin, opcode, None, len, &mut hdr);
        write_all_vectored(&mut self.io, &hdr[..n], payload).await
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }
}

/// Ends the stream after a WebSocket close handshake: TLS close_notify (for a TLS stream)
/// and FIN, bounded to 1 s, best effort. A peer then sees a normal close, not a TLS
/// "connection closed without close_notify" error.
pub async fn close_tls<W: AsyncWrite + Unpin>(w: &mut W) {
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}

/// Writes `a` then `b` with as few vectored writes as the stream allows.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else {
            w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Reads a request head into `buf`, leaving any bytes after it there.
pub async fn read_request_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<RequestHead>, HeadError> {
    loop {
        if let Some((head, used)) = handshake::parse_request(buf, max_head)? {
            let _ = buf.split_to(used);
            return Ok(Some(head));
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()))
            };
        }
    }
}

/// Reading an HTTP head failed.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Http(#[from] HandshakeError),
}

/// A `ws://` or `wss://` URL split for dialing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    pub tls: bool,
    /// Host as written (IPv6 in brackets).
    pub host: String,
    pub port: u16,
    /// Origin-form target: path and query.
    pub target: String,
}

impl WsUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not a URL"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "wss" | "https" => true,
            "ws" | "http" => false,
            _ => return Err(format!("unsupported URL scheme {scheme:?}")),
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        let (host, port) =
            crate::proto::connstr::split_host_port(authority).ok_or_else(|| format!("bad host in URL {url:?}"))?;
        Ok(Self {
            tls,
            host,
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            target,
        })
    }

    /// Value for the `Host` header.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Host without IPv6 brackets.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Why a client connection or handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake with {host} failed: {source}{}", tls_hint(source))]
    Tls { host: String, source: io::Error },
    #[error("I/O error during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("bad handshake response: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server answered with a status other than 101.
    #[error("relay answered {status} {reason}")]
    Rejected { status: u16, reason: String },
    #[error("server sent a wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// The outbound proxy could not open a tunnel to the server.
    #[error(transparent)]
    Proxy(#[from] super::proxy::ProxyError),
}

/// What to do about a TLS failure the operator can fix with a flag.
fn tls_hint(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            " (the relay's certificate is not issued by a CA trusted here: pass that CA with --ca-file, HYRELAY_CA_FILE or ca_files; for a relay with --self-signed it is <relay data dir>/tls/ca.pem)"
        }
        _ => "",
    }
}

impl ConnectError {
    /// True if the server could not be reached at all (DNS, TCP, timeout), as opposed to
    /// reached and refusing.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ConnectError::Resolve { .. } | ConnectError::Connect { .. } | ConnectError::Timeout(_) => true,
            ConnectError::Proxy(p) => p.is_unreachable(),
            _ => false,
        }
    }

    /// HTTP status if the server answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Opens TCP to `host:port`, trying each resolved address in turn.
pub async fn dial(host: &str, port: u16) -> Result<tokio::net::TcpStream, ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs = resolve(bare, port).await?;
    let mut last = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                super::sock::tune(&s);
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    // Every address failed: look the name up afresh next time.
    dns_cache::forget(bare, port);
    let (addr, source) = match last {
        Some((a, e)) => (a.to_string(), e),
        None => (
            format!("{bare}:{port}"),
            io::Error::new(io::ErrorKind::NotFound, "no address"),
        ),
    };
    Err(ConnectError::Connect { addr, source })
}

/// Addresses of `host:port`: IP literals at once, names through a short-lived cache in
/// front of the system resolver (which tokio runs on its blocking pool — per connection,
/// that hop would cost more than the connect itself).
async fn resolve(host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, ConnectError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![std::net::SocketAddr::new(ip, port)]);
    }
    if let Some(hit) = dns_cache::get(host, port) {
        return Ok(hit);
    }
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    dns_cache::put(host, port, &addrs);
    Ok(addrs)
}

/// A small process-wide cache of name lookups. Entries live [`dns_cache::TTL`]; a name
/// whose addresses all refuse is dropped at once, so a moved service is found again.
mod dns_cache {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// How long a lookup is reused. Default: 30 s.
    pub const TTL: Duration = Duration::from_secs(30);
    /// Names kept at most; the cache is emptied when full (no unbounded growth).
    const MAX: usize = 1024;

    type Map = HashMap<(String, u16), (Instant, Vec<SocketAddr>)>;
    static CACHE: Mutex<Option<Map>> = Mutex::new(None);

    pub fn get(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        let guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let (at, addrs) = guard.as_ref()?.get(&(host.to_ascii_lowercase(), port))?;
        (at.elapsed() < TTL && !addrs.is_empty()).then(|| addrs.clone())
    }

    pub fn put(host: &str, port: u16, addrs: &[SocketAddr]) {
        let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        if map.len() >= MAX {
            map.clear();
        }
        map.insert((host.to_ascii_lowercase(), port), (Instant::now(), addrs.to_vec()));
    }

    pub fn forget(host: &str, port: u16) {
        if let Some(map) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.remove(&(host.to_ascii_lowercase(), port));
        }
    }
}

/// Dials (through the proxy `proxy` names for `host`, if any) and, for `tls`, runs the TLS
/// handshake with SNI = `host`.
pub async fn open_stream(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &ProxyConfig,
) -> Result<Stream, ConnectError> {
    open_stream_sending(host, port, tls, proxy, &[]).await
}

/// [`open_stream`] that also sends `first` (a request). Over TLS it goes out with the
/// client's Finished, in the same write (the Finished is held back until `first` is
/// sealed behind it, [`TlsConn::connect`]): one write fewer for the client. The
/// relay's reads per tunnel did not drop measurably (benches/RESULTS.md).
async fn open_stream_sending(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &ProxyConfig,
    first: &[u8],
) -> Result<Stream, ConnectError> {
    let tcp = match proxy.for_host(host) {
        Some(p) => super::proxy::tunnel(p, host, port).await?,
        None => dial(host, port).await?,
    };
    let sock = super::sock::Sock::Live(tcp);
    let Some(cfg) = tls else {
        let mut s = Stream::Plain(sock);
        if !first.is_empty() {
            s.write_all(first).await?;
        }
        return Ok(s);
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(bare.to_owned()).map_err(|e| ConnectError::Tls {
        host: bare.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    let s = TlsConn::connect(cfg.clone(), name, sock, first)
        .await
        .map_err(|source| ConnectError::Tls {
            host: bare.to_owned(),
            source,
        })?;
    Ok(Stream::Tls(Box::new(s)))
}

/// An open client WebSocket.
#[derive(Debug)]
pub struct ClientWs {
    pub stream: Stream,
    /// Bytes read past the 101 response.
    pub leftover: BytesMut,
    pub response: ResponseHead,
}

/// Connects directly and upgrades; everything (DNS, TCP, TLS, handshake) within `timeout`.
pub async fn connect(
    url: &WsUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<ClientWs, ConnectError> {
    connect_via(url, tls, &DIRECT, headers, timeout).await
}

/// [`connect`] through the proxy `proxy` names for the URL's host (if any); the proxy's
/// `CONNECT` counts against `timeout` too.
pub async fn connect_via(
    url: &WsUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &ProxyConfig,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<ClientWs, ConnectError> {
    let connecting = async {
        let (key, req) = upgrade_request(url, headers);
        let stream = open_via_sending(url, tls, proxy, &req).await?;
        read_answer(stream, &key).await
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// Opens the connection (TCP, and TLS for `wss`) a WebSocket to `url` will run on, without
/// the upgrade: lets a caller overlap it with other work and choose the request later.
pub async fn open(url: &WsUrl, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Stream, ConnectError> {
    open_via(url, tls, &DIRECT).await
}

/// [`open`] through the proxy `proxy` names for the URL's host, if any.
pub async fn open_via(
    url: &WsUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &ProxyConfig,
) -> Result<Stream, ConnectError> {
    open_via_sending(url, tls, proxy, &[]).await
}

/// [`open_via`] that sends `first` right away ([`open_stream_sending`]).
async fn open_via_sending(
    url: &WsUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &ProxyConfig,
    first: &[u8],
) -> Result<Stream, ConnectError> {
    let tls = if url.tls { tls } else { None };
    if url.tls && tls.is_none() {
        return Err(ConnectError::Tls {
            host: url.host.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no TLS configuration"),
        });
    }
    open_stream_sending(&url.host, url.port, tls, proxy, first).await
}

/// Sends the upgrade request for `url` on an open `stream` and reads the answer.
pub async fn upgrade(mut stream: Stream, url: &WsUrl, headers: &[(&str, &str)]) -> Result<ClientWs, ConnectError> {
    let key = send_upgrade(&mut stream, url, headers).await?;
    read_answer(stream, &key).await
}

/// Reads the answer to the upgrade request with `key` sent on `stream`.
async fn read_answer(mut stream: Stream, key: &str) -> Result<ClientWs, ConnectError> {
    let mut buf = BytesMut::with_capacity(4096);
    let (response, used) = loop {
        if let Some(r) = parse_answer(&buf)? {
            break r;
        }
        buf.reserve(4096);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ConnectError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    };
    finish_upgrade(stream, buf, response, used, key)
}

/// Writes the upgrade request for `url`; returns its `Sec-WebSocket-Key`.
pub async fn send_upgrade<S: AsyncWrite + Unpin>(
    stream: &mut S,
    url: &WsUrl,
    headers: &[(&str, &str)],
) -> Result<String, ConnectError> {
    let (key, req) = upgrade_request(url, headers);
    stream.write_all(&req).await?;
    stream.flush().await?;
    Ok(key)
}

/// A fresh `Sec-WebSocket-Key` and the upgrade request for `url` that carries it.
pub fn upgrade_request(url: &WsUrl, headers: &[(&str, &str)]) -> (String, Vec<u8>) {
    let key = handshake::new_key();
    let req = handshake::client_request(&url.host_header(), &url.target, &key, headers);
    (key, req)
}

/// The server's answer head in `buf`, if complete.
pub fn parse_answer(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, ConnectError> {
    Ok(handshake::parse_response(buf, handshake::DEFAULT_MAX_HEAD)?)
}

/// Checks the answer (`used` bytes of `buf`) to the request with `key`: 101 and the right
/// `Sec-WebSocket-Accept`.
pub fn finish_upgrade(
    stream: Stream,
    mut buf: BytesMut,
    response: ResponseHead,
    used: usize,
    key: &str,
) -> Result<ClientWs, ConnectError> {
    let _ = buf.split_to(used);
    if response.status != 101 {
        return Err(ConnectError::Rejected {
            status: response.status,
            reason: response.reason.clone(),
        });
    }
    if response.headers.get("Sec-WebSocket-Accept").map(str::trim) != Some(handshake::accept_key(key).as_str()) {
        return Err(ConnectError::BadAccept);
    }
    Ok(ClientWs {
        stream,
        leftover: buf,
        response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory stream that counts the writes made to it (a vectored write is one, as
    /// `writev` on a socket).
    struct CountingWrites {
        io: tokio::io::DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for CountingWrites {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingWrites {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            // All or nothing, so one call is one write (the duplex has room for a handshake).
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let r = std::pin::Pin::new(&mut self.io).poll_write(cx, &all);
            if let std::task::Poll::Ready(Ok(n)) = &r {
                assert_eq!(*n, all.len(), "the duplex took a partial write");
                self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            r
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// Our server config (development certificate in a temporary directory, kept alive by
    /// the returned guard), our client config trusting it, and the name to ask for.
    fn tls_pair() -> (
        Arc<rustls::ServerConfig>,
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (server, files) = crate::transport::tls::self_signed(dir.path(), &[]).unwrap();
        let client = crate::transport::tls::client_config(&[files.ca]).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        (server, client, name, dir)
    }

    /// Over TLS the request goes out in the same write as the client's Finished: two
    /// writes in all (ClientHello; Finished and request), not three.
    #[tokio::test]
    async fn the_request_leaves_with_the_clients_finished() {
        let (server_cfg, client_cfg, name, _dir) = tls_pair();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client_io = CountingWrites {
            io: a,
            writes: writes.clone(),
        };
        let server = async {
            let mut s = tokio_rustls::TlsAcceptor::from(server_cfg).accept(b).await.unwrap();
            let mut req = [0u8; 7];
            s.read_exact(&mut req).await.unwrap();
            req
        };
        let (client, req) = tokio::join!(TlsConn::connect(client_cfg, name, client_io, b"GET / \r\n"), server);
        let _client = client.unwrap();
        assert_eq!(&req, b"GET / \r");
        assert_eq!(writes.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A first write larger than a TLS record (100 KiB) arrives whole: it is sealed after
    /// the handshake, so there is no limit on what may wait for it (rustls' buffered
    /// connection held 64 KiB and failed beyond).
    #[tokio::test]
    async fn a_large_first_write_arrives_whole() {
        let (server_cfg, client_cfg, name, _dir) = tls_pair();
        let (a, b) = tokio::io::duplex(256 * 1024);
        let big: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
        let server = async {
            let mut s = tokio_rustls::TlsAcceptor::from(server_cfg).accept(b).await.unwrap();
            let mut got = vec![0u8; big.len()];
            s.read_exact(&mut got).await.unwrap();
            got
        };
        let (client, got) = tokio::join!(TlsConn::connect(client_cfg, name, a, &big), server);
        let _client = client.unwrap();
        assert!(got == big, "the first write arrived changed");
    }

    #[test]
    fn unknown_issuer_names_the_flag() {
        let e = ConnectError::Tls {
            host: "relay".into(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
        };
        assert!(e.to_string().contains("--ca-file"), "{e}");
    }

    #[tokio::test]
    async fn names_are_cached_and_forgotten_when_unreachable() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ip = resolve("127.0.0.1", port).await.unwrap();
        assert_eq!(ip, vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))]);
        let first = resolve("localhost", port).await.unwrap();
        assert_eq!(dns_cache::get("LOCALHOST", port), Some(first));
        // Every address refuses: the entry goes, so a moved service is looked up again.
        assert!(dial("localhost", port).await.is_err());
        assert_eq!(dns_cache::get("localhost", port), None);
    }

    #[test]
    fn urls() {
        let u = WsUrl::parse("wss://ns:443/$hc/a?x=1").unwrap();
        assert_eq!(
            (u.tls, u.host_header(), u.target.as_str()),
            (true, "ns".into(), "/$hc/a?x=1")
        );
        let u = WsUrl::parse("ws://127.0.0.1:9000?q").unwrap();
        assert_eq!(
            (u.port, u.target.as_str(), u.host_header()),
            (9000, "/?q", "127.0.0.1:9000".into())
        );
        let u = WsUrl::parse("ws://[::1]:1/").unwrap();
        assert_eq!(u.bare_host(), "::1");
        assert!(WsUrl::parse("ftp://x").is_err());
    }

    #[test]
    fn utf8_is_checked_as_it_arrives() {
        let euro = "€".as_bytes(); // three bytes
        assert_eq!(utf8_checked(&euro[..2], 0, false).unwrap(), 0, "a cut sequence waits");
        assert!(utf8_checked(&euro[..2], 0, true).is_err(), "but not past the end");
        assert_eq!(utf8_checked(euro, 0, true).unwrap(), 3);
        assert!(
            utf8_checked(b"ok\xff", 0, false).is_err(),
            "0xff is never valid: fail now"
        );
    }

    #[tokio::test]
    async fn reader_reassembles_and_writer_masks() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let mut client = WsWriter::new(aw, Role::Client);
        let mut server = WsReader::new(br, BytesMut::new(), Role::Server, 1 << 20);
        client.send(false, OpCode::Text, b"hel").await.unwrap();
        client.send(true, OpCode::Ping, b"!").await.unwrap();
        client.send(true, OpCode::Continuation, b"lo").await.unwrap();
        assert_eq!(
            server.next_message(100).await.unwrap(),
            Some(Message::Ping(Bytes::from_static(b"!")))
        );
        assert_eq!(
            server.next_message(100).await.unwrap(),
            Some(Message::Text("hello".into()))
        );
        client.send(true, OpCode::Binary, &[0u8; 200]).await.unwrap();
        assert!(matches!(
            server.next_message(100).await,
            Err(WsError::MessageTooLarge(100))
        ));
        let mut sw = WsWriter::new(bw, Role::Server);
        let mut cr = WsReader::new(ar, BytesMut::new(), Role::Client, 1 << 20);
        sw.write_unmasked(true, OpCode::Binary, 3, b"abc").await.unwrap();
        sw.send_close(1000, "bye").await.unwrap();
        assert_eq!(
            cr.next_message(10).await.unwrap(),
            Some(Message::Binary(Bytes::from_static(b"abc")))
        );
        assert_eq!(
            cr.next_message(10).await.unwrap(),
            Some(Message::Close(CloseFrame {
                code: Some(1000),
                reason: "bye".into()
            }))
        );
        drop((sw, server));
        assert_eq!(cr.next_message(10).await.unwrap(), None);
    }
}
