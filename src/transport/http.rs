//! A minimal HTTP/1.1 client for the relay's management API and the runtime-information
//! GET: one request per connection, `Connection: close`, body read by `Content-Length` or to EOF.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ws::{ConnectError, open_stream};
use crate::proto::connstr::RelayEndpoint;
use crate::proto::handshake::{self, ResponseHead};

/// Largest response body accepted. Default: 4 MiB.
pub const MAX_BODY: usize = 4 << 20;

/// What to send: method, origin-form target, extra headers (values sanitized) and body.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// A response: head and body.
#[derive(Debug)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

/// Sends one request to the relay at `endpoint` (through `proxy`'s choice for its host)
/// and reads the whole response.
pub async fn request(
    endpoint: &RelayEndpoint,
    tls: Option<&Arc<rustls::ClientConfig>>,
    proxy: &super::proxy::ProxyConfig,
    req: Request<'_>,
    timeout: Duration,
) -> Result<Response, ConnectError> {
    let Request {
        method,
        target,
        headers,
        body,
    } = req;
    let fut = async {
        let tls = if endpoint.tls { tls } else { None };
        let mut s = open_stream(&endpoint.host, endpoint.port, tls, proxy).await?;
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            endpoint.authority(),
            body.len()
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {}\r\n", handshake::sanitize_header_value(v)));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        s.flush().await?;
        let mut buf = BytesMut::with_capacity(8192);
        let (head, used) = loop {
            if let Some(r) = handshake::parse_response(&buf, handshake::DEFAULT_MAX_HEAD)? {
                break r;
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        };
        let _ = buf.split_to(used);
        let want = head
            .headers
            .get("Content-Length")
            .and_then(|v| v.trim().parse::<usize>().ok());
        while want.is_none_or(|w| buf.len() < w) && buf.len() <= MAX_BODY {
            buf.reserve(8192);
            if s.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        let mut body = buf.to_vec();
        if let Some(w) = want {
            body.truncate(w);
        }
        Ok(Response { head, body })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}
