//! What every client of a relay needs (hcm, bridge, CLI): tokens from a connection string,
//! `$hc` URLs, the runtime-information GET, and the rate that sizes warm connections.

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
    mint(cs, entity, sas::unix_now() + ttl.as_secs())
}

/// A token for `entity` that expires at `expires` (Unix seconds), or the connection
/// string's own token.
fn mint(cs: &ConnectionString, entity: &str, expires: u64) -> String {
    match &cs.credential {
        Credential::Key { name, key } => {
            let resource = format!("http://{}/{}", cs.endpoint.host, entity);
            sas::create_token(&resource, name, key.expose(), expires)
        }
        Credential::Token(t) => t.expose().to_owned(),
    }
}

/// A cached token is handed out for at most this long after it was minted (and half its
/// TTL): a relay whose clock runs ahead of ours is tolerated as far as for a fresh token,
/// less this.
pub const TOKEN_REUSE_AT_MOST: Duration = Duration::from_secs(300);
/// ... and only while at least this much of its life is left: a pooled rendezvous waits up
/// to a minute before its token is checked again, at the relay, when a sender takes it.
pub const TOKEN_REUSE_MIN_LEFT: Duration = Duration::from_secs(120);

/// The token for new connections of one hybrid connection, minted once and handed out
/// again for a while ([`TOKEN_REUSE_AT_MOST`] or half the TTL, while
/// [`TOKEN_REUSE_MIN_LEFT`] of its life is left). Without it the bridge's upgrade per app
/// connection and the hcm's pooled rendezvous each paid an HMAC and half a dozen
/// allocations for a token that differs only in its expiry. Keyed by all that goes into a token - the
/// connection string (relay, rule, key), the entity and the TTL - so a rotated key or
/// another relay mints afresh. A renewal (`renewToken`) wants a fresh expiry and uses
/// [`token`].
#[derive(Debug, Default)]
pub struct TokenCache(std::sync::Mutex<Option<CachedToken>>);

#[derive(Debug)]
struct CachedToken {
    cs: ConnectionString,
    entity: String,
    ttl: Duration,
    expires: u64,
    token: String,
}

impl TokenCache {
    /// A token for `entity` valid for `ttl`, or one minted for the same within the reuse
    /// window.
    pub fn token(&self, cs: &ConnectionString, entity: &str, ttl: Duration) -> String {
        self.token_at(cs, entity, ttl, sas::unix_now())
    }

