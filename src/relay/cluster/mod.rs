//! A relay cluster: several equal relay nodes behind an ordinary TCP load balancer serve
//! one namespace, sharing their state through Redis (issue 10; architecture.md "Scale
//! beyond one machine").
//!
//! - **Catalog** ([`catalog`]): rules, hybrid connections, keys and metadata live in Redis;
//!   every node keeps a copy in memory (the relay's [`SharedState`]) and a cache on disk, so
//!   authenticating never waits on Redis and a node can start and serve while Redis is away.
//!   Writes are compare-and-set scripts; every node applies a change on its pub/sub event
//!   and, in case one was lost, on a version check every second.
//! - **Presence** ([`presence`]): each node publishes its listeners and loads every second
//!   under an expiring key and reads everyone else's; a listener's arrival is written
//!   before its 101 and announced to the other nodes at once, and a node that finds no
//!   listener for a sender reads presence afresh before it refuses.
//! - **Routing** ([`route`]): a node whose sender's hybrid connection has no listener of
//!   its own asks the node of a listener elsewhere to hand it an `accept` whose address
//!   names the *sender's* node, so the hcm opens the rendezvous where the sender waits and
//!   the tunnel's bytes never cross between nodes.
//!
//! The catalog is never silently re-created: a node that had one and finds Redis empty (or
//! holding another cluster's) keeps serving from its copy, refuses management writes and
//! says why on `/readyz` until an operator acts (`hyrelay cluster import`).
//!
//! Threads: the cluster's background work runs on a thread of its own (`hyrelay-cluster`)
//! with a single-threaded runtime; management writes and routing requests run on the
//! caller's runtime over the same multiplexed Redis connection.

pub mod catalog;
pub mod config;
pub mod presence;
pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::catalog::{CasResult, Keys, Snapshot};
pub use self::config::ClusterConfig;
use self::presence::{NodePresence, Presence, PresenceKeys};
use self::route::Message;
use super::control::Ctl;
use super::store::{SharedState, State, StoreError};

/// How often presence is published and read, and the catalog's version checked.
const BEAT: Duration = Duration::from_secs(1);
/// Bound on one Redis command (a slow Redis counts as an unreachable one).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a sender that found no listener waits for a fresh read of presence, and a
/// new listener's 101 for its presence to be written.
const MISS_REFRESH: Duration = Duration::from_millis(500);
/// Least time between two presence reads that senders finding no listener trigger: a
/// flood of such senders costs Redis at most one read per `MISS_FLOOR`, and a sender at
/// most this much more wait.
pub const MISS_FLOOR: Duration = Duration::from_millis(20);
/// Compare-and-set attempts before a management write gives up.
const CAS_ATTEMPTS: usize = 5;

/// Whether a presence beat writes this node's record or only reads the others'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Write ours (with its TTL) and read the others': the once-a-second beat and an
    /// announcement that this node's listeners changed.
    Own,
    /// Only read: another node said its listeners changed, or a sender found no listener.
    /// This node's record has not changed, and the next beat renews its TTL.
    Nothing,
}

/// Metric names of the cluster (`/metrics`).
pub mod metric {
    pub const REDIS_UP: &str = "hyrelay_cluster_redis_up";
    pub const CATALOG_VERSION: &str = "hyrelay_cluster_catalog_version";
    pub const NODES: &str = "hyrelay_cluster_nodes";
    pub const ROUTED: &str = "hyrelay_cluster_accepts_routed_total";
    pub const ROUTE_SECONDS: &str = "hyrelay_cluster_route_seconds";
}

/// How the node's copy of the catalog stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogState {
    /// In step with Redis.
    Synced,
    /// Redis cannot be reached; serving the last copy (if any).
    RedisDown(String),
    /// Redis holds no catalog, but this node had one: not re-created (data lost, wrong DB).
    Lost(String),
    /// Nothing to serve yet: no Redis and no cached copy.
    NoCatalog(String),
}

/// The cluster's health as `/readyz` and `/status` show it.
#[derive(Debug, Clone)]
pub struct Health {
    pub node_id: String,
    pub public_url: String,
    pub redis: String,
    pub redis_up: bool,
    pub catalog: CatalogState,
    pub catalog_version: u64,
    pub cluster_id: Option<String>,
    /// Other nodes that beat within their TTL.
    pub nodes: Vec<NodePresence>,
}

