//! The relay's persistent state: namespace rules and hybrid connections (entities) with
//! their rules and keys, in `state.json` in the data directory.
//!
//! The file is rewritten atomically on every change, so a crash leaves the old or the new
//! state, and the previous version is kept as `state.json.bak`. The control plane owns the
//! [`Store`]; workers read immutable [`State`] snapshots through [`SharedState`].
//!
//! Opening is careful (issue 9 item 7): a file that does not parse, or parses but breaks
//! an invariant (no root rule, an entity filed under another name, a rule without keys),
//! is a clear error; and a missing `state.json` in a directory whose `cli.json` shows that
//! a namespace was created there is not silently replaced by a new namespace with new keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::proto::Secret;
use crate::proto::metadata::{self, HostPort};
use crate::proto::sas::Rights;

/// Name of the namespace-wide rule created on first start.
pub const ROOT_RULE: &str = "RootManageSharedAccessKey";
/// Per-entity Listen rule (what an hcm's connection string uses).
pub const LISTEN_RULE: &str = "defaultListener";
/// Per-entity Send rule (what a bridge's connection string uses).
pub const SEND_RULE: &str = "defaultSender";

const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

/// A SAS rule: a name, two keys, rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub key_name: String,
    pub primary_key: Secret,
    pub secondary_key: Secret,
    #[serde(with = "rights_names")]
    pub rights: Rights,
    /// Keys replaced by `regenerate-key`, newest first, at most [`MAX_REVOKED`]: kept only to
    /// tell a client why its token fails. They never grant anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedKey>,
}

/// How many regenerated keys a rule remembers (for error messages).
pub const MAX_REVOKED: usize = 4;

/// A key that was regenerated, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedKey {
    pub key: Secret,
    /// RFC 3339.
    pub at: String,
}

impl Rule {
    /// A rule with two fresh keys.
    pub fn generate(name: &str, rights: Rights) -> Self {
        Self {
            key_name: name.to_owned(),
            primary_key: Secret::random_key(),
            secondary_key: Secret::random_key(),
            rights,
            revoked: Vec::new(),
        }
    }

    /// Replaces the key in `slot` with a fresh one, remembering the old one as revoked.
    pub fn regenerate(&mut self, secondary: bool) {
        let slot = if secondary {
            &mut self.secondary_key
        } else {
            &mut self.primary_key
        };
        let old = std::mem::replace(slot, Secret::random_key());
        self.revoked.insert(
            0,
            RevokedKey {
                key: old,
                at: crate::clock::now_rfc3339(),
            },
        );
        self.revoked.truncate(MAX_REVOKED);
    }
}

mod rights_names {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::proto::sas::Rights;

    pub fn serialize<S: Serializer>(r: &Rights, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(r.names())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Rights, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        Rights::from_names(names.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

/// A hybrid connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entity {
    /// Name as created (matching is case-insensitive).
    pub name: String,
    /// The `userMetadata` string; holds the `endpoint` item.
    pub user_metadata: String,
    pub requires_client_authorization: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    pub rules: Vec<Rule>,
}

impl Entity {
    /// The `endpoint` metadata, if present and valid.
    pub fn endpoint(&self) -> Option<HostPort> {
        metadata::endpoint_from_user_metadata(&self.user_metadata)
            .ok()
            .flatten()
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.key_name == name)
    }
}

/// Everything the relay persists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    pub namespace_rules: Vec<Rule>,
    /// Keyed by lower-cased name.
    pub hybrid_connections: BTreeMap<String, Entity>,
}

impl State {
    /// A new namespace: the root rule with fresh keys, no hybrid connection.
    pub fn initial() -> Self {
        Self {
            version: FORMAT_VERSION,
            namespace_rules: vec![Rule::generate(ROOT_RULE, Rights::ALL)],
            hybrid_connections: BTreeMap::new(),
        }
    }

