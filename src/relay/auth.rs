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
    /// No usable token, bad signature, unknown key name, expired: HTTP 401.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the right or scope for this request: HTTP 403.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Unauthorized(_) => 401,
            AuthError::Forbidden(_) => 403,
        }
    }
}

/// A token that passed.
#[derive(Debug, Clone)]
pub struct Granted {
    /// Expiry of the token, Unix seconds.
    pub expiry: u64,
    pub key_name: String,
}

/// What is being asked for.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    /// The entity addressed, if any (namespace-level management has none).
    pub entity: Option<&'a Entity>,
    /// Decoded path addressed, without leading `/` (entity name plus suffix, or "").
    pub path: &'a str,
    /// Host names this namespace answers to (lower-case, no port).
    pub hosts: &'a [String],
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
    Err(first_err.unwrap_or_else(|| AuthError::Unauthorized("The security token is missing.".into())))
}

fn check(state: &State, token: &str, d: &Demand<'_>) -> Result<Granted, AuthError> {
    let unauthorized = |m: &str| AuthError::Unauthorized(m.to_owned());
    let t = SasToken::parse(token)
        .map_err(|e| AuthError::Unauthorized(format!("The security token is malformed: {e}.")))?;
    // An entity rule only exists on the entity the path resolved to, so "the target is
    // inside that entity" (§3.3) holds by construction.
    let rule = find_rule(state, d.entity, &t.key_name)
        .ok_or_else(|| unauthorized("The token has an invalid signature (unknown key name)."))?;
    if !(t.signed_with(rule.primary_key.expose()) || t.signed_with(rule.secondary_key.expose())) {
        return Err(unauthorized("The token has an invalid signature."));
    }
    if t.expired_at(d.now) {
        return Err(unauthorized("The token is expired."));
    }
    let scope = Scope::from_resource(&t.resource)
        .ok_or_else(|| AuthError::Forbidden("The token's audience is not a URI.".into()))?;
    if !d.hosts.contains(&scope.host) {
        return Err(AuthError::Forbidden(format!(
            "The token's audience host {:?} is not this namespace.",
            scope.host
        )));
    }
    if !scope.covers(d.path) {
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
    })
}

fn find_rule<'a>(state: &'a State, entity: Option<&'a Entity>, name: &str) -> Option<&'a Rule> {
    entity.and_then(|e| e.rule(name)).or_else(|| state.namespace_rule(name))
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

    fn demand<'a>(st: &'a State, right: Rights, hosts: &'a [String]) -> Demand<'a> {
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
        let hosts = vec!["ns".to_owned()];
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
    fn scope_rules() {
        let st = setup();
        let hosts = vec!["ns".to_owned()];
        let root = token(&st, ROOT_RULE, "http://ns/", false, 2000);
        assert!(authorize(&st, &[&root], &demand(&st, Rights::MANAGE, &hosts)).is_ok());
        let other_host = token(&st, ROOT_RULE, "http://evil/", false, 2000);
        assert_eq!(
            authorize(&st, &[&other_host], &demand(&st, Rights::SEND, &hosts))
                .unwrap_err()
                .status(),
            403
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
