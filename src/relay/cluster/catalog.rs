//! The catalog (namespace rules, hybrid connections with their rules, keys and metadata) as
//! it lives in Redis, and the node-local cache of it.
//!
//! Keys, all under one hash tag so they share a slot (`{p}` is the key prefix):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}:id` | string | the cluster's id, made when the catalog was created or imported |
//! | `{p}:version` | integer | bumped by every write |
//! | `{p}:catalog` | hash | `ns` → the namespace rules (JSON), `hc:<lower-cased name>` → an entity (JSON) |
//! | `{p}:events` | channel | `"<version> <field> ..."` after every write |
//!
//! Every write is one Lua script (atomic in Redis): it checks the cluster id and that each
//! field still holds what the writer read (compare-and-set on the raw JSON), writes, bumps
//! the version and publishes the event. A writer that lost a race reloads and tries again.
//! Readers keep the raw JSON of every field, so their compare-and-set compares what Redis
//! holds byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::relay::store::{Entity, Rule, State};

/// The namespace rules' field.
pub const NS_FIELD: &str = "ns";
/// Prefix of an entity's field.
pub const HC_FIELD: &str = "hc:";

/// Names of the catalog's keys for one key prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub id: String,
    pub version: String,
    pub catalog: String,
    pub events: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let k = |s: &str| format!("{{{prefix}}}:{s}");
        Self {
            id: k("id"),
            version: k("version"),
            catalog: k("catalog"),
            events: k("events"),
        }
    }

    fn all(&self) -> [&str; 4] {
        [&self.id, &self.version, &self.catalog, &self.events]
    }
}

/// The whole catalog as read from Redis (or the cache): raw JSON per field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub cluster_id: String,
    pub version: u64,
    pub fields: BTreeMap<String, String>,
}

impl Snapshot {
    /// The state the relay runs on. Fields that do not parse are an error naming them.
    pub fn to_state(&self) -> Result<State, String> {
        let ns = self.fields.get(NS_FIELD).ok_or("the catalog has no namespace rules")?;
        let namespace_rules: Vec<Rule> =
            serde_json::from_str(ns).map_err(|e| format!("the namespace rules do not parse: {e}"))?;
        let mut hybrid_connections = BTreeMap::new();
        for (field, json) in &self.fields {
            let Some(key) = field.strip_prefix(HC_FIELD) else {
                continue;
            };
            let e: Entity =
                serde_json::from_str(json).map_err(|e| format!("hybrid connection {key:?} does not parse: {e}"))?;
            hybrid_connections.insert(key.to_owned(), e);
        }
        let state = State {
            version: 1,
            namespace_rules,
            hybrid_connections,
        };
        state.validate()?;
        Ok(state)
    }
}

/// The fields that hold `state`.
pub fn fields_of(state: &State) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(
        NS_FIELD.to_owned(),
        serde_json::to_string(&state.namespace_rules).unwrap_or_default(),
    );
    for (key, e) in &state.hybrid_connections {
        out.insert(format!("{HC_FIELD}{key}"), serde_json::to_string(e).unwrap_or_default());
    }
    out
}

/// One field's change: what it held when read (`None`: absent) and what it should hold
/// (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub field: String,
    pub expected: Option<String>,
    pub new: Option<String>,
}

/// The changes that turn `before` into `after`, given the raw fields `before` came from.
pub fn diff(raw: &BTreeMap<String, String>, after: &State) -> Vec<Change> {
    let next = fields_of(after);
    let mut out = Vec::new();
    for (field, new) in &next {
        let old = raw.get(field);
        // Unchanged entities keep their stored text (it may differ in formatting).
        let same = old.is_some_and(|o| reparse_equal(field, o, new));
        if !same {
            out.push(Change {
                field: field.clone(),
                expected: old.cloned(),
                new: Some(new.clone()),
            });
        }
    }
    for (field, old) in raw {
        if !next.contains_key(field) {
            out.push(Change {
                field: field.clone(),
                expected: Some(old.clone()),
                new: None,
            });
        }
    }
    out
}

/// Whether two JSON texts of `field` hold the same value.
fn reparse_equal(field: &str, a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if field == NS_FIELD {
        let p = |t: &str| serde_json::from_str::<Vec<Rule>>(t).ok();
        p(a).is_some() && p(a) == p(b)
    } else {
        let p = |t: &str| serde_json::from_str::<Entity>(t).ok();
        p(a).is_some() && p(a) == p(b)
    }
}

/// Reads id, version and every field in one atomic step.
const LOAD: &str = r#"
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"#;

/// Creates the catalog if there is none; returns the cluster id in effect (ARGV[1] if this
/// call created it). ARGV: id, then field/value pairs.
const INIT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('GET', KEYS[1]) end
redis.call('DEL', KEYS[3])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[2], 1)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[4], '1 *')
return ARGV[1]
"#;

