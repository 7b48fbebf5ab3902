//! HTTP mode on the relay, sans-IO (hc-protocol.md §6.1–§6.4): what of a sender's request
//! reaches the listener, and what of a listener's `response` reaches the sender.
//!
//! Invariants: no `sb-hc-*` query parameter and no relay credential ever reaches a
//! listener; hop-by-hop headers (RFC 9110 §7.6.1, plus those a `Connection` header names)
//! never cross the relay in either direction; the listener's status description can never
//! break the sender's status line.

use percent_encoding::percent_decode_str;

pub use crate::proto::hop::{HOP_BY_HOP, code_label, connection_tokens, is_hop_by_hop, reason_phrase};

/// The relay's own credential header, always stripped.
pub const SB_AUTH: &str = "servicebusauthorization";

/// A sender's request target split for the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitTarget {
    /// Path and non-`sb-hc-*` query, as sent (percent-encoding untouched).
    pub request_target: String,
    /// The path without the leading `/` (entity and suffix, still encoded).
    pub raw_path: String,
    /// Non-`sb-hc-*` query pairs, raw, in order.
    pub app_query: Vec<String>,
    /// `sb-hc-token`, percent-decoded once.
    pub token: Option<String>,
}

/// Splits an origin-form target; every `sb-hc-*` parameter is removed (names compared
/// case-insensitively), `sb-hc-token` is kept aside. `None` if not origin-form.
pub fn split_target(target: &str) -> Option<SplitTarget> {
    if !target.starts_with('/') {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut token = None;
    let mut app_query = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        let lower = name.to_ascii_lowercase();
        if !lower.starts_with("sb-hc-") {
            app_query.push(pair.to_owned());
        } else if lower == "sb-hc-token" {
            let v = pair.split_once('=').map_or("", |(_, v)| v);
            token = Some(percent_decode_str(v).decode_utf8_lossy().into_owned());
        }
    }
    let mut request_target = path.to_owned();
    if !app_query.is_empty() {
        request_target.push('?');
        request_target.push_str(&app_query.join("&"));
    }
    Some(SplitTarget {
        request_target,
        raw_path: path.trim_start_matches('/').to_owned(),
        app_query,
        token,
    })
}

/// `{base}/$hc/{path}?{app query&}sb-hc-action=request&sb-hc-id={id}&sb-hc-rid={secret}`:
/// where the listener fetches a rendezvous-only request or upgrades a response to.
pub fn rendezvous_address(base: &str, raw_path: &str, app_query: &[String], id: &str, secret: &str) -> String {
    let mut q: Vec<&str> = app_query.iter().map(String::as_str).collect();
    let tail = format!(
        "sb-hc-action=request&sb-hc-id={}&{}={secret}",
        percent_encoding::utf8_percent_encode(id, crate::proto::sas::URI_COMPONENT),
        crate::proto::address::RENDEZVOUS_PARAM
    );
    q.push(&tail);
    format!("{base}/$hc/{raw_path}?{}", q.join("&"))
}

/// A listener's `responseHeaders` as the sender gets them: hop-by-hop headers dropped
/// (`content-length` kept when the answer has no body, as for HEAD), the listener's `Via`
/// (if any) annotated with this relay, last.
pub fn sender_headers(headers: &[(String, String)], no_body: bool, via_host: &str) -> Vec<(String, String)> {
    let conn_tokens = connection_tokens(
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v.as_str()),
    );
    let mut via_in: Option<&str> = None;
    let mut out = Vec::with_capacity(headers.len() + 1);
    for (n, v) in headers {
        if n.eq_ignore_ascii_case("via") {
            via_in = Some(v);
            continue;
        }
        let keep_length = no_body && n.eq_ignore_ascii_case("content-length");
        if is_stripped(n, &conn_tokens) && !keep_length {
            continue;
        }
        out.push((n.clone(), v.clone()));
    }
    out.push(("via".into(), via(via_in, via_host)));
    out
}

/// Which credentials a request presents, and which headers they take with them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Tokens to check, in order of precedence.
    pub tokens: Vec<String>,
    /// True if `Authorization` carried the relay token (and so is not forwarded).
    pub authorization_used: bool,
}

/// The §6.1 rules: `sb-hc-token` and `ServiceBusAuthorization` are always stripped and
/// evaluated when the hybrid connection requires authorization; `Authorization` is
/// evaluated (and stripped) only then and only if neither of the others is present.
pub fn credentials(
    query_token: Option<&str>,
    sb_auth: Option<&str>,
    authorization: Option<&str>,
    auth_on: bool,
) -> Credentials {
    let mut c = Credentials::default();
    if !auth_on {
        return c;
    }
    c.tokens.extend(query_token.map(str::to_owned));
    c.tokens.extend(sb_auth.map(str::to_owned));
    if c.tokens.is_empty()
        && let Some(a) = authorization
    {
        c.tokens.push(a.to_owned());
        c.authorization_used = true;
    }
    c
}

