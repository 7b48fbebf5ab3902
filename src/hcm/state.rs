//! The hcm's files in its data directory.
//!
//! - `connections.json` (owner-only, owned by the data directory's owner): hybrid
//!   connections added with `hyrelay hcm add`. The daemon watches it, so `add` and `remove`
//!   take effect without a restart, also when they run as root and the daemon as the
//!   unit's dynamic user.
//! - `status.json`: written by the running daemon every few seconds and on every change,
//!   read by `hyrelay hcm list` / `status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::config::HcEntry;
use crate::proto::connstr::ConnectionString;

const CONNECTIONS_FILE: &str = "connections.json";
const STATUS_FILE: &str = "status.json";
/// A status file older than this means the daemon is not running.
pub const STATUS_STALE: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Added {
    connection_string: String,
    #[serde(default)]
    endpoint: Option<String>,
    added_at: String,
}

pub fn connections_path(dir: &Path) -> PathBuf {
    dir.join(CONNECTIONS_FILE)
}

fn read_added(dir: &Path) -> anyhow::Result<Vec<Added>> {
    let path = connections_path(dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `connections.json` atomically, owner-only, and owned by whoever owns the data
/// directory: `hcm add` runs as root while the hcm runs as another user (systemd's
/// `DynamicUser=`, which owns `/var/lib/hyrelay/hcm`), which must be able to read it.
fn write_added(dir: &Path, added: &[Added]) -> anyhow::Result<()> {
    let path = connections_path(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::config::write_atomic_owned(&path, &serde_json::to_vec_pretty(added)?, true, owner_to_give(dir))
        .with_context(|| format!("writing {}", path.display()))
}

/// The data directory's owner when it is not us and we may give files away (root).
#[cfg(unix)]
fn owner_to_give(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    (me == 0 && m.uid() != me).then_some((m.uid(), m.gid()))
}

#[cfg(not(unix))]
fn owner_to_give(_dir: &Path) -> Option<(u32, u32)> {
    None
}

/// The hybrid connections added with `hcm add`.
pub fn load_added(dir: &Path) -> anyhow::Result<Vec<HcEntry>> {
    read_added(dir)?
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let cs = ConnectionString::parse(&a.connection_string)
                .with_context(|| format!("{} entry {i}: connection string", CONNECTIONS_FILE))?;
            let ep = a
                .endpoint
                .map(|e| e.parse())
                .transpose()
                .map_err(|e: String| anyhow::anyhow!("{CONNECTIONS_FILE} entry {i}: endpoint: {e}"))?;
            HcEntry::new(cs, ep)
        })
        .collect()
}

/// Adds (or replaces, for the same relay and hybrid connection) an entry. Returns true if
/// it replaced one.
pub fn add(dir: &Path, entry: &HcEntry) -> anyhow::Result<bool> {
    let mut added = read_added(dir)?;
    let before = added.len();
    added.retain(|a| {
        ConnectionString::parse(&a.connection_string)
            .ok()
            .and_then(|c| HcEntry::new(c, None).ok())
            .map(|e| e.key())
            != Some(entry.key())
    });
    let replaced = added.len() != before;
    added.push(Added {
        connection_string: entry.connection_string.expose(),
        endpoint: entry.endpoint.as_ref().map(|e| e.to_string()),
        added_at: crate::clock::now_rfc3339(),
    });
    write_added(dir, &added)?;
    Ok(replaced)
}

/// Removes entries for hybrid connection `name` (any relay). Returns how many.
pub fn remove(dir: &Path, name: &str) -> anyhow::Result<usize> {
    let mut added = read_added(dir)?;
    let before = added.len();
    added.retain(|a| {
        ConnectionString::parse(&a.connection_string)
            .ok()
            .and_then(|c| c.entity_path)
            .is_none_or(|p| !p.eq_ignore_ascii_case(name))
    });
    let n = before - added.len();
    if n > 0 {
        write_added(dir, &added)?;
    }
    Ok(n)
}

/// State of a hybrid connection's control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelState {
    Connecting,
    Connected,
    /// Waiting to reconnect after a failure.
    Disconnected,
    Stopped,
}

/// The last dial of the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DialStatus {
    pub ok: bool,
    /// RFC 3339.
    pub at: String,
    pub millis: u64,
    pub detail: String,
}

/// What the hcm reports per hybrid connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HcStatus {
    pub name: String,
    /// Relay `host[:port]`.
    pub relay: String,
    /// The endpoint in use (metadata or override), once known.
    pub endpoint: Option<String>,
    pub state: ChannelState,
    /// When `state` was entered (RFC 3339).
    pub since: String,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub accepts: u64,
    pub active_tunnels: u64,
    pub last_dial: Option<DialStatus>,
    #[serde(default)]
    pub bytes_to_endpoint: u64,
    #[serde(default)]
    pub bytes_from_endpoint: u64,
    /// The SAS rule the hcm authenticates with (never its key).
    #[serde(default)]
    pub key_name: Option<String>,
    /// When the control channel's current token expires (RFC 3339), once one was sent.
    #[serde(default)]
    pub token_expires: Option<String>,
    /// The last few failures of either segment, newest last (at most [`RECENT_ERRORS`]).
    #[serde(default)]
    pub recent_errors: std::collections::VecDeque<SegmentError>,
    /// HTTP-mode requests forwarded to the endpoint.
    #[serde(default)]
    pub http_requests: u64,
    /// The latest one: `"200 at <time>"`, or why it failed.
    #[serde(default)]
    pub last_http: Option<String>,
}