/// Compare-and-set of several fields. ARGV: cluster id, then (field, expected, new)
/// triples, "" meaning absent. Returns the new version, -1 when a field changed meanwhile,
/// -2 when the cluster id is not the expected one (Redis emptied or replaced).
const CAS: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -2 end
local n = (#ARGV - 1) / 3
for i = 0, n - 1 do
  local cur = redis.call('HGET', KEYS[3], ARGV[2 + 3 * i])
  if cur == false then cur = '' end
  if cur ~= ARGV[3 + 3 * i] then return -1 end
end
local fields = {}
for i = 0, n - 1 do
  local f, new = ARGV[2 + 3 * i], ARGV[4 + 3 * i]
  if new == '' then redis.call('HDEL', KEYS[3], f) else redis.call('HSET', KEYS[3], f, new) end
  fields[#fields + 1] = f
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[4], v .. ' ' .. table.concat(fields, ' '))
return v
"#;

/// Reads the whole catalog; `None` when Redis holds none (no cluster id).
pub async fn load<C: ConnectionLike>(conn: &mut C, keys: &Keys) -> redis::RedisResult<Option<Snapshot>> {
    let (id, version, flat): (Option<String>, Option<u64>, Vec<String>) = redis::Script::new(LOAD)
        .key(&keys.all()[..3])
        .invoke_async(conn)
        .await?;
    let Some(cluster_id) = id else { return Ok(None) };
    let mut fields = BTreeMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        fields.insert(k, v);
    }
    Ok(Some(Snapshot {
        cluster_id,
        version: version.unwrap_or(0),
        fields,
    }))
}

/// Creates the catalog from `fields` unless one exists; returns the cluster id in effect.
pub async fn init<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    cluster_id: &str,
    fields: &BTreeMap<String, String>,
) -> redis::RedisResult<String> {
    let script = redis::Script::new(INIT);
    let mut inv = script.key(&keys.all()[..]);
    inv.arg(cluster_id);
    for (k, v) in fields {
        inv.arg(k).arg(v);
    }
    inv.invoke_async(conn).await
}

/// What a compare-and-set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasResult {
    /// Written: the catalog's new version.
    Written(u64),
    /// A field changed since it was read: reload and try again.
    Conflict,
    /// Redis holds another cluster's catalog, or none.
    WrongCluster,
}

/// Writes `changes` if every field still holds what was read.
pub async fn cas<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    cluster_id: &str,
    changes: &[Change],
) -> redis::RedisResult<CasResult> {
    let script = redis::Script::new(CAS);
    let mut inv = script.key(&keys.all()[..]);
    inv.arg(cluster_id);
    for c in changes {
        inv.arg(&c.field)
            .arg(c.expected.as_deref().unwrap_or(""))
            .arg(c.new.as_deref().unwrap_or(""));
    }
    let v: i64 = inv.invoke_async(conn).await?;
    Ok(match v {
        -1 => CasResult::Conflict,
        -2 => CasResult::WrongCluster,
        v => CasResult::Written(v as u64),
    })
}

/// An event of `{p}:events`: the new version and the fields written (`*`: all).
pub fn parse_event(text: &str) -> Option<(u64, Vec<String>)> {
    let mut parts = text.split(' ');
    let version = parts.next()?.parse().ok()?;
    Some((version, parts.filter(|f| !f.is_empty()).map(str::to_owned).collect()))
}

/// File name of a node's cache of the catalog, in its data directory.
pub const CACHE_FILE: &str = "cluster-cache.json";

/// The node's cached catalog, if it has one; an unreadable cache is an error naming it.
pub fn read_cache(dir: &Path) -> anyhow::Result<Option<Snapshot>> {
    let path = dir.join(CACHE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

/// Writes the node's cache (owner-only: it holds keys).
pub fn write_cache(dir: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    crate::config::write_private(&dir.join(CACHE_FILE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::store::{ROOT_RULE, new_entity};

    fn state() -> State {
        let mut s: State = serde_json::from_value(serde_json::json!({
            "version": 1, "namespaceRules": [], "hybridConnections": {}
        }))
        .unwrap();
        s.namespace_rules
            .push(Rule::generate(ROOT_RULE, crate::proto::sas::Rights::ALL));
        s.hybrid_connections.insert("db".into(), new_entity("DB", None, true));
        s
    }

    #[test]
    fn fields_round_trip_and_diffs_are_minimal() {
        let s = state();
        let snap = Snapshot {
            cluster_id: "c".into(),
            version: 3,
            fields: fields_of(&s),
        };
        assert_eq!(snap.to_state().unwrap(), s);
        let mut next = s.clone();
        next.hybrid_connections
            .insert("api".into(), new_entity("api", None, true));
        next.hybrid_connections.remove("db");
        let d = diff(&snap.fields, &next);
        let names: Vec<(&str, bool, bool)> = d
            .iter()
            .map(|c| (c.field.as_str(), c.expected.is_some(), c.new.is_some()))
            .collect();
        assert_eq!(names, [("hc:api", false, true), ("hc:db", true, false)]);
        assert!(diff(&snap.fields, &s).is_empty(), "no change, no write");
    }

    #[test]
    fn a_bad_field_is_an_error_naming_it() {
        let mut snap = Snapshot {
            cluster_id: "c".into(),
            version: 1,
            fields: fields_of(&state()),
        };
        snap.fields.insert("hc:x".into(), "{not json".into());
        assert!(snap.to_state().unwrap_err().contains("\"x\""));
        snap.fields.remove(NS_FIELD);
        assert!(snap.to_state().is_err());
    }

    #[test]
    fn events() {
        assert_eq!(
            parse_event("12 hc:db hc:a/b"),
            Some((12, vec!["hc:db".into(), "hc:a/b".into()]))
        );
        assert_eq!(parse_event("1 *"), Some((1, vec!["*".into()])));
        assert_eq!(parse_event("x y"), None);
    }
}