impl Health {
    /// `Err(reason)` when the node must not be counted as ready: it has no catalog, or its
    /// catalog is gone from Redis. Redis merely being away is degraded, not unready (the
    /// node still serves its own listeners; a load balancer must keep sending it traffic).
    pub fn ready(&self) -> Result<(), String> {
        match &self.catalog {
            CatalogState::Lost(why) | CatalogState::NoCatalog(why) => Err(why.clone()),
            _ => Ok(()),
        }
    }

    /// A short word for status tables.
    pub fn word(&self) -> &'static str {
        match self.catalog {
            CatalogState::Synced if self.redis_up => "synced",
            CatalogState::Synced | CatalogState::RedisDown(_) => "degraded: Redis unreachable",
            CatalogState::Lost(_) => "catalog lost",
            CatalogState::NoCatalog(_) => "no catalog",
        }
    }
}

/// Where the answer to a routing request goes: whether it was delivered, and why not.
type AckSender = oneshot::Sender<(bool, Option<String>)>;

/// What the node serves: the catalog snapshot and its raw fields.
#[derive(Debug, Default)]
struct Mirror {
    snap: Option<Snapshot>,
}

/// A running cluster membership. Dropping the last reference stops nothing: call
/// [`Cluster::stop`].
pub struct Cluster {
    cfg: ClusterConfig,
    keys: Keys,
    pkeys: PresenceKeys,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    rt: tokio::runtime::Handle,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: CancellationToken,
    state: SharedState,
    mirror: Mutex<Mirror>,
    catalog: Mutex<CatalogState>,
    redis_up: AtomicBool,
    presence: RwLock<Arc<Presence>>,
    acks: Mutex<HashMap<u64, AckSender>>,
    next_req: AtomicU64,
    ctl: OnceLock<Ctl>,
    totals: OnceLock<Arc<crate::dataplane::flush::Totals>>,
    data_dir: PathBuf,
    started: String,
    draining: AtomicBool,
    /// The catalog version last written to the on-disk cache.
    cache_written: Mutex<u64>,
    /// Held for each beat, so beats never overlap (an older record never lands after a
    /// newer one); holds when the last successful beat started.
    beating: tokio::sync::Mutex<Option<Instant>>,
    /// This node's listeners changed: beat now and tell the others.
    changed: tokio::sync::Notify,
    /// Another node's listeners changed: read now.
    heard: tokio::sync::Notify,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.cfg.node_id).finish()
    }
}

/// The Redis client for `cfg` (password and CA applied).
pub fn client(cfg: &ClusterConfig) -> anyhow::Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let mut info = cfg
        .redis
        .expose()
        .into_connection_info()
        .map_err(|e| anyhow::anyhow!("Redis URL {}: {e}", cfg.redis_display()))?;
    if let Some(p) = &cfg.password {
        let r = info.redis_settings().clone().set_password(p.expose());
        info = info.set_redis_settings(r);
    }
    if cfg.ca_files.is_empty() {
        return redis::Client::open(info).map_err(|e| anyhow::anyhow!("Redis URL {}: {e}", cfg.redis_display()));
    }
    let mut pem = Vec::new();
    for f in &cfg.ca_files {
        pem.extend(std::fs::read(f).with_context(|| format!("reading the Redis CA file {}", f.display()))?);
    }
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| anyhow::anyhow!("Redis TLS settings: {e}"))
}

/// A connection manager that gives up quickly, so a dead Redis fails calls fast.
async fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client.clone(), cfg).await
}

/// `f` bounded by [`REDIS_TIMEOUT`]; a timeout is an I/O error.
async fn bounded<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
    tokio::time::timeout(REDIS_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )))
    })
}