    fn token_at(&self, cs: &ConnectionString, entity: &str, ttl: Duration, now: u64) -> String {
        if !matches!(cs.credential, Credential::Key { .. }) {
            return token(cs, entity, ttl); // the connection string's own token
        }
        let reuse_for = (ttl.as_secs() / 2).min(TOKEN_REUSE_AT_MOST.as_secs());
        let need_left = (ttl.as_secs() - reuse_for).max(TOKEN_REUSE_MIN_LEFT.as_secs());
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref()
            && c.expires >= now.saturating_add(need_left)
            && c.ttl == ttl
            && c.entity == entity
            && c.cs == *cs
        {
            return c.token.clone();
        }
        let expires = now + ttl.as_secs();
        let token = mint(cs, entity, expires);
        *cached = Some(CachedToken {
            cs: cs.clone(),
            entity: entity.to_owned(),
            ttl,
            expires,
            token: token.clone(),
        });
        token
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

/// How many events of a running count fell in about the last second, for sizing the
/// hcm's rendezvous pool and the bridge's warm queue: the count is sampled on a fixed
/// tick only, so the window stays a second however often the sizing task is woken in
/// between (each used connection wakes it).
#[derive(Debug)]
pub(crate) struct LastSecond {
    samples: std::collections::VecDeque<u64>,
    len: usize,
}

impl LastSecond {
    /// A window of one second of `tick`s.
    pub fn new(tick: Duration) -> Self {
        let len = (Duration::from_secs(1).as_millis() / tick.as_millis().max(1)).max(1) as usize;
        Self {
            samples: std::collections::VecDeque::with_capacity(len + 1),
            len,
        }
    }

    /// The events since the oldest sample, given the count now; `ticked`: this is a tick,
    /// and `total` becomes a sample.
    pub fn rate(&mut self, total: u64, ticked: bool) -> u64 {
        if ticked {
            self.samples.push_back(total);
            if self.samples.len() > self.len {
                self.samples.pop_front();
            }
        }
        total.saturating_sub(self.samples.front().copied().unwrap_or(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wake-ups between ticks (one per used connection) leave the window a second long:
    /// before, each one was a sample, and at hundreds of tunnels a second the "last
    /// second" was the last few wake-ups, so pools and warm queues stayed at their minimum.
    #[test]
    fn the_last_second_is_a_second_of_ticks_whatever_wakes_in_between() {
        let mut w = LastSecond::new(Duration::from_millis(250));
        let mut total = 0;
        for _ in 0..4 {
            assert_eq!(w.rate(total, true), total);
            // 100 events between ticks, each waking the task.
            for _ in 0..100 {
                total += 1;
                w.rate(total, false);
            }
        }
        assert_eq!(w.rate(total, true), 300, "the three ticks before this one");
        for _ in 0..4 {
            w.rate(total, true);
        }
        assert_eq!(w.rate(total, false), 0, "quiet for a second");
    }

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

    /// A cached token is handed out again for at most five minutes (half a short TTL) while
    /// two minutes of it are left, only for the same connection string, entity and TTL; the
    /// shortest TTL mints every time; a connection string's own token passes through.
    #[test]
    fn cached_tokens_are_reused_only_while_fresh_and_for_what_they_were_minted() {
        let cs = |key: &str, host: &str| {
            ConnectionString::parse(&format!(
                "Endpoint=sb://{host}/;SharedAccessKeyName=r;SharedAccessKey={key}"
            ))
            .unwrap()
        };
        let (a, hour) = (cs("k", "relay"), Duration::from_secs(3600));
        let cache = TokenCache::default();
        let t0 = 1_000_000;
        let first = cache.token_at(&a, "hc", hour, t0);
        assert_eq!(sas::SasToken::parse(&first).unwrap().expiry, t0 + 3600);
        assert_eq!(
            cache.token_at(&a, "hc", hour, t0 + 300),
            first,
            "within five minutes: reused"
        );
        let later = cache.token_at(&a, "hc", hour, t0 + 301);
        assert_ne!(later, first, "after five minutes: minted afresh");
        assert_eq!(sas::SasToken::parse(&later).unwrap().expiry, t0 + 301 + 3600);
        // Anything that goes into the token mints afresh, and is signed with the new key.
        let other = cache.token_at(&a, "other", hour, t0 + 302);
        assert_eq!(sas::SasToken::parse(&other).unwrap().resource, "http://relay/other");
        let rotated = cache.token_at(&cs("k2", "relay"), "other", hour, t0 + 303);
        assert!(sas::SasToken::parse(&rotated).unwrap().signed_with("k2"));
        let moved = cache.token_at(&cs("k2", "relay2"), "other", hour, t0 + 304);
        assert_eq!(sas::SasToken::parse(&moved).unwrap().resource, "http://relay2/other");
        // A TTL of four minutes: reused for two, while two are left.
        let four = Duration::from_secs(240);
        let short = cache.token_at(&a, "hc", four, t0);
        assert_eq!(sas::SasToken::parse(&short).unwrap().expiry, t0 + 240);
        assert_eq!(cache.token_at(&a, "hc", four, t0 + 120), short);
        assert_ne!(cache.token_at(&a, "hc", four, t0 + 121), short);
        // The minimum TTL (60 s) leaves less than two minutes: never reused.
        let minute = Duration::from_secs(60);
        let m1 = cache.token_at(&a, "hc", minute, t0);
        let m2 = cache.token_at(&a, "hc", minute, t0);
        assert_eq!(sas::SasToken::parse(&m2).unwrap().expiry, t0 + 60);
        assert_eq!(m1, m2, "the same second mints the same token");
        assert_ne!(cache.token_at(&a, "hc", minute, t0 + 1), m1);
        // A connection string that carries a token: that token, always.
        let own = ConnectionString::parse(
            "Endpoint=sb://relay/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=r",
        )
        .unwrap();
        assert_eq!(
            cache.token_at(&own, "hc", hour, t0),
            "SharedAccessSignature sr=x&sig=y&se=1&skn=r"
        );
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
