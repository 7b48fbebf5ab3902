//! Relay request targets: `/$hc/{entity}[/suffix]?sb-hc-*` (hc-protocol.md §2), sans-IO.
//!
//! Parsing splits the query on `&` first and decodes each value once, so a token that
//! itself contains `&` and `=` survives. Every `sb-hc-*` parameter is pulled out; the rest
//! of the query is kept raw, in order, to be passed on to the listener untouched.

use percent_encoding::percent_decode_str;

/// Query parameter carrying the relay's rendezvous secret in an `accept` address.
pub const RENDEZVOUS_PARAM: &str = "sb-hc-rid";

/// Path prefix of hyrelay's own management API (`/$hyrelay/v1/hybrid-connections`).
pub const MGMT_API_PREFIX: &str = "/$hyrelay/v1/hybrid-connections";

/// What a `$hc` request asks for (`sb-hc-action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Listen,
    Connect,
    Accept,
    Request,
}

/// A request on `/$hc/...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HcRequest {
    /// Decoded path after `/$hc/`, without leading or trailing `/` (entity plus suffix).
    pub path: String,
    /// The same path still percent-encoded, as sent.
    pub raw_path: String,
    /// `sb-hc-action`; `None` if absent. An unknown value is an error.
    pub action: Option<Action>,
    pub id: Option<String>,
    /// `sb-hc-token`, decoded once (the token text).
    pub token: Option<String>,
    pub status_code: Option<String>,
    pub status_description: Option<String>,
    /// The relay's rendezvous secret ([`RENDEZVOUS_PARAM`]).
    pub rendezvous: Option<String>,
    /// Non-`sb-hc` query pairs, raw, in order (`k=v` or `k`).
    pub app_query: Vec<String>,
}

/// A request anywhere else: the runtime-information GET, management API, HTTP mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    /// Decoded path with leading `/`.
    pub path: String,
    /// The path as sent (percent-encoded).
    pub raw_path: String,
    /// Raw query pairs `(name, value)`, both percent-decoded.
    pub query: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Hc(HcRequest),
    Plain(PlainRequest),
}

/// One way a request target can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not origin-form (`/...`).
    #[error("request target must start with '/'")]
    NotOriginForm,
    /// `sb-hc-action` with a value other than listen, connect, accept, request.
    #[error("unknown sb-hc-action {0:?}")]
    UnknownAction(String),
    /// A percent-escape that does not decode to UTF-8.
    #[error("request target is not valid percent-encoded UTF-8")]
    BadEncoding,
}

/// Percent-decodes `s` (no `+` handling).
pub fn decode(s: &str) -> Result<String, AddressError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| AddressError::BadEncoding)
}

/// Form-decodes `s`: `+` is a space, then percent-escapes (as .NET's `UrlEncode` produces).
pub fn form_decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn strip_hc_prefix(path: &str) -> Option<&str> {
    for prefix in ["/$hc", "/%24hc"] {
        // `get`, not `path[..n]`: byte n may fall inside a multi-byte character (`/$hé`
        // panicked; found by fuzzing). httparse lets UTF-8 through in request targets.
        if path.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix)) {
            let rest = &path[prefix.len()..];
            if rest.is_empty() || rest.starts_with('/') {
                return Some(rest);
            }
        }
    }
    None
}

/// Parses an origin-form request target.
pub fn parse_target(target: &str) -> Result<Target, AddressError> {
    if !target.starts_with('/') {
        return Err(AddressError::NotOriginForm);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let pairs = query.split('&').filter(|p| !p.is_empty());
    let Some(rest) = strip_hc_prefix(path) else {
        let query = pairs
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (form_decode(k), form_decode(v))
            })
            .collect();
        return Ok(Target::Plain(PlainRequest {
            path: decode(path)?,
            raw_path: path.to_owned(),
            query,
        }));
    };
    let raw_path = rest.trim_matches('/').to_owned();
    let mut req = HcRequest {
        path: decode(&raw_path)?.trim_matches('/').to_owned(),
        raw_path,
        ..HcRequest::default()
    };
    for pair in pairs {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = k.to_ascii_lowercase();
        if !name.starts_with("sb-hc-") {
            req.app_query.push(pair.to_owned());
            continue;
        }
        match name.as_str() {
            "sb-hc-action" => {
                req.action = Some(match decode(v)?.to_ascii_lowercase().as_str() {
                    "listen" => Action::Listen,
                    "connect" => Action::Connect,
                    "accept" => Action::Accept,
                    "request" => Action::Request,
                    other => return Err(AddressError::UnknownAction(other.to_owned())),
                })
            }
            "sb-hc-id" => req.id = Some(decode(v)?),
            "sb-hc-token" => req.token = Some(decode(v)?),
            "sb-hc-statuscode" => req.status_code = Some(decode(v)?),
            "sb-hc-statusdescription" => req.status_description = Some(form_decode(v)),
            n if n == RENDEZVOUS_PARAM => req.rendezvous = Some(decode(v)?),
            _ => {} // other sb-hc-* parameters are dropped, never forwarded
        }
    }
    Ok(Target::Hc(req))
}