/// Joins this node to the cluster: connects to Redis (or falls back to the cached catalog),
/// and returns with the catalog loaded into `Cluster::state`. Background work starts with
/// [`Cluster::attach`].
pub fn start(cfg: ClusterConfig, data_dir: &Path) -> anyhow::Result<Arc<Cluster>> {
    // rustls picks the process's provider for the Redis TLS connection: ours, as everywhere.
    let _ = Arc::unwrap_or_clone(crate::transport::tls::provider()).install_default();
    let client = client(&cfg)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = CancellationToken::new();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("hyrelay-cluster".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tx.send(Err(e)).ok();
                    return;
                }
            };
            tx.send(Ok(rt.handle().clone())).ok();
            rt.block_on(thread_stop.cancelled());
        })?;
    let rt = rx.recv().map_err(|_| anyhow::anyhow!("the cluster thread died"))??;
    let cache = catalog::read_cache(data_dir)?;
    let cluster = Arc::new(Cluster {
        keys: Keys::new(&cfg.key_prefix),
        pkeys: PresenceKeys::new(&cfg.key_prefix),
        client,
        conn: Mutex::new(None),
        rt,
        thread: Mutex::new(Some(thread)),
        stop,
        state: SharedState::new(Arc::new(empty_state())),
        mirror: Mutex::new(Mirror::default()),
        catalog: Mutex::new(CatalogState::NoCatalog("not connected to Redis yet".into())),
        redis_up: AtomicBool::new(false),
        presence: RwLock::new(Arc::new(Presence::default())),
        acks: Mutex::new(HashMap::new()),
        next_req: AtomicU64::new(1),
        ctl: OnceLock::new(),
        totals: OnceLock::new(),
        data_dir: data_dir.to_owned(),
        started: crate::clock::now_rfc3339(),
        draining: AtomicBool::new(false),
        cache_written: Mutex::new(0),
        beating: tokio::sync::Mutex::new(None),
        changed: tokio::sync::Notify::new(),
        heard: tokio::sync::Notify::new(),
        cfg,
    });
    if let Some(c) = cache {
        cluster.serve_snapshot(c, false);
        cluster.set_catalog(CatalogState::RedisDown("not connected to Redis yet".into()));
    }
    let c = cluster.clone();
    let first = cluster
        .rt
        .block_on(async move { tokio::time::timeout(Duration::from_secs(5), c.sync_once()).await });
    match first {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            tracing::warn!(node = %cluster.cfg.node_id, reason = %why, "starting without the cluster catalog from Redis")
        }
        Err(_) => {
            tracing::warn!(node = %cluster.cfg.node_id, "Redis did not answer within 5 s; starting from the cached catalog, if any")
        }
    }
    Ok(cluster)
}

/// A state with nothing in it: no rule, so nothing is authorized until a catalog arrives.
fn empty_state() -> State {
    State {
        version: 1,
        namespace_rules: Vec::new(),
        hybrid_connections: BTreeMap::new(),
    }
}

impl Cluster {
    /// The relay's state cell, fed from the catalog.
    pub fn shared_state(&self) -> SharedState {
        self.state.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// `ws(s)://host:port` of this node: the base of the rendezvous addresses it makes.
    pub fn public_base(&self) -> String {
        self.cfg.public_url.ws_base()
    }

    /// Starts the background work: catalog sync, presence, and answering other nodes.
    pub fn attach(self: &Arc<Self>, ctl: Ctl, totals: Arc<crate::dataplane::flush::Totals>) {
        self.ctl.set(ctl).ok();
        self.totals.set(totals).ok();
        let (a, b) = (self.clone(), self.clone());
        self.rt.spawn(async move { a.sync_loop().await });
        self.rt.spawn(async move { b.presence_loop().await });
    }

    /// The other nodes, as last read.
    pub fn presence(&self) -> Arc<Presence> {
        self.presence.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn health(&self) -> Health {
        let mirror = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        Health {
            node_id: self.cfg.node_id.clone(),
            public_url: self.public_base(),
            redis: self.cfg.redis_display(),
            redis_up: self.redis_up.load(Ordering::Relaxed),
            catalog: self.catalog.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            catalog_version: mirror.snap.as_ref().map_or(0, |s| s.version),
            cluster_id: mirror.snap.as_ref().map(|s| s.cluster_id.clone()),
            nodes: self.presence().nodes.clone(),
        }
    }

    /// Draining: this node's presence goes at once, so no other node routes to it.
    pub fn drain(self: &Arc<Self>) {
        if self.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        let c = self.clone();
        let (done, wait) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            if let Some(mut conn) = c.conn() {
                let key = c.pkeys.node(&c.cfg.node_id);
                let _ = bounded(
                    redis::pipe()
                        .del(&key)
                        .srem(&c.pkeys.nodes, &c.cfg.node_id)
                        .query_async::<()>(&mut conn),
                )
                .await;
            }
            done.send(()).ok();
        });
        // Called from a plain thread (the drain): wait for it, bounded.
        let _ = wait.recv_timeout(REDIS_TIMEOUT + Duration::from_millis(500));
    }

    /// Stops the background work and its thread.
    pub fn stop(&self) {
        self.stop.cancel();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.join().ok();
        }
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_catalog(&self, s: CatalogState) {
        let mut c = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        if *c != s {
            match &s {
                CatalogState::Synced => tracing::info!(node = %self.cfg.node_id, "cluster catalog in sync with Redis"),
                CatalogState::RedisDown(why) => {
                    tracing::warn!(node = %self.cfg.node_id, reason = %why, "Redis unreachable: serving the last catalog; management writes are refused")
                }
                CatalogState::Lost(why) | CatalogState::NoCatalog(why) => {
                    tracing::error!(node = %self.cfg.node_id, reason = %why, "cluster catalog unavailable")
                }
            }
        }
        *c = s;
    }

