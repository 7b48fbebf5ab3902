//! The hcm's side of the rendezvous-pool extension (`proto::extensions`): per hybrid
//! connection, a few pre-opened, authenticated rendezvous connections, so a sender the
//! relay hands to one of them does not wait for the hcm's TCP and TLS to the relay.
//!
//! The pool runs only while the control channel is up and its 101 advertised
//! `rendezvous-pool` (and the config's `extensions` is on); against any other relay the hcm
//! uses the standard protocol alone. Each pooled connection is a `listen` upgrade with
//! `X-Hyrelay-Pool: 1` and a fresh Listen token; it waits for one `accept` text frame, then
//! is the tunnel (`super::accept::handle_pooled`). It is closed and replaced after
//! [`RENEW_AFTER`], well before the relay's idle limit (120 s) and any token expiry.
//!
//! Size: two more than a quarter of the accepts of the last second that a pool could have
//! served (`Demand`), at most [`MAX`]; re-evaluated every [`TICK`] and whenever a pooled
//! connection is used; surplus connections are closed as the rate falls. A used connection
//! is replaced at once, on the worker that used it, while the pool is at or below its size
//! (no wake-up of the pool task or of another worker per tunnel). A burst larger than the
//! pool is served the standard way meanwhile, and the pool refills behind it.
//!
//! Reuse (`proto::extensions`, `reuse`): when the relay offers it, each pooled `listen`
//! opts in. After a clean end of the tunnel on a connection whose 101 promised it, the
//! relay has put the connection back in its pool (both Closes were 1000), and the hcm waits
//! on it for the next `accept` (`again`) instead of closing it; one the pool does not
//! want (full, stopping, or older than [`RENEW_AFTER`]) is retired the usual race-free way.
//! While its tunnel runs it counts towards the size, up to half of it, and it is replaced
//! at once only if fewer than half the pool would be left.
//!
//! Which accepts count: those that came on a pooled connection, and standard ones the
//! pool could have served. Pooled connections wait on the relay node they reached, and
//! only senders on that node can use them. Each pooled connection's 101 names its node,
//! and a standard accept counts if its rendezvous address names one of the pool's nodes: with a
//! connection string naming one node of a cluster, accepts for senders on other nodes are
//! not demand for this pool; behind a load balancer the pool spreads over the nodes and
//! their senders count as it reaches them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{HcRt, HcmCtx};
use crate::client;
use crate::proto::control::{self, Command, MAX_CONTROL_MESSAGE};
use crate::proto::extensions::{ADVERTISE_HEADER, Advertised, NODE_HEADER, POOL_HEADER};
use crate::proto::extensions::{REUSE_HEADER, flag_set};
use crate::proto::frame::{Role, close_code};
use crate::proto::metadata::HostPort;
use crate::transport::ws::{self, Message, WsReader, WsWriter};

/// Pooled connections kept at least (while the pool runs): two, so one is ready while the
/// other's replacement is being opened.
pub const MIN: usize = 2;
/// Pooled connections kept at most per hybrid connection.
pub const MAX: usize = 32;
/// A pooled connection is replaced after this long unused.
pub const RENEW_AFTER: Duration = Duration::from_secs(60);
/// How often the size is re-evaluated and the pool refilled.
pub const TICK: Duration = Duration::from_millis(250);

/// Accepts counted for sizing the pool of one hybrid connection.
///
/// Each pooled connection's 101 names the relay node it reached
/// ([`crate::proto::extensions::NODE_HEADER`]). An accept whose rendezvous address names
/// one of those nodes (host and port) could have been served by the pool; once any node is
/// known only those count. Before (or with a relay that does not say), all do.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    all: AtomicU64,
    here: AtomicU64,
    /// `(host in lower case, port)` of the nodes pooled connections reached.
    nodes: std::sync::Mutex<Vec<(String, u16)>>,
}

/// Nodes remembered per hybrid connection at most (a cluster's size, with room).
const MAX_NODES: usize = 64;

impl Demand {
    /// Records the node a pooled connection reached (`base`: `ws(s)://host[:port]`).
    pub fn pool_on(&self, base: &str) {
        let Some(node) = authority(base) else { return };
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if !nodes.contains(&node) && nodes.len() < MAX_NODES {
            nodes.push(node);
        }
    }