/// Checks a hybrid connection name: 1–260 characters of letters, digits, `.`, `-`, `_`,
/// in `/`-separated segments that start and end with a letter or digit.
pub fn validate_entity_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 260 {
        return Err("a hybrid connection name has 1 to 260 characters".into());
    }
    for seg in name.split('/') {
        let ok_edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !ok_edge(seg.chars().next()) || !ok_edge(seg.chars().last()) {
            return Err(format!(
                "{name:?}: each '/'-separated segment must start and end with a letter or digit"
            ));
        }
        if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c))) {
            return Err(format!(
                "{name:?}: character {c:?} is not allowed (letters, digits, '.', '-', '_', '/')"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_target_with_encoded_token() {
        let t = "/%24hc/My%20HC/?sb-hc-action=listen&sb-hc-id=abc&sb-hc-token=SharedAccessSignature%20sr%3Dx%26sig%3Dy%252B&foo=1";
        let Target::Hc(r) = parse_target(t).unwrap() else {
            panic!()
        };
        assert_eq!(r.path, "My HC");
        assert_eq!(r.raw_path, "My%20HC");
        assert_eq!(r.action, Some(Action::Listen));
        assert_eq!(r.token.as_deref(), Some("SharedAccessSignature sr=x&sig=y%2B"));
        assert_eq!(r.app_query, vec!["foo=1".to_owned()]);
    }

    #[test]
    fn reject_params_and_unknown_action() {
        let t = "/$hc/hc1/sub?a=b&SB-HC-ACTION=accept&sb-hc-id=1&sb-hc-rid=s3cr3t&sb-hc-statusCode=502&sb-hc-statusDescription=Endpoint+down%21";
        let Target::Hc(r) = parse_target(t).unwrap() else {
            panic!()
        };
        assert_eq!(r.path, "hc1/sub");
        assert_eq!(r.rendezvous.as_deref(), Some("s3cr3t"));
        assert_eq!(r.status_code.as_deref(), Some("502"));
        assert_eq!(r.status_description.as_deref(), Some("Endpoint down!"));
        assert_eq!(
            parse_target("/$hc/a?sb-hc-action=dance"),
            Err(AddressError::UnknownAction("dance".into()))
        );
    }

    #[test]
    fn plain_targets() {
        let Target::Plain(p) = parse_target("/hc1?api-version=2016-07").unwrap() else {
            panic!()
        };
        assert_eq!(p.path, "/hc1");
        assert_eq!(p.query, vec![("api-version".into(), "2016-07".into())]);
        assert!(matches!(parse_target("/$hcx/a").unwrap(), Target::Plain(_)));
        assert_eq!(parse_target("http://x/"), Err(AddressError::NotOriginForm));
    }

    #[test]
    fn non_ascii_where_the_prefix_ends_is_not_a_panic() {
        // fuzz/regressions/hc_target/non-ascii-after-hc-prefix: byte 4 is inside 'é'.
        assert!(matches!(parse_target("/$hé"), Ok(Target::Plain(_))));
        assert!(matches!(parse_target("/%24hé/x"), Ok(Target::Plain(_))));
        assert!(matches!(parse_target("/$hc/é?sb-hc-action=listen"), Ok(Target::Hc(_))));
    }

    #[test]
    fn entity_names() {
        for ok in ["hc1", "a.b-c_d", "microsoft.hybridcompute/machines/x/v2"] {
            assert!(validate_entity_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a/", "a//b", "$hc", "a b", &"x".repeat(261)] {
            assert!(validate_entity_name(bad).is_err(), "{bad}");
        }
    }
}
