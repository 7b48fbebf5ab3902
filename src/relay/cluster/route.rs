//! Messages between nodes: a node whose sender (or HTTP request) goes to a listener on
//! another node asks that node to hand the listener a command, and gets an answer.
//!
//! Each node subscribes to its own channel, `{p}:to:<node id>`. A request is one PUBLISH
//! from the asking node, the answer one PUBLISH back: two Redis commands per routed tunnel.
//! PUBLISH returns how many subscribers got the message, so a request to a node that is
//! gone (0) fails at once; one that is not answered within `route_timeout` counts as
//! failed too, and the asking node tries another listener.
//!
//! The wire form is explicit JSON, written and read here field by field:
//! `{"t":"deliver","from":N,"req":R,"hc":H,"key":K,"text":T}` and
//! `{"t":"ack","req":R,"ok":bool[,"why":W]}`.

use serde_json::{Value, json};

/// The channel a node listens on.
pub fn channel(prefix: &str, node: &str) -> String {
    format!("{{{prefix}}}:to:{node}")
}

/// A message between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Hand listener `key` of `hc` on the receiving node this command.
    Deliver {
        from: String,
        req: u64,
        hc: String,
        key: u64,
        /// The JSON text of the command (`accept`, or an HTTP `request` in its
        /// rendezvous-only form: no body ever crosses between nodes).
        text: String,
    },
    /// The answer to request `req`.
    Ack { req: u64, ok: bool, why: Option<String> },
}

/// Why a node could not hand a command over (the `why` of a negative ack).
pub const WHY_GONE: &str = "gone";
pub const WHY_BUSY: &str = "busy";

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Deliver {
                from,
                req,
                hc,
                key,
                text,
            } => json!({"t": "deliver", "from": from, "req": req, "hc": hc, "key": key, "text": text}).to_string(),
            Message::Ack { req, ok, why } => {
                let mut v = json!({"t": "ack", "req": req, "ok": ok});
                if let Some(w) = why {
                    v["why"] = w.as_str().into();
                }
                v.to_string()
            }
        }
    }

    /// `None` for anything that is not a well-formed message (ignored by the caller).
    pub fn decode(text: &str) -> Option<Message> {
        let v: Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        match v.get("t")?.as_str()? {
            "deliver" => Some(Message::Deliver {
                from: s("from")?,
                req: n("req")?,
                hc: s("hc")?,
                key: n("key")?,
                text: s("text")?,
            }),
            "ack" => Some(Message::Ack {
                req: n("req")?,
                ok: v.get("ok")?.as_bool()?,
                why: s("why"),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_ignored() {
        let d = Message::Deliver {
            from: "n1".into(),
            req: 7,
            hc: "db".into(),
            key: 3,
            text: r#"{"accept":{"address":"ws://n1/$hc/db?x"}}"#.into(),
        };
        assert_eq!(Message::decode(&d.encode()), Some(d));
        let a = Message::Ack {
            req: 7,
            ok: false,
            why: Some(WHY_BUSY.into()),
        };
        assert_eq!(Message::decode(&a.encode()), Some(a));
        for bad in [
            "",
            "{}",
            r#"{"t":"deliver"}"#,
            r#"{"t":"ack","req":"x","ok":true}"#,
            "[1]",
        ] {
            assert_eq!(Message::decode(bad), None, "{bad}");
        }
        assert_eq!(channel("hyrelay", "n-2:443"), "{hyrelay}:to:n-2:443");
    }
}
