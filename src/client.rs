//! What every client of a relay needs (hcm, bridge, CLI): tokens from a connection string,
//! `$hc` URLs, and the runtime-information GET.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::utf8_percent_encode;

use crate::proto::connstr::{ConnectionString, Credential};
use crate::proto::metadata::RuntimeInfo;
use crate::proto::sas::{self, URI_COMPONENT};
use crate::transport::http::Request;
use crate::transport::proxy::ProxyConfig;
use crate::transport::ws::WsUrl;

/// A token for `entity` valid for `ttl` (or the connection string's own token).
pub fn token(cs: &ConnectionString, entity: &str, ttl: Duration) -> String {
    match &cs.credential {
        Credential::Key { name, key } => {
            let resource = format!("http://{}/{}", cs.endpoint.host, entity);
            sas::create_token(&resource, name, key.expose(), sas::unix_now() + ttl.as_secs())
        }
        Credential::Token(t) => t.expose().to_owned(),
    }
}

/// Encodes an entity path for a URL, keeping its `/` separators.
pub fn encode_path(entity: &str) -> String {
    entity
        .split('/')
        .map(|s| utf8_percent_encode(s, URI_COMPONENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// `ws(s)://host:port/$hc/{entity}?sb-hc-action={action}&sb-hc-id={id}`.
pub fn hc_url(cs: &ConnectionString, entity: &str, action: &str, id: &str) -> WsUrl {
    WsUrl {
        tls: cs.endpoint.tls,
        host: cs.endpoint.host.clone(),
        port: cs.endpoint.port,
        target: format!(
            "/$hc/{}?sb-hc-action={action}&sb-hc-id={}",
            encode_path(entity),
            utf8_percent_encode(id, URI_COMPONENT)
        ),
    }
}

/// Why the runtime-information GET failed.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("cannot reach the relay: {0}")]
    Unreachable(#[from] crate::transport::ws::ConnectError),
    #[error("the relay refused the credentials: {status} {reason}")]
    Auth { status: u16, reason: String },
    #[error("hybrid connection {0:?} does not exist on the relay")]
    NotFound(String),
    #[error("unexpected answer from the relay: {0}")]
    Unexpected(String),
}

/// `GET /{entity}?api-version=2016-07`: the entity's metadata and listener count.
pub async fn runtime_info(
    cs: &ConnectionString,
    entity: &str,
    tls: &Arc<rustls::ClientConfig>,
    proxy: &ProxyConfig,
    timeout: Duration,
) -> Result<RuntimeInfo, InfoError> {
    let token = token(cs, entity, Duration::from_secs(600));
    let target = format!("/{}?api-version=2016-07", encode_path(entity));
    let resp = crate::transport::http::request(
        &cs.endpoint,
        Some(tls),
        proxy,
        Request {
            method: "GET",
            target: &target,
            headers: &[("Authorization", &token), ("X-PROCESS-AT", "ServiceBus")],
            body: b"",
        },
        timeout,
    )
    .await?;
    match resp.head.status {
        200 => RuntimeInfo::from_atom(&String::from_utf8_lossy(&resp.body)).map_err(InfoError::Unexpected),
        401 | 403 => Err(InfoError::Auth {
            status: resp.head.status,
            reason: resp.head.reason,
        }),
        404 | 204 => Err(InfoError::NotFound(entity.to_owned())),
        s => Err(InfoError::Unexpected(format!("{s} {}", resp.head.reason))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_tokens() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://relay:9443/;SharedAccessKeyName=r;SharedAccessKey=k;EntityPath=a b/c",
        )
        .unwrap();
        let u = hc_url(&cs, "a b/c", "listen", "x");
        assert_eq!(u.target, "/$hc/a%20b/c?sb-hc-action=listen&sb-hc-id=x");
        assert_eq!((u.tls, u.port), (true, 9443));
        let t = sas::SasToken::parse(&token(&cs, "a b/c", Duration::from_secs(60))).unwrap();
        assert_eq!(t.resource, "http://relay/a b/c");
        assert!(t.signed_with("k"));
    }
}

/// Client of the relay's management API (`hyrelay hc ...`).
#[derive(Debug, Clone)]
pub struct Management {
    cs: ConnectionString,
    tls: Arc<rustls::ClientConfig>,
    proxy: ProxyConfig,
    timeout: Duration,
}

/// A management call failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("cannot reach the relay: {0}")]
    Unreachable(#[from] crate::transport::ws::ConnectError),
    #[error("relay answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("relay sent malformed JSON: {0}")]
    BadJson(String),
}

impl Management {
    /// `cs` must carry a Manage key (namespace-wide, e.g. RootManageSharedAccessKey).
    pub fn new(cs: ConnectionString, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            cs,
            tls,
            proxy: ProxyConfig::default(),
            timeout: Duration::from_secs(20),
        }
    }

    /// Reaches the relay through `proxy` (default: directly).
    pub fn with_proxy(mut self, proxy: ProxyConfig) -> Self {
        self.proxy = proxy;
        self
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ManagementError> {
        let token = token(&self.cs, "", Duration::from_secs(300));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("Authorization", token.as_str())];
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        let target = format!("{}{path}", crate::proto::address::MGMT_API_PREFIX);
        let resp = crate::transport::http::request(
            &self.cs.endpoint,
            Some(&self.tls),
            &self.proxy,
            Request {
                method,
                target: &target,
                headers: &headers,
                body: body.as_bytes(),
            },
            self.timeout,
        )
        .await?;
        let value: serde_json::Value = if resp.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&resp.body).map_err(|e| ManagementError::BadJson(e.to_string()))?
        };
        if (200..300).contains(&resp.head.status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or(resp.head.reason);
            Err(ManagementError::Refused {
                status: resp.head.status,
                message,
            })
        }
    }

    fn name_segment(name: &str) -> String {
        format!("/{}", utf8_percent_encode(name, URI_COMPONENT))
    }

    pub async fn list(&self) -> Result<serde_json::Value, ManagementError> {
        self.call("GET", "", None).await
    }

    pub async fn create(
        &self,
        name: &str,
        endpoint: Option<&str>,
        requires_client_authorization: bool,
    ) -> Result<serde_json::Value, ManagementError> {
        let body = serde_json::json!({ "name": name, "endpoint": endpoint, "requiresClientAuthorization": requires_client_authorization });
        self.call("POST", "", Some(body)).await
    }

    pub async fn show(&self, name: &str) -> Result<serde_json::Value, ManagementError> {
        self.call("GET", &Self::name_segment(name), None).await
    }

    pub async fn delete(&self, name: &str) -> Result<(), ManagementError> {
        self.call("DELETE", &Self::name_segment(name), None).await.map(|_| ())
    }

    /// `secondary` picks the key; `rule` limits it to one rule (default: both).
    pub async fn regenerate_key(
        &self,
        name: &str,
        secondary: bool,
        rule: Option<&str>,
    ) -> Result<serde_json::Value, ManagementError> {
        let body = serde_json::json!({ "key": if secondary { "secondary" } else { "primary" }, "rule": rule });
        self.call(
            "POST",
            &format!("{}/regenerate-key", Self::name_segment(name)),
            Some(body),
        )
        .await
    }

    /// The Listen (`send == false`) or Send connection string of `name`.
    pub async fn connection_string(
        &self,
        name: &str,
        send: bool,
        secondary: bool,
    ) -> Result<ConnectionString, ManagementError> {
        let path = format!(
            "{}/connection-string?right={}&key={}",
            Self::name_segment(name),
            if send { "send" } else { "listen" },
            if secondary { "secondary" } else { "primary" }
        );
        let v = self.call("GET", &path, None).await?;
        let s = v
            .get("connectionString")
            .and_then(|s| s.as_str())
            .ok_or_else(|| ManagementError::BadJson("no connectionString".into()))?;
        ConnectionString::parse(s).map_err(|e| ManagementError::BadJson(e.to_string()))
    }
}
