//! The relay's control plane: the listener registry, the rendezvous table and the entity
//! store, behind one cloneable handle ([`Ctl`]).
//!
//! Two parts, split by how hot they are:
//! - The **registry** (listeners per hybrid connection, pending rendezvous, tunnel counts)
//!   is a `Mutex<Registry>` shared by every worker. Register, connect, rendezvous and HTTP
//!   delivery run on the calling worker under a short lock, so a new tunnel costs no round
//!   trip to another thread. Listener I/O stays on the worker that accepted the control
//!   channel; the registry holds only a bounded command queue per listener.
//! - The **store** (entities, keys, the state file or, in a cluster, the Redis catalog) is
//!   owned by the plane task on its own thread ([`Plane::run`]): management requests reach
//!   it over a bounded channel and are answered on a oneshot; it also sweeps expired
//!   rendezvous once a second and re-dispatches those whose listener went away.
//!
//! Rendezvous: `connect` creates a single-use 128-bit secret, records a oneshot to the
//! sender's task and queues an `accept` on a chosen listener (this node's, else in a
//! cluster one on another node, reached through Redis: [`Ctl::connect`]). The listener's
//! rendezvous request, on whatever worker it lands, takes that oneshot out of the table and
//! sends its parked connection through it, so the later leg joins the earlier leg's worker.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use percent_encoding::utf8_percent_encode;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cluster::Cluster;
use super::cluster::presence::{PresentListener, listener_ref};
use super::config::{Balance, RelayConfig};
use super::store::{Catalog, Entity, SharedState, State, StoreError};
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
    /// An HTTP-mode `request` and its body: the JSON text, then (if any) the body as one
    /// binary message, with nothing in between (hc-protocol.md §4.3).
    Request { text: String, body: Option<bytes::Bytes> },
    /// Close the channel with this code and reason.
    Close(u16, String),
}

/// The listener an HTTP-mode request is about to be sent to ([`Ctl::deliver`]).
#[derive(Debug)]
pub struct Delivery<'a> {
    /// The listener's registration key; 0 for a listener on another node (no inline
    /// answer is taken for the request then).
    pub key: u64,
    /// `ws(s)://host[:port]` of this relay as the listener can reach it, for rendezvous
    /// addresses.
    pub base_url: &'a str,
    /// False if the request must take the rendezvous-only form (a listener served by
    /// another relay node, which only relays the command).
    pub inline_ok: bool,
}

/// An HTTP-mode request handed to a listener.
#[derive(Debug)]
#[must_use = "dropping it stops counting the request against the listener"]
pub struct Delivered {
    /// Cancelled when that listener's control channel goes away.
    pub gone: CancellationToken,
    /// Counts the request against the listener's limit while it lives.
    _inflight: InflightGuard,
}

/// Counts one HTTP request in flight on a listener.
#[derive(Debug)]
struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
    /// Told when the listener leaves, so other nodes stop routing to it at once.
    cluster: Option<Arc<Cluster>>,
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
        if let Some(c) = &self.cluster {
            c.presence_changed();
        }
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

/// The listener's leg of a tunnel: parked for the move to the sender's worker, or live
/// when the sender runs on the worker that accepted it.
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

/// This node's listeners, its open tunnels per hybrid connection, and its tunnels per
/// listener they go to (`node/key`): its presence record in a cluster.
pub type LocalPresence = (Vec<PresentListener>, BTreeMap<String, u64>, BTreeMap<String, u64>);

/// A listener as shown by management and status.
#[derive(Debug, Clone)]
pub struct ListenerView {
    /// The relay node holding its control channel (a cluster), `None` for this node.
    pub node: Option<String>,
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
    cluster: Option<Arc<Cluster>>,
}