/// How many failures [`HcStatus::recent_errors`] keeps.
pub const RECENT_ERRORS: usize = 5;

/// The segment a failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Segment {
    /// relay ⇄ hcm: the control channel.
    Relay,
    /// hcm ⇄ endpoint: a dial.
    Endpoint,
}

/// One failure of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentError {
    /// RFC 3339.
    pub at: String,
    pub segment: Segment,
    pub detail: String,
}

impl HcStatus {
    pub fn new(entry: &HcEntry) -> Self {
        Self {
            name: entry.name().to_owned(),
            relay: entry.connection_string.endpoint.authority(),
            endpoint: entry.endpoint.as_ref().map(|e| e.to_string()),
            state: ChannelState::Connecting,
            since: crate::clock::now_rfc3339(),
            reconnects: 0,
            last_error: None,
            accepts: 0,
            active_tunnels: 0,
            last_dial: None,
            bytes_to_endpoint: 0,
            bytes_from_endpoint: 0,
            key_name: entry.connection_string.key_name().map(str::to_owned),
            token_expires: None,
            recent_errors: Default::default(),
            http_requests: 0,
            last_http: None,
        }
    }

    /// Remembers a failure of `segment` (bounded to the last [`RECENT_ERRORS`]).
    pub fn note_error(&mut self, segment: Segment, detail: &str) {
        if self.recent_errors.len() == RECENT_ERRORS {
            self.recent_errors.pop_front();
        }
        self.recent_errors.push_back(SegmentError {
            at: crate::clock::now_rfc3339(),
            segment,
            detail: detail.to_owned(),
        });
    }

    /// Records an endpoint dial; a failed one is also a recent error.
    pub fn set_dial(&mut self, d: DialStatus) {
        if !d.ok {
            self.note_error(Segment::Endpoint, &d.detail);
        }
        self.last_dial = Some(d);
    }

    /// The newest failure of any segment.
    pub fn latest_error(&self) -> Option<&SegmentError> {
        self.recent_errors.back()
    }
}

/// When a token minted now for `entry` with lifetime `ttl` expires (RFC 3339); for a
/// ready-made SharedAccessSignature, its own `se`.
pub fn token_expiry(entry: &HcEntry, ttl: Duration) -> Option<String> {
    use crate::proto::connstr::Credential;
    let secs = match &entry.connection_string.credential {
        Credential::Key { .. } => crate::proto::sas::unix_now().saturating_add(ttl.as_secs()),
        Credential::Token(t) => t
            .expose()
            .split(['&', ' '])
            .find_map(|kv| kv.strip_prefix("se="))
            .and_then(|v| v.parse().ok())?,
    };
    Some(crate::clock::rfc3339(
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(253_402_300_799)),
    ))
}

/// Contents of `status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusFile {
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub updated: u64,
    /// Written by a daemon that has stopped: nothing in it is running.
    #[serde(default)]
    pub stopped: bool,
    pub hybrid_connections: Vec<HcStatus>,
}

/// Writes the running daemon's status.
pub fn write_status(dir: &Path, list: &[HcStatus]) -> anyhow::Result<()> {
    write_status_file(dir, list, false)
}

/// Writes the last status of a daemon that stopped: every channel stopped, no tunnels.
pub fn write_stopped(dir: &Path, list: &[HcStatus]) -> anyhow::Result<()> {
    let list: Vec<HcStatus> = list
        .iter()
        .map(|s| HcStatus {
            state: ChannelState::Stopped,
            active_tunnels: 0,
            ..s.clone()
        })
        .collect();
    write_status_file(dir, &list, true)
}

fn write_status_file(dir: &Path, list: &[HcStatus], stopped: bool) -> anyhow::Result<()> {
    let f = StatusFile {
        pid: std::process::id(),
        updated: crate::proto::sas::unix_now(),
        stopped,
        hybrid_connections: list.to_vec(),
    };
    crate::config::write_atomic(&dir.join(STATUS_FILE), &serde_json::to_vec_pretty(&f)?, false)?;
    Ok(())
}

/// The daemon's last status, if it is fresh and the daemon has not stopped (it is running).
pub fn read_status(dir: &Path) -> Option<StatusFile> {
    let f = read_status_any(dir)?;
    let age = crate::proto::sas::unix_now().saturating_sub(f.updated);
    (!f.stopped && age <= STATUS_STALE.as_secs()).then_some(f)
}

/// The last status written, running or not.
pub fn read_status_any(dir: &Path) -> Option<StatusFile> {
    serde_json::from_slice(&std::fs::read(dir.join(STATUS_FILE)).ok()?).ok()
}

/// Modification time of `connections.json`, to notice `add`/`remove`.
pub fn connections_mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(connections_path(dir)).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_replace_remove() {
        let dir = std::env::temp_dir().join(format!("hyrelay-hcm-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cs = |k: &str| {
            ConnectionString::parse(&format!(
                "Endpoint=sb://r/;SharedAccessKeyName=defaultListener;SharedAccessKey={k};EntityPath=Db"
            ))
            .unwrap()
        };
        let e1 = HcEntry::new(cs("a"), None).unwrap();
        assert!(!add(&dir, &e1).unwrap());
        let e2 = HcEntry::new(cs("b"), Some("h:1".parse().unwrap())).unwrap();
        assert!(add(&dir, &e2).unwrap(), "same relay and name replaces");
        assert_eq!(load_added(&dir).unwrap(), vec![e2]);
        assert_eq!(remove(&dir, "db").unwrap(), 1);
        assert!(load_added(&dir).unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
