//! Plain HTTP on the relay: the runtime-information GET (hc-protocol.md §8.1) and the
//! management API.
//!
//! Management API (JSON, Manage right, token in `Authorization` or `ServiceBusAuthorization`;
//! `{name}` is one percent-encoded path segment, so `a/b` is `a%2Fb`):
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/$hyrelay/v1/hybrid-connections` | list with status |
//! | POST | `/$hyrelay/v1/hybrid-connections` | create: `{"name", "endpoint", "requiresClientAuthorization"}` |
//! | GET | `/$hyrelay/v1/hybrid-connections/{name}` | show, with rules and keys |
//! | DELETE | `/$hyrelay/v1/hybrid-connections/{name}` | delete (listeners get 1001) |
//! | POST | `/$hyrelay/v1/hybrid-connections/{name}/regenerate-key` | `{"key": "primary"\|"secondary", "rule"?}` |
//! | GET | `/$hyrelay/v1/hybrid-connections/{name}/connection-string?right=listen\|send&key=primary\|secondary` | |

use bytes::BytesMut;
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

use super::Ctx;
use super::auth::{Demand, authorize};
use super::conn::{Incoming, respond, send_and_close};
use super::control::{EntityView, KeySlot, MgmtOp, MgmtReply};
use super::store::{LISTEN_RULE, SEND_RULE, StoreError};
use crate::clock::rfc3339;
use crate::proto::address::PlainRequest;
use crate::proto::connstr::{ConnectionString, Credential};
use crate::proto::handshake::{self, RequestHead};
use crate::proto::metadata::{self, RuntimeInfo};
use crate::proto::sas::{Rights, unix_now};
use crate::transport::Stream;

pub use crate::proto::address::MGMT_API_PREFIX as API_PREFIX;
/// Largest request body the API reads. Default: 64 KiB.
const MAX_BODY: usize = 64 * 1024;

pub(super) async fn serve(mut stream: Stream, mut inc: Incoming, req: PlainRequest, ctx: Arc<Ctx>) {
    let peer = inc.peer;
    let raw = req.raw_path.as_str();
    let lower = raw.to_ascii_lowercase();
    let is_api = lower.starts_with("/$hyrelay/") || lower.starts_with("/%24hyrelay/");
    // HEAD anywhere, and every plain request that is not the API or the runtime-information
    // GET, is served by hyper (HTTP mode): its answers to HEAD never carry a body.
    if inc.head.method == "HEAD" {
        return super::http::serve(stream, inc, ctx).await;
    }
    if is_api {
        let body = match read_body(&mut stream, &mut inc.buf, &inc.head).await {
            Ok(b) => b,
            Err((status, msg)) => return respond(&mut stream, status, msg, "").await,
        };
        let (status, value) = api(&mut inc, &req, &body, &ctx).await;
        let head = &inc.head;
        tracing::debug!(%peer, method = %head.method, path = %req.path, status, "management request");
        return json_response(&mut stream, status, &value).await;
    }
    let head = &inc.head;
    let wants_info = req.query.iter().any(|(k, _)| k.eq_ignore_ascii_case("api-version"));
    let state = ctx.state.load();
    let resolved = state.resolve(&req.path).map(|(e, s)| (e.clone(), s.is_empty()));
    match resolved {
        Some((entity, true)) if head.method == "GET" && wants_info => {
            let hosts = ctx.hosts();
            let tokens = auth_headers(head);
            let demand = Demand {
                entity: Some(&entity),
                path: &entity.name,
                hosts,
                right: Rights::default(),
                now: unix_now(),
            };
            if let Err(e) = authorize(&state, &tokens, &demand) {
                inc.auth_failed(&ctx, &e);
                return xml_error(&mut stream, e.status(), &e.to_string()).await;
            }
            drop(state);
            inc.pending.done();
            let listeners = match ctx.ctl.manage(MgmtOp::Show(entity.name.clone())).await {
                Ok(MgmtReply::Entity(v)) => v.listeners.len() as u32,
                _ => 0,
            };
            let info = RuntimeInfo {
                created_at: entity.created_at.clone(),
                updated_at: entity.updated_at.clone(),
                requires_client_authorization: entity.requires_client_authorization,
                user_metadata: entity.user_metadata.clone(),
                listener_count: listeners,
            };
            let base = ctx.public_endpoint(head.headers.get("Host"));
            let base = format!("https://{}", base.authority());
            let body = info.to_atom(&base, &entity.name);
            let bytes = handshake::response(200, "OK", metadata::ATOM_ENTRY_CONTENT_TYPE, body.as_bytes());
            send_and_close(&mut stream, &bytes).await;
        }
        None if wants_info && head.method == "GET" => xml_error(&mut stream, 404, "Endpoint does not exist.").await,
        _ => {
            drop(state);
            super::http::serve(stream, inc, ctx).await;
        }
    }
}

fn auth_headers(head: &RequestHead) -> Vec<&str> {
    ["Authorization", "ServiceBusAuthorization"]
        .iter()
        .filter_map(|h| head.headers.get(h))
        .collect()
}

async fn read_body(
    stream: &mut Stream,
    buf: &mut BytesMut,
    head: &RequestHead,
) -> Result<Vec<u8>, (u16, &'static str)> {
    let len = match head.headers.get("Content-Length") {
        None => return Ok(Vec::new()),
        Some(v) => v.trim().parse::<usize>().map_err(|_| (400, "Bad Content-Length"))?,
    };
    if len > MAX_BODY {
        return Err((413, "Payload Too Large"));
    }
    let read = async {
        while buf.len() < len {
            if stream.read_buf(buf).await.map_err(|_| (400, "Body read failed"))? == 0 {
                return Err((400, "Body shorter than Content-Length"));
            }
        }
        Ok(buf.split_to(len).to_vec())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .map_err(|_| (408, "Request Timeout"))?
}

async fn json_response(stream: &mut Stream, status: u16, v: &Value) {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = if status == 204 {
        Vec::new()
    } else {
        serde_json::to_vec_pretty(v).unwrap_or_default()
    };
    let bytes = handshake::response(status, reason, "application/json", &body);
    send_and_close(stream, &bytes).await;
}

async fn xml_error(stream: &mut Stream, status: u16, detail: &str) {
    let body = format!(
        "<Error><Code>{status}</Code><Detail>{}</Detail></Error>",
        metadata::xml_escape(detail)
    );
    let bytes = handshake::response(
        status,
        &handshake::sanitize_header_value(detail),
        "application/xml; charset=utf-8",
        body.as_bytes(),
    );
    send_and_close(stream, &bytes).await;
}

fn error(status: u16, msg: impl Into<String>) -> (u16, Value) {
    (status, json!({ "error": msg.into() }))
}

fn store_error(e: StoreError) -> (u16, Value) {
    let status = match e {
        StoreError::NotFound(_) => 404,
        StoreError::Exists(_) => 409,
        StoreError::Invalid(_) => 400,
        StoreError::Quota(_) => 403,
        StoreError::Io(_) => 500,
        StoreError::Unavailable(_) => 503,
    };
    error(status, e.to_string())
}

/// Routes an API request; returns status and JSON body.
async fn api(inc: &mut Incoming, req: &PlainRequest, body: &[u8], ctx: &Ctx) -> (u16, Value) {
    let head = &inc.head;
    let mut parts = req.raw_path.splitn(4, '/').skip(2);
    let (version, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let Some(rest) = rest.strip_prefix("hybrid-connections").filter(|_| version == "v1") else {
        return error(404, "unknown management path");
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let name = match segs.first().map(|s| crate::proto::address::decode(s)) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(400, "bad hybrid connection name encoding"),
        None => None,
    };
    // Authorize: Manage on the namespace, or on the entity addressed.
    {
        let state = ctx.state.load();
        let entity = name.as_deref().and_then(|n| state.entity(n));
        let hosts = ctx.hosts();
        let demand = Demand {
            entity,
            path: name.as_deref().unwrap_or(""),
            hosts,
            right: Rights::MANAGE,
            now: unix_now(),
        };
        if let Err(e) = authorize(&state, &auth_headers(head), &demand) {
            inc.auth_failed(ctx, &e);
            return error(e.status(), e.to_string());
        }
    }
    inc.pending.done();
    let method = head.method.as_str();
    let result = match (method, name, segs.get(1).copied(), segs.len()) {
        ("GET", None, _, 0) => ctx.ctl.manage(MgmtOp::List).await,
        ("POST", None, _, 0) => match parse_create(body) {
            Ok(op) => ctx.ctl.manage(op).await,
            Err(e) => return error(400, e),
        },
        ("GET", Some(n), None, 1) => ctx.ctl.manage(MgmtOp::Show(n)).await,
        ("DELETE", Some(n), None, 1) => ctx.ctl.manage(MgmtOp::Delete(n)).await,
        ("POST", Some(n), Some("regenerate-key"), 2) => match parse_regenerate(n, body) {
            Ok(op) => ctx.ctl.manage(op).await,
            Err(e) => return error(400, e),
        },
        ("GET", Some(n), Some("connection-string"), 2) => {
            return connection_string(ctx, head, req, &n).await;
        }
        (_, _, _, _) if segs.len() <= 2 => return error(405, format!("{method} is not allowed here")),
        _ => return error(404, "unknown management path"),
    };
    match result {
        Ok(MgmtReply::List(views)) => (200, Value::Array(views.iter().map(|v| view_json(v, false)).collect())),
        Ok(MgmtReply::Entity(v)) => (
            if method == "POST" && segs.is_empty() { 201 } else { 200 },
            with_senders(view_json(&v, true), ctx),
        ),
        Ok(MgmtReply::Deleted) => {
            if let Some(n) = segs.first() {
                ctx.usage.forget(&crate::proto::address::decode(n).unwrap_or_default());
            }
            (204, Value::Null)
        }
        Err(e) => store_error(e),
    }
}

fn parse_create(body: &[u8]) -> Result<MgmtOp, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or("field `name` is required")?
        .to_owned();
    let endpoint = match v.get("endpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse().map_err(|e| format!("field `endpoint`: {e}"))?),
        Some(_) => return Err("field `endpoint` must be a string HOST:PORT".into()),
    };
    let rca = match v.get("requiresClientAuthorization") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field `requiresClientAuthorization` must be a boolean".into()),
    };
    Ok(MgmtOp::Create {
        name,
        endpoint,
        requires_client_authorization: rca,
    })
}

fn parse_regenerate(name: String, body: &[u8]) -> Result<MgmtOp, String> {
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?
    };
    let slot = match v.get("key").and_then(Value::as_str) {
        Some("primary") => KeySlot::Primary,
        Some("secondary") => KeySlot::Secondary,
        _ => return Err("field `key` must be \"primary\" or \"secondary\"".into()),
    };
    let rule = v.get("rule").and_then(Value::as_str).map(str::to_owned);
    Ok(MgmtOp::RegenerateKey { name, slot, rule })
}

async fn connection_string(ctx: &Ctx, head: &RequestHead, req: &PlainRequest, name: &str) -> (u16, Value) {
    let q = |k: &str| req.query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let rule_name = match q("right") {
        Some("listen") => LISTEN_RULE,
        Some("send") => SEND_RULE,
        _ => return error(400, "query `right` must be listen or send"),
    };
    let secondary = match q("key").unwrap_or("primary") {
        "primary" => false,
        "secondary" => true,
        _ => return error(400, "query `key` must be primary or secondary"),
    };
    let state = ctx.state.load();
    let Some(entity) = state.entity(name) else {
        return error(404, format!("hybrid connection {name:?} does not exist"));
    };
    let Some(rule) = entity.rule(rule_name) else {
        return error(404, format!("hybrid connection {name:?} has no rule {rule_name}"));
    };
    let cs = ConnectionString {
        endpoint: ctx.public_endpoint(head.headers.get("Host")),
        credential: Credential::Key {
            name: rule.key_name.clone(),
            key: if secondary {
                rule.secondary_key.clone()
            } else {
                rule.primary_key.clone()
            },
        },
        entity_path: Some(entity.name.clone()),
    };
    (200, json!({ "connectionString": cs.expose() }))
}

/// Adds the hybrid connection's recent senders (this relay node's; issue 14 item 10).
fn with_senders(mut v: Value, ctx: &Ctx) -> Value {
    let name = v["name"].as_str().unwrap_or_default().to_owned();
    v["senders"] = ctx.usage.senders(&name).iter().map(|s| s.to_json()).collect();
    v
}

/// JSON for an entity; `with_keys` adds rules and keys (show only).
pub fn view_json(v: &EntityView, with_keys: bool) -> Value {
    let e = &v.entity;
    let mut out = json!({
        "name": e.name,
        "endpoint": e.endpoint().map(|h| h.to_string()),
        "requiresClientAuthorization": e.requires_client_authorization,
        "createdAt": e.created_at,
        "updatedAt": e.updated_at,
        "status": if v.listeners.is_empty() { "Not connected" } else { "Connected" },
        "listenerCount": v.listeners.len(),
        "activeTunnels": v.active_tunnels,
        "lastSenderConnect": v.last_connect.as_ref().map(|c| json!({
            "at": rfc3339(c.at), "result": c.result, "detail": c.detail,
        })),
        "listeners": v.listeners.iter().map(|l| json!({
            "id": l.id,
            "node": l.node,
            "remoteAddress": l.remote.map(|a| a.to_string()),
            "connectedAt": rfc3339(l.connected_at),
            "activeTunnels": l.active_tunnels,
        })).collect::<Vec<_>>(),
    });
    if with_keys {
        out["rules"] = e
            .rules
            .iter()
            .map(|r| {
                json!({
                    "keyName": r.key_name,
                    "rights": r.rights.names(),
                    "primaryKey": r.primary_key.expose(),
                    "secondaryKey": r.secondary_key.expose(),
                })
            })
            .collect();
    }
    out
}
