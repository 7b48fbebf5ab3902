//! Outbound HTTP proxies: every connection an hcm, a bridge, `hyrelay hc` or `doctor`
//! opens to a relay can go through an HTTP proxy with `CONNECT` (Basic credentials if the
//! proxy URL has them). TLS to the relay runs inside the tunnel as it would over a direct
//! connection, so the proxy sees only the relay's host and port.
//!
//! Which proxy: [`ProxyConfig`] ([`settings`]) — a role's `proxy` setting or `--proxy`, else
//! `HTTPS_PROXY`/`https_proxy`/`ALL_PROXY`; hosts matching `NO_PROXY` (or `no_proxy` in the
//! config) are reached directly. The same proxy serves `ws://` and `wss://` relays: both are
//! tunnelled, never forwarded. Connections an hcm makes to its endpoints never use it.
//!
//! Invariants: the credentials never reach a log or an error text (the request bytes are
//! written and dropped; [`settings::Proxy`] prints `***`); a tunnel is handed on only after
//! a 2xx answer with nothing behind it, so no proxy byte can be mistaken for the relay's.

pub mod connect;
pub mod settings;

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use self::settings::{DIRECT, NoProxy, Proxy, ProxyConfig, SettingError};

/// Why a tunnel through a proxy could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No TCP connection to the proxy (DNS, refused, unreachable).
    #[error("cannot reach the proxy {proxy}: {detail}")]
    Unreachable { proxy: String, detail: String },
    /// 407 (or 401, as tinyproxy answers) and the proxy URL has no credentials.
    #[error(
        "the proxy {proxy} requires authentication ({status} {reason}; it offers {challenges}): put user:password@ in the proxy URL"
    )]
    AuthRequired {
        proxy: String,
        status: u16,
        reason: String,
        challenges: String,
    },
    /// 407 or 401 although credentials were sent: wrong user or password, or a scheme
    /// other than Basic required.
    #[error(
        "the proxy {proxy} refused the credentials ({status} {reason}; it offers {challenges}): check the user and password, and that the proxy accepts Basic"
    )]
    AuthRejected {
        proxy: String,
        status: u16,
        reason: String,
        challenges: String,
    },
    /// Any other answer than 2xx or 407: the proxy's policy forbids the target (403), or
    /// it could not reach it (502, 503, 504, tinyproxy's 500).
    #[error("the proxy {proxy} refused to CONNECT to {target}: {status} {reason}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
    },
    /// The answer is not HTTP, or too long.
    #[error("the proxy {proxy} sent a bad answer to CONNECT: {source}")]
    BadReply { proxy: String, source: connect::ReplyError },
    /// Bytes after the 2xx head, before we sent anything into the tunnel.
    #[error("the proxy {proxy} sent data before the tunnel was used")]
    EarlyBytes { proxy: String },
    /// The proxy closed the connection before answering.
    #[error("the proxy {proxy} closed the connection without answering CONNECT")]
    Closed { proxy: String },
    #[error("I/O error talking to the proxy {proxy}: {source}")]
    Io { proxy: String, source: io::Error },
}

impl ProxyError {
    /// True when the relay could not be reached at all: the proxy is down, or it says it
    /// cannot reach the relay (502, 503, 504, or 500 as tinyproxy answers a refused dial).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ProxyError::Unreachable { .. } => true,
            ProxyError::Refused { status, .. } => matches!(status, 500 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// True for a refusal of the credentials or their absence.
    pub fn is_auth(&self) -> bool {
        matches!(self, ProxyError::AuthRequired { .. } | ProxyError::AuthRejected { .. })
    }
}

/// Opens TCP to `proxy` and asks it to `CONNECT` to `host:port`; returns the tunnel. The
/// caller bounds the time (the relay timeout covers the proxy too).
pub async fn tunnel(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let shown = proxy.to_string();
    let mut tcp = super::ws::dial(&proxy.host, proxy.port)
        .await
        .map_err(|e| ProxyError::Unreachable {
            proxy: shown.clone(),
            detail: e.to_string(),
        })?;
    let io_err = |source| ProxyError::Io {
        proxy: shown.clone(),
        source,
    };
    tcp.write_all(&connect::request(host, port, proxy.auth.as_ref()))
        .await
        .map_err(io_err)?;
    let mut buf = BytesMut::with_capacity(1024);
    let (reply, used) = loop {
        match connect::parse_reply(&buf) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(source) => return Err(ProxyError::BadReply { proxy: shown, source }),
        }
        buf.reserve(1024);
        if tcp.read_buf(&mut buf).await.map_err(io_err)? == 0 {
            return Err(ProxyError::Closed { proxy: shown });
        }
    };
    judge(
        reply,
        buf.len() > used,
        shown,
        proxy.auth.is_some(),
        connect::authority(host, port),
    )?;
    Ok(tcp)
}

