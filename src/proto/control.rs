//! Control-channel JSON commands (hc-protocol.md §4.2), sans-IO.
//!
//! One JSON object per text message, the top-level key naming the command. Encoding is
//! written out field by field (never a serialized Rust enum) so that the wire format is
//! visible here; unknown commands decode to [`Command::Unknown`] and are ignored by callers.
//!
//! HTTP mode (§6): a [`Request`] is either *inline* (it carries `method` and `body`, and a
//! body, if any, follows as the next binary message) or *rendezvous-only* (just `address`
//! and `id`: the listener dials the address and the full request arrives there). The two
//! forms are told apart by `method`, as hyco-https does; the inline form always carries
//! both `method` and `body` so that .NET (which looks at `body`) agrees. Header values
//! that are not strings (hyco-https may send numbers) decode to their JSON text; arrays
//! are joined with `", "`.

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

/// `request`: the relay hands a listener an HTTP request (§4.2, §6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Complete `ws(s)://` URL with `sb-hc-action=request`: where the listener fetches a
    /// rendezvous-only request, or upgrades a response to (a single-use capability).
    pub address: String,
    /// Unique among the listener's requests in flight; echoed as `response.requestId`.
    pub id: String,
    /// The request itself; `None` for the rendezvous-only form.
    pub http: Option<HttpRequest>,
}

/// The HTTP part of a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Origin-form path and query, entity included, every `sb-hc-*` parameter removed.
    pub request_target: String,
    pub method: String,
    /// End-to-end headers, merged by name (repeats joined with `", "`).
    pub request_headers: Vec<(String, String)>,
    /// The sender's address, if known.
    pub remote_endpoint: Option<(String, u16)>,
    /// True if a body message follows.
    pub body: bool,
}

/// `response`: a listener answers a request (§6.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub request_id: String,
    /// 100..=999 (a JSON number, or a string holding one, as the doc's example has it).
    pub status_code: u16,
    pub status_description: Option<String>,
    pub response_headers: Vec<(String, String)>,
    /// True if a body message follows.
    pub body: bool,
}

/// A decoded control-channel command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Accept(Accept),
    /// `renewToken` from a listener.
    RenewToken {
        token: String,
    },
    Request(Request),
    Response(Response),
    /// Anything else: the name, for logging.
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
    /// The JSON text of this command, written into one buffer (the relay sends one per
    /// tunnel): keys in the order a `serde_json` map keeps them (sorted), header names
    /// sorted and a repeated name's last value kept, as the map would; strings escaped by
    /// `serde_json`.
    pub fn encode(&self) -> String {
        let mut headers: Vec<&(String, String)> = self.connect_headers.iter().collect();
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        let text_len: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
        let mut out = Vec::with_capacity(96 + self.address.len() + self.id.len() + text_len);
        out.extend_from_slice(b"{\"accept\":{\"address\":");
        push_json_str(&mut out, &self.address);
        out.extend_from_slice(b",\"connectHeaders\":{");
        let mut first = true;
        for (i, (k, v)) in headers.iter().map(|h| (&h.0, &h.1)).enumerate() {
            // A repeated name: only its last value is written.
            if headers.get(i + 1).is_some_and(|next| &next.0 == k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            push_json_str(&mut out, k);
            out.push(b':');
            push_json_str(&mut out, v);
        }
        out.extend_from_slice(b"},\"id\":");
        push_json_str(&mut out, &self.id);
        if let Some((addr, port)) = &self.remote_endpoint {
            out.extend_from_slice(b",\"remoteEndpoint\":{\"address\":");
            push_json_str(&mut out, addr);
            out.extend_from_slice(format!(",\"port\":{port}}}").as_bytes());
        }
        out.extend_from_slice(b"}}");
        String::from_utf8(out).expect("JSON text of UTF-8 strings is UTF-8")
    }
}

/// Appends `s` as a JSON string (quoted and escaped).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a string into a Vec cannot fail");
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