impl Ctl {
    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a listener; it stays registered until the returned guard is dropped. In a
    /// cluster, returns once the listener is in this node's presence record in Redis (or,
    /// bounded, Redis did not take it), so that a sender on any node that arrives after
    /// the listener's 101 finds it.
    pub async fn register(&self, entity: &str, info: ListenerInfo) -> Result<Registration, Refusal> {
        let (key, commands) = self.reg().register(entity, info)?;
        let registration = Registration {
            key,
            commands,
            entity: entity.to_owned(),
            reg: self.reg.clone(),
            cluster: self.cluster.clone(),
        };
        if let Some(c) = &self.cluster {
            c.listener_arrived().await;
        }
        Ok(registration)
    }

    /// Dispatches a sender to a listener: one of this node's if it has any that takes it,
    /// else (in a cluster) one on another node, whose node is asked to hand it the `accept`
    /// (the address names this node, where the sender waits).
    pub async fn connect(&self, req: ConnectReq) -> Result<Connecting, Refusal> {
        let arrived = Instant::now();
        let local = self.reg().connect(&req);
        let Some(cluster) = &self.cluster else { return local };
        match local {
            Err(Refusal::NoListener | Refusal::Busy) => {}
            other => return other,
        }
        let hc = req.entity.to_lowercase();
        let mut candidates = self.remote_candidates_since(cluster, &hc, arrived).await;
        let busy = matches!(local, Err(Refusal::Busy));
        while !candidates.is_empty() {
            let i = pick_candidate(&candidates, self.reg().cfg.balance);
            let c = candidates.swap_remove(i);
            let (connecting, text) = self
                .reg()
                .prepare_remote(&req, &c.node, c.key, &cluster.public_base())?;
            match cluster.deliver(&c.node, &hc, c.key, text).await {
                Ok(()) => return Ok(connecting),
                Err(why) => {
                    tracing::debug!(hc = %req.entity, node = %c.node, reason = %why, "routing to a listener on another node failed; trying the next");
                    self.reg().pending.remove(&connecting.secret);
                }
            }
        }
        Err(if busy { Refusal::Busy } else { Refusal::NoListener })
    }

    /// The listeners of `hc` (lower case) on other nodes, as of their last beats, with
    /// their loads.
    fn remote_candidates(&self, cluster: &Cluster, hc: &str) -> Vec<super::cluster::presence::Candidate> {
        let reg = self.reg();
        let own = |node: &str, key: u64| reg.remote_load_of(node, key);
        cluster.presence().candidates(hc, &own)
    }

    /// [`Ctl::remote_candidates`], but when there are none, only after presence was read
    /// again after `arrived`: a listener that registered elsewhere since the last beat is
    /// found, not refused as missing.
    async fn remote_candidates_since(
        &self,
        cluster: &Cluster,
        hc: &str,
        arrived: Instant,
    ) -> Vec<super::cluster::presence::Candidate> {
        let candidates = self.remote_candidates(cluster, hc);
        if !candidates.is_empty() {
            return candidates;
        }
        cluster.refresh_presence(arrived).await;
        self.remote_candidates(cluster, hc)
    }

    /// The `ws(s)://host[:port]` this node's accept addresses name when config fixes it (a
    /// cluster node's own public URL, or `public_url`); otherwise they take the Host the
    /// listener reached the relay by.
    pub fn node_base(&self) -> Option<String> {
        self.reg().fixed_base()
    }

    /// The tunnel count of the listener of `hc` on this node whose `sb-hc-id` is `id`.
    pub fn listener_load(&self, hc: &str, id: &str) -> Option<Arc<AtomicUsize>> {
        let reg = self.reg();
        let rt = reg.live.get(&hc.to_lowercase())?;
        rt.listeners.iter().find(|l| l.info.id == id).map(|l| l.load.clone())
    }

