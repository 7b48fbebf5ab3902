//! The relay's control plane: one task, on its own thread, that owns the entity store, the
//! listener registry and the rendezvous table.
//!
//! Workers never share mutable state with it: they send a [`Request`] over a bounded
//! channel through [`Ctl`] and get an answer on a oneshot. Listener I/O stays on the worker
//! that accepted the control channel; the plane only holds a command sender per listener.
//!
//! Rendezvous: `connect` creates a single-use 128-bit secret, records a oneshot to the
//! sender's task and queues an `accept` on a chosen listener. The listener's rendezvous
//! request, on whatever worker it lands, takes that oneshot out of the table and sends its
//! parked connection through it, so the later leg joins the earlier leg's worker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use percent_encoding::utf8_percent_encode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::config::{Balance, RelayConfig};
use super::store::{Entity, SharedState, State, Store, StoreError};
use crate::proto::address::RENDEZVOUS_PARAM;
use crate::proto::control::Accept;
use crate::proto::ids::{new_id, new_secret};
use crate::proto::sas::URI_COMPONENT;
use crate::transport::Stream;

/// Capacity of the worker → control plane channel.
const REQUEST_QUEUE: usize = 4096;

/// A command for a listener's control-channel task.
#[derive(Debug)]
pub enum ListenerCmd {
    /// Send this JSON text.
    Send(String),
    /// Close the channel with this code and reason.
    Close(u16, String),
}

/// What the relay knows about a connected listener.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// `sb-hc-id`, or a generated id.
    pub id: String,
    pub remote: Option<SocketAddr>,
    /// `ws(s)://host[:port]` the listener reached us at; base of its accept addresses.
    pub base_url: String,
    pub connected_at: SystemTime,
}

/// A registered listener's end of the plane. Dropping it unregisters the listener, so the
/// registration is released on every exit path of the task that holds it, a panic
/// included (issue 9 item 4: a leaked registration counted against the listener quota
/// until the relay restarted).
#[must_use = "dropping the registration unregisters the listener"]
pub struct Registration {
    pub key: u64,
    pub commands: mpsc::Receiver<ListenerCmd>,
    entity: String,
    reg: Arc<Mutex<Registry>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("entity", &self.entity)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.reg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unregister(&self.entity, self.key);
    }
}

/// A sender's connect request.
#[derive(Debug, Clone)]
pub struct ConnectReq {
    /// Entity name (any case).
    pub entity: String,
    /// Entity and suffix as sent (percent-encoded).
    pub raw_path: String,
    /// The sender's non-`sb-hc` query pairs, raw.
    pub app_query: Vec<String>,
    /// The sender's `sb-hc-id`.
    pub id: Option<String>,
    /// Handshake headers to forward (credentials already removed), merged by name.
    pub headers: Vec<(String, String)>,
    pub remote: Option<SocketAddr>,
}

/// A dispatched connect, waiting for a listener.
#[derive(Debug)]
pub struct Connecting {
    pub secret: String,
    pub tracking_id: String,
    pub outcome: oneshot::Receiver<Outcome>,
    /// Counts this tunnel against the chosen listener while it lives.
    pub listener_load: Arc<AtomicUsize>,
    /// Counts the entity's active tunnels.
    pub entity_tunnels: Arc<AtomicUsize>,
    /// Cancelled when the entity is deleted.
    pub entity_gone: CancellationToken,
}

/// How a rendezvous ended.
#[derive(Debug)]
pub enum Outcome {
    Accepted(Leg),
    Rejected { status: u16, description: String },
}

/// The listener's leg of a tunnel, parked for the move to the sender's worker.
#[derive(Debug)]
pub struct Leg {
    pub stream: Stream,
    pub leftover: BytesMut,
    /// The subprotocol the listener picked.
    pub protocol: Option<String>,
    /// The listener's `Sec-WebSocket-Key`, for its 101.
    pub key: String,
    /// The leg's connection count, kept while the tunnel runs.
    pub slot: super::limits::ConnSlot,
}

/// Why the plane said no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Endpoint does not exist.")]
    NotFound,
    #[error("There are no listeners connected for the endpoint.")]
    NoListener,
    #[error(
        "QuotaExceeded: the hybrid connection already has the maximum of {0} listeners (MaximumListenersPerEndpoint)."
    )]
    Quota(usize),
    #[error("The relay is shutting down.")]
    ShuttingDown,
    #[error("Every listener of the endpoint has a full backlog of pending accepts; retry later.")]
    Busy,
    /// The sender's address (path and query) alone makes an `accept` larger than 64 KiB.
    #[error("The request target is too long to be passed to a listener.")]
    TooLarge,
}

