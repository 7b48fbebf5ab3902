//! The HTTP `CONNECT` exchange with a proxy, sans-IO: the request we send and a parser for
//! the proxy's answer.
//!
//! [`parse_reply`] is fed the bytes read so far and returns `Ok(None)` until a final
//! (non-1xx) response head is complete; interim 1xx heads are skipped. The count it returns
//! covers every head it consumed; what follows belongs to the tunnel (for a 2xx) or to the
//! proxy's error page. Heads are limited to [`MAX_REPLY_HEAD`] bytes in all.

use base64::Engine;

use super::settings::Credentials;
use crate::proto::handshake::{self, HandshakeError};

/// Largest answer head (all interim heads and the final one) accepted. Default: 16 KiB.
pub const MAX_REPLY_HEAD: usize = handshake::DEFAULT_MAX_HEAD;

/// `host:port` as a `CONNECT` target: IPv6 literals in brackets.
pub fn authority(host: &str, port: u16) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.contains(':') {
        format!("[{bare}]:{port}")
    } else {
        format!("{bare}:{port}")
    }
}

/// `CONNECT host:port HTTP/1.1` with `Host` and, given credentials, `Proxy-Authorization:
/// Basic`. The bytes carry the password: never log them.
pub fn request(host: &str, port: u16, auth: Option<&Credentials>) -> Vec<u8> {
    let target = authority(host, port);
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: hyrelay/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(c) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password.expose()));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// The proxy's final answer to `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub reason: String,
    /// The schemes of the `Proxy-Authenticate` challenges (`Basic`, `Negotiate`, …).
    pub challenges: Vec<String>,
}

impl Reply {
    /// A 2xx: the tunnel is open.
    pub fn established(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a proxy's answer cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not an HTTP response head.
    #[error("the proxy's answer is not HTTP: {0}")]
    NotHttp(HandshakeError),
    /// The heads passed [`MAX_REPLY_HEAD`].
    #[error("the proxy's answer head exceeds {MAX_REPLY_HEAD} bytes")]
    TooLarge,
}

/// Parses the answer in `buf`: `Ok(None)` = need more bytes; else the final head and the
/// bytes it (and any interim heads before it) took.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut used = 0;
    loop {
        let room = MAX_REPLY_HEAD - used;
        let parsed = match handshake::parse_response(&buf[used..], room) {
            Ok(p) => p,
            Err(HandshakeError::TooLarge(_)) => return Err(ReplyError::TooLarge),
            Err(e) => return Err(ReplyError::NotHttp(e)),
        };
        let Some((head, n)) = parsed else {
            return Ok(None);
        };
        used += n;
        if (100..200).contains(&head.status) {
            if used >= MAX_REPLY_HEAD {
                return Err(ReplyError::TooLarge);
            }
            continue;
        }
        let challenges = head
            .headers
            .0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Proxy-Authenticate"))
            .filter_map(|(_, v)| v.split_whitespace().next())
            .map(|s| s.trim_end_matches(',').to_owned())
            .collect();
        let reply = Reply {
            status: head.status,
            reason: head.reason,
            challenges,
        };
        return Ok(Some((reply, used)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Secret;

    #[test]
    fn requests() {
        let creds = Credentials {
            user: "user".into(),
            password: Secret::new("pass"),
        };
        let r = String::from_utf8(request("relay.example.com", 443, Some(&creds))).unwrap();
        assert!(
            r.starts_with("CONNECT relay.example.com:443 HTTP/1.1\r\nHost: relay.example.com:443\r\n"),
            "{r}"
        );
        assert!(r.contains("Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"));
        let r = String::from_utf8(request("[::1]", 9, None)).unwrap();
        assert!(r.starts_with("CONNECT [::1]:9 HTTP/1.1\r\n") && !r.contains("Proxy-Authorization"));
        assert_eq!(authority("::1", 9), "[::1]:9");
    }

    #[test]
    fn replies() {
        let ok = b"HTTP/1.1 200 Connection established\r\n\r\n";
        for cut in 0..ok.len() {
            assert_eq!(parse_reply(&ok[..cut]), Ok(None), "cut at {cut}");
        }
        let (r, n) = parse_reply(ok).unwrap().unwrap();
        assert!(r.established() && n == ok.len());
        let auth = b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nProxy-Authenticate: Negotiate\r\n\r\n<html>";
        let (r, n) = parse_reply(auth).unwrap().unwrap();
        assert_eq!(
            (r.status, r.challenges.clone()),
            (407, vec!["Basic".into(), "Negotiate".into()])
        );
        assert_eq!(&auth[n..], b"<html>");
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n";
        let (r, n) = parse_reply(interim).unwrap().unwrap();
        assert_eq!((r.status, r.reason.as_str(), n), (403, "Forbidden", interim.len()));
        assert_eq!(parse_reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1"), Ok(None));
        assert!(matches!(
            parse_reply(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(ReplyError::NotHttp(_))
        ));
        let many = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_REPLY_HEAD / 20);
        assert_eq!(parse_reply(&many), Err(ReplyError::TooLarge));
    }
}