    /// Counts one HTTP request against listener `key` of `hc` (lower-cased) on this node,
    /// as [`Ctl::deliver`] does, for a request that goes on a rendezvous kept from an
    /// earlier one: `None` if that listener is no longer registered here or already has
    /// `max_inflight` requests in flight.
    pub fn count_request(&self, hc: &str, key: u64, max_inflight: usize) -> Option<Delivered> {
        let reg = self.reg();
        let l = reg.live.get(hc)?.listeners.iter().find(|l| l.key == key)?;
        // Under the registry lock, as in `deliver`: the check and the count are one step.
        (!l.at_request_limit(max_inflight)).then(|| l.count_request())
    }

    /// Hands listener `key` of `hc` on this node a command another node sent (cluster
    /// routing). `Err` is the reason word for the answer.
    pub fn deliver_local(&self, hc: &str, key: u64, text: String) -> Result<(), &'static str> {
        let reg = self.reg();
        let l = reg
            .live
            .get(&hc.to_lowercase())
            .and_then(|rt| rt.listeners.iter().find(|l| l.key == key))
            .ok_or(super::cluster::route::WHY_GONE)?;
        match l.tx.try_send(ListenerCmd::Send(text)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(super::cluster::route::WHY_BUSY),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(super::cluster::route::WHY_GONE),
        }
    }

    /// This node's listeners, open tunnels per hybrid connection, and tunnels per listener
    /// they go to, for its presence record.
    pub fn local_presence(&self, node: &str) -> LocalPresence {
        self.reg().local_presence(node)
    }

    /// Sends the pending rendezvous `secret`, whose listener went away, to another one
    /// (this node's first, then other nodes'); with none left the sender gets "no listener".
    async fn redispatch(&self, secret: String) {
        let Some(cluster) = &self.cluster else { return };
        let Some((hc, text, gone)) = self.reg().pending_for_redispatch(&secret) else {
            return;
        };
        if self.reg().redispatch_local(&secret) {
            return;
        }
        let mut candidates = self.remote_candidates(cluster, &hc);
        candidates.retain(|c| (c.node.as_str(), c.key) != (gone.0.as_str(), gone.1));
        for c in candidates {
            if cluster.deliver(&c.node, &hc, c.key, text.clone()).await.is_ok() {
                self.reg().retarget(
                    &secret,
                    Target::Remote {
                        node: c.node,
                        key: c.key,
                    },
                );
                return;
            }
        }
        self.reg().pending.remove(&secret);
    }

    /// Picks a listener of `entity` with the same rule as [`Ctl::connect`], skipping those
    /// with `max_inflight` HTTP requests in flight, and queues the command `make` builds
    /// for it. `make` may be called again for another listener if a queue is full.
    ///
    /// In a cluster, with no local listener that takes it, the request goes to a listener
    /// on another node in the rendezvous-only form (`inline_ok` false: only the command
    /// travels, through Redis; the listener then opens its rendezvous to this node, where
    /// the request and its body wait). Such a request is not counted against that
    /// listener's `max_inflight` (its node counts only its own), and its `gone` never
    /// fires: the response deadline bounds it.
    pub async fn deliver(
        &self,
        entity: &str,
        max_inflight: usize,
        mut make: impl FnMut(&Delivery<'_>) -> ListenerCmd,
    ) -> Result<Delivered, Refusal> {
        let arrived = Instant::now();
        let local = self.reg().deliver(entity, max_inflight, &mut make);
        let Some(cluster) = &self.cluster else { return local };
        let busy = match local {
            Err(Refusal::NoListener) => false,
            Err(Refusal::Busy) => true,
            other => return other,
        };
        let hc = entity.to_lowercase();
        let base = cluster.public_base();
        let mut candidates = self.remote_candidates_since(cluster, &hc, arrived).await;
        while !candidates.is_empty() {
            let i = pick_candidate(&candidates, self.reg().cfg.balance);
            let c = candidates.swap_remove(i);
            // Key 0 is no listener of this node: no inline answer is taken for it.
            let d = Delivery {
                key: 0,
                base_url: &base,
                inline_ok: false,
            };
            let text = match make(&d) {
                ListenerCmd::Request { text, .. } | ListenerCmd::Send(text) => text,
                ListenerCmd::Close(..) => continue,
            };
            match cluster.deliver(&c.node, &hc, c.key, text).await {
                Ok(()) => {
                    return Ok(Delivered {
                        gone: CancellationToken::new(),
                        _inflight: InflightGuard(Arc::new(AtomicUsize::new(1))),
                    });
                }
                Err(why) => {
                    tracing::debug!(hc = %entity, node = %c.node, reason = %why, "routing an HTTP request to a listener on another node failed; trying the next");
                }
            }
        }
        Err(if busy { Refusal::Busy } else { Refusal::NoListener })
    }

    /// Takes the rendezvous for `secret` out of the table (single use): where its outcome
    /// goes, and the worker thread of the sender waiting for it (see [`Stream::park_for`]).
    ///
    /// [`Stream::park_for`]: crate::transport::Stream::park_for
    pub fn rendezvous(&self, secret: &str) -> Option<(oneshot::Sender<Outcome>, std::thread::ThreadId)> {
        self.reg()
            .pending
            .remove(secret)
            .filter(|p| p.deadline > Instant::now())
            .map(|p| (p.tx, p.worker))
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
    /// HTTP-mode requests in flight.
    http: Arc<AtomicUsize>,
    /// Cancelled when the listener leaves the registry (HTTP requests waiting on it fail).
    gone: CancellationToken,
}

impl ListenerRt {
    /// True while `max` HTTP requests are in flight on it.
    fn at_request_limit(&self, max: usize) -> bool {
        self.http.load(Ordering::Relaxed) >= max
    }

    /// Counts one more HTTP request in flight, for as long as the result lives.
    fn count_request(&self) -> Delivered {
        self.http.fetch_add(1, Ordering::Relaxed);
        Delivered {
            gone: self.gone.clone(),
            _inflight: InflightGuard(self.http.clone()),
        }
    }
}

impl Drop for ListenerRt {
    fn drop(&mut self) {
        self.gone.cancel();
    }
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
    /// The worker thread of the waiting sender's task (`connect` runs on it).
    worker: std::thread::ThreadId,
    deadline: Instant,
    /// Lower-cased entity name and the listener the `accept` went to.
    entity: String,
    listener: Target,
    /// The `accept` JSON, to hand to another listener if this one goes away.
    accept: String,
}

/// The listener an `accept` went to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One of this node's, by key.
    Local(u64),
    /// One of another node's (a cluster).
    Remote { node: String, key: u64 },
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
    /// The cluster this node belongs to, if any.
    cluster: Option<Arc<Cluster>>,
    /// Tunnels open on this node per listener of another node (`node/key`).
    remote_load: HashMap<String, Arc<AtomicUsize>>,
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
    store: Catalog,
    reg: Arc<Mutex<Registry>>,
    ctl: Ctl,
}