fn header_map(headers: &[(String, String)]) -> Map<String, Value> {
    headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

fn remote_json(remote: &Option<(String, u16)>) -> Option<Value> {
    remote
        .as_ref()
        .map(|(addr, port)| json!({ "address": addr, "port": port }))
}

impl Request {
    /// The JSON text of this command.
    pub fn encode(&self) -> String {
        let mut body = json!({ "address": self.address, "id": self.id });
        if let Some(h) = &self.http {
            body["requestTarget"] = Value::String(h.request_target.clone());
            body["method"] = Value::String(h.method.clone());
            body["requestHeaders"] = Value::Object(header_map(&h.request_headers));
            if let Some(r) = remote_json(&h.remote_endpoint) {
                body["remoteEndpoint"] = r;
            }
            body["body"] = Value::Bool(h.body);
        }
        json!({ "request": body }).to_string()
    }
}

impl Response {
    /// The JSON text of this command.
    pub fn encode(&self) -> String {
        let mut body = json!({
            "requestId": self.request_id,
            "statusCode": self.status_code,
            "responseHeaders": header_map(&self.response_headers),
            "body": self.body,
        });
        if let Some(d) = &self.status_description {
            body["statusDescription"] = Value::String(d.clone());
        }
        json!({ "response": body }).to_string()
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

/// A header value as text: strings as they are, arrays joined with `", "`, anything
/// else as its JSON text.
fn header_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(header_value).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// An optional object of headers; missing or `null` is empty.
fn headers_field(
    obj: &Value,
    command: &'static str,
    field: &'static str,
) -> Result<Vec<(String, String)>, ControlError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), header_value(v))).collect()),
        Some(_) => Err(ControlError::BadField { command, field }),
    }
}

fn remote_field(obj: &Value) -> Option<(String, u16)> {
    let r = obj.get("remoteEndpoint")?;
    let addr = r.get("address")?.as_str()?.to_owned();
    let port = r.get("port")?.as_u64().and_then(|p| u16::try_from(p).ok())?;
    Some((addr, port))
}

fn bool_field(obj: &Value, command: &'static str, field: &'static str) -> Result<bool, ControlError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ControlError::BadField { command, field }),
    }
}

fn decode_request(body: &Value) -> Result<Request, ControlError> {
    const C: &str = "request";
    let address = str_field(body, C, "address")?;
    let id = body.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    // hyco-https's rule: a truthy `method` makes the request inline.
    let method = match body.get("method") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.is_empty() => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => {
            return Err(ControlError::BadField {
                command: C,
                field: "method",
            });
        }
    };
    let http = match method {
        None => None,
        Some(method) => Some(HttpRequest {
            request_target: str_field(body, C, "requestTarget")?,
            method,
            request_headers: headers_field(body, C, "requestHeaders")?,
            remote_endpoint: remote_field(body),
            body: bool_field(body, C, "body")?,
        }),
    };
    Ok(Request { address, id, http })
}

fn decode_response(body: &Value) -> Result<Response, ControlError> {
    const C: &str = "response";
    let bad = |field| ControlError::BadField { command: C, field };
    let status_code = match body.get("statusCode") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .and_then(|c| u16::try_from(c).ok())
    .filter(|c| (100..=999).contains(c))
    .ok_or(bad("statusCode"))?;
    let status_description = match body.get("statusDescription") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("statusDescription")),
    };
    Ok(Response {
        request_id: str_field(body, C, "requestId")?,
        status_code,
        status_description,
        response_headers: headers_field(body, C, "responseHeaders")?,
        body: bool_field(body, C, "body")?,
    })
}

/// Decodes one text message.
pub fn decode(text: &str) -> Result<Command, ControlError> {
    if text.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge(text.len()));
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ControlError::NotJson(e.to_string()))?;
    let Value::Object(command) = v else {
        return Err(ControlError::NotCommand);
    };
    let mut command = command.into_iter();
    let (Some((name, body)), None) = (command.next(), command.next()) else {
        return Err(ControlError::NotCommand);
    };
    match name.as_str() {
        // Moved out of the parsed document, not copied: one `accept` per tunnel.
        "accept" => decode_accept(body).map(Command::Accept),
        "renewToken" => Ok(Command::RenewToken {
            token: str_field(&body, "renewToken", "token")?,
        }),
        "request" => decode_request(&body).map(Command::Request),
        "response" => decode_response(&body).map(Command::Response),
        other => Ok(Command::Unknown(other.chars().take(64).collect())),
    }
}