/// True if `name` (any case) never crosses the relay: hop-by-hop, named in one of the
/// `connection` tokens, or the relay's credential.
pub fn is_stripped(name: &str, connection_tokens: &[String]) -> bool {
    name.eq_ignore_ascii_case(SB_AUTH) || is_hop_by_hop(name, connection_tokens)
}

/// `Via` after this relay (`1.1 {host}`) is appended to `existing`.
pub fn via(existing: Option<&str>, host: &str) -> String {
    let me = format!("1.1 {}", crate::proto::sas::strip_port(host));
    match existing.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => format!("{v}, {me}"),
        None => me,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sb_hc_parameters_never_reach_the_listener() {
        let t = split_target("/hc1/api/x?a=1&SB-HC-TOKEN=Shared%20x%26y&b=%2f%3a&sb-hc-id=7&flag").unwrap();
        assert_eq!(t.request_target, "/hc1/api/x?a=1&b=%2f%3a&flag");
        assert_eq!(t.raw_path, "hc1/api/x");
        assert_eq!(t.token.as_deref(), Some("Shared x&y"));
        assert_eq!(split_target("/hc1?sb-hc-action=x").unwrap().request_target, "/hc1");
        assert_eq!(split_target("http://x/"), None);
    }

    #[test]
    fn rendezvous_addresses_parse_back() {
        let a = rendezvous_address("wss://ns:9", "hc1/x%20y", &["a=1".into()], "id-1", "00ff");
        assert_eq!(
            a,
            "wss://ns:9/$hc/hc1/x%20y?a=1&sb-hc-action=request&sb-hc-id=id-1&sb-hc-rid=00ff"
        );
        let target = &a["wss://ns:9".len()..];
        let crate::proto::address::Target::Hc(r) = crate::proto::address::parse_target(target).unwrap() else {
            panic!()
        };
        assert_eq!(r.action, Some(crate::proto::address::Action::Request));
        assert_eq!((r.id.as_deref(), r.rendezvous.as_deref()), (Some("id-1"), Some("00ff")));
    }

    #[test]
    fn sender_headers_drop_hops_and_add_via() {
        let h = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let got = sender_headers(
            &h(&[
                ("Content-Length", "5"),
                ("connection", "x-a"),
                ("x-a", "1"),
                ("x-b", "2"),
                ("Via", "1.0 app"),
            ]),
            false,
            "ns",
        );
        assert_eq!(got, h(&[("x-b", "2"), ("via", "1.0 app, 1.1 ns")]));
        let head = sender_headers(&h(&[("content-length", "5")]), true, "ns");
        assert_eq!(head, h(&[("content-length", "5"), ("via", "1.1 ns")]));
    }

    #[test]
    fn credential_rules() {
        let c = credentials(Some("q"), Some("h"), Some("a"), true);
        assert_eq!(c.tokens, vec!["q", "h"]);
        assert!(!c.authorization_used);
        let c = credentials(None, None, Some("a"), true);
        assert_eq!(c.tokens, vec!["a"]);
        assert!(c.authorization_used);
        assert_eq!(credentials(Some("q"), None, Some("a"), false), Credentials::default());
    }

    #[test]
    fn stripping_and_via() {
        let conn = connection_tokens(["keep-alive, X-Secret"].into_iter());
        for h in [
            "Connection",
            "ServiceBusAuthorization",
            "x-secret",
            "Transfer-Encoding",
            "Host",
            "Expect",
        ] {
            assert!(is_stripped(h, &conn), "{h}");
        }
        for h in ["Authorization", "Content-Type", "Via", "X-Forwarded-For"] {
            assert!(!is_stripped(h, &conn), "{h}");
        }
        assert_eq!(via(None, "ns.example:443"), "1.1 ns.example");
        assert_eq!(via(Some("1.0 proxy"), "ns"), "1.0 proxy, 1.1 ns");
    }

    #[test]
    fn reasons_and_labels() {
        assert_eq!(reason_phrase("Made\r\nSet-Cookie: x  "), "MadeSet-Cookie: x");
        assert_eq!(reason_phrase("grüße"), "gre");
        assert_eq!(code_label(418), "4xx");
        assert_eq!(code_label(504), "504");
        assert_eq!(code_label(999), "5xx");
    }
}
