//! Host names and IP literals, as endpoints, relays and rendezvous URLs write them.
//!
//! Everything that names a host goes through [`validate`]: a DNS name (letters, digits,
//! `-` and `_` in dot-separated labels of 1 to 63 characters, 253 in all, the last label
//! not all digits), an IPv4 literal, or an IPv6 literal in brackets. Nothing else - no
//! whitespace, no control character, no `%` zone - so a host can be written into a hosts
//! file line, a log line or a table cell without turning into something else.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host is empty")]
    Empty,
    #[error("the host is longer than 253 characters")]
    TooLong,
    /// A character outside letters, digits, `-`, `_` and `.`; carries its escaped form.
    #[error("the host contains the character '{0}' (a host name has letters, digits, '-', '_' and '.')")]
    BadChar(String),
    #[error("the host has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("a label of the host is longer than 63 characters")]
    LabelTooLong,
    #[error("a label of the host starts or ends with '-'")]
    HyphenEdge,
    #[error("the host looks numeric but is not an IPv4 address")]
    NumericName,
    #[error("[{0}] is not an IPv6 address")]
    BadIpv6(String),
}

/// Checks `host` as written in a URL authority (IPv6 in brackets).
pub fn validate(host: &str) -> Result<(), HostError> {
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| HostError::BadIpv6(escape(inner)))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| HostError::BadIpv6(escape(inner)));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(HostError::BadChar(escape(&c.to_string())));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::HyphenEdge);
        }
    }
    // `1.2.3` or `0x7f.1` would reach the resolver as an IPv4 shorthand.
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) || (last.starts_with("0x") && name.contains('.') && last.len() > 2) {
        return Err(HostError::NumericName);
    }
    Ok(())
}

/// `text` with every control or non-ASCII character written as an escape (`\n`, `\u{1b}`),
/// for error messages and tables that must not carry raw control characters.
pub fn escape(text: &str) -> String {
    text.escape_debug().to_string()
}

/// `text` with control characters (and only those) written as escapes, for tables and
/// pages: `db\n6.6.6.6` shows as `db\\n6.6.6.6`; other text, accents included, is kept.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_and_literals() {
        for ok in [
            "db",
            "db.corp.local",
            "DB-1.corp_x.local",
            "db.local.",
            "10.0.0.5",
            "[::1]",
            "[fd00::5]",
            "xn--bcher-kva.example",
            "a1.b2",
        ] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_what_would_change_meaning() {
        let cases: &[(&str, HostError)] = &[
            ("", HostError::Empty),
            ("db.local\n6.6.6.6", HostError::BadChar("\\n".into())),
            ("db\tbank", HostError::BadChar("\\t".into())),
            ("db\r", HostError::BadChar("\\r".into())),
            ("db\0", HostError::BadChar("\\0".into())),
            ("db\u{1b}[31m", HostError::BadChar("\\u{1b}".into())),
            ("db local", HostError::BadChar(" ".into())),
            ("a..b", HostError::EmptyLabel),
            (".a", HostError::EmptyLabel),
            ("-a.b", HostError::HyphenEdge),
            ("a-.b", HostError::HyphenEdge),
            ("1.2.3", HostError::NumericName),
            ("999.1.1.1", HostError::NumericName),
            ("[::1", HostError::BadIpv6("::1".into())),
            ("[fe80::1%eth0]", HostError::BadIpv6("fe80::1%eth0".into())),
            ("[zz]", HostError::BadIpv6("zz".into())),
        ];
        for (bad, want) in cases {
            assert_eq!(validate(bad).as_ref(), Err(want), "{bad:?}");
        }
        assert_eq!(validate(&"a".repeat(64)), Err(HostError::LabelTooLong));
        assert_eq!(validate(&format!("{}.x", "a.".repeat(130))), Err(HostError::TooLong));
        assert!(validate("café.example").is_err(), "IDNs are written in punycode");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(
            escape_controls("db.local\n6.6.6.6\tbank\u{1b}[0m"),
            "db.local\\n6.6.6.6\\tbank\\u{1b}[0m"
        );
        assert_eq!(escape_controls("café ok"), "café ok");
    }
}