/// A listener as shown by management and status.
#[derive(Debug, Clone)]
pub struct ListenerView {
    pub id: String,
    pub remote: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub active_tunnels: usize,
}

/// An entity with its live status.
#[derive(Debug, Clone)]
pub struct EntityView {
    pub entity: Entity,
    pub listeners: Vec<ListenerView>,
    pub active_tunnels: usize,
    /// The latest sender connect and its result.
    pub last_connect: Option<ConnectRecord>,
    /// The latest sender connect that was not accepted (status page: last error).
    pub last_failure: Option<ConnectRecord>,
    /// Sender connects per result since the relay started.
    pub connects: Vec<(&'static str, u64)>,
}

/// One sender connect as status shows it.
#[derive(Debug, Clone)]
pub struct ConnectRecord {
    pub at: SystemTime,
    /// `accepted`, `rejected`, `no_listener`, `auth_failed`, `timeout`, …
    pub result: &'static str,
    pub detail: String,
}

/// Which key of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Primary,
    Secondary,
}

/// Management operations.
#[derive(Debug, Clone)]
pub enum MgmtOp {
    List,
    Show(String),
    Create {
        name: String,
        endpoint: Option<crate::proto::metadata::HostPort>,
        requires_client_authorization: bool,
    },
    Delete(String),
    /// Regenerates `slot` of `rule` (or of every rule of the entity).
    RegenerateKey {
        name: String,
        slot: KeySlot,
        rule: Option<String>,
    },
}

/// Answer to a management operation.
#[derive(Debug)]
pub enum MgmtReply {
    List(Vec<EntityView>),
    Entity(Box<EntityView>),
    Deleted,
}

/// Messages from workers to the plane thread: changes of the persistent state.
#[derive(Debug)]
pub enum Request {
    Manage {
        op: MgmtOp,
        reply: oneshot::Sender<Result<MgmtReply, StoreError>>,
    },
}

/// Cloneable handle to the control plane. Registry operations (register, connect,
/// rendezvous, …) run on the calling worker under a short lock; management goes to the
/// plane thread, which owns the store.
#[derive(Debug, Clone)]
pub struct Ctl {
    tx: mpsc::Sender<Request>,
    reg: Arc<Mutex<Registry>>,
}

impl Ctl {
    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a listener; it stays registered until the returned guard is dropped.
    pub fn register(&self, entity: &str, info: ListenerInfo) -> Result<Registration, Refusal> {
        let (key, commands) = self.reg().register(entity, info)?;
        Ok(Registration {
            key,
            commands,
            entity: entity.to_owned(),
            reg: self.reg.clone(),
        })
    }

    pub fn connect(&self, req: ConnectReq) -> Result<Connecting, Refusal> {
        self.reg().connect(req)
    }

    /// Takes the rendezvous for `secret` out of the table (single use).
    pub fn rendezvous(&self, secret: &str) -> Option<oneshot::Sender<Outcome>> {
        self.reg()
            .pending
            .remove(secret)
            .filter(|p| p.deadline > Instant::now())
            .map(|p| p.tx)
    }

    /// The active-tunnel counter and deletion token of `entity`, while it has live state
    /// (for tunnels joined outside [`Ctl::connect`], like pooled rendezvous).
    pub fn entity_handles(&self, entity: &str) -> Option<(Arc<AtomicUsize>, CancellationToken)> {
        let reg = self.reg();
        let rt = reg.live.get(&entity.to_lowercase())?;
        Some((rt.tunnels.clone(), rt.gone.clone()))
    }

    /// Records a sender connect's result for status.
    pub fn record_connect(&self, entity: &str, result: &'static str, detail: String) {
        let record = ConnectRecord {
            at: SystemTime::now(),
            result,
            detail,
        };
        self.reg().record_connect(entity, record);
    }

    pub fn cancel(&self, secret: &str) {
        self.reg().pending.remove(secret);
    }

    pub async fn manage(&self, op: MgmtOp) -> Result<MgmtReply, StoreError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Manage { op, reply }).await.is_err() {
            return Err(StoreError::Io("the relay is shutting down".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Io("the relay is shutting down".into())))
    }
}

struct ListenerRt {
    key: u64,
    info: ListenerInfo,
    tx: mpsc::Sender<ListenerCmd>,
    load: Arc<AtomicUsize>,
}

