//! Control-channel JSON commands (hc-protocol.md §4.2), sans-IO.
//!
//! One JSON object per text message, the top-level key naming the command. Encoding is
//! written out field by field (never a serialized Rust enum) so that the wire format is
//! visible here; unknown commands decode to [`Command::Unknown`] and are ignored by callers.

use serde_json::{Map, Value, json};

/// Largest control message either side sends or accepts. Default: 64 KiB (what .NET reads).
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// `accept`: the relay asks a listener to open a rendezvous for a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// Complete `ws(s)://` URL to open verbatim (contains the single-use secret).
    pub address: String,
    pub id: String,
    /// The sender's handshake headers minus credentials, merged by name.
    pub connect_headers: Vec<(String, String)>,
    /// The sender's address, if known.
    pub remote_endpoint: Option<(String, u16)>,
}

/// A decoded control-channel command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Accept(Accept),
    /// `renewToken` from a listener.
    RenewToken {
        token: String,
    },
    /// An HTTP-mode `request` or `response`, or anything else: the name, for logging.
    Unknown(String),
}

/// One way a control message can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Not JSON.
    #[error("control message is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object with exactly one key.
    #[error("control message must be an object with one command key")]
    NotCommand,
    /// A known command missing a required field or with a wrong type.
    #[error("control command '{command}' has a missing or invalid '{field}'")]
    BadField { command: &'static str, field: &'static str },
    /// Larger than [`MAX_CONTROL_MESSAGE`].
    #[error("control message of {0} bytes exceeds the 64 KiB limit")]
    TooLarge(usize),
}

impl Accept {
    /// The JSON text of this command.
    pub fn encode(&self) -> String {
        let headers: Map<String, Value> = self
            .connect_headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut body = json!({
            "address": self.address,
            "id": self.id,
            "connectHeaders": headers,
        });
        if let Some((addr, port)) = &self.remote_endpoint {
            body["remoteEndpoint"] = json!({ "address": addr, "port": port });
        }
        json!({ "accept": body }).to_string()
    }
}

/// Headers an `accept` keeps first when it must shrink: what a listener needs to open the
/// rendezvous and answer the sender's upgrade (hyco-ws needs `Sec-WebSocket-Key`).
const ESSENTIAL_HEADERS: &[&str] = &[
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Host",
    "Upgrade",
    "Connection",
];

impl Accept {
    /// The JSON text of this command in at most `limit` bytes: if the forwarded headers make
    /// it larger (counted after JSON escaping, which can make a header six times longer),
    /// headers are left out - the largest first, the essential ones last - until it fits.
    /// Returns the text and the names of the headers left out; `Err` with the smallest
    /// possible size if even the address and the essential headers do not fit.
    pub fn encode_within(&self, limit: usize) -> Result<(String, Vec<String>), usize> {
        let full = self.encode();
        if full.len() <= limit {
            return Ok((full, Vec::new()));
        }
        let essential = |n: &str| ESSENTIAL_HEADERS.iter().any(|e| e.eq_ignore_ascii_case(n));
        let cost = |(k, v): &(String, String)| json!(k).to_string().len() + json!(v).to_string().len() + 2;
        // Candidates to leave out: non-essential ones by size, largest first; then the rest.
        let mut order: Vec<usize> = (0..self.connect_headers.len()).collect();
        order.sort_by_key(|&i| {
            let h = &self.connect_headers[i];
            (essential(&h.0), std::cmp::Reverse(cost(h)))
        });
        let mut kept = self.clone();
        let mut dropped = Vec::new();
        let mut size = full.len();
        for i in order {
            if size <= limit {
                break;
            }
            let h = &self.connect_headers[i];
            size = size.saturating_sub(cost(h));
            dropped.push(h.0.clone());
        }
        kept.connect_headers.retain(|(k, _)| !dropped.contains(k));
        // The estimate above may be off by a separator; the real text decides.
        let text = kept.encode();
        if text.len() <= limit {
            return Ok((text, dropped));
        }
        let bare = Accept {
            connect_headers: Vec::new(),
            ..self.clone()
        };
        Err(bare.encode().len())
    }
}

/// `{"renewToken":{"token":...}}`.
pub fn encode_renew_token(token: &str) -> String {
    json!({ "renewToken": { "token": token } }).to_string()
}

fn str_field(obj: &Value, command: &'static str, field: &'static str) -> Result<String, ControlError> {
    obj.get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(ControlError::BadField { command, field })
}