    fn set_redis_up(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
        metrics::gauge!(metric::REDIS_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Makes `snap` what the node serves; `persist` writes the on-disk cache too. An older
    /// version of the same catalog than the one served is ignored (a write's own event may
    /// arrive after the write was applied).
    fn serve_snapshot(&self, snap: Snapshot, persist: bool) {
        let stale = self
            .mirror
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snap
            .as_ref()
            .is_some_and(|m| m.cluster_id == snap.cluster_id && m.version > snap.version);
        if stale {
            return;
        }
        let state = match snap.to_state() {
            Ok(s) => s,
            Err(why) => {
                tracing::error!(node = %self.cfg.node_id, version = snap.version, reason = %why, "the cluster catalog does not validate; keeping the previous one");
                return;
            }
        };
        if persist {
            // One writer at a time, newest version last.
            let mut written = self.cache_written.lock().unwrap_or_else(|e| e.into_inner());
            if *written < snap.version || snap.version == 1 {
                match catalog::write_cache(&self.data_dir, &snap) {
                    Ok(()) => *written = snap.version,
                    Err(e) => tracing::warn!(error = %e, "cannot write the catalog cache"),
                }
            }
        }
        metrics::gauge!(metric::CATALOG_VERSION).set(snap.version as f64);
        let first = self.mirror.lock().unwrap_or_else(|e| e.into_inner()).snap.is_none();
        self.mirror.lock().unwrap_or_else(|e| e.into_inner()).snap = Some(snap);
        self.state.publish(Arc::new(state));
        if first {
            tracing::info!(node = %self.cfg.node_id, "cluster catalog loaded");
        }
    }

    /// The cluster id and version the node serves, if it has a catalog.
    fn served(&self) -> Option<(String, u64)> {
        let m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        m.snap.as_ref().map(|s| (s.cluster_id.clone(), s.version))
    }

    /// Connects if needed and brings the catalog in step (creating it in an empty Redis
    /// when this node never had one). `Err` says why it could not.
    async fn sync_once(self: &Arc<Self>) -> Result<(), String> {
        let mut conn = match self.conn() {
            Some(c) => c,
            None => match connect(&self.client).await {
                Ok(c) => {
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    c
                }
                Err(e) => return Err(self.redis_failed(&e)),
            },
        };
        let loaded = match bounded(catalog::load(&mut conn, &self.keys)).await {
            Ok(l) => l,
            Err(e) => return Err(self.redis_failed(&e)),
        };
        self.set_redis_up(true);
        let served = self.served();
        match (loaded, served) {
            (Some(snap), Some((id, _))) if snap.cluster_id != id => {
                let why = format!(
                    "Redis holds catalog {} but this node serves catalog {id}: wrong Redis or database? Serving the node's \
                     copy; point it at the right Redis, or remove {} to adopt the one in Redis",
                    snap.cluster_id,
                    self.data_dir.join(catalog::CACHE_FILE).display()
                );
                self.set_catalog(CatalogState::Lost(why.clone()));
                Err(why)
            }
            (Some(snap), _) => {
                if self.served().map(|(_, v)| v) != Some(snap.version) {
                    self.serve_snapshot(snap, true);
                }
                self.set_catalog(CatalogState::Synced);
                Ok(())
            }
            (None, Some((id, version))) => {
                let why = format!(
                    "Redis holds no catalog, but this node had catalog {id} (version {version}): Redis lost its data or \
                     this is the wrong database. Not re-creating it (that would change every key); serving the node's copy. \
                     Restore Redis, or run `hyrelay cluster import --redis URL --from-cache {}`",
                    self.data_dir.join(catalog::CACHE_FILE).display()
                );
                self.set_catalog(CatalogState::Lost(why.clone()));
                Err(why)
            }
            (None, None) => {
                // A new cluster: the first node creates the namespace (another may win the race).
                let fresh = catalog::fields_of(&State::initial());
                let id = crate::proto::ids::new_id();
                match bounded(catalog::init(&mut conn, &self.keys, &id, &fresh)).await {
                    Ok(in_effect) => {
                        if in_effect == id {
                            tracing::info!(node = %self.cfg.node_id, cluster = %id, "created a new cluster catalog in Redis");
                        }
                        Box::pin(self.sync_once()).await
                    }
                    Err(e) => Err(self.redis_failed(&e)),
                }
            }
        }
    }

    /// Notes a Redis failure; returns the reason.
    fn redis_failed(&self, e: &redis::RedisError) -> String {
        self.set_redis_up(false);
        let why = format!("Redis {} is unreachable: {e}", self.cfg.redis_display());
        let has_catalog = self.served().is_some();
        let current = self.catalog.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !matches!(current, CatalogState::Lost(_)) {
            self.set_catalog(if has_catalog {
                CatalogState::RedisDown(why.clone())
            } else {
                CatalogState::NoCatalog(format!("{why}, and this node has no cached catalog"))
            });
        }
        why
    }

    /// Keeps the catalog in step: pub/sub events, a version check every second, and the
    /// answers to other nodes' routing requests on the same subscription.
    async fn sync_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        while !self.stop.is_cancelled() {
            let _ = self.sync_once().await;
            match self.subscribe().await {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(250);
                    self.serve_subscription(pubsub).await;
                }
                Err(e) => {
                    self.redis_failed(&e);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return,
            }
            // Redis is one hop away: a second between attempts is gentle and brings a node
            // back in step within about a second of Redis returning.
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = bounded(self.client.get_async_pubsub()).await?;
        bounded(pubsub.subscribe(&self.keys.events)).await?;
        bounded(pubsub.subscribe(route::channel(&self.cfg.key_prefix, &self.cfg.node_id))).await?;
        bounded(pubsub.subscribe(&self.pkeys.events)).await?;
        Ok(pubsub)
    }

    /// Handles events and routing messages until the subscription breaks or the node stops.
    async fn serve_subscription(self: &Arc<Self>, pubsub: redis::aio::PubSub) {
        use futures_util::StreamExt;
        // The subscription may have missed events while it was being made.
        let _ = self.sync_once().await;
        let mut messages = pubsub.into_on_message();
        let mut tick = tokio::time::interval(BEAT);
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else {
                        tracing::warn!(node = %self.cfg.node_id, "the Redis subscription ended; reconnecting");
                        self.set_redis_up(false);
                        return;
                    };
                    let channel = m.get_channel_name().to_owned();
                    let Ok(payload) = m.get_payload::<String>() else { continue };
                    if channel == self.keys.events {
                        self.on_event(&payload).await;
                    } else if channel == self.pkeys.events {
                        if payload != self.cfg.node_id {
                            self.heard.notify_one();
                        }
                    } else {
                        self.on_route(&payload).await;
                    }
                }
                _ = tick.tick() => {
                    if let Err(why) = self.check_version().await {
                        tracing::debug!(reason = %why, "catalog version check failed");
                    }
                }
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// A catalog event: applies the change if it is the next version, else reloads.
    async fn on_event(self: &Arc<Self>, payload: &str) {
        let Some((version, _fields)) = catalog::parse_event(payload) else {
            return;
        };
        if self.served().is_some_and(|(_, v)| v >= version) {
            return; // our own write, already applied
        }
        let _ = self.sync_once().await;
    }

    /// The once-a-second check that heals a lost event.
    async fn check_version(self: &Arc<Self>) -> Result<(), String> {
        let Some(mut conn) = self.conn() else {
            return self.sync_once().await;
        };
        let r: redis::RedisResult<(Option<String>, Option<u64>)> = bounded(
            redis::pipe()
                .get(&self.keys.id)
                .get(&self.keys.version)
                .query_async(&mut conn),
        )
        .await;
        match r {
            Ok((id, version)) => {
                self.set_redis_up(true);
                let served = self.served();
                let in_step = match (&id, served) {
                    (Some(id), Some((sid, v))) => *id == sid && Some(v) == version,
                    _ => false,
                };
                let state = self.catalog.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if !in_step || state != CatalogState::Synced {
                    self.sync_once().await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(self.redis_failed(&e)),
        }
    }

    /// Applies `f` to the catalog: a compare-and-set in Redis, retried against a fresh copy
    /// when another node wrote first. Refused (503) while Redis is away or the catalog lost.
    pub async fn update<T>(self: &Arc<Self>, f: impl Fn(&mut State) -> Result<T, StoreError>) -> Result<T, StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let catalog_state = self.catalog.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match catalog_state {
                CatalogState::Synced => {}
                CatalogState::RedisDown(why) | CatalogState::Lost(why) | CatalogState::NoCatalog(why) => {
                    return Err(StoreError::Unavailable(why));
                }
            }
            let (snap, current) = {
                let m = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
                let snap = m
                    .snap
                    .clone()
                    .ok_or_else(|| StoreError::Unavailable("no catalog".into()))?;
                (snap, self.state.load())
            };
            let mut next = (*current).clone();
            let out = f(&mut next)?;
            let changes = catalog::diff(&snap.fields, &next);
            if changes.is_empty() {
                return Ok(out);
            }
            let mut conn = self
                .conn()
                .ok_or_else(|| StoreError::Unavailable("Redis is unreachable".into()))?;
            match bounded(catalog::cas(&mut conn, &self.keys, &snap.cluster_id, &changes)).await {
                Ok(CasResult::Written(version)) => {
                    let mut fields = snap.fields;
                    for c in changes {
                        match c.new {
                            Some(v) => fields.insert(c.field, v),
                            None => fields.remove(&c.field),
                        };
                    }
                    let gap = version != snap.version + 1;
                    self.serve_snapshot(
                        Snapshot {
                            cluster_id: snap.cluster_id,
                            version,
                            fields,
                        },
                        true,
                    );
                    if gap {
                        // Someone else wrote in between: take their changes too.
                        let _ = self.sync_once().await;
                    }
                    return Ok(out);
                }
                Ok(CasResult::Conflict) => {
                    let _ = self.sync_once().await;
                }
                Ok(CasResult::WrongCluster) => {
                    let _ = self.sync_once().await;
                    return Err(StoreError::Unavailable(
                        "Redis no longer holds this cluster's catalog; see /readyz".into(),
                    ));
                }
                Err(e) => return Err(StoreError::Unavailable(self.redis_failed(&e))),
            }
        }
        Err(StoreError::Unavailable(
            "the catalog kept changing under this write; try again".into(),
        ))
    }

    /// Publishes this node's presence and reads the others': every second, at once when
    /// this node's listeners changed (then also telling the others), and at once when
    /// another node says its listeners changed.
    async fn presence_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(BEAT);
        let mut last_read = Instant::now();
        loop {
            // `None`: this node's listeners changed, announce. A tick writes this node's
            // record (its TTL) and reads the others'; word that another node changed only
            // needs the read.
            let beat = tokio::select! {
                _ = tick.tick() => Some(Write::Own),
                _ = self.changed.notified() => None,
                _ = self.heard.notified() => Some(Write::Nothing),
                _ = self.stop.cancelled() => return,
            };
            if self.draining.load(Ordering::Relaxed) {
                continue;
            }
            let r = match beat {
                None => self.announce().await,
                Some(write) => self.beat_now(write).await,
            };
            match r {
                Ok(()) => last_read = Instant::now(),
                Err(e) => {
                    tracing::debug!(error = %e, "presence beat failed");
                    if last_read.elapsed() > self.cfg.presence_ttl {
                        // What we knew has expired too: route to nobody elsewhere.
                        *self.presence.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Presence::default());
                    }
                }
            }
        }
    }