#[derive(Default)]
struct EntityRt {
    listeners: Vec<ListenerRt>,
    tunnels: Arc<AtomicUsize>,
    gone: CancellationToken,
    last_connect: Option<ConnectRecord>,
    last_failure: Option<ConnectRecord>,
    connects: Vec<(&'static str, u64)>,
}

struct PendingRt {
    tx: oneshot::Sender<Outcome>,
    deadline: Instant,
    /// Lower-cased entity name and the listener the `accept` went to.
    entity: String,
    listener: u64,
    /// The `accept` JSON, to hand to another listener if this one goes away.
    accept: String,
}

/// Listeners and pending rendezvous: what the setup of every tunnel consults. Shared by
/// the workers (under a `Mutex`, held for microseconds, never across an await) so that a
/// connect or a rendezvous costs no round trip to another thread.
#[derive(Debug)]
pub struct Registry {
    cfg: Arc<RelayConfig>,
    state: SharedState,
    live: HashMap<String, EntityRt>,
    pending: HashMap<String, PendingRt>,
    next_key: u64,
}

impl std::fmt::Debug for EntityRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntityRt")
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl std::fmt::Debug for PendingRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRt").field("entity", &self.entity).finish()
    }
}

/// The plane thread: owns the store; answers management requests; sweeps expired
/// rendezvous; closes every control channel at shutdown.
pub struct Plane {
    store: Store,
    reg: Arc<Mutex<Registry>>,
}

impl Plane {
    /// A plane over `store`, and the handle workers use.
    pub fn new(cfg: Arc<RelayConfig>, store: Store) -> (Self, Ctl, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let reg = Arc::new(Mutex::new(Registry {
            cfg,
            state: store.shared(),
            live: HashMap::new(),
            pending: HashMap::new(),
            next_key: 1,
        }));
        let plane = Self {
            store,
            reg: reg.clone(),
        };
        (plane, Ctl { tx, reg }, rx)
    }

    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves requests until `shutdown`, then closes every control channel with 1001.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => self.reg().sweep(),
                req = rx.recv() => match req {
                    Some(Request::Manage { op, reply }) => {
                        reply.send(self.manage(op)).ok();
                    }
                    None => break,
                },
            }
        }
        for e in self.reg().live.values() {
            for l in &e.listeners {
                l.tx.try_send(ListenerCmd::Close(1001, "The relay is shutting down.".into()))
                    .ok();
            }
        }
    }

    fn view(&self, e: &Entity) -> EntityView {
        self.reg().view(e)
    }
    fn manage(&mut self, op: MgmtOp) -> Result<MgmtReply, StoreError> {
        let state = self.store.current();
        let find = |state: &State, name: &str| {
            state
                .entity(name)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(name.to_owned()))
        };
        match op {
            MgmtOp::List => Ok(MgmtReply::List(
                state.hybrid_connections.values().map(|e| self.view(e)).collect(),
            )),
            MgmtOp::Show(name) => Ok(MgmtReply::Entity(Box::new(self.view(&find(&state, &name)?)))),
            MgmtOp::Create {
                name,
                endpoint,
                requires_client_authorization,
            } => {
                crate::proto::address::validate_entity_name(&name).map_err(StoreError::Invalid)?;
                let e = self.store.update(|st| {
                    let key = name.to_lowercase();
                    if st.hybrid_connections.contains_key(&key) {
                        return Err(StoreError::Exists(name.clone()));
                    }
                    let e = super::store::new_entity(&name, endpoint.as_ref(), requires_client_authorization);
                    st.hybrid_connections.insert(key, e.clone());
                    Ok(e)
                })?;
                Ok(MgmtReply::Entity(Box::new(self.view(&e))))
            }
            MgmtOp::Delete(name) => {
                let key = name.to_lowercase();
                self.store.update(|st| {
                    st.hybrid_connections
                        .remove(&key)
                        .map(|_| ())
                        .ok_or_else(|| StoreError::NotFound(name.clone()))
                })?;
                metrics::gauge!(crate::telemetry::metrics::RELAY_LISTENERS, "hc" => name.clone()).set(0.0);
                let gone = self.reg().live.remove(&key);
                if let Some(rt) = gone {
                    rt.gone.cancel();
                    for l in rt.listeners {
                        l.tx.try_send(ListenerCmd::Close(1001, "The hybrid connection was deleted.".into()))
                            .ok();
                    }
                }
                Ok(MgmtReply::Deleted)
            }
            MgmtOp::RegenerateKey { name, slot, rule } => {
                let e = self.store.update(|st| {
                    let e = st
                        .hybrid_connections
                        .get_mut(&name.to_lowercase())
                        .ok_or_else(|| StoreError::NotFound(name.clone()))?;
                    let mut hit = false;
                    for r in e
                        .rules
                        .iter_mut()
                        .filter(|r| rule.as_ref().is_none_or(|n| *n == r.key_name))
                    {
                        r.regenerate(slot == KeySlot::Secondary);
                        hit = true;
                    }
                    if !hit {
                        return Err(StoreError::Invalid(format!(
                            "{name:?} has no rule {:?}",
                            rule.clone().unwrap_or_default()
                        )));
                    }
                    e.updated_at = crate::clock::now_rfc3339();
                    Ok(e.clone())
                })?;
                Ok(MgmtReply::Entity(Box::new(self.view(&e))))
            }
        }
    }
}

