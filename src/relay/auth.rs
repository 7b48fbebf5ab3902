//! SAS authorization on the relay (hc-protocol.md §3): which token, which rule, which key,
//! which scope, which right.
//!
//! Order of checks: parse → rule by key name (entity rules, then namespace rules) →
//! signature with the primary, then the secondary key (constant time) → expiry → scope
//! (host and path) → right. The first four fail with 401, the last two with 403.

use crate::proto::sas::{Rights, SasToken, Scope};

use super::store::{Entity, Rule, State};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carried no token at all: HTTP 401. Not a guess at a secret, so it does
    /// not count towards the auth-failure delay.
    #[error("The security token is missing.")]
    Missing,
    /// A token that failed: malformed, bad signature, unknown key name, expired: HTTP 401.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the right or scope for this request: HTTP 403.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Unauthorized(_) => 401,
            AuthError::Forbidden(_) => 403,
        }
    }

    /// True if a credential was presented and failed: what the auth-failure delay counts.
    pub fn presented_a_credential(&self) -> bool {
        !matches!(self, AuthError::Missing)
    }
}

/// The host names a relay answers to: a token's audience (`sr`) must name one of them
/// (issue 9 item 13). Lower-case, no port, IPv6 in brackets; `*.example.com` covers one
/// label below `example.com`, as in a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Audience(Vec<String>);

impl Audience {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut v: Vec<String> = names
            .into_iter()
            .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        v.sort();
        v.dedup();
        Self(v)
    }

    /// Whether a token scoped to `host` (lower-case, no port) is for this relay.
    pub fn accepts(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.0.iter().any(|n| match n.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => n == host,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// Where the rule that signed a token lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleScope {
    Namespace,
    Entity,
}

/// A token that passed.
#[derive(Debug, Clone)]
pub struct Granted {
    /// Expiry of the token, Unix seconds.
    pub expiry: u64,
    pub key_name: String,
    /// Where the rule `key_name` was found.
    pub scope: RuleScope,
    /// The key that signed the token, so that a connection held open by it can be closed
    /// when the key is regenerated ([`still_valid`]).
    pub key: crate::proto::Secret,
}

/// Whether the key behind `granted` still exists in `state` for `entity` (the rule is
/// still there and still has that key as its primary or secondary). `Err` says why not.
pub fn still_valid(state: &State, entity: &str, granted: &Granted) -> Result<(), String> {
    let rule = match granted.scope {
        RuleScope::Entity => state.entity(entity).and_then(|e| e.rule(&granted.key_name)),
        RuleScope::Namespace => state.namespace_rule(&granted.key_name),
    };
    let Some(rule) = rule else {
        return Err(format!("The rule '{}' no longer exists.", granted.key_name));
    };
    if rule.primary_key == granted.key || rule.secondary_key == granted.key {
        return Ok(());
    }
    let when = rule
        .revoked
        .iter()
        .find(|r| r.key == granted.key)
        .map(|r| format!(" at {}", r.at))
        .unwrap_or_default();
    Err(format!(
        "The key of rule '{}' this connection authenticated with was regenerated{when}.",
        granted.key_name
    ))
}

/// What is being asked for.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    /// The entity addressed, if any (namespace-level management has none).
    pub entity: Option<&'a Entity>,
    /// Decoded path addressed, without leading `/` (entity name plus suffix, or "").
    pub path: &'a str,
    /// Host names this relay answers to: its configuration, never the request's own
    /// `Host` header.
    pub hosts: &'a Audience,
    /// The right needed.
    pub right: Rights,
    /// Current Unix time.
    pub now: u64,
}