    /// Counts an accept with rendezvous `address`.
    pub fn count(&self, address: &str) {
        self.all.fetch_add(1, Ordering::Relaxed);
        let here =
            authority(address).is_some_and(|a| self.nodes.lock().unwrap_or_else(|e| e.into_inner()).contains(&a));
        if here {
            self.here.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an accept that came on a pooled connection: served by the pool, so demand
    /// for it (its `accept` carries no rendezvous address to tell the node by). Before
    /// these counted, a rate the pool served alone looked like none, and the pool shrank
    /// to its minimum under it.
    pub fn count_pooled(&self) {
        self.all.fetch_add(1, Ordering::Relaxed);
        self.here.fetch_add(1, Ordering::Relaxed);
    }

    /// Accepts so far that the pool could have served (see [`Demand`]); it may fall once,
    /// when the first node becomes known, so take differences saturating.
    pub fn total(&self) -> u64 {
        if self.nodes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            self.all.load(Ordering::Relaxed)
        } else {
            self.here.load(Ordering::Relaxed)
        }
    }
}

/// `(host in lower case, port)` of a `ws(s)://` URL.
fn authority(url: &str) -> Option<(String, u16)> {
    let u = ws::WsUrl::parse(url).ok()?;
    Some((u.host.to_ascii_lowercase(), u.port))
}

/// The pool size for `per_second` accepts in the last second.
pub fn target(per_second: u64) -> usize {
    (per_second as usize / 4 + 1).clamp(MIN, MAX)
}

/// Starts the pool of `hc` on this (control) runtime if the relay's control-channel 101
/// (`answer`) advertised it and the config allows; it runs until the guard drops.
pub(crate) fn start_if_offered(
    hc: &Arc<HcRt>,
    ctx: &Arc<HcmCtx>,
    endpoint: &HostPort,
    answer: &crate::proto::handshake::ResponseHead,
) -> Option<tokio_util::sync::DropGuard> {
    let offered = Advertised::parse(answer.headers.get(ADVERTISE_HEADER));
    if !(ctx.cfg.extensions && offered.rendezvous_pool) {
        return None;
    }
    let stop = CancellationToken::new();
    let p = Arc::new(PoolRt {
        hc: hc.clone(),
        ctx: ctx.clone(),
        endpoint: endpoint.clone(),
        stop: stop.clone(),
        // Tunnels on the completion backend end by closing: nothing to opt in to there.
        reuse: offered.reuse && !crate::dataplane::offload::active(),
        open: AtomicUsize::new(0),
        want: AtomicUsize::new(0),
        returning: AtomicUsize::new(0),
        used: tokio::sync::Notify::new(),
        retire: Retire::default(),
    });
    tokio::spawn(run(p));
    Some(stop.drop_guard())
}

/// One hybrid connection's pool: what its connections share.
struct PoolRt {
    hc: Arc<HcRt>,
    ctx: Arc<HcmCtx>,
    endpoint: HostPort,
    /// The control channel's session ended.
    stop: CancellationToken,
    /// The relay offered `reuse` (and this hcm's tunnels can give their connection back).
    reuse: bool,
    /// Pooled connections open or being opened ([`Opened`]).
    open: AtomicUsize,
    /// The pool's size as last computed.
    want: AtomicUsize,
    /// Connections in tunnels whose 101 promised reuse: they may come back ([`Returning`]).
    returning: AtomicUsize,
    /// Wakes the pool task when a pooled connection was used or is gone.
    used: tokio::sync::Notify,
    retire: Retire,
}

impl PoolRt {
    /// Connections to open now: up to the size, counting those likely to come back after
    /// their tunnels, but at most half of it (a long tunnel must not keep the pool empty).
    fn missing(&self) -> usize {
        let want = self.want.load(Ordering::Relaxed);
        let coming = self.returning.load(Ordering::Relaxed).min(want / 2);
        want.saturating_sub(self.open.load(Ordering::Relaxed) + coming)
    }
}

/// Keeps the pool filled until it stops (the control channel's session ended).
async fn run(p: Arc<PoolRt>) {
    let name = p.hc.entry.name().to_owned();
    let mut tick = tokio::time::interval(TICK);
    let mut window = client::LastSecond::new(TICK);
    loop {
        let ticked = tokio::select! {
            _ = tick.tick() => true,
            _ = p.used.notified() => false,
            _ = p.stop.cancelled() => break,
        };
        // Accepts in the last second (sampled on the ticks only: the wake-ups for used
        // connections are as frequent as the tunnels).
        let want = target(window.rate(p.hc.demand.total(), ticked));
        p.want.store(want, Ordering::Relaxed);
        let now_open = p.open.load(Ordering::Relaxed);
        p.retire.ask(now_open.saturating_sub(want));
        for _ in 0..p.missing() {
            let opened = Opened::new(&p);
            let p = p.clone();
            p.ctx.workers.clone().spawn(move || pooled(p, opened));
        }
        gauge(&name, p.open.load(Ordering::Relaxed));
    }
    gauge(&name, 0);
}

fn gauge(hc: &str, n: usize) {
    metrics::gauge!(crate::telemetry::metrics::warm_connections("hcm"), "hc" => hc.to_owned()).set(n as f64);
}

/// Surplus pooled connections to close: waiting ones take a ticket each and close.
#[derive(Default)]
struct Retire {
    tickets: AtomicUsize,
    wake: tokio::sync::Notify,
}

impl Retire {
    /// Asks `n` waiting connections (none when 0) to close.
    fn ask(&self, n: usize) {
        self.tickets.store(n, Ordering::Relaxed);
        if n > 0 {
            self.wake.notify_waiters();
        }
    }