    /// The entity whose name is the longest segment-prefix of `path` (decoded, no leading
    /// `/`), and the rest of the path (the suffix, possibly empty). Case-insensitive.
    pub fn resolve<'a, 'p>(&'a self, path: &'p str) -> Option<(&'a Entity, &'p str)> {
        let path = path.trim_matches('/');
        let lower = path.to_lowercase();
        if lower.len() != path.len() {
            // Lower-casing changed byte offsets (rare non-ASCII); match whole names only.
            return self.hybrid_connections.get(&lower).map(|e| (e, ""));
        }
        let mut end = path.len();
        loop {
            if let Some(e) = self.hybrid_connections.get(&lower[..end]) {
                return Some((e, path[end..].trim_start_matches('/')));
            }
            end = lower[..end].rfind('/')?;
        }
    }

    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.hybrid_connections.get(&name.to_lowercase())
    }

    pub fn namespace_rule(&self, name: &str) -> Option<&Rule> {
        self.namespace_rules.iter().find(|r| r.key_name == name)
    }

    /// Checks what the rest of the relay relies on; `Err` names the first thing wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} (this hyrelay reads {FORMAT_VERSION})",
                self.version
            ));
        }
        let root = self
            .namespace_rule(ROOT_RULE)
            .ok_or_else(|| format!("the namespace rule {ROOT_RULE} is missing"))?;
        if !root.rights.contains(Rights::MANAGE) {
            return Err(format!("the namespace rule {ROOT_RULE} lacks the Manage right"));
        }
        check_rules(&self.namespace_rules, "the namespace")?;
        for (key, e) in &self.hybrid_connections {
            let what = format!("hybrid connection {:?}", e.name);
            crate::proto::address::validate_entity_name(&e.name).map_err(|m| format!("{what}: {m}"))?;
            if *key != e.name.to_lowercase() {
                return Err(format!("{what} is filed under {key:?}"));
            }
            check_rules(&e.rules, &what)?;
        }
        Ok(())
    }
}

/// Every rule named, with two keys, and no name twice.
fn check_rules(rules: &[Rule], owner: &str) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for r in rules {
        if r.key_name.is_empty() || r.key_name.len() > 256 {
            return Err(format!("{owner} has a rule without a valid name"));
        }
        if r.primary_key.expose().is_empty() || r.secondary_key.expose().is_empty() {
            return Err(format!("rule {:?} of {owner} lacks a key", r.key_name));
        }
        if !seen.insert(r.key_name.as_str()) {
            return Err(format!("{owner} has the rule {:?} twice", r.key_name));
        }
    }
    Ok(())
}

/// Snapshot cell shared between the control plane (writer) and workers (readers). Holders
/// of long-lived connections [`SharedState::subscribe`] to hear of every change (a key
/// regenerated, a hybrid connection deleted) and re-check what they were granted.
#[derive(Debug, Clone)]
pub struct SharedState(Arc<tokio::sync::watch::Sender<Arc<State>>>);

impl SharedState {
    pub fn new(s: Arc<State>) -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(s)))
    }

    /// The current snapshot; cheap (one `Arc` clone).
    pub fn load(&self) -> Arc<State> {
        self.0.borrow().clone()
    }

    /// Replaces the snapshot and wakes every subscriber.
    pub(crate) fn publish(&self, s: Arc<State>) {
        self.0.send_replace(s);
    }

    /// A receiver that sees every later `SharedState::publish`.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<State>> {
        self.0.subscribe()
    }
}

/// Owner of the state file.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    shared: SharedState,
}

