//! Who used each hybrid connection lately (issue 14 item 10), as App Service shows per
//! plan: per hybrid connection, the senders this relay joined to a listener, told apart by
//! remote address, the SAS rule their token was signed with, and the client id our bridge
//! sends ([`crate::proto::client_id`]); for each, first and last seen, tunnels opened, tunnels
//! open now and bytes both ways (counted when a tunnel ends). Shown by `hc show`, the
//! relay's `/status` and its status page.
//!
//! Invariants: memory is bounded — at most [`MAX_SENDERS`] senders per hybrid connection
//! (the one seen least recently makes room), at most [`MAX_HYBRID_CONNECTIONS`] hybrid
//! connections (the one used least recently goes), and a sender not seen for
//! [`FORGET_AFTER`] is dropped. The client id is the peer's string, recorded by the rule
//! of [`crate::proto::client_id::client_id`]; it is never a metric label. In a relay cluster each node keeps
//! the senders it joined itself: the usage is per node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

/// Senders kept per hybrid connection.
pub const MAX_SENDERS: usize = 16;
/// Hybrid connections kept.
pub const MAX_HYBRID_CONNECTIONS: usize = 10_000;
/// A sender not seen for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What tells one sender from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SenderKey {
    pub remote: IpAddr,
    /// The SAS rule of the sender's token; `None` for a hybrid connection that does not
    /// require client authorization.
    pub key_name: Option<String>,
    pub client_id: Option<String>,
}

/// One sender's use of a hybrid connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderUsage {
    pub key: SenderKey,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Tunnels opened.
    pub tunnels: u64,
    /// Tunnels open now.
    pub active: u64,
    /// Bytes from the sender to the listener, of tunnels that ended.
    pub bytes_sent: u64,
    /// Bytes from the listener to the sender, of tunnels that ended.
    pub bytes_received: u64,
}

impl SenderUsage {
    /// The JSON `hc show` and `/status` give.
    pub fn to_json(&self) -> Value {
        json!({
            "remoteAddress": self.key.remote.to_string(),
            "keyName": self.key.key_name,
            "clientId": self.key.client_id,
            "firstSeen": crate::clock::rfc3339(self.first_seen),
            "lastSeen": crate::clock::rfc3339(self.last_seen),
            "tunnels": self.tunnels,
            "activeTunnels": self.active,
            "bytesSent": self.bytes_sent,
            "bytesReceived": self.bytes_received,
        })
    }
}

/// The senders of every hybrid connection (keyed by lower-cased name).
#[derive(Debug, Default)]
pub struct Usage {
    by_hc: Mutex<HashMap<String, Vec<SenderUsage>>>,
}

impl Usage {
    /// A tunnel of hybrid connection `hc` was opened for `key`; the ticket counts its end.
    pub fn opened(self: &Arc<Self>, hc: &str, key: SenderKey) -> Ticket {
        self.opened_at(hc, key.clone(), SystemTime::now());
        Ticket {
            open: Some((self.clone(), hc.to_lowercase(), key)),
        }
    }

    fn opened_at(&self, hc: &str, key: SenderKey, now: SystemTime) {
        let mut m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        let hc = hc.to_lowercase();
        if !m.contains_key(&hc) && m.len() >= MAX_HYBRID_CONNECTIONS {
            let stalest = m
                .iter()
                .min_by_key(|(_, v)| v.iter().map(|s| s.last_seen).max())
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                m.remove(&k);
            }
        }
        let senders = m.entry(hc).or_default();
        senders.retain(|s| s.active > 0 || now.duration_since(s.last_seen).unwrap_or_default() < FORGET_AFTER);
        match senders.iter_mut().find(|s| s.key == key) {
            Some(s) => {
                s.last_seen = now;
                s.tunnels += 1;
                s.active += 1;
            }
            None => {
                if senders.len() >= MAX_SENDERS
                    && let Some(i) = (0..senders.len()).min_by_key(|&i| senders[i].last_seen)
                {
                    senders.swap_remove(i);
                }
                senders.push(SenderUsage {
                    key,
                    first_seen: now,
                    last_seen: now,
                    tunnels: 1,
                    active: 1,
                    bytes_sent: 0,
                    bytes_received: 0,
                });
            }
        }
    }

    fn closed(&self, hc: &str, key: &SenderKey, sent: u64, received: u64) {
        self.closed_at(hc, key, sent, received, SystemTime::now());
    }

    fn closed_at(&self, hc: &str, key: &SenderKey, sent: u64, received: u64, now: SystemTime) {
        let mut m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.get_mut(hc).and_then(|v| v.iter_mut().find(|s| &s.key == key)) {
            s.active = s.active.saturating_sub(1);
            s.last_seen = now;
            s.bytes_sent += sent;
            s.bytes_received += received;
        }
    }

    /// The senders of `hc`, the most recently seen first.
    pub fn senders(&self, hc: &str) -> Vec<SenderUsage> {
        let m = self.by_hc.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = m.get(&hc.to_lowercase()).cloned().unwrap_or_default();
        v.sort_by_key(|s| std::cmp::Reverse(s.last_seen));
        v
    }

    /// Forgets a hybrid connection (deleted).
    pub fn forget(&self, hc: &str) {
        self.by_hc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&hc.to_lowercase());
    }
}