    /// Takes a ticket if one is left.
    fn take(&self) -> bool {
        self.tickets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
            .is_ok()
    }
}

/// A pooled connection counted in one of its pool's counters while this lives; when it
/// ends, the pool task is woken to replace the connection, unless `quiet`.
struct Count {
    p: Arc<PoolRt>,
    counter: fn(&PoolRt) -> &AtomicUsize,
    quiet: bool,
}

impl Count {
    fn new(p: &Arc<PoolRt>, counter: fn(&PoolRt) -> &AtomicUsize) -> Self {
        counter(p).fetch_add(1, Ordering::Relaxed);
        Self {
            p: p.clone(),
            counter,
            quiet: false,
        }
    }

    /// Ends the count without waking the pool task.
    fn end_quietly(mut self) {
        self.quiet = true;
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        (self.counter)(&self.p).fetch_sub(1, Ordering::Relaxed);
        if !self.quiet {
            self.p.used.notify_one();
        }
    }
}

/// Counts a pooled connection as open until it is used or gone; then wakes the pool.
struct Opened(Count);

impl Opened {
    fn new(p: &Arc<PoolRt>) -> Self {
        Self(Count::new(p, |p| &p.open))
    }

    /// True if, without the connection this counts, the pool would be below its size (or,
    /// for one that will likely come back after its tunnel, below half of it, at least one
    /// waiting): a used connection is then replaced at once (the count passes to the
    /// replacement).
    fn needs_replacing(&self, coming_back: bool) -> bool {
        let p = &self.0.p;
        let want = p.want.load(Ordering::Relaxed);
        let floor = if coming_back { (want / 2).max(1) } else { want };
        p.open.load(Ordering::Relaxed) <= floor
    }

    /// Its count moves from open to coming back (counted there first), without waking the
    /// pool task: the connection is expected back after its tunnel.
    fn into_returning(self) -> Returning {
        let r = Returning::new(&self.0.p);
        self.0.end_quietly();
        r
    }
}

/// Counts a connection in a tunnel whose 101 promised reuse, until it is back in the pool
/// or not wanted ([`Returning::landed`]), or gone (then the pool task is woken to replace
/// it).
struct Returning(Count);

impl Returning {
    fn new(p: &Arc<PoolRt>) -> Self {
        Self(Count::new(p, |p| &p.returning))
    }