    /// One beat now, after any beat under way.
    async fn beat_now(&self, write: Write) -> redis::RedisResult<()> {
        let mut last = self.beating.lock().await;
        self.beat_holding(&mut last, write).await
    }

    /// [`Cluster::beat_now`] for a caller that holds the beat lock (`last` is its value).
    async fn beat_holding(&self, last: &mut Option<Instant>, write: Write) -> redis::RedisResult<()> {
        let started = Instant::now();
        let p = self.beat(write).await?;
        metrics::gauge!(metric::NODES).set((p.nodes.len() + 1) as f64);
        *self.presence.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
        *last = Some(started);
        Ok(())
    }

    /// Writes this node's presence now and tells the other nodes to read it.
    async fn announce(&self) -> redis::RedisResult<()> {
        if self.draining.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.beat_now(Write::Own).await?;
        let Some(mut conn) = self.conn() else { return Ok(()) };
        bounded(conn.publish::<_, _, ()>(&self.pkeys.events, &self.cfg.node_id)).await
    }

    /// A listener arrived on this node: called before its 101, returns once this node's
    /// record in Redis has it and the other nodes were told, so a sender on any node that
    /// comes after the listener's upgrade finds it (see [`Cluster::refresh_presence`]).
    /// Waits at most `MISS_REFRESH` (500 ms), and not at all while Redis is away: then the
    /// background beat publishes it.
    pub async fn listener_arrived(&self) {
        if self.redis_up.load(Ordering::Relaxed)
            && let Ok(Ok(())) = tokio::time::timeout(MISS_REFRESH, self.announce()).await
        {
            return;
        }
        self.changed.notify_one();
    }