/// One open tunnel's entry; [`Ticket::closed`] adds its bytes when it ends. Dropped
/// without that (a tunnel that could not start), it only closes the tunnel's count.
#[must_use = "a ticket counts the tunnel's end"]
pub struct Ticket {
    /// Taken by [`Ticket::closed`]; still here on drop means the tunnel ended uncounted.
    open: Option<(Arc<Usage>, String, SenderKey)>,
}

impl Ticket {
    /// The tunnel ended having moved `sent` bytes from the sender and `received` to it.
    pub fn closed(mut self, sent: u64, received: u64) {
        if let Some((usage, hc, key)) = self.open.take() {
            usage.closed(&hc, &key, sent, received);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((usage, hc, key)) = self.open.take() {
            usage.closed(&hc, &key, 0, 0);
        }
    }
}

/// The quota on hybrid connections in a namespace (`limits.max_hybrid_connections`):
/// `Err` with the message the management API gives when `existing` already reach `max`.
pub fn check_quota(existing: usize, max: Option<std::num::NonZeroUsize>) -> Result<(), String> {
    match max {
        Some(m) if existing >= m.get() => Err(format!(
            "quota exceeded: this namespace allows at most {m} hybrid connections (limits.max_hybrid_connections) and has {existing}; delete one or raise the limit"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, client: Option<&str>) -> SenderKey {
        SenderKey {
            remote: ip.parse().unwrap(),
            key_name: Some("defaultSender".into()),
            client_id: client.map(str::to_owned),
        }
    }

    #[test]
    fn counts_tunnels_and_bytes_per_sender() {
        let u = Arc::new(Usage::default());
        let t1 = u.opened("Db", key("10.0.0.1", Some("app1")));
        let t2 = u.opened("db", key("10.0.0.1", Some("app1")));
        let t3 = u.opened("db", key("10.0.0.2", None));
        t1.closed(100, 2000);
        drop(t2);
        let s = u.senders("DB");
        assert_eq!(s.len(), 2);
        let app1 = s.iter().find(|s| s.key.client_id.as_deref() == Some("app1")).unwrap();
        assert_eq!(
            (app1.tunnels, app1.active, app1.bytes_sent, app1.bytes_received),
            (2, 0, 100, 2000)
        );
        assert!(app1.first_seen <= app1.last_seen);
        t3.closed(1, 1);
        assert_eq!(s[0].to_json()["keyName"], "defaultSender");
        u.forget("db");
        assert!(u.senders("db").is_empty());
    }

    #[test]
    fn bounded_and_forgetful() {
        let u = Usage::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..40u64 {
            let k = key(&format!("10.0.0.{i}"), None);
            u.opened_at("db", k.clone(), t0 + Duration::from_secs(i));
            u.closed_at("db", &k, 0, 0, t0 + Duration::from_secs(i));
        }
        let s = u.senders("db");
        assert_eq!(s.len(), MAX_SENDERS);
        assert_eq!(s[0].key.remote.to_string(), "10.0.0.39", "the newest stay");
        assert!(s.iter().all(|s| s.key.remote.to_string() != "10.0.0.0"));
        // A day later, everyone idle is forgotten on the next connect.
        let k = key("10.9.9.9", None);
        u.opened_at("db", k.clone(), t0 + FORGET_AFTER + Duration::from_secs(100));
        assert_eq!(u.senders("db").len(), 1);
    }

    #[test]
    fn quota() {
        let max = std::num::NonZeroUsize::new(5);
        assert!(check_quota(4, max).is_ok());
        assert!(check_quota(5, max).unwrap_err().contains("at most 5"));
        assert!(check_quota(1_000_000, None).is_ok());
    }
}
