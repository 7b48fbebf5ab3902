//! Entity metadata: the `endpoint` item of `userMetadata` and the runtime-information Atom
//! entry (hc-protocol.md §8.1–§8.2), sans-IO.
//!
//! `userMetadata` is a JSON string holding `[{"key":"endpoint","value":"host:port"}]`.
//! The Atom entry's elements keep the order `DataContractSerializer` needs.

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

/// A `host:port` endpoint. IPv6 literals are written in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;

    /// `host:port` with a valid host name or IP literal ([`super::host::validate`]) and a
    /// port of 1 to 65535; the error says what is wrong, with control characters escaped.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((host, Some(port))) = super::connstr::split_host_port(s) {
            return Ok(HostPort { host, port });
        }
        let shown = super::host::escape(s);
        let host = match s.strip_prefix('[') {
            Some(_) => s.rsplit_once("]:").map(|(h, _)| format!("{h}]")),
            None => s.rsplit_once(':').map(|(h, _)| h.to_owned()),
        };
        Err(match host.map(|h| super::host::validate(&h)) {
            Some(Err(e)) => format!("\"{shown}\" is not HOST:PORT: {e}"),
            _ => format!("\"{shown}\" is not HOST:PORT (port 1-65535)"),
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl HostPort {
    /// Host without IPv6 brackets, for DNS lookups and socket addresses.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// `userMetadata` text for an endpoint.
pub fn user_metadata_for(endpoint: &HostPort) -> String {
    json!([{ "key": "endpoint", "value": endpoint.to_string() }]).to_string()
}

/// The first `endpoint` item of a `userMetadata` string (key case-insensitive).
///
/// `Ok(None)` when there is no such item; an error when the text or the value is malformed.
pub fn endpoint_from_user_metadata(text: &str) -> Result<Option<HostPort>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("userMetadata is not JSON: {e}"))?;
    let items = v.as_array().ok_or("userMetadata is not a JSON array")?;
    for item in items {
        let key = item.get("key").and_then(Value::as_str).unwrap_or_default();
        if key.eq_ignore_ascii_case("endpoint") {
            let value = item.get("value").and_then(Value::as_str).unwrap_or_default();
            return value.parse().map(Some).map_err(|e| format!("endpoint metadata: {e}"));
        }
    }
    Ok(None)
}

/// What the runtime-information GET reports about an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
    pub requires_client_authorization: bool,
    pub user_metadata: String,
    pub listener_count: u32,
}

/// Content type of the Atom entry. A `type=feed` answer would mean "not found" to .NET.
pub const ATOM_ENTRY_CONTENT_TYPE: &str = "application/atom+xml;type=entry;charset=utf-8";

