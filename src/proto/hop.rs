//! Hop-by-hop rules for HTTP messages that cross hyrelay (the relay's HTTP mode and the
//! hcm's forwarding), sans-IO: which headers concern one connection only (RFC 9110
//! §7.6.1, plus those a `Connection` header names), and a reason phrase that cannot break
//! a status line.

/// Headers that concern one hop only, never forwarded (lower case): the hop-by-hop set,
/// plus `host`, `content-length` and `expect`, which each hop sets for itself.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "close",
    "host",
    "content-length",
    "expect",
];

/// True if `name` (any case) concerns one hop only: a [`HOP_BY_HOP`] header or one named
/// in `connection_tokens`.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str()) || connection_tokens.contains(&lower)
}

/// The lower-cased tokens of the `Connection` header values.
pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// A reason phrase safe for a status line: visible ASCII, spaces and tabs, at most 256
/// bytes; anything else dropped.
pub fn reason_phrase(desc: &str) -> String {
    let mut s: String = desc
        .chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(256)
        .collect();
    s.truncate(s.trim_end().len());
    s
}

/// The `code` label of the request metrics: a bounded set (common statuses by number,
/// the rest by class).
pub fn code_label(status: u16) -> &'static str {
    const COMMON: [(u16, &str); 20] = [
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (429, "429"),
        (431, "431"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, l)) = COMMON.iter().find(|(c, _)| *c == status) {
        return l;
    }
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