/// Decodes one text message.
pub fn decode(text: &str) -> Result<Command, ControlError> {
    if text.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge(text.len()));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ControlError::NotJson(e.to_string()))?;
    let Some((name, body)) = v.as_object().filter(|o| o.len() == 1).and_then(|o| o.iter().next()) else {
        return Err(ControlError::NotCommand);
    };
    match name.as_str() {
        "accept" => {
            let headers = body
                .get("connectHeaders")
                .and_then(Value::as_object)
                .ok_or(ControlError::BadField {
                    command: "accept",
                    field: "connectHeaders",
                })?
                .iter()
                .map(|(k, v)| {
                    let v = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
                    (k.clone(), v)
                })
                .collect();
            let remote_endpoint = body.get("remoteEndpoint").and_then(|r| {
                let addr = r.get("address")?.as_str()?.to_owned();
                let port = r.get("port")?.as_u64().and_then(|p| u16::try_from(p).ok())?;
                Some((addr, port))
            });
            Ok(Command::Accept(Accept {
                address: str_field(body, "accept", "address")?,
                id: body.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                connect_headers: headers,
                remote_endpoint,
            }))
        }
        "renewToken" => Ok(Command::RenewToken {
            token: str_field(body, "renewToken", "token")?,
        }),
        other => Ok(Command::Unknown(other.chars().take(64).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_round_trip() {
        let a = Accept {
            address: "wss://ns:443/$hc/hc1?sb-hc-action=accept&sb-hc-id=1&sb-hc-rid=x".into(),
            id: "1".into(),
            connect_headers: vec![("Sec-WebSocket-Key".into(), "k==".into()), ("X-A".into(), "b".into())],
            remote_endpoint: Some(("127.0.0.1".into(), 5000)),
        };
        let text = a.encode();
        assert!(text.starts_with("{\"accept\":{"));
        assert_eq!(decode(&text).unwrap(), Command::Accept(a));
    }

    /// Issue 9 item 8: headers that expand under JSON escaping never push an `accept` over
    /// the limit; the essential headers stay.
    #[test]
    fn accept_fits_the_limit_after_escaping() {
        let quotes = "\"".repeat(20_000); // 20,000 bytes, 40,000 once escaped
        let a = Accept {
            address: "ws://r/$hc/h?sb-hc-action=accept&sb-hc-id=1&sb-hc-rid=x".into(),
            id: "1".into(),
            connect_headers: vec![
                ("Sec-WebSocket-Key".into(), "k==".into()),
                ("X-A".into(), quotes.clone()),
                ("X-B".into(), quotes.clone()),
                ("X-Small".into(), "s".into()),
            ],
            remote_endpoint: None,
        };
        assert!(a.encode().len() > MAX_CONTROL_MESSAGE);
        let (text, dropped) = a.encode_within(MAX_CONTROL_MESSAGE).unwrap();
        assert!(text.len() <= MAX_CONTROL_MESSAGE, "{}", text.len());
        assert_eq!(dropped, ["X-A"]);
        let Command::Accept(back) = decode(&text).unwrap() else {
            panic!()
        };
        let names: Vec<&str> = back.connect_headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"Sec-WebSocket-Key") && names.contains(&"X-Small") && names.contains(&"X-B"));
        // Small enough already: unchanged.
        assert_eq!(a.encode_within(1 << 20).unwrap(), (a.encode(), vec![]));
        // An address that alone is too long cannot be sent.
        let long = Accept {
            address: "x".repeat(70_000),
            ..a
        };
        assert!(long.encode_within(MAX_CONTROL_MESSAGE).is_err());
    }

    #[test]
    fn renew_and_unknown() {
        let t = encode_renew_token("SharedAccessSignature sr=a&sig=b&se=1&skn=c");
        assert_eq!(
            decode(&t).unwrap(),
            Command::RenewToken {
                token: "SharedAccessSignature sr=a&sig=b&se=1&skn=c".into()
            }
        );
        assert_eq!(
            decode(r#"{"injectFault":{}}"#).unwrap(),
            Command::Unknown("injectFault".into())
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(decode("nope"), Err(ControlError::NotJson(_))));
        assert_eq!(decode("[1]"), Err(ControlError::NotCommand));
        assert_eq!(decode(r#"{"a":1,"b":2}"#), Err(ControlError::NotCommand));
        assert_eq!(
            decode(r#"{"renewToken":{"token":5}}"#),
            Err(ControlError::BadField {
                command: "renewToken",
                field: "token"
            })
        );
        assert_eq!(
            decode(r#"{"accept":{"address":"x"}}"#),
            Err(ControlError::BadField {
                command: "accept",
                field: "connectHeaders"
            })
        );
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_CONTROL_MESSAGE));
        assert!(matches!(decode(&big), Err(ControlError::TooLarge(_))));
    }
}
