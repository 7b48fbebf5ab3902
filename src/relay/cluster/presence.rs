//! Listener presence: every node publishes, once a second, which listeners it holds and
//! how loaded they are, under a key that expires (`presence_ttl`, 5 s) unless refreshed;
//! every node reads all the others' at the same pace. A node that dies drops out when its
//! key expires; a draining node deletes its key at once.
//!
//! Keys: `{p}:node:<id>` (JSON, with a TTL) and `{p}:nodes` (the set of ids; an id whose
//! key is gone is removed by whichever node sees it first). Channel `{p}:presence`: a
//! node whose listeners changed publishes its id there after writing its record, and the
//! others read at once; the once-a-second beat heals a lost message.
//!
//! Listener load is counted where tunnels run: a node reports, for every listener its
//! tunnels go to (its own or another node's), how many are open; a listener's load is the
//! sum over all nodes' reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Names of the presence keys for one key prefix.
#[derive(Debug, Clone)]
pub struct PresenceKeys {
    prefix: String,
    pub nodes: String,
    /// The pub/sub channel on which a node whose listeners changed says so (the payload
    /// is its id), so the others read its record at once instead of on their next beat.
    pub events: String,
}

impl PresenceKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            nodes: format!("{{{prefix}}}:nodes"),
            events: format!("{{{prefix}}}:presence"),
        }
    }

    /// The presence key of `node`.
    pub fn node(&self, node: &str) -> String {
        format!("{{{}}}:node:{node}", self.prefix)
    }
}

/// A listener as its node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentListener {
    /// Lower-cased hybrid connection name.
    pub hc: String,
    /// The listener's key on its node (unique there).
    pub key: u64,
    /// Its `sb-hc-id`.
    pub id: String,
    /// RFC 3339.
    pub since: String,
    pub remote: Option<String>,
}

/// One node's presence record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePresence {
    pub node: String,
    /// The node's public URL (where its rendezvous addresses point).
    pub url: String,
    /// When the node started (RFC 3339).
    pub started: String,
    /// Unix milliseconds of this heartbeat.
    pub at_ms: u64,
    pub draining: bool,
    pub listeners: Vec<PresentListener>,
    /// Tunnels open on this node, per lower-cased hybrid connection.
    pub tunnels: BTreeMap<String, u64>,
    /// Tunnels open on this node per listener they go to (`node/key`).
    pub load: BTreeMap<String, u64>,
    /// Payload bytes relayed on this node, per hybrid connection: up, down.
    #[serde(default)]
    pub bytes: BTreeMap<String, (u64, u64)>,
}

/// A listener somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    pub key: u64,
    /// Open tunnels to it, all nodes together.
    pub load: u64,
}

/// What a node knows of the others, refreshed every second.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    /// Every other node that beat within its TTL and is not draining.
    pub nodes: Vec<NodePresence>,
}

/// `node/key`, the name of a listener in load maps.
pub fn listener_ref(node: &str, key: u64) -> String {
    format!("{node}/{key}")
}

impl Presence {
    /// Listeners of hybrid connection `hc` (lower-case) on other nodes, with their load
    /// (`own_load` adds what this node itself routes to each).
    pub fn candidates(&self, hc: &str, own_load: &dyn Fn(&str, u64) -> u64) -> Vec<Candidate> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| !n.draining) {
            for l in n.listeners.iter().filter(|l| l.hc == hc) {
                let r = listener_ref(&n.node, l.key);
                let reported: u64 = self.nodes.iter().filter_map(|m| m.load.get(&r)).sum();
                out.push(Candidate {
                    node: n.node.clone(),
                    key: l.key,
                    load: reported + own_load(&n.node, l.key),
                });
            }
        }
        out
    }

    /// Listeners of `hc` on other nodes, with their node.
    pub fn listeners_of<'a>(
        &'a self,
        hc: &'a str,
    ) -> impl Iterator<Item = (&'a NodePresence, &'a PresentListener)> + 'a {
        self.nodes
            .iter()
            .flat_map(move |n| n.listeners.iter().filter(move |l| l.hc == hc).map(move |l| (n, l)))
    }

    /// Whether `node` still lists listener `key`.
    pub fn holds(&self, node: &str, key: u64) -> bool {
        self.nodes
            .iter()
            .any(|n| n.node == node && !n.draining && n.listeners.iter().any(|l| l.key == key))
    }

    /// Tunnels of `hc` open on other nodes.
    pub fn tunnels_of(&self, hc: &str) -> u64 {
        self.nodes.iter().filter_map(|n| n.tunnels.get(hc)).sum()
    }

    /// Bytes of `hc` relayed on other nodes: up, down.
    pub fn bytes_of(&self, hc: &str) -> (u64, u64) {
        self.nodes
            .iter()
            .filter_map(|n| n.bytes.get(hc))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, listeners: &[(&str, u64)], load: &[(&str, u64)]) -> NodePresence {
        NodePresence {
            node: name.into(),
            url: format!("ws://{name}"),
            started: String::new(),
            at_ms: 0,
            draining: false,
            listeners: listeners
                .iter()
                .map(|(hc, key)| PresentListener {
                    hc: (*hc).into(),
                    key: *key,
                    id: format!("l{key}"),
                    since: String::new(),
                    remote: None,
                })
                .collect(),
            tunnels: BTreeMap::new(),
            load: load.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
            bytes: BTreeMap::new(),
        }
    }

    #[test]
    fn load_is_summed_over_every_node_that_routes_to_a_listener() {
        let p = Presence {
            nodes: vec![
                node("b", &[("db", 1), ("api", 2)], &[("b/1", 3)]),
                node("c", &[], &[("b/1", 2)]),
            ],
        };
        let own = |node: &str, key: u64| u64::from(node == "b" && key == 1);
        let c = p.candidates("db", &own);
        assert_eq!(
            c,
            [Candidate {
                node: "b".into(),
                key: 1,
                load: 6
            }]
        );
        assert!(p.holds("b", 2) && !p.holds("c", 1));
        let mut draining = p.clone();
        draining.nodes[0].draining = true;
        assert!(
            draining.candidates("db", &own).is_empty(),
            "a draining node takes no more"
        );
    }
}
