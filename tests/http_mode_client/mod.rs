//! A plain HTTP sender for the HTTP-mode tests: hyper's HTTP/1.1 client on one keep-alive
//! connection, every exchange bounded in time.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;

const STEP: Duration = Duration::from_secs(60);

pub struct Sender {
    tx: hyper::client::conn::http1::SendRequest<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>,
    host: String,
}

/// What came back.
pub struct Got {
    pub status: u16,
    pub reason: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn h(&self, n: &str) -> &str {
        self.headers.get(n).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

impl Sender {
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Self {
            tx,
            host: format!("127.0.0.1:{}", addr.port()),
        }
    }

    pub async fn send(&mut self, method: &str, target: &str, headers: &[(&str, &str)], body: Body) -> Got {
        let mut b = Request::builder().method(method).uri(target).header("host", &self.host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = match body {
            Body::Bytes(v) => Full::new(Bytes::from(v)).map_err(|e| match e {}).boxed(),
            Body::Chunked(v) => Chunks(v.chunks(40_000).map(Bytes::copy_from_slice).collect()).boxed(),
        };
        let req = b.body(body).unwrap();
        let fut = async {
            self.tx.ready().await.unwrap();
            let resp = self.tx.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            let reason = parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
                .unwrap_or_else(|| parts.status.canonical_reason().unwrap_or("").to_owned());
            Got {
                status: parts.status.as_u16(),
                reason,
                headers: parts.headers,
                body: body.collect().await.unwrap().to_bytes(),
            }
        };
        tokio::time::timeout(STEP, fut).await.expect("no answer in time")
    }
}

pub enum Body {
    Bytes(Vec<u8>),
    /// Sent with chunked transfer-encoding, in 40 000-byte pieces.
    Chunked(Vec<u8>),
}

/// A body of unknown length (so sent chunked), one piece per poll.
struct Chunks(std::collections::VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// `n` senders at once, each on its own connection, POST a body of `len(i)` bytes (test
/// data seeded with `i`) to `/{hc}/echo` with the Send token `tok`; each must get 200 and
/// its own body back.
#[allow(dead_code)]
pub async fn parallel_echoes(addr: SocketAddr, hc: &str, tok: &str, n: usize, len: fn(usize) -> usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let (tok, path) = (tok.to_owned(), format!("/{hc}/echo"));
        tasks.push(tokio::spawn(async move {
            let mut s = Sender::connect(addr).await;
            let data = super::common::payload(len(i), i as u64);
            let auth = [("ServiceBusAuthorization", tok.as_str())];
            let g = s.send("POST", &path, &auth, Body::Bytes(data.clone())).await;
            assert_eq!(g.status, 200, "request {i}: {}", g.reason);
            assert!(g.body[..] == data[..], "request {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