/// Checks candidate tokens (query token, `ServiceBusAuthorization`, …): the first that
/// passes wins; otherwise the error of the first candidate is returned.
pub fn authorize(state: &State, tokens: &[&str], demand: &Demand<'_>) -> Result<Granted, AuthError> {
    let mut first_err = None;
    for t in tokens {
        match check(state, t, demand) {
            Ok(g) => return Ok(g),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or(AuthError::Missing))
}

fn check(state: &State, token: &str, d: &Demand<'_>) -> Result<Granted, AuthError> {
    let unauthorized = |m: &str| AuthError::Unauthorized(m.to_owned());
    let t = SasToken::parse(token)
        .map_err(|e| AuthError::Unauthorized(format!("The security token is malformed: {e}.")))?;
    // An entity rule only exists on the entity the path resolved to, so "the target is
    // inside that entity" (§3.3) holds by construction.
    let (rule, scope) = find_rule(state, d.entity, &t.key_name)
        .ok_or_else(|| unauthorized("The token has an invalid signature (unknown key name)."))?;
    let key = if t.signed_with(rule.primary_key.expose()) {
        rule.primary_key.clone()
    } else if t.signed_with(rule.secondary_key.expose()) {
        rule.secondary_key.clone()
    } else if let Some(r) = rule.revoked.iter().find(|r| t.signed_with(r.key.expose())) {
        // Only to say why: a regenerated key never grants anything.
        return Err(AuthError::Unauthorized(format!(
            "The token has an invalid signature: it was signed with a key of rule '{}' that was regenerated at {}.",
            rule.key_name, r.at
        )));
    } else {
        return Err(unauthorized("The token has an invalid signature."));
    };
    if t.expired_at(d.now) {
        return Err(unauthorized("The token is expired."));
    }
    let audience = Scope::from_resource(&t.resource)
        .ok_or_else(|| AuthError::Forbidden("The token's audience is not a URI.".into()))?;
    // A token minted for another host is not a token for this relay, whatever `Host` the
    // request claims (issue 9 item 13): the list is the relay's own configuration.
    if !d.hosts.accepts(&audience.host) {
        return Err(AuthError::Unauthorized(format!(
            "The token's audience host \"{}\" is not a name this relay answers to.",
            crate::proto::host::escape(&audience.host)
        )));
    }
    if !audience.covers(d.path) {
        return Err(AuthError::Forbidden("The token is not valid for this path.".into()));
    }
    if !rule.rights.contains(d.right) {
        return Err(AuthError::Forbidden(format!(
            "The token's rule '{}' lacks the {} right.",
            rule.key_name,
            d.right.names().join("+")
        )));
    }
    Ok(Granted {
        expiry: t.expiry,
        key_name: t.key_name,
        scope,
        key,
    })
}

fn find_rule<'a>(state: &'a State, entity: Option<&'a Entity>, name: &str) -> Option<(&'a Rule, RuleScope)> {
    entity
        .and_then(|e| e.rule(name))
        .map(|r| (r, RuleScope::Entity))
        .or_else(|| state.namespace_rule(name).map(|r| (r, RuleScope::Namespace)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::sas::create_token;
    use crate::relay::store::{LISTEN_RULE, ROOT_RULE, SEND_RULE, new_entity};

    fn setup() -> State {
        let mut st: State = serde_json::from_value(serde_json::json!({
            "version": 1, "namespaceRules": [], "hybridConnections": {}
        }))
        .unwrap();
        st.namespace_rules.push(Rule::generate(ROOT_RULE, Rights::ALL));
        st.hybrid_connections
            .insert("hc1".into(), new_entity("hc1", None, true));
        st
    }

    fn token(st: &State, rule: &str, uri: &str, secondary: bool, expiry: u64) -> String {
        let r = st
            .entity("hc1")
            .unwrap()
            .rule(rule)
            .or_else(|| st.namespace_rule(rule))
            .unwrap();
        let key = if secondary { &r.secondary_key } else { &r.primary_key };
        create_token(uri, rule, key.expose(), expiry)
    }

    fn demand<'a>(st: &'a State, right: Rights, hosts: &'a Audience) -> Demand<'a> {
        Demand {
            entity: st.entity("hc1"),
            path: "hc1",
            hosts,
            right,
            now: 1000,
        }
    }

    #[test]
    fn the_issue_matrix() {
        let st = setup();
        let hosts = Audience::new(["ns".to_owned()]);
        let listen = token(&st, LISTEN_RULE, "http://ns:443/hc1", false, 2000);
        let send = token(&st, SEND_RULE, "http://ns/hc1", false, 2000);
        assert!(authorize(&st, &[&listen], &demand(&st, Rights::LISTEN, &hosts)).is_ok());
        assert_eq!(
            authorize(&st, &[&send], &demand(&st, Rights::LISTEN, &hosts))
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(
            authorize(&st, &[&listen], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            403
        );
        let secondary = token(&st, SEND_RULE, "sb://ns/hc1/", true, 2000);
        assert!(authorize(&st, &[&secondary], &demand(&st, Rights::SEND, &hosts)).is_ok());
        let expired = token(&st, SEND_RULE, "http://ns/hc1", false, 999);
        assert_eq!(
            authorize(&st, &[&expired], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            401
        );
        let wrong_key = create_token("http://ns/hc1", SEND_RULE, "bm90IHRoZSBrZXk=", 2000);
        assert_eq!(
            authorize(&st, &[&wrong_key], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(
            authorize(&st, &[], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            401
        );
        assert_eq!(
            authorize(&st, &["garbage"], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            401
        );
        // Either candidate may pass.
        assert!(authorize(&st, &[&expired, &send], &demand(&st, Rights::SEND, &hosts)).is_ok());
    }

    #[test]
    fn audience_names_and_wildcards() {
        let a = Audience::new([
            "Relay.Example.com.".to_owned(),
            "*.nodes.example.com".into(),
            "[::1]".into(),
        ]);
        assert!(a.accepts("relay.example.com"));
        assert!(a.accepts("n2.nodes.example.com"));
        assert!(!a.accepts("nodes.example.com"));
        assert!(!a.accepts("a.b.nodes.example.com"));
        assert!(!a.accepts("evil.com"));
        assert!(a.accepts("[::1]"));
    }

    #[test]
    fn a_missing_token_is_not_a_failed_guess() {
        let st = setup();
        let hosts = Audience::new(["ns".to_owned()]);
        let e = authorize(&st, &[], &demand(&st, Rights::SEND, &hosts)).unwrap_err();
        assert_eq!((e.status(), e.presented_a_credential()), (401, false));
        let e = authorize(&st, &["SharedAccessSignature sr=x"], &demand(&st, Rights::SEND, &hosts)).unwrap_err();
        assert!(e.presented_a_credential());
    }

    #[test]
    fn a_regenerated_key_says_so_and_its_holders_are_revalidated() {
        let mut st = setup();
        let hosts = Audience::new(["ns".to_owned()]);
        let old = token(&st, LISTEN_RULE, "http://ns/hc1", false, 2000);
        let granted = authorize(&st, &[&old], &demand(&st, Rights::LISTEN, &hosts)).unwrap();
        assert_eq!(still_valid(&st, "hc1", &granted), Ok(()));
        let e = st.hybrid_connections.get_mut("hc1").unwrap();
        e.rules
            .iter_mut()
            .find(|r| r.key_name == LISTEN_RULE)
            .unwrap()
            .regenerate(false);
        let err = authorize(&st, &[&old], &demand(&st, Rights::LISTEN, &hosts)).unwrap_err();
        assert_eq!(err.status(), 401);
        assert!(err.to_string().contains("regenerated at"), "{err}");
        let why = still_valid(&st, "hc1", &granted).unwrap_err();
        assert!(why.contains("was regenerated at"), "{why}");
    }

    #[test]
    fn scope_rules() {
        let st = setup();
        let hosts = Audience::new(["ns".to_owned()]);
        let root = token(&st, ROOT_RULE, "http://ns/", false, 2000);
        assert!(authorize(&st, &[&root], &demand(&st, Rights::MANAGE, &hosts)).is_ok());
        // Issue 9 item 13: a token for another host is not a token for this relay.
        let other_host = token(&st, ROOT_RULE, "http://evil/", false, 2000);
        assert_eq!(
            authorize(&st, &[&other_host], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            401
        );
        let other_path = token(&st, SEND_RULE, "http://ns/hc2", false, 2000);
        assert_eq!(
            authorize(&st, &[&other_path], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            403
        );
        // An entity rule's key signing a namespace-wide audience still only reaches its entity.
        let broad = token(&st, SEND_RULE, "http://ns/", false, 2000);
        assert!(authorize(&st, &[&broad], &demand(&st, Rights::SEND, &hosts)).is_ok());
        let d = Demand {
            path: "hc1/sub/path",
            ..demand(&st, Rights::SEND, &hosts)
        };
        let ok = token(&st, SEND_RULE, "http://ns/hc1", false, 2000);
        assert!(authorize(&st, &[&ok], &d).is_ok());
    }
}
