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