    /// The connection is back (counted as open again) or not wanted (the pool is full).
    fn landed(self) {
        self.0.end_quietly();
    }
}

/// The Listen token, URL and name of a pooled connection's request.
fn pool_request(p: &PoolRt) -> (String, ws::WsUrl, String) {
    let entry = &p.hc.entry;
    let cs = &entry.connection_string;
    let token = p.hc.tokens.token(cs, entry.name(), p.ctx.cfg.token_ttl);
    let url = client::hc_url(cs, entry.name(), "listen", &p.hc.listener_id);
    (token, url, entry.name().to_owned())
}

/// One pooled connection: open it, wait for its `accept` (or renewal, or stop).
async fn pooled(p: Arc<PoolRt>, opened: Opened) {
    let (token, url, name) = pool_request(&p);
    let mut headers = vec![("ServiceBusAuthorization", token.as_str()), (POOL_HEADER, "1")];
    if p.reuse {
        headers.push((REUSE_HEADER, "1"));
    }
    // Boxed, as the tunnel below: the dial's state (TLS included) is not carried in the
    // task while it waits in the pool.
    let ctx = &p.ctx;
    let dial = ws::connect_via(&url, Some(&ctx.tls), &ctx.cfg.proxy, &headers, ctx.cfg.relay_timeout);
    let conn = tokio::select! {
        c = Box::pin(dial) => c,
        _ = p.stop.cancelled() => return,
    };
    match conn {
        Ok(c) => {
            if let Some(node) = c.response.headers.get(NODE_HEADER) {
                p.hc.demand.pool_on(node);
            }
            let promised = p.reuse && flag_set(c.response.headers.get(REUSE_HEADER));
            let reader = WsReader::new(c.stream, c.leftover, Role::Client, MAX_CONTROL_MESSAGE as u64);
            let since = tokio::time::Instant::now();
            Box::pin(serve(reader, p.clone(), opened, (since, promised))).await;
        }
        Err(e) => {
            tracing::debug!(hc = %name, error = %e, "cannot open a pooled rendezvous connection");
            // Do not spin against a relay that refuses: the next tick retries.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A connection back from a tunnel that ended cleanly, whose 101 promised reuse, with
/// what the relay sent after its Close: the relay has put it back in its pool (both Closes
/// were normal), so it waits for its next `accept` here, as after its `listen`. One the
/// pool does not want (full, stopping, or older than [`RENEW_AFTER`], so its token stays
/// well within its life) asks the relay to retire it, which is race-free: an `accept`
/// that crossed the request is served.
async fn again(
    stream: crate::transport::Stream,
    rest: bytes::BytesMut,
    p: Arc<PoolRt>,
    (returning, since): (Returning, tokio::time::Instant),
) {
    let mut reader = WsReader::new(stream, rest, Role::Client, MAX_CONTROL_MESSAGE as u64);
    let old = since.elapsed() >= RENEW_AFTER;
    let full = p.open.load(Ordering::Relaxed) >= p.want.load(Ordering::Relaxed);
    if old || full || p.stop.is_cancelled() {
        // An old one is replaced (the pool task is woken); otherwise nothing is missing.
        if old {
            drop(returning);
        } else {
            returning.landed();
        }
        if let Some(a) = ask_to_retire(&mut reader, p.ctx.cfg.relay_timeout).await {
            // A sender took it before the request to retire arrived: it serves that
            // sender, and the relay keeps it again after that tunnel as it promised, so it
            // must come back here then (closing it instead would leave the relay's pool a
            // dead connection for the next sender).
            let back = back_to(&p, Returning::new(&p), since);
            let (stream, leftover) = reader.into_parts();
            let (hc, endpoint, ctx) = (p.hc.clone(), p.endpoint.clone(), p.ctx.clone());
            drop(p);
            let tunnel = super::accept::handle_pooled(a, hc, endpoint, ctx, (stream, leftover), Some(back));
            Box::pin(tunnel).await;
        }
        return;
    }
    let opened = Opened::new(&p);
    returning.landed();
    metrics::counter!(crate::telemetry::metrics::reused_connections("hcm"), "hc" => p.hc.entry.name().to_owned())
        .increment(1);
    Box::pin(serve(reader, p, opened, (since, true))).await;
}

/// A pooled connection waiting in the relay's pool (`since`: its `listen`; `promised`: its
/// 101 promised reuse): wait for its `accept` (or renewal, or stop), then serve the tunnel.
async fn serve(
    mut reader: WsReader<crate::transport::Stream>,
    p: Arc<PoolRt>,
    opened: Opened,
    (since, promised): (tokio::time::Instant, bool),
) {
    let ctx = &p.ctx;
    let renew = tokio::time::sleep(RENEW_AFTER);
    tokio::pin!(renew);
    let accept = loop {
        tokio::select! {
            // Cancel-safe: the reader keeps its state.
            m = reader.next_message(MAX_CONTROL_MESSAGE) => break match m {
                Ok(Some(Message::Text(t))) => match control::decode(&t) {
                    Ok(Command::Accept(a)) => Some(a),
                    _ => None,
                },
                // The relay closed it (expired, retired, the pool full or draining): its
                // Close is answered and it is gone, with nothing to retire.
                Ok(Some(Message::Close(_))) => {
                    let mut w = WsWriter::new(reader.get_mut(), Role::Client);
                    let _ = tokio::time::timeout(Duration::from_secs(2), w.send_close(close_code::NORMAL, "")).await;
                    return;
                }
                _ => None,
            },
            _ = p.retire.wake.notified() => {
                if p.retire.take() {
                    break None;
                }
            }
            _ = &mut renew => break None,
            _ = p.stop.cancelled() => break None,
        }
    };
    let accept = match accept {
        Some(a) => Some(a),
        None => ask_to_retire(&mut reader, ctx.cfg.relay_timeout).await,
    };
    let Some(a) = accept else { return };
    // In use: its count passes to a replacement opened on this worker, or ends, which
    // wakes the pool task. One that will likely come back is replaced at once only if the
    // pool would fall below half its size, and otherwise counts as coming back, without a
    // wake-up: no cross-thread wake-up per tunnel either way.
    let replace = opened.needs_replacing(promised) && !p.stop.is_cancelled();
    let returning = match (replace, promised) {
        (true, _) => {
            let r = promised.then(|| Returning::new(&p));
            tokio::task::spawn_local(pooled(p.clone(), opened));
            r
        }
        (false, true) => Some(opened.into_returning()),
        (false, false) => {
            drop(opened);
            None
        }
    };
    let back = returning.map(|returning| back_to(&p, returning, since));
    let (stream, leftover) = reader.into_parts();
    let (hc, endpoint, ctx) = (p.hc.clone(), p.endpoint.clone(), p.ctx.clone());
    drop(p);
    Box::pin(super::accept::handle_pooled(
        a,
        hc,
        endpoint,
        ctx,
        (stream, leftover),
        back,
    ))
    .await;
}

/// Where a pooled connection goes after a clean end of its tunnel (`again`): it is back in
/// the relay's pool then, as its 101 promised.
fn back_to(p: &Arc<PoolRt>, returning: Returning, since: tokio::time::Instant) -> crate::dataplane::splice::Back {
    let p = p.clone();
    Box::new(move |stream, rest| {
        drop(tokio::task::spawn_local(again(stream, rest, p, (returning, since))));
    })
}

/// Asks the relay to retire a pooled connection (a ping, its only message) and reads on:
/// the relay answers with a Close, or, if a sender took the connection meanwhile, with that
/// sender's `accept`, which is then served as usual.
async fn ask_to_retire(
    reader: &mut WsReader<crate::transport::Stream>,
    limit: Duration,
) -> Option<crate::proto::control::Accept> {
    let mut w = WsWriter::new(reader.get_mut(), Role::Client);
    w.send(true, crate::proto::frame::OpCode::Ping, b"retire").await.ok()?;
    let answer = tokio::time::timeout(limit, reader.next_message(MAX_CONTROL_MESSAGE)).await;
    match answer {
        Ok(Ok(Some(Message::Text(t)))) => match control::decode(&t) {
            Ok(Command::Accept(a)) => Some(a),
            _ => None,
        },
        Ok(Ok(Some(Message::Close(_)))) => {
            let mut w = WsWriter::new(reader.get_mut(), Role::Client);
            let _ = tokio::time::timeout(Duration::from_secs(2), w.send_close(close_code::NORMAL, "")).await;
            None
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection's task waits in the pool, one per connection, and is moved
    /// when spawned: it does not carry the dial (TLS) nor the tunnel's setup (3,656 bytes
    /// before they were boxed).
    #[test]
    fn a_pooled_connection_task_does_not_carry_its_dial_or_tunnel() {
        crate::test_support::assert_future_at_most(&pooled, 1600, "an hcm pooled connection");
        crate::test_support::assert_future_at_most(&again, 1600, "an hcm pooled connection back from a tunnel");
    }

    #[test]
    fn only_accepts_for_the_pools_nodes_count_once_a_node_is_known() {
        let d = Demand::default();
        // No pooled connection yet (or a relay that does not say): every accept counts.
        d.count("ws://node-1:9000/$hc/db?sb-hc-action=accept&sb-hc-id=1");
        d.count("wss://node-2/$hc/db?sb-hc-action=accept&sb-hc-id=2");
        assert_eq!(d.total(), 2);
        // The pool reached node-1 only (a connection string naming that node).
        d.pool_on("ws://NODE-1:9000");
        d.pool_on("ws://node-1:9000");
        assert_eq!(d.total(), 0);
        d.count("ws://node-1:9000/$hc/db?sb-hc-action=accept&sb-hc-id=3");
        d.count("ws://node-2:9000/$hc/db?sb-hc-action=accept&sb-hc-id=4");
        d.count("ws://node-1:9001/$hc/db?sb-hc-action=accept&sb-hc-id=5");
        d.count("not a url");
        assert_eq!(d.total(), 1);
        // Behind a balancer the pool reaches more nodes, and their senders count too.
        d.pool_on("wss://node-2");
        d.count("wss://node-2:443/$hc/db?sb-hc-action=accept&sb-hc-id=6");
        assert_eq!(d.total(), 2);
        // An accept on a pooled connection names no node, and always counts.
        d.count_pooled();
        assert_eq!(d.total(), 3);
    }

    #[test]
    fn size_follows_the_accept_rate_within_bounds() {
        assert_eq!(target(0), 2);
        assert_eq!(target(3), 2);
        assert_eq!(target(40), 11);
        assert_eq!(target(10_000), MAX);
    }
}