impl Registry {
    /// The entity's name as created (the metric label), or the lower-cased form if gone.
    fn label(&self, name: &str) -> String {
        self.state
            .load()
            .entity(name)
            .map(|e| e.name.clone())
            .unwrap_or_else(|| name.to_lowercase())
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        self.pending.retain(|_, p| p.deadline > now && !p.tx.is_closed());
    }

    fn record_connect(&mut self, entity: &str, record: ConnectRecord) {
        let name = entity.to_lowercase();
        if self.state.load().entity(&name).is_none() {
            return;
        }
        let rt = self.live.entry(name).or_default();
        match rt.connects.iter_mut().find(|(r, _)| *r == record.result) {
            Some((_, n)) => *n += 1,
            None => rt.connects.push((record.result, 1)),
        }
        if record.result != "accepted" {
            rt.last_failure = Some(record.clone());
        }
        rt.last_connect = Some(record);
    }

    fn register(&mut self, entity: &str, info: ListenerInfo) -> Result<(u64, mpsc::Receiver<ListenerCmd>), Refusal> {
        let name = entity.to_lowercase();
        if self.state.load().entity(&name).is_none() {
            return Err(Refusal::NotFound);
        }
        let rt = self.live.entry(name).or_default();
        if rt.listeners.len() >= self.cfg.max_listeners {
            return Err(Refusal::Quota(self.cfg.max_listeners));
        }
        let (tx, commands) = mpsc::channel(self.cfg.max_pending_accepts);
        let key = self.next_key;
        self.next_key += 1;
        rt.listeners.push(ListenerRt {
            key,
            info,
            tx,
            load: Arc::new(AtomicUsize::new(0)),
        });
        let n = rt.listeners.len();
        metrics::gauge!(crate::telemetry::metrics::RELAY_LISTENERS, "hc" => self.label(entity)).set(n as f64);
        Ok((key, commands))
    }