/// The verdict on the proxy's final answer. A 401 can only come from the proxy itself (no
/// origin answers a `CONNECT`), so it counts as a 407.
fn judge(reply: connect::Reply, extra: bool, proxy: String, had_auth: bool, target: String) -> Result<(), ProxyError> {
    let challenges = || match reply.challenges.is_empty() {
        true => "no scheme".to_owned(),
        false => reply.challenges.join(", "),
    };
    match reply.status {
        200..=299 if extra => Err(ProxyError::EarlyBytes { proxy }),
        200..=299 => Ok(()),
        status @ (401 | 407) if had_auth => Err(ProxyError::AuthRejected {
            proxy,
            status,
            challenges: challenges(),
            reason: reply.reason,
        }),
        status @ (401 | 407) => Err(ProxyError::AuthRequired {
            proxy,
            status,
            challenges: challenges(),
            reason: reply.reason,
        }),
        status => Err(ProxyError::Refused {
            proxy,
            target,
            status,
            reason: reply.reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot proxy on 127.0.0.1 that answers `answer` and records the request.
    async fn fake_proxy(answer: &'static [u8]) -> (Proxy, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 256];
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0);
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(answer).await.unwrap();
            req
        });
        (
            Proxy::parse(&format!("http://u:secret-pw@127.0.0.1:{port}")).unwrap(),
            task,
        )
    }

    #[tokio::test]
    async fn answers_become_verdicts() {
        let (p, t) = fake_proxy(b"HTTP/1.1 200 OK\r\n\r\n").await;
        assert!(tunnel(&p, "relay", 443).await.is_ok());
        let req = String::from_utf8(t.await.unwrap()).unwrap();
        assert!(req.starts_with("CONNECT relay:443 HTTP/1.1\r\n") && req.contains("Proxy-Authorization: Basic "));
        type Check = fn(&ProxyError) -> bool;
        let cases: [(&'static [u8], Check); 5] = [
            (b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=x\r\n\r\n", |e| {
                matches!(e, ProxyError::AuthRejected { .. })
            }),
            (b"HTTP/1.1 401 Unauthorized\r\n\r\n", |e| {
                matches!(e, ProxyError::AuthRejected { status: 401, .. }) && e.is_auth()
            }),
            (b"HTTP/1.1 403 Access violation\r\n\r\n", |e| {
                matches!(e, ProxyError::Refused { status: 403, .. }) && !e.is_unreachable()
            }),
            (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", |e| e.is_unreachable()),
            (b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0", |e| {
                matches!(e, ProxyError::EarlyBytes { .. })
            }),
        ];
        for (answer, ok) in cases {
            let (p, _t) = fake_proxy(answer).await;
            let e = tunnel(&p, "relay", 443).await.unwrap_err();
            assert!(ok(&e), "{e:?}");
            assert!(!e.to_string().contains("secret-pw"), "{e}");
        }
        let mut p = fake_proxy(b"HTTP/1.1 407 Auth\r\n\r\n").await.0;
        p.auth = None;
        let e = tunnel(&p, "relay", 443).await.unwrap_err();
        assert!(
            matches!(e, ProxyError::AuthRequired { .. }) && e.to_string().contains("user:password@"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_dead_proxy_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Proxy::parse(&format!("127.0.0.1:{port}")).unwrap();
        let e = tunnel(&p, "relay", 443).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
    }
}