    /// This node's listeners changed (one left): beat and announce from the background.
    pub fn presence_changed(&self) {
        self.changed.notify_one();
    }

    /// Makes sure presence was read after `since` (a sender's arrival) before the caller
    /// concludes no node has a listener: waits for a beat under way, or beats, but not
    /// sooner than [`MISS_FLOOR`] after the beat before. Bounded by `MISS_REFRESH`
    /// (500 ms); skipped while Redis is away. Concurrent misses share beats, so senders
    /// for a hybrid connection without listeners, however many, cost Redis at most one
    /// read per `MISS_FLOOR`.
    pub async fn refresh_presence(&self, since: Instant) {
        if !self.redis_up.load(Ordering::Relaxed) {
            return;
        }
        let fresh = async {
            let last = *self.beating.lock().await;
            if last.is_some_and(|t| t >= since) {
                return;
            }
            if let Some(t) = last {
                tokio::time::sleep_until((t + MISS_FLOOR).into()).await;
            }
            // Waiters queue on the lock; whoever comes first beats, the read is fresh
            // enough for the rest.
            let mut last = self.beating.lock().await;
            if !last.is_some_and(|t| t >= since) {
                let _ = self.beat_holding(&mut last, Write::Nothing).await;
            }
        };
        let _ = tokio::time::timeout(MISS_REFRESH, fresh).await;
    }