    fn unregister(&mut self, entity: &str, key: u64) {
        let name = entity.to_lowercase();
        let label = self.label(entity);
        let Some(rt) = self.live.get_mut(&name) else { return };
        rt.listeners.retain(|l| l.key != key);
        metrics::gauge!(crate::telemetry::metrics::RELAY_LISTENERS, "hc" => label).set(rt.listeners.len() as f64);
        // Senders waiting on the lost listener get another one (same address, same secret),
        // or, with none left, an immediate "no listener" instead of the accept timeout.
        let orphans: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.listener == key && p.entity == name)
            .map(|(s, _)| s.clone())
            .collect();
        for secret in orphans {
            let p = self.pending.get_mut(&secret).expect("collected above");
            let next = rt
                .listeners
                .iter()
                .filter(|l| l.tx.try_send(ListenerCmd::Send(p.accept.clone())).is_ok())
                .map(|l| l.key)
                .next();
            match next {
                Some(k) => p.listener = k,
                None => {
                    self.pending.remove(&secret);
                }
            }
        }
    }

    fn connect(&mut self, req: ConnectReq) -> Result<Connecting, Refusal> {
        let name = req.entity.to_lowercase();
        let rt = self.live.get_mut(&name).ok_or(Refusal::NoListener)?;
        let mut candidates: Vec<usize> = (0..rt.listeners.len()).collect();
        let mut busy = false;
        let tracking_id = req.id.clone().unwrap_or_else(new_id);
        while !candidates.is_empty() {
            let pick = pick(&rt.listeners, &candidates, self.cfg.balance);
            let idx = candidates.swap_remove(pick);
            let l = &rt.listeners[idx];
            let secret = new_secret();
            let accept = Accept {
                address: accept_address(&self.cfg, &l.info.base_url, &req, &tracking_id, &secret),
                id: tracking_id.clone(),
                connect_headers: req.headers.clone(),
                remote_endpoint: req.remote.map(|a| (a.ip().to_string(), a.port())),
            };
            // Never more than a listener may receive (issue 9 item 8): the .NET listener and
            // ours read control messages into 64 KiB.
            let text = match accept.encode_within(crate::proto::control::MAX_CONTROL_MESSAGE) {
                Ok((text, dropped)) => {
                    if !dropped.is_empty() {
                        tracing::info!(hc = %req.entity, dropped = dropped.len(), "connect headers left out of the accept to keep it within 64 KiB");
                    }
                    text
                }
                Err(_) => return Err(Refusal::TooLarge),
            };
            match l.tx.try_send(ListenerCmd::Send(text.clone())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    busy = true;
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => continue,
            }
            let (tx, outcome) = oneshot::channel();
            let deadline = Instant::now() + self.cfg.accept_timeout;
            let pending = PendingRt {
                tx,
                deadline,
                entity: name.clone(),
                listener: l.key,
                accept: text,
            };
            self.pending.insert(secret.clone(), pending);
            return Ok(Connecting {
                secret,
                tracking_id,
                outcome,
                listener_load: l.load.clone(),
                entity_tunnels: rt.tunnels.clone(),
                entity_gone: rt.gone.clone(),
            });
        }
        Err(if busy { Refusal::Busy } else { Refusal::NoListener })
    }

    fn view(&self, e: &Entity) -> EntityView {
        let rt = self.live.get(&e.name.to_lowercase());
        EntityView {
            entity: e.clone(),
            listeners: rt
                .map(|rt| {
                    rt.listeners
                        .iter()
                        .map(|l| ListenerView {
                            id: l.info.id.clone(),
                            remote: l.info.remote,
                            connected_at: l.info.connected_at,
                            active_tunnels: l.load.load(Ordering::Relaxed),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            active_tunnels: rt.map(|rt| rt.tunnels.load(Ordering::Relaxed)).unwrap_or(0),
            last_connect: rt.and_then(|rt| rt.last_connect.clone()),
            last_failure: rt.and_then(|rt| rt.last_failure.clone()),
            connects: rt.map(|rt| rt.connects.clone()).unwrap_or_default(),
        }
    }
}

fn pick(listeners: &[ListenerRt], candidates: &[usize], balance: Balance) -> usize {
    match balance {
        Balance::Random => rand::random_range(0..candidates.len()),
        Balance::LeastLoaded => {
            let load = |i: usize| listeners[candidates[i]].load.load(Ordering::Relaxed);
            let min = (0..candidates.len()).map(load).min().unwrap_or(0);
            let best: Vec<usize> = (0..candidates.len()).filter(|&i| load(i) == min).collect();
            best[rand::random_range(0..best.len())]
        }
    }
}

/// `{base}/$hc/{path}?{app query&}sb-hc-action=accept&sb-hc-id={id}&sb-hc-rid={secret}`.
fn accept_address(cfg: &RelayConfig, listener_base: &str, req: &ConnectReq, id: &str, secret: &str) -> String {
    let base = cfg
        .public_url
        .as_ref()
        .map(|u| u.ws_base())
        .unwrap_or_else(|| listener_base.to_owned());
    let mut q: Vec<String> = req.app_query.clone();
    q.push("sb-hc-action=accept".into());
    q.push(format!("sb-hc-id={}", utf8_percent_encode(id, URI_COMPONENT)));
    q.push(format!("{RENDEZVOUS_PARAM}={secret}"));
    format!("{base}/$hc/{}?{}", req.raw_path, q.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_address_keeps_app_query_and_hides_nothing_else() {
        let cfg = RelayConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "/tmp".into(),
            super::super::config::TlsSetting::Plain,
        );
        let req = ConnectReq {
            entity: "hc1".into(),
            raw_path: "hc1/sub%20x".into(),
            app_query: vec!["a=1".into()],
            id: None,
            headers: vec![],
            remote: None,
        };
        let a = accept_address(&cfg, "ws://127.0.0.1:5", &req, "id 1", "s3");
        assert_eq!(
            a,
            "ws://127.0.0.1:5/$hc/hc1/sub%20x?a=1&sb-hc-action=accept&sb-hc-id=id%201&sb-hc-rid=s3"
        );
    }
}