impl Store {
    /// Loads `state.json` from `dir`, or creates it with a fresh root rule when the
    /// directory never held a namespace (or `new_namespace` says to start one).
    ///
    /// The caller holds the directory's lock ([`crate::config::lock_dir`]).
    pub fn open(dir: &Path, new_namespace: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes)
                    .with_context(|| format!("state file {} is corrupt{}", path.display(), backup_hint(dir)))?;
                s.validate().map_err(|why| {
                    anyhow::anyhow!("state file {} is invalid: {why}{}", path.display(), backup_hint(dir))
                })?;
                warn_about_metadata(&s);
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let cli = dir.join(super::CLI_FILE);
                if cli.exists() && !new_namespace {
                    anyhow::bail!(
                        "{} is missing, but {} shows that a namespace was created in {}: its keys are in the hcms and \
                         bridges that use it, and a new namespace would have new ones. Restore state.json{}, or start \
                         with --new-namespace to create a new namespace with new keys",
                        path.display(),
                        cli.display(),
                        dir.display(),
                        if dir.join(BACKUP_FILE).exists() {
                            format!(
                                " (a backup of the previous version is {})",
                                dir.join(BACKUP_FILE).display()
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                let s = State::initial();
                write(&path, &s)?;
                s
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self {
            path,
            shared: SharedState::new(Arc::new(state)),
        })
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    pub fn current(&self) -> Arc<State> {
        self.shared.load()
    }

    /// Applies `f` to a copy of the state, writes it, then publishes it. Nothing changes
    /// if `f` fails or the write fails.
    pub fn update<T>(&mut self, f: impl FnOnce(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut next = (*self.current()).clone();
        let out = f(&mut next)?;
        write(&self.path, &next).map_err(|e| StoreError::Io(format!("{e:#}")))?;
        self.shared.publish(Arc::new(next));
        Ok(out)
    }
}

fn write(path: &Path, s: &State) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(s)?;
    crate::config::write_private_with_backup(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// The previous version of the state file, kept by every write.
const BACKUP_FILE: &str = "state.json.bak";

/// "; the previous version is …" when a backup exists.
fn backup_hint(dir: &Path) -> String {
    let bak = dir.join(BACKUP_FILE);
    if bak.exists() {
        format!(" (the previous version is kept in {})", bak.display())
    } else {
        String::new()
    }
}

/// Logs hybrid connections whose stored endpoint metadata is not `HOST:PORT` (written by
/// an older relay): hcms and bridges refuse it, so the operator should replace it.
fn warn_about_metadata(s: &State) {
    for e in s.hybrid_connections.values() {
        if let Err(why) = metadata::endpoint_from_user_metadata(&e.user_metadata) {
            tracing::warn!(hc = %e.name, reason = %crate::proto::host::escape(&why), "stored endpoint metadata is invalid; hcms and bridges will refuse it: delete and re-create this hybrid connection");
        }
    }
}

/// Why a state change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("hybrid connection {0:?} does not exist")]
    NotFound(String),
    #[error("hybrid connection {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    /// The namespace holds `limits.max_hybrid_connections` already.
    #[error("{0}")]
    Quota(String),
    #[error("cannot write the state file: {0}")]
    Io(String),
    /// The cluster's catalog cannot take writes now (Redis unreachable, catalog lost).
    #[error("the cluster catalog cannot be changed now: {0}")]
    Unavailable(String),
}

/// Where the catalog lives: a node's own state file, or a cluster's Redis.
#[derive(Debug)]
pub enum Catalog {
    File(Store),
    Cluster(Arc<crate::relay::cluster::Cluster>),
}

impl Catalog {
    /// The snapshot cell workers read.
    pub fn shared(&self) -> SharedState {
        match self {
            Catalog::File(s) => s.shared(),
            Catalog::Cluster(c) => c.shared_state(),
        }
    }

    pub fn current(&self) -> Arc<State> {
        self.shared().load()
    }

    /// Applies `f` to a copy of the catalog and makes the result the catalog, or changes
    /// nothing. `f` may run more than once (a cluster write that lost a race is redone on
    /// the fresh catalog).
    pub async fn update<T>(&mut self, f: impl Fn(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match self {
            Catalog::File(s) => s.update(f),
            Catalog::Cluster(c) => c.update(f).await,
        }
    }
}

/// A new entity with `defaultListener` and `defaultSender` rules.
pub fn new_entity(name: &str, endpoint: Option<&HostPort>, requires_client_authorization: bool) -> Entity {
    let now = crate::clock::now_rfc3339();
    Entity {
        name: name.to_owned(),
        user_metadata: endpoint.map(metadata::user_metadata_for).unwrap_or_default(),
        requires_client_authorization,
        created_at: now.clone(),
        updated_at: now,
        rules: vec![
            Rule::generate(LISTEN_RULE, Rights::LISTEN),
            Rule::generate(SEND_RULE, Rights::SEND),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hyrelay-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_reopen_and_failed_updates_change_nothing() {
        let dir = temp_dir("reopen");
        let mut s = Store::open(&dir, false).unwrap();
        let root = s.current().namespace_rule(ROOT_RULE).unwrap().clone();
        let ep: HostPort = "db:5432".parse().unwrap();
        s.update(|st| {
            st.hybrid_connections
                .insert("db".into(), new_entity("DB", Some(&ep), true));
            Ok(())
        })
        .unwrap();
        let before = s.current();
        let r: Result<(), _> = s.update(|st| {
            st.hybrid_connections.clear();
            Err(StoreError::Invalid("no".into()))
        });
        assert!(r.is_err());
        assert_eq!(s.current(), before);
        drop(s);
        let s = Store::open(&dir, false).unwrap();
        let st = s.current();
        assert_eq!(st.namespace_rule(ROOT_RULE), Some(&root));
        assert_eq!(st.entity("db").unwrap().endpoint(), Some(ep));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let e = format!("{:#}", Store::open(&dir, false).unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Issue 9 item 7: a file that parses but breaks an invariant is a clear error (a file
    /// without the root rule used to panic later).
    #[test]
    fn invalid_files_are_clear_errors() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"version":1,"namespaceRules":[],"hybridConnections":{}}"#,
                "RootManageSharedAccessKey is missing",
            ),
            (
                r#"{"version":2,"namespaceRules":[],"hybridConnections":{}}"#,
                "format version 2",
            ),
            (
                r#"{"version":1,"namespaceRules":[{"keyName":"RootManageSharedAccessKey","primaryKey":"","secondaryKey":"k","rights":["Manage"]}],"hybridConnections":{}}"#,
                "lacks a key",
            ),
            (
                r#"{"version":1,"namespaceRules":[{"keyName":"RootManageSharedAccessKey","primaryKey":"a","secondaryKey":"k","rights":["Listen"]}],"hybridConnections":{}}"#,
                "lacks the Manage right",
            ),
            (
                r#"{"version":1,"namespaceRules":[{"keyName":"RootManageSharedAccessKey","primaryKey":"a","secondaryKey":"k","rights":["Manage"]}],"hybridConnections":{"x":{"name":"y","userMetadata":"","requiresClientAuthorization":true,"createdAt":"","updatedAt":"","rules":[]}}}"#,
                "filed under",
            ),
            (r#"{"version":1}"#, "corrupt"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let dir = temp_dir(&format!("invalid{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(STATE_FILE), text).unwrap();
            let e = format!("{:#}", Store::open(&dir, false).unwrap_err());
            assert!(e.contains(want), "case {i}: {e}");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// Issue 9 item 7: a deleted state.json next to cli.json is not silently replaced by a
    /// new namespace; `new_namespace` allows it; every write keeps the previous version.
    #[test]
    fn a_lost_state_file_is_not_replaced_unless_asked() {
        let dir = temp_dir("lost");
        let mut s = Store::open(&dir, false).unwrap();
        let root = s.current().namespace_rule(ROOT_RULE).unwrap().clone();
        s.update(|st| {
            st.hybrid_connections.insert("db".into(), new_entity("db", None, true));
            Ok(())
        })
        .unwrap();
        drop(s);
        std::fs::write(dir.join(crate::relay::CLI_FILE), b"{}").unwrap();
        let bak: State = serde_json::from_slice(&std::fs::read(dir.join(BACKUP_FILE)).unwrap()).unwrap();
        assert!(bak.hybrid_connections.is_empty(), "the backup is the previous version");
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        let e = format!("{:#}", Store::open(&dir, false).unwrap_err());
        assert!(e.contains("--new-namespace") && e.contains("state.json.bak"), "{e}");
        let fresh = Store::open(&dir, true).unwrap();
        assert_ne!(
            fresh.current().namespace_rule(ROOT_RULE),
            Some(&root),
            "a new namespace has new keys"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resolve_longest_segment_prefix() {
        let mut st = State::initial();
        for n in ["a", "a/b", "x"] {
            st.hybrid_connections.insert(n.into(), new_entity(n, None, true));
        }
        assert_eq!(
            st.resolve("A/B/c/d").map(|(e, s)| (e.name.as_str(), s)),
            Some(("a/b", "c/d"))
        );
        assert_eq!(st.resolve("a/bc").map(|(e, s)| (e.name.as_str(), s)), Some(("a", "bc")));
        assert_eq!(st.resolve("x/").map(|(e, s)| (e.name.as_str(), s)), Some(("x", "")));
        assert!(st.resolve("xy").is_none());
        assert!(st.resolve("").is_none());
    }
}
