//! The relay's persistent state: namespace rules and hybrid connections (entities) with
//! their rules and keys, in `state.json` in the data directory.
//!
//! The file is rewritten atomically on every change, so a crash leaves the old or the new
//! state. The control plane owns the [`Store`]; workers read immutable [`State`]
//! snapshots through [`SharedState`].

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
    fn initial() -> Self {
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

    /// A receiver that sees every later [`SharedState::publish`].
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
    /// Loads `state.json` from `dir`, or creates it with a fresh root rule.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes)
                    .with_context(|| format!("state file {} is corrupt", path.display()))?;
                if s.version != FORMAT_VERSION {
                    anyhow::bail!(
                        "state file {} has format version {}, expected {FORMAT_VERSION}",
                        path.display(),
                        s.version
                    );
                }
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
    crate::config::write_private(path, &bytes).with_context(|| format!("writing {}", path.display()))
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
    #[error("cannot write the state file: {0}")]
    Io(String),
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
        let mut s = Store::open(&dir).unwrap();
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
        let s = Store::open(&dir).unwrap();
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
        let e = format!("{:#}", Store::open(&dir).unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
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