/// The body of an `accept`.
fn decode_accept(body: Value) -> Result<Accept, ControlError> {
    let bad = |field| ControlError::BadField {
        command: "accept",
        field,
    };
    let Value::Object(mut body) = body else {
        return Err(bad("connectHeaders"));
    };
    let Some(Value::Object(headers)) = body.remove("connectHeaders") else {
        return Err(bad("connectHeaders"));
    };
    let connect_headers = headers
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(v) => (k, v),
            other => (k, other.to_string()),
        })
        .collect();
    let remote_endpoint = match body.remove("remoteEndpoint") {
        Some(Value::Object(mut r)) => match (r.remove("address"), r.get("port").and_then(Value::as_u64)) {
            (Some(Value::String(addr)), Some(port)) => u16::try_from(port).ok().map(|port| (addr, port)),
            _ => None,
        },
        _ => None,
    };
    let Some(Value::String(address)) = body.remove("address") else {
        return Err(bad("address"));
    };
    let id = match body.remove("id") {
        Some(Value::String(id)) => id,
        _ => String::new(),
    };
    Ok(Accept {
        address,
        id,
        connect_headers,
        remote_endpoint,
    })
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

    /// The accept written by hand is the text a `serde_json` document of the same command
    /// gives: key order, a repeated header's last value, escapes (quotes, backslashes,
    /// control characters, non-ASCII), with and without the sender's address.
    #[test]
    fn accept_text_is_what_a_json_document_gives() {
        let as_document = |a: &Accept| {
            let headers: Map<String, Value> = a
                .connect_headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let mut body = json!({ "address": a.address, "id": a.id, "connectHeaders": headers });
            if let Some((addr, port)) = &a.remote_endpoint {
                body["remoteEndpoint"] = json!({ "address": addr, "port": port });
            }
            json!({ "accept": body }).to_string()
        };
        let h = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let cases = [
            Accept {
                address: "wss://ns:443/$hc/hc1?sb-hc-action=accept&sb-hc-id=1".into(),
                id: "1".into(),
                connect_headers: vec![],
                remote_endpoint: None,
            },
            Accept {
                address: "wss://n\"s\\/x".into(),
                id: "id\u{1}\n\t".into(),
                connect_headers: vec![
                    h("X-B", "2"),
                    h("Sec-WebSocket-Key", "k=="),
                    h("X-B", "last \"wins\""),
                    h("a-lower", "ü € \u{7f} \u{1f600}"),
                    h("", ""),
                    h("X-A", "</script>\r\n"),
                ],
                remote_endpoint: Some(("::1".into(), 65535)),
            },
            Accept {
                address: String::new(),
                id: String::new(),
                connect_headers: vec![h("Z", "z"), h("Z", "y"), h("Z", "x")],
                remote_endpoint: Some(("127.0.0.1".into(), 0)),
            },
        ];
        for a in &cases {
            assert_eq!(a.encode(), as_document(a), "{a:?}");
            let Command::Accept(back) = decode(&a.encode()).unwrap() else {
                panic!("not an accept")
            };
            assert_eq!(back.address, a.address);
            assert_eq!(back.remote_endpoint, a.remote_endpoint);
        }
    }

    /// An accept's fields of the wrong type are refused as before the decoder moved them
    /// out of the document; a header value that is not a string becomes its JSON text.
    #[test]
    fn accept_fields_of_the_wrong_type() {
        let bad = |field| {
            Err(ControlError::BadField {
                command: "accept",
                field,
            })
        };
        assert_eq!(decode(r#"{"accept":1}"#), bad("connectHeaders"));
        assert_eq!(decode(r#"{"accept":{"address":"a"}}"#), bad("connectHeaders"));
        assert_eq!(
            decode(r#"{"accept":{"address":"a","connectHeaders":[]}}"#),
            bad("connectHeaders")
        );
        assert_eq!(decode(r#"{"accept":{"connectHeaders":{}}}"#), bad("address"));
        assert_eq!(
            decode(r#"{"accept":{"address":7,"connectHeaders":{}}}"#),
            bad("address")
        );
        assert_eq!(decode(r#"{"accept":{},"x":{}}"#), Err(ControlError::NotCommand));
        assert_eq!(decode(r#"[{"accept":{}}]"#), Err(ControlError::NotCommand));
        assert_eq!(decode("{}"), Err(ControlError::NotCommand));
        // A sender's address that is not an address and a port is left out, not an error.
        for remote in [r#"{"address":5,"port":1}"#, r#"{"address":"h"}"#, "[]"] {
            let text = format!(r#"{{"accept":{{"address":"a","connectHeaders":{{}},"remoteEndpoint":{remote}}}}}"#);
            let Ok(Command::Accept(a)) = decode(&text) else {
                panic!("{text}")
            };
            assert_eq!(a.remote_endpoint, None, "{text}");
        }
        let a = decode(
            r#"{"accept":{"address":"a","id":5,"connectHeaders":{"N":5,"B":true,"S":"s"},"remoteEndpoint":{"address":"h","port":70000}}}"#,
        );
        assert_eq!(
            a,
            Ok(Command::Accept(Accept {
                address: "a".into(),
                id: String::new(),
                connect_headers: vec![
                    ("B".into(), "true".into()),
                    ("N".into(), "5".into()),
                    ("S".into(), "s".into())
                ],
                remote_endpoint: None,
            }))
        );
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
    fn request_forms_round_trip() {
        let inline = Request {
            address: "ws://h:1/$hc/hc1?sb-hc-action=request&sb-hc-id=i&sb-hc-rid=s".into(),
            id: "i".into(),
            http: Some(HttpRequest {
                request_target: "/hc1/x?a=1".into(),
                method: "POST".into(),
                request_headers: vec![("Content-Type".into(), "text/plain".into())],
                remote_endpoint: Some(("10.0.0.1".into(), 4000)),
                body: true,
            }),
        };
        let text = inline.encode();
        assert!(text.contains("\"method\":\"POST\"") && text.contains("\"body\":true"));
        assert_eq!(decode(&text).unwrap(), Command::Request(inline));
        let bare = Request {
            address: "ws://h:1/x?sb-hc-action=request".into(),
            id: "j".into(),
            http: None,
        };
        let text = bare.encode();
        // Neither `method` nor `body`: .NET and hyco-https both see the rendezvous form.
        assert!(!text.contains("method") && !text.contains("body"));
        assert_eq!(decode(&text).unwrap(), Command::Request(bare));
    }

    #[test]
    fn responses_as_listeners_send_them() {
        // hyco-https: lower-case names, numeric values; the doc's example: a string status.
        let r = decode(
            r#"{"response":{"requestId":"r1","statusCode":"201","statusDescription":"Made","responseHeaders":{"content-length":5,"x":["a","b"]},"body":true}}"#,
        )
        .unwrap();
        let Command::Response(r) = r else { panic!() };
        assert_eq!(r.status_code, 201);
        assert_eq!(r.status_description.as_deref(), Some("Made"));
        assert_eq!(
            r.response_headers,
            vec![("content-length".into(), "5".into()), ("x".into(), "a, b".into())]
        );
        assert!(r.body);
        assert_eq!(decode(&r.encode()).unwrap(), Command::Response(r));
        let minimal = decode(r#"{"response":{"requestId":"r","statusCode":204}}"#).unwrap();
        let Command::Response(m) = minimal else { panic!() };
        assert!(!m.body && m.response_headers.is_empty() && m.status_description.is_none());
        for bad in [
            r#"{"response":{"requestId":"r","statusCode":99}}"#,
            r#"{"response":{"requestId":"r","statusCode":70000}}"#,
            r#"{"response":{"requestId":"r"}}"#,
            r#"{"response":{"statusCode":200}}"#,
            r#"{"response":{"requestId":"r","statusCode":200,"body":"yes"}}"#,
        ] {
            assert!(matches!(decode(bad), Err(ControlError::BadField { .. })), "{bad}");
        }
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