/// Escapes text for XML element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`xml_escape`], plus numeric character references. `None` on a bad entity.
pub fn xml_unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';')? + i;
        let ent = &rest[i + 1..end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    ent.strip_prefix('#')?.parse().ok()?
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

impl RuntimeInfo {
    /// The Atom `<entry>` for entity `name` reached at `base_url` (`https://ns`).
    pub fn to_atom(&self, base_url: &str, name: &str) -> String {
        let id = xml_escape(&format!("{base_url}/{name}"));
        format!(
            concat!(
                "<entry xmlns=\"http://www.w3.org/2005/Atom\"><id>{id}</id>",
                "<title type=\"text\">{title}</title><updated>{updated}</updated>",
                "<content type=\"application/xml\">",
                "<HybridConnectionDescription xmlns=\"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect\" ",
                "xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">",
                "<CreatedAt>{created}</CreatedAt><UpdatedAt>{updated}</UpdatedAt>",
                "<RequiresClientAuthorization>{rca}</RequiresClientAuthorization>",
                "<UserMetadata>{meta}</UserMetadata><ListenerCount>{count}</ListenerCount>",
                "</HybridConnectionDescription></content></entry>"
            ),
            id = id,
            title = xml_escape(name),
            updated = xml_escape(&self.updated_at),
            created = xml_escape(&self.created_at),
            rca = self.requires_client_authorization,
            meta = xml_escape(&self.user_metadata),
            count = self.listener_count,
        )
    }

    /// Reads the fields back from an Atom entry (element prefixes allowed, order free).
    pub fn from_atom(xml: &str) -> Result<Self, String> {
        if !xml.contains("HybridConnectionDescription") {
            return Err("response is not a HybridConnectionDescription entry".into());
        }
        let text = |name: &str| element_text(xml, name);
        Ok(RuntimeInfo {
            created_at: text("CreatedAt").unwrap_or_default(),
            updated_at: text("UpdatedAt").unwrap_or_default(),
            requires_client_authorization: text("RequiresClientAuthorization")
                .map(|v| !v.trim().eq_ignore_ascii_case("false"))
                .unwrap_or(true),
            user_metadata: text("UserMetadata").unwrap_or_default(),
            listener_count: text("ListenerCount").and_then(|v| v.trim().parse().ok()).unwrap_or(0),
        })
    }
}

/// Unescaped text of the first element with local name `name`; `Some("")` for `<name/>`.
fn element_text(xml: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(rel) = xml[from..].find('<') {
        let start = from + rel + 1;
        let close = start + xml[start..].find('>')?;
        let tag = &xml[start..close];
        from = close;
        if tag.starts_with('/') {
            continue;
        }
        let qname = tag.split_whitespace().next().unwrap_or("").trim_end_matches('/');
        let local = qname.rsplit(':').next().unwrap_or(qname);
        if local != name {
            continue;
        }
        if tag.ends_with('/') {
            return Some(String::new());
        }
        let end_tag = format!("</{qname}>");
        let end = close + 1 + xml[close + 1..].find(&end_tag)?;
        return xml_unescape(&xml[close + 1..end]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        let hp: HostPort = "db.corp.local:1433".parse().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("db.corp.local", 1433));
        let v6: HostPort = "[::1]:80".parse().unwrap();
        assert_eq!((v6.bare_host(), v6.to_string().as_str()), ("::1", "[::1]:80"));
        for bad in ["db", "db:", "db:0", "db:70000", ":80", "a b:1"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
        // The value seen stored by a relay, aimed at a hosts file: refused, and the error
        // shows the control characters escaped.
        let e = "db.local\n6.6.6.6\tbank.example.com:5432"
            .parse::<HostPort>()
            .unwrap_err();
        assert!(e.contains("db.local\\n6.6.6.6\\tbank") && e.contains("'\\n'"), "{e}");
        assert!(!e.contains('\n') && !e.contains('\t'), "{e}");
    }

    #[test]
    fn metadata_round_trip_through_atom() {
        let ep = HostPort {
            host: "sql.corp".into(),
            port: 1433,
        };
        let info = RuntimeInfo {
            created_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-02T00:00:00Z".into(),
            requires_client_authorization: false,
            user_metadata: user_metadata_for(&ep),
            listener_count: 3,
        };
        let xml = info.to_atom("https://ns", "hc1");
        let order = [
            "<CreatedAt>",
            "<UpdatedAt>",
            "<RequiresClientAuthorization>",
            "<UserMetadata>",
            "<ListenerCount>",
        ];
        let pos: Vec<usize> = order.iter().map(|t| xml.find(t).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "DataContract order");
        let back = RuntimeInfo::from_atom(&xml).unwrap();
        assert_eq!(back, info);
        assert_eq!(endpoint_from_user_metadata(&back.user_metadata).unwrap(), Some(ep));
    }

    #[test]
    fn user_metadata_variants() {
        assert_eq!(endpoint_from_user_metadata("").unwrap(), None);
        assert_eq!(
            endpoint_from_user_metadata(r#"[{"key":"other","value":"x"}]"#).unwrap(),
            None
        );
        let ep = endpoint_from_user_metadata(r#"[{"key":"ENDPOINT","value":"h:1"}]"#).unwrap();
        assert_eq!(
            ep,
            Some(HostPort {
                host: "h".into(),
                port: 1
            })
        );
        assert!(endpoint_from_user_metadata(r#"[{"key":"endpoint","value":"h"}]"#).is_err());
        assert!(endpoint_from_user_metadata("{").is_err());
    }

    #[test]
    fn prefixed_and_empty_elements() {
        let xml = "<a:HybridConnectionDescription><a:UserMetadata/><a:ListenerCount>2</a:ListenerCount></a:HybridConnectionDescription>";
        let info = RuntimeInfo::from_atom(xml).unwrap();
        assert_eq!((info.user_metadata.as_str(), info.listener_count), ("", 2));
        assert_eq!(xml_unescape("&#x41;&#66;&amp;").as_deref(), Some("AB&"));
        assert_eq!(xml_unescape("&bogus;"), None);
    }
}