    /// This node's presence record.
    fn own_presence(&self) -> NodePresence {
        let (listeners, tunnels, load) = match self.ctl.get() {
            Some(ctl) => ctl.local_presence(&self.cfg.node_id),
            None => Default::default(),
        };
        let bytes = match self.totals.get() {
            Some(t) => tunnels
                .keys()
                .chain(listeners.iter().map(|l| &l.hc))
                .map(|hc| {
                    let t = t.get_ci(hc);
                    (hc.clone(), (t.bytes_up, t.bytes_down))
                })
                .collect(),
            None => BTreeMap::new(),
        };
        NodePresence {
            node: self.cfg.node_id.clone(),
            url: self.public_base(),
            started: self.started.clone(),
            at_ms: crate::proto::sas::unix_now() * 1000,
            draining: self.draining.load(Ordering::Relaxed),
            listeners,
            tunnels,
            load,
            bytes,
        }
    }

    /// One heartbeat: write ours (unless `write` says not), read everyone's, forget nodes
    /// whose key expired.
    async fn beat(&self, write: Write) -> redis::RedisResult<Presence> {
        let Some(mut conn) = self.conn() else {
            return Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into());
        };
        let mut pipe = redis::pipe();
        if write == Write::Own {
            let json = serde_json::to_string(&self.own_presence()).unwrap_or_default();
            let ttl = self.cfg.presence_ttl.as_millis() as u64;
            pipe.cmd("SET")
                .arg(self.pkeys.node(&self.cfg.node_id))
                .arg(json)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .sadd(&self.pkeys.nodes, &self.cfg.node_id)
                .ignore();
        }
        let (ids,): (Vec<String>,) = bounded(pipe.smembers(&self.pkeys.nodes).query_async(&mut conn)).await?;
        let others: Vec<String> = ids.into_iter().filter(|n| *n != self.cfg.node_id).collect();
        let mut nodes = Vec::new();
        if !others.is_empty() {
            let keys: Vec<String> = others.iter().map(|n| self.pkeys.node(n)).collect();
            let values: Vec<Option<String>> = bounded(conn.mget(&keys)).await?;
            let mut gone = Vec::new();
            for (id, v) in others.iter().zip(values) {
                match v.and_then(|v| serde_json::from_str::<NodePresence>(&v).ok()) {
                    Some(p) if !p.draining => nodes.push(p),
                    Some(_) => {}
                    None => gone.push(id.clone()),
                }
            }
            if !gone.is_empty() {
                let _: redis::RedisResult<()> = bounded(conn.srem(&self.pkeys.nodes, &gone)).await;
            }
        }
        self.set_redis_up(true);
        Ok(Presence { nodes })
    }

    /// Asks `node` to hand listener `key` of `hc` the command `text`. `Ok` once that node
    /// has queued it for the listener.
    pub async fn deliver(&self, node: &str, hc: &str, key: u64, text: String) -> Result<(), String> {
        let started = Instant::now();
        let r = self.route(node, hc, key, text).await;
        let result = if r.is_ok() { "ok" } else { "failed" };
        metrics::counter!(metric::ROUTED, "direction" => "to", "result" => result).increment(1);
        metrics::histogram!(metric::ROUTE_SECONDS).record(started.elapsed().as_secs_f64());
        r
    }

    /// One routed command: PUBLISH it to `node`'s channel and wait for its ack.
    async fn route(&self, node: &str, hc: &str, key: u64, text: String) -> Result<(), String> {
        let mut conn = self.conn().ok_or("Redis is unreachable")?;
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap_or_else(|e| e.into_inner()).insert(req, tx);
        let msg = Message::Deliver {
            from: self.cfg.node_id.clone(),
            req,
            hc: hc.to_owned(),
            key,
            text,
        };
        let forget = || {
            self.acks.lock().unwrap_or_else(|e| e.into_inner()).remove(&req);
        };
        let receivers: i64 = match bounded(conn.publish(route::channel(&self.cfg.key_prefix, node), msg.encode())).await
        {
            Ok(n) => n,
            Err(e) => {
                forget();
                return Err(format!("Redis: {e}"));
            }
        };
        if receivers == 0 {
            forget();
            return Err(format!("node {node} is not connected to Redis"));
        }
        match tokio::time::timeout(self.cfg.route_timeout, rx).await {
            Ok(Ok((true, _))) => Ok(()),
            Ok(Ok((false, why))) => Err(format!("node {node}: {}", why.unwrap_or_default())),
            Ok(Err(_)) | Err(_) => {
                forget();
                Err(format!(
                    "node {node} did not answer within {:?}",
                    self.cfg.route_timeout
                ))
            }
        }
    }

    /// A message on this node's channel: a request to deliver, or an answer to ours.
    async fn on_route(&self, payload: &str) {
        match Message::decode(payload) {
            Some(Message::Ack { req, ok, why }) => {
                if let Some(tx) = self.acks.lock().unwrap_or_else(|e| e.into_inner()).remove(&req) {
                    tx.send((ok, why)).ok();
                }
            }
            Some(Message::Deliver {
                from,
                req,
                hc,
                key,
                text,
            }) => {
                let r = match self.ctl.get() {
                    Some(ctl) => ctl.deliver_local(&hc, key, text),
                    None => Err(route::WHY_GONE),
                };
                metrics::counter!(metric::ROUTED, "direction" => "from", "result" => if r.is_ok() { "ok" } else { "failed" })
                    .increment(1);
                let ack = Message::Ack {
                    req,
                    ok: r.is_ok(),
                    why: r.err().map(str::to_owned),
                };
                if let Some(mut conn) = self.conn() {
                    let _: redis::RedisResult<i64> =
                        bounded(conn.publish(route::channel(&self.cfg.key_prefix, &from), ack.encode())).await;
                }
            }
            None => tracing::debug!("ignoring a malformed cluster message"),
        }
    }
}