impl Plane {
    /// A plane over `store`, and the handle workers use.
    pub fn new(cfg: Arc<RelayConfig>, store: Catalog) -> (Self, Ctl, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let cluster = match &store {
            Catalog::Cluster(c) => Some(c.clone()),
            Catalog::File(_) => None,
        };
        let reg = Arc::new(Mutex::new(Registry {
            cfg,
            state: store.shared(),
            live: HashMap::new(),
            pending: HashMap::new(),
            next_key: 1,
            cluster: cluster.clone(),
            remote_load: HashMap::new(),
        }));
        let ctl = Ctl {
            tx,
            reg: reg.clone(),
            cluster,
        };
        let plane = Self {
            store,
            reg,
            ctl: ctl.clone(),
        };
        (plane, ctl, rx)
    }

    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves requests until `shutdown`, then closes every control channel with 1001.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut changes = self.store.shared().subscribe();
        let mut known = self.store.current();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => {
                    let orphans = self.reg().sweep();
                    for secret in orphans {
                        let ctl = self.ctl.clone();
                        tokio::spawn(async move { ctl.redispatch(secret).await });
                    }
                }
                Ok(()) = changes.changed() => {
                    let now = changes.borrow_and_update().clone();
                    self.reg().forget_deleted(&known, &now);
                    known = now;
                }
                req = rx.recv() => match req {
                    Some(Request::Manage { op, reply }) => {
                        reply.send(self.manage(op).await).ok();
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
    async fn manage(&mut self, op: MgmtOp) -> Result<MgmtReply, StoreError> {
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
                let quota = self.reg().cfg.max_hybrid_connections;
                let e = self
                    .store
                    .update(|st| {
                        let key = name.to_lowercase();
                        if st.hybrid_connections.contains_key(&key) {
                            return Err(StoreError::Exists(name.clone()));
                        }
                        super::usage::check_quota(st.hybrid_connections.len(), quota).map_err(StoreError::Quota)?;
                        let e = super::store::new_entity(&name, endpoint.as_ref(), requires_client_authorization);
                        st.hybrid_connections.insert(key, e.clone());
                        Ok(e)
                    })
                    .await?;
                Ok(MgmtReply::Entity(Box::new(self.view(&e))))
            }
            MgmtOp::Delete(name) => {
                let key = name.to_lowercase();
                self.store
                    .update(|st| {
                        st.hybrid_connections
                            .remove(&key)
                            .map(|_| ())
                            .ok_or_else(|| StoreError::NotFound(name.clone()))
                    })
                    .await?;
                // Its listeners are closed when the change reaches the state (`forget_deleted`),
                // on this node and on every other node of a cluster alike.
                Ok(MgmtReply::Deleted)
            }
            MgmtOp::RegenerateKey { name, slot, rule } => {
                let e = self.store.update(|st: &mut State| {
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
                });
                let e = e.await?;
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

    /// Drops expired or abandoned rendezvous; returns those whose listener on another node
    /// is no longer present (to send elsewhere).
    fn sweep(&mut self) -> Vec<String> {
        let now = Instant::now();
        self.pending.retain(|_, p| p.deadline > now && !p.tx.is_closed());
        self.remote_load.retain(|_, n| n.load(Ordering::Relaxed) > 0);
        let Some(cluster) = &self.cluster else {
            return Vec::new();
        };
        let presence = cluster.presence();
        self.pending
            .iter()
            .filter(|(_, p)| matches!(&p.listener, Target::Remote { node, key } if !presence.holds(node, *key)))
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// After a change of the state: hybrid connections that no longer exist lose their
    /// listeners (1001) and their tunnels (`gone`), whichever node deleted them.
    fn forget_deleted(&mut self, before: &State, now: &State) {
        for (key, e) in &before.hybrid_connections {
            if now.hybrid_connections.contains_key(key) {
                continue;
            }
            metrics::gauge!(crate::telemetry::metrics::RELAY_LISTENERS, "hc" => e.name.clone()).set(0.0);
            if let Some(rt) = self.live.remove(key) {
                rt.gone.cancel();
                for l in rt.listeners {
                    l.tx.try_send(ListenerCmd::Close(1001, "The hybrid connection was deleted.".into()))
                        .ok();
                }
            }
            self.pending.retain(|_, p| p.entity != *key);
        }
    }

    /// Tunnels this node runs to listener `key` of `node`.
    fn remote_load_of(&self, node: &str, key: u64) -> u64 {
        self.remote_load
            .get(&listener_ref(node, key))
            .map_or(0, |n| n.load(Ordering::Relaxed) as u64)
    }

    /// Registers a rendezvous for `req` with a listener of another node; returns it and the
    /// `accept` text to send there (its address names this node, `base`).
    fn prepare_remote(
        &mut self,
        req: &ConnectReq,
        node: &str,
        key: u64,
        base: &str,
    ) -> Result<(Connecting, String), Refusal> {
        let name = req.entity.to_lowercase();
        if self.state.load().entity(&name).is_none() {
            return Err(Refusal::NotFound);
        }
        let tracking_id = req.id.clone().unwrap_or_else(new_id);
        let secret = new_secret();
        let text = encode_accept(req, accept_address(base, req, &tracking_id, &secret), &tracking_id)?;
        let load = self
            .remote_load
            .entry(listener_ref(node, key))
            .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
            .clone();
        let rt = self.live.entry(name.clone()).or_default();
        let (tx, outcome) = oneshot::channel();
        self.pending.insert(
            secret.clone(),
            PendingRt {
                tx,
                worker: std::thread::current().id(),
                deadline: Instant::now() + self.cfg.accept_timeout,
                entity: name,
                listener: Target::Remote {
                    node: node.to_owned(),
                    key,
                },
                accept: text.clone(),
            },
        );
        Ok((
            Connecting {
                secret,
                tracking_id,
                outcome,
                listener_load: load,
                entity_tunnels: rt.tunnels.clone(),
                entity_gone: rt.gone.clone(),
            },
            text,
        ))
    }

    /// The hybrid connection, `accept` text and listener of pending rendezvous `secret`.
    fn pending_for_redispatch(&self, secret: &str) -> Option<(String, String, (String, u64))> {
        let p = self.pending.get(secret)?;
        let gone = match &p.listener {
            Target::Remote { node, key } => (node.clone(), *key),
            Target::Local(k) => (String::new(), *k),
        };
        Some((p.entity.clone(), p.accept.clone(), gone))
    }

    /// Sends pending rendezvous `secret` to one of this node's listeners, if one takes it.
    fn redispatch_local(&mut self, secret: &str) -> bool {
        let Some(p) = self.pending.get_mut(secret) else {
            return false;
        };
        let Some(rt) = self.live.get(&p.entity) else {
            return false;
        };
        let next = rt
            .listeners
            .iter()
            .find(|l| l.tx.try_send(ListenerCmd::Send(p.accept.clone())).is_ok())
            .map(|l| l.key);
        match next {
            Some(k) => {
                p.listener = Target::Local(k);
                true
            }
            None => false,
        }
    }

    fn retarget(&mut self, secret: &str, to: Target) {
        if let Some(p) = self.pending.get_mut(secret) {
            p.listener = to;
        }
    }

    /// This node's presence: its listeners, tunnels per hybrid connection, tunnels per
    /// listener (its own and other nodes').
    fn local_presence(&self, node: &str) -> LocalPresence {
        let mut listeners = Vec::new();
        let mut tunnels = BTreeMap::new();
        let mut load = BTreeMap::new();
        for (hc, rt) in &self.live {
            let n = rt.tunnels.load(Ordering::Relaxed) as u64;
            if n > 0 {
                tunnels.insert(hc.clone(), n);
            }
            for l in &rt.listeners {
                listeners.push(PresentListener {
                    hc: hc.clone(),
                    key: l.key,
                    id: l.info.id.clone(),
                    since: crate::clock::rfc3339(l.info.connected_at),
                    remote: l.info.remote.map(|a| a.to_string()),
                });
                let n = l.load.load(Ordering::Relaxed) as u64;
                if n > 0 {
                    load.insert(listener_ref(node, l.key), n);
                }
            }
        }
        for (r, n) in &self.remote_load {
            let n = n.load(Ordering::Relaxed) as u64;
            if n > 0 {
                load.insert(r.clone(), n);
            }
        }
        (listeners, tunnels, load)
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
        // The limit is the cluster's: listeners on other nodes count (as of their last beat).
        let elsewhere = self
            .cluster
            .as_ref()
            .map_or(0, |c| c.presence().listeners_of(&name).count());
        let rt = self.live.entry(name).or_default();
        if rt.listeners.len() + elsewhere >= self.cfg.max_listeners {
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
            http: Arc::new(AtomicUsize::new(0)),
            gone: CancellationToken::new(),
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
            .filter(|(_, p)| p.listener == Target::Local(key) && p.entity == name)
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
                Some(k) => p.listener = Target::Local(k),
                // In a cluster the sweep sends it to another node's listener, if any.
                None if self.cluster.is_some() => {}
                None => {
                    self.pending.remove(&secret);
                }
            }
        }
    }

    /// The base of this node's rendezvous addresses when config fixes it: a cluster node's
    /// own public URL, else a single node's `public_url` ([`Ctl::node_base`]).
    fn fixed_base(&self) -> Option<String> {
        self.cluster
            .as_ref()
            .map(|c| c.public_base())
            .or_else(|| self.cfg.public_url.as_ref().map(|u| u.ws_base()))
    }

    fn connect(&mut self, req: &ConnectReq) -> Result<Connecting, Refusal> {
        let name = req.entity.to_lowercase();
        let own_base = self.fixed_base();
        let rt = self.live.get_mut(&name).ok_or(Refusal::NoListener)?;
        let mut candidates: Vec<usize> = (0..rt.listeners.len()).collect();
        let mut busy = false;
        let tracking_id = req.id.clone().unwrap_or_else(new_id);
        while !candidates.is_empty() {
            let pick = pick(&rt.listeners, &candidates, self.cfg.balance);
            let idx = candidates.swap_remove(pick);
            let l = &rt.listeners[idx];
            let secret = new_secret();
            // The node's fixed base, else the Host the listener reached it by.
            let base = own_base.clone().unwrap_or_else(|| l.info.base_url.clone());
            let text = encode_accept(req, accept_address(&base, req, &tracking_id, &secret), &tracking_id)?;
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
                worker: std::thread::current().id(),
                deadline,
                entity: name.clone(),
                listener: Target::Local(l.key),
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

    fn deliver(
        &mut self,
        entity: &str,
        max_inflight: usize,
        mut make: impl FnMut(&Delivery<'_>) -> ListenerCmd,
    ) -> Result<Delivered, Refusal> {
        let base = self.fixed_base();
        let rt = self.live.get(&entity.to_lowercase()).ok_or(Refusal::NoListener)?;
        let mut candidates: Vec<usize> = (0..rt.listeners.len()).collect();
        let mut busy = false;
        while !candidates.is_empty() {
            let idx = candidates.swap_remove(pick(&rt.listeners, &candidates, self.cfg.balance));
            let l = &rt.listeners[idx];
            if l.at_request_limit(max_inflight) {
                busy = true;
                continue;
            }
            let d = Delivery {
                key: l.key,
                base_url: base.as_deref().unwrap_or(&l.info.base_url),
                inline_ok: true,
            };
            match l.tx.try_send(make(&d)) {
                Ok(()) => return Ok(l.count_request()),
                Err(mpsc::error::TrySendError::Full(_)) => busy = true,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Err(if busy { Refusal::Busy } else { Refusal::NoListener })
    }

    /// An entity with its listeners and tunnels: this node's, and in a cluster every other
    /// node's as of their last beat.
    fn view(&self, e: &Entity) -> EntityView {
        let key = e.name.to_lowercase();
        let rt = self.live.get(&key);
        let presence = self.cluster.as_ref().map(|c| c.presence());
        let mut listeners: Vec<ListenerView> = rt
            .map(|rt| {
                rt.listeners
                    .iter()
                    .map(|l| ListenerView {
                        node: None,
                        id: l.info.id.clone(),
                        remote: l.info.remote,
                        connected_at: l.info.connected_at,
                        active_tunnels: l.load.load(Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut elsewhere = 0;
        if let Some(p) = &presence {
            for (n, l) in p.listeners_of(&key) {
                let r = listener_ref(&n.node, l.key);
                let load: u64 =
                    p.nodes.iter().filter_map(|m| m.load.get(&r)).sum::<u64>() + self.remote_load_of(&n.node, l.key);
                listeners.push(ListenerView {
                    node: Some(n.node.clone()),
                    id: l.id.clone(),
                    remote: l.remote.as_deref().and_then(|r| r.parse().ok()),
                    connected_at: humantime::parse_rfc3339(&l.since).unwrap_or(std::time::UNIX_EPOCH),
                    active_tunnels: load as usize,
                });
            }
            elsewhere = p.tunnels_of(&key) as usize;
        }
        EntityView {
            entity: e.clone(),
            listeners,
            active_tunnels: rt.map(|rt| rt.tunnels.load(Ordering::Relaxed)).unwrap_or(0) + elsewhere,
            last_connect: rt.and_then(|rt| rt.last_connect.clone()),
            last_failure: rt.and_then(|rt| rt.last_failure.clone()),
            connects: rt.map(|rt| rt.connects.clone()).unwrap_or_default(),
        }
    }
}

/// Builds the `accept` for `req` with `address`, within what a listener may receive
/// (issue 9 item 8: the .NET listener and ours read control messages into 64 KiB).
fn encode_accept(req: &ConnectReq, address: String, tracking_id: &str) -> Result<String, Refusal> {
    let accept = Accept {
        address,
        id: tracking_id.to_owned(),
        connect_headers: req.headers.clone(),
        remote_endpoint: req.remote.map(|a| (a.ip().to_string(), a.port())),
    };
    match accept.encode_within(crate::proto::control::MAX_CONTROL_MESSAGE) {
        Ok((text, dropped)) => {
            if !dropped.is_empty() {
                tracing::info!(hc = %req.entity, dropped = dropped.len(), "connect headers left out of the accept to keep it within 64 KiB");
            }
            Ok(text)
        }
        Err(_) => Err(Refusal::TooLarge),
    }
}

/// The candidate (a listener on another node) to try next, by the balance rule.
fn pick_candidate(c: &[super::cluster::presence::Candidate], balance: Balance) -> usize {
    let loads: Vec<Option<usize>> = c.iter().map(|x| Some(x.load as usize)).collect();
    choose_by(balance, &loads)
}

/// The index `balance` picks among items with these loads (`None`: not known here, counted
/// as idle): random, or the least loaded with ties broken at random.
pub(crate) fn choose_by(balance: Balance, loads: &[Option<usize>]) -> usize {
    match balance {
        Balance::Random => rand::random_range(0..loads.len().max(1)),
        Balance::LeastLoaded => {
            let load = |i: usize| loads[i].unwrap_or(0);
            let min = (0..loads.len()).map(load).min().unwrap_or(0);
            let best: Vec<usize> = (0..loads.len()).filter(|&i| load(i) == min).collect();
            best.get(rand::random_range(0..best.len().max(1))).copied().unwrap_or(0)
        }
    }
}

fn pick(listeners: &[ListenerRt], candidates: &[usize], balance: Balance) -> usize {
    let loads: Vec<Option<usize>> = candidates
        .iter()
        .map(|&i| Some(listeners[i].load.load(Ordering::Relaxed)))
        .collect();
    choose_by(balance, &loads)
}

/// `{base}/$hc/{path}?{app query&}sb-hc-action=accept&sb-hc-id={id}&sb-hc-rid={secret}`.
fn accept_address(base: &str, req: &ConnectReq, id: &str, secret: &str) -> String {
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
        let req = ConnectReq {
            entity: "hc1".into(),
            raw_path: "hc1/sub%20x".into(),
            app_query: vec!["a=1".into()],
            id: None,
            headers: vec![],
            remote: None,
        };
        let a = accept_address("ws://127.0.0.1:5", &req, "id 1", "s3");
        assert_eq!(
            a,
            "ws://127.0.0.1:5/$hc/hc1/sub%20x?a=1&sb-hc-action=accept&sb-hc-id=id%201&sb-hc-rid=s3"
        );
    }
}