/// `hyrelay cluster import`: writes `state` into an empty Redis as a new catalog (or, with
/// `cluster_id`, as that cluster's catalog restored). Refuses when Redis holds a catalog.
pub async fn import(
    client: &redis::Client,
    prefix: &str,
    state: &State,
    cluster_id: Option<&str>,
) -> anyhow::Result<String> {
    state
        .validate()
        .map_err(|why| anyhow::anyhow!("the state to import is invalid: {why}"))?;
    let mut conn = connect(client).await.context("connecting to Redis")?;
    let keys = Keys::new(prefix);
    let id = cluster_id.map(str::to_owned).unwrap_or_else(crate::proto::ids::new_id);
    let in_effect = bounded(catalog::init(&mut conn, &keys, &id, &catalog::fields_of(state)))
        .await
        .context("writing the catalog")?;
    if in_effect != id {
        anyhow::bail!(
            "Redis already holds cluster catalog {in_effect}: import only into an empty Redis (or another key_prefix)"
        );
    }
    Ok(id)
}

/// What `hyrelay cluster status` shows: the catalog's id and version and every node's presence.
pub async fn status(
    client: &redis::Client,
    prefix: &str,
) -> anyhow::Result<(Option<(String, u64, usize)>, Vec<NodePresence>)> {
    let mut conn = connect(client).await.context("connecting to Redis")?;
    let keys = Keys::new(prefix);
    let pkeys = PresenceKeys::new(prefix);
    let snap = bounded(catalog::load(&mut conn, &keys)).await?;
    let ids: Vec<String> = bounded(conn.smembers(&pkeys.nodes)).await?;
    let mut nodes = Vec::new();
    if !ids.is_empty() {
        let ks: Vec<String> = ids.iter().map(|n| pkeys.node(n)).collect();
        let values: Vec<Option<String>> = bounded(conn.mget(&ks)).await?;
        nodes = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(&v).ok())
            .collect();
    }
    let catalog = snap.map(|s| {
        let hcs = s.fields.keys().filter(|k| k.starts_with(catalog::HC_FIELD)).count();
        (s.cluster_id, s.version, hcs)
    });
    Ok((catalog, nodes))
}
