//! The hyrelay extensions between our own pieces: pooled rendezvous connections (hcm) and
//! warm connections with early data (bridge), negotiated through the relay's
//! `X-Hyrelay-Extensions` advertisement.
//!
//! 1. Tunnels through pooled rendezvous and early data are byte-exact (0 B, 1 B, 64 KiB,
//!    16 MiB, half-close from either side), over ws:// and wss://.
//! 2. A pooled connection serves once, only its own hybrid connection, and only after
//!    authenticating with a Listen token (driven raw, as an hcm and a bridge would).
//! 3. No phantom endpoint connections: with pools and warm connections up, the endpoint
//!    counts exactly one connection per app connection, including apps that connect and
//!    close at once.
//! 4. Pools refill after a burst of 500 new tunnels.
//! 5. Extensions off on the relay (or on the hcm and bridge): everything still works, the
//!    standard way.
//! 6. `reuse`: the bridge's and the hcm's connections to the relay carry tunnel after
//!    tunnel, byte-exact, over ws:// and wss://; driven raw: the relay reads a kept
//!    connection's next request (also one that came in the same read as the Close), never
//!    a byte of one tunnel in the next, promises nothing to a client that did not opt in,
//!    and closes a connection whose tunnel did not end with a clean close handshake.
//!
//! hyco-ws senders and listeners against a relay with the extensions on: tests/compat_hyco.rs
//! (the extensions are on by default there).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use hyrelay::hcm::config::HcEntry;
use hyrelay::proto::control::{self, Command};
use hyrelay::proto::frame::{OpCode, Role};
use hyrelay::transport::ws::{self, ConnectError, Message, WsReader, WsWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A relay with an admin listener, an hcm and a bridge for `hc` whose endpoint is `endpoint`.
struct Setup {
    rig: Rig,
    admin: SocketAddr,
    _hcm: hyrelay::hcm::HcmHandle,
    bridge: hyrelay::bridge::BridgeHandle,
    hc: String,
}

impl Setup {
    async fn new(tls: bool, hc: &str, endpoint: SocketAddr, relay_ext: bool, client_ext: bool) -> Setup {
        let rig = Rig::with(tls, |c| {
            c.runtime.admin = Some("127.0.0.1:0".parse().unwrap());
            c.extensions = relay_ext;
        });
        let admin = rig.relay.admin_addr().unwrap();
        rig.create(hc, endpoint).await;
        let mut hcfg = rig.hcm_config(vec![HcEntry::new(rig.listen_cs(hc).await, None).unwrap()]);
        hcfg.extensions = client_ext;
        let hcm = hyrelay::hcm::start(hcfg).unwrap();
        rig.wait_listeners(hc, 1).await;
        let mut bcfg = rig.bridge_config(hc, &rig.send_cs(hc).await);
        bcfg.extensions = client_ext;
        let bridge = hyrelay::bridge::start(bcfg).unwrap();
        Setup {
            rig,
            admin,
            _hcm: hcm,
            bridge,
            hc: hc.to_owned(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.bridge.addr_of(&self.hc).unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        metric(&metrics_text(self.admin).await, name, &self.hc)
    }

    async fn pooled(&self) -> f64 {
        self.metric("hyrelay_relay_pooled_rendezvous_total").await
    }

    /// Waits until the relay holds a pooled connection and the bridge a warm one.
    async fn wait_warm(&self) {
        let ok = wait_for(Duration::from_secs(10), || async {
            let m = metrics_text(self.admin).await;
            metric(&m, "hyrelay_relay_warm_connections", &self.hc) >= 1.0
                && metric(&m, "hyrelay_bridge_warm_connections", &self.hc) >= 1.0
        })
        .await;
        assert!(ok, "no warm connections: {}", metrics_text(self.admin).await);
    }
}

async fn byte_exact_through_pool_and_early_data(tls: bool) {
    let (greeter, mut greeted) = greeter();
    // Names of their own: the metrics of tests running at once share one registry.
    let (hc, greet) = if tls {
        ("exact-wss", "greet-wss")
    } else {
        ("exact-ws", "greet-ws")
    };
    let s = Setup::new(tls, hc, echo(), true, true).await;
    // The first tunnel is how the bridge learns the relay's offer.
    assert_eq!(round_trip(s.addr(), b"hello").await.unwrap(), b"hello");
    for len in [0usize, 1, 64 * 1024, 16 << 20] {
        s.wait_warm().await;
        let before = s.pooled().await;
        let data = payload(len, len as u64);
        let back = round_trip(s.addr(), &data).await.unwrap();
        assert!(back == data, "{len} bytes came back different ({} bytes)", back.len());
        assert_eq!(
            s.pooled().await,
            before + 1.0,
            "the {len}-byte tunnel used a pooled rendezvous"
        );
    }
    // The endpoint half-closes first: its greeting arrives, then what the app sends after.
    s.rig.create(greet, greeter).await;
    let _hcm2 = s.rig.hcm(&s.rig.listen_cs(greet).await);
    s.rig.wait_listeners(greet, 1).await;
    let b2 = s.rig.bridge(greet, &s.rig.send_cs(greet).await);
    let addr = b2.addr_of(greet).unwrap();
    assert_eq!(round_trip(addr, b"x").await.unwrap(), b"hello from the endpoint");
    greeted.recv().await.unwrap();
    let ok = wait_for(Duration::from_secs(10), || async {
        let m = metrics_text(s.admin).await;
        metric(&m, "hyrelay_relay_warm_connections", greet) >= 1.0
            && metric(&m, "hyrelay_bridge_warm_connections", greet) >= 1.0
    })
    .await;
    assert!(ok, "greet never got warm connections");
    let before = metric(
        &metrics_text(s.admin).await,
        "hyrelay_relay_pooled_rendezvous_total",
        greet,
    );
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got, b"hello from the endpoint",
        "the endpoint's half-close came through"
    );
    c.write_all(b"after the endpoint's EOF").await.unwrap();
    c.shutdown().await.unwrap();
    let later = tokio::time::timeout(Duration::from_secs(10), greeted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(later, b"after the endpoint's EOF");
    let after = metric(
        &metrics_text(s.admin).await,
        "hyrelay_relay_pooled_rendezvous_total",
        greet,
    );
    assert_eq!(after, before + 1.0, "that tunnel was pooled too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_through_pool_and_early_data_ws() {
    byte_exact_through_pool_and_early_data(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_through_pool_and_early_data_wss() {
    byte_exact_through_pool_and_early_data(true).await;
}

/// A raw pooled rendezvous connection for `hc` with `token`.
async fn raw_pooled(rig: &Rig, hc: &str, token: &str) -> Result<ws::ClientWs, ConnectError> {
    let cs = rig.listen_cs(hc).await;
    let url = hyrelay::client::hc_url(&cs, hc, "listen", "pool");
    let headers = [("ServiceBusAuthorization", token), ("X-Hyrelay-Pool", "1")];
    ws::connect(&url, Some(&rig.tls), &headers, Duration::from_secs(10)).await
}

/// A raw opted-in sender for `hc` that sends `early` right behind its upgrade request.
async fn raw_early_sender(
    rig: &Rig,
    hc: &str,
    early: &[u8],
) -> (
    WsReader<tokio::io::ReadHalf<hyrelay::transport::Stream>>,
    tokio::task::JoinHandle<()>,
) {
    let cs = rig.send_cs(hc).await;
    let token = hyrelay::client::token(&cs, hc, Duration::from_secs(600));
    let url = hyrelay::client::hc_url(&cs, hc, "connect", "early");
    let mut stream = ws::open(&url, None).await.unwrap();
    let key = ws::send_upgrade(
        &mut stream,
        &url,
        &[("ServiceBusAuthorization", &token), ("X-Hyrelay-Early", "1")],
    )
    .await
    .unwrap();
    let mut w = WsWriter::new(&mut stream, Role::Client);
    w.send(true, OpCode::Binary, early).await.unwrap();
    let mut buf = BytesMut::new();
    let (head, used) = loop {
        if let Some(r) = ws::parse_answer(&buf).unwrap() {
            break r;
        }
        assert!(stream.read_buf(&mut buf).await.unwrap() > 0, "the relay closed");
    };
    let conn = ws::finish_upgrade(stream, buf, head, used, &key).unwrap();
    assert!(conn.response.headers.get("X-Hyrelay-Extensions").is_some());
    let (r, w) = tokio::io::split(conn.stream);
    let keep = tokio::spawn(async move {
        let _w = w;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    (WsReader::new(r, conn.leftover, Role::Client, 1 << 20), keep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_serves_once_its_own_hc_after_authenticating() {
    let rig = Rig::new(false);
    rig.create("one", echo()).await;
    rig.create("two", echo()).await;
    let cs = rig.listen_cs("one").await;
    let listen_token = hyrelay::client::token(&cs, "one", Duration::from_secs(600));
    // Authentication: no token, a Send token, and a token for another hybrid connection.
    let send = rig.send_cs("one").await;
    let send_token = hyrelay::client::token(&send, "one", Duration::from_secs(600));
    let other = hyrelay::client::token(&rig.listen_cs("two").await, "two", Duration::from_secs(600));
    for (t, want) in [("", 401), (send_token.as_str(), 403), (other.as_str(), 403)] {
        match raw_pooled(&rig, "one", t).await {
            Err(e) => assert!(
                matches!(e.status(), Some(s) if s == want || (want == 403 && s == 401)),
                "{e}"
            ),
            Ok(_) => panic!("a pooled connection was accepted with {t:?}"),
        }
    }
    let (mut ctl_one, _w1) = raw_listener(&rig, "one").await;
    let (mut ctl_two, _w2) = raw_listener(&rig, "two").await;
    let pooled = raw_pooled(&rig, "one", &listen_token).await.unwrap();
    assert!(pooled.response.headers.get("X-Hyrelay-Extensions").is_some());
    let mut pr = WsReader::new(pooled.stream, pooled.leftover, Role::Client, 1 << 20);

    // Another hybrid connection's sender never gets it.
    let _s2 = raw_early_sender_pending(&rig, "two").await;
    let a = next_accept(&mut ctl_two).await;
    assert!(!a.address.is_empty(), "standard accept on two's control channel");

    // The first sender of "one" gets it: accept, then its early bytes, on the pooled connection.
    let (_ra, _ka) = raw_early_sender(&rig, "one", b"early bytes").await;
    let m = next_msg(&mut pr).await;
    let Some(Message::Text(t)) = m else {
        panic!("expected the accept, got {m:?}")
    };
    assert!(matches!(control::decode(&t).unwrap(), Command::Accept(_)));
    let m = next_msg(&mut pr).await;
    assert_eq!(m, Some(Message::Binary(bytes::Bytes::from_static(b"early bytes"))));

    // The second sender goes the standard way: the pooled connection is spent.
    let _pending = raw_early_sender_pending(&rig, "one").await;
    let a = next_accept(&mut ctl_one).await;
    assert!(!a.address.is_empty());
    let nothing = tokio::time::timeout(Duration::from_millis(500), pr.next_message(1 << 16)).await;
    assert!(
        nothing.is_err(),
        "nothing more arrives on the spent pooled connection: {nothing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regenerated_key_retires_pooled_connections() {
    let rig = Rig::new(false);
    rig.create("rekey", echo()).await;
    let cs = rig.listen_cs("rekey").await;
    let token = hyrelay::client::token(&cs, "rekey", Duration::from_secs(600));
    let (mut ctl, _w) = raw_listener(&rig, "rekey").await;
    let pooled = raw_pooled(&rig, "rekey", &token).await.unwrap();
    let mut pr = WsReader::new(pooled.stream, pooled.leftover, Role::Client, 1 << 20);
    rig.mgmt
        .regenerate_key("rekey", false, Some("defaultListener"))
        .await
        .unwrap();
    // The sender is served the standard way (within the control channel's grace), and the
    // pooled connection, authenticated with the old key, gets nothing.
    let _pending = raw_early_sender_pending(&rig, "rekey").await;
    let a = next_accept(&mut ctl).await;
    assert!(!a.address.is_empty());
    let m = tokio::time::timeout(Duration::from_secs(5), pr.next_message(1 << 16))
        .await
        .unwrap();
    assert!(
        !matches!(m, Ok(Some(Message::Text(_)))),
        "no accept on the retired pooled connection: {m:?}"
    );
}

/// An opted-in sender whose upgrade stays pending (no pooled connection waits): returns
/// its open stream so the relay keeps it.
async fn raw_early_sender_pending(rig: &Rig, hc: &str) -> hyrelay::transport::Stream {
    let cs = rig.send_cs(hc).await;
    let token = hyrelay::client::token(&cs, hc, Duration::from_secs(600));
    let url = hyrelay::client::hc_url(&cs, hc, "connect", "pending");
    let mut stream = ws::open(&url, None).await.unwrap();
    ws::send_upgrade(
        &mut stream,
        &url,
        &[("ServiceBusAuthorization", &token), ("X-Hyrelay-Early", "1")],
    )
    .await
    .unwrap();
    stream
}

/// An echo endpoint counting the connections it accepted.
fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let addr = serve_on_thread(move |mut s, _| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    });
    (addr, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_phantom_endpoint_connections() {
    let (endpoint, accepted) = counting_echo();
    let s = Setup::new(false, "phantom", endpoint, true, true).await;
    round_trip(s.addr(), b"learn").await.unwrap();
    s.wait_warm().await;
    // Warm connections on both sides, for a while: the endpoint sees nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "only the first app connection reached it"
    );
    let before = s.pooled().await;
    for i in 0..20u64 {
        // With a pooled and a warm connection ready each time.
        s.wait_warm().await;
        if i % 2 == 0 {
            let data = payload(100, i);
            assert!(round_trip(s.addr(), &data).await.unwrap() == data);
        } else {
            // Connects and closes at once.
            drop(tokio::net::TcpStream::connect(s.addr()).await.unwrap());
        }
    }
    let settled = wait_for(Duration::from_secs(10), || async {
        accepted.load(Ordering::SeqCst) >= 21
    })
    .await;
    assert!(
        settled,
        "an app connection never reached the endpoint: {}",
        accepted.load(Ordering::SeqCst)
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        21,
        "exactly one endpoint connection per app connection"
    );
    assert_eq!(s.pooled().await, before + 20.0, "every one went through the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_refill_after_a_burst_of_500() {
    let s = Setup::new(false, "burst", echo(), true, true).await;
    round_trip(s.addr(), b"learn").await.unwrap();
    s.wait_warm().await;
    let addr = s.addr();
    let tasks: Vec<_> = (0..25u64)
        .map(|t| {
            tokio::spawn(async move {
                for i in 0..20u64 {
                    let data = payload(64, t * 100 + i);
                    assert!(round_trip(addr, &data).await.unwrap() == data, "tunnel {t}/{i}");
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(s.pooled().await >= 1.0, "some of the burst used the pool");
    s.wait_warm().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_off_on_either_side_fall_back_to_the_standard_protocol() {
    for (hc, relay_ext, client_ext) in [("plain-relay-off", false, true), ("plain-clients-off", true, false)] {
        let s = Setup::new(false, hc, echo(), relay_ext, client_ext).await;
        for len in [0usize, 1, 70_000] {
            let data = payload(len, 9);
            assert!(round_trip(s.addr(), &data).await.unwrap() == data);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let m = metrics_text(s.admin).await;
        assert_eq!(metric(&m, "hyrelay_relay_pooled_rendezvous_total", hc), 0.0, "{hc}");
        assert_eq!(metric(&m, "hyrelay_relay_warm_connections", hc), 0.0, "{hc}");
        assert_eq!(metric(&m, "hyrelay_bridge_warm_connections", hc), 0.0, "{hc}");
    }
}

/// A warm connection to a live relay counts as open while parked, also over TLS, where the
/// relay sends its session tickets after the handshake (bytes the bridge has not read);
/// after the relay restarts it counts as dead. Without the first half, every `wss://`
/// warm connection was dropped and early data never used one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_warm_connections_are_told_open_or_dead_also_over_tls() {
    for tls in [false, true] {
        let mut rig = Rig::new(tls);
        let addr = rig.relay.local_addr();
        let proxy = hyrelay::transport::proxy::ProxyConfig::default();
        let mut warm = Vec::new();
        for _ in 0..2 {
            let mut s = ws::open_stream("localhost", addr.port(), tls.then_some(&rig.tls), &proxy)
                .await
                .unwrap();
            s.park().unwrap();
            warm.push(s);
        }
        // Bounded: time for the relay's post-handshake records to arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for s in &mut warm {
            assert!(s.idle_and_open(), "a warm connection to a live relay (tls: {tls})");
        }
        rig.restart();
        let dead = wait_for(Duration::from_secs(5), || {
            let all = warm.iter_mut().all(|s| !s.idle_and_open());
            async move { all }
        })
        .await;
        assert!(dead, "warm connections to the stopped relay count as dead (tls: {tls})");
    }
}

const KEPT_REQUESTS: &str = "hyrelay_relay_kept_connection_requests_total";

/// Sequential tunnels ride the connections earlier tunnels used: the bridge's connect goes
/// out on a kept connection, the hcm's pooled connection is back in the relay's pool, and
/// every tunnel is byte-exact.
async fn tunnels_ride_kept_connections(tls: bool) {
    let hc = if tls { "kept-wss" } else { "kept-ws" };
    let s = Setup::new(tls, hc, echo(), true, true).await;
    // The first tunnel is how the bridge learns the relay's offer; the next ones let the
    // pool and the warm queue settle at this rate (they grow with it, by new connections).
    assert_eq!(round_trip(s.addr(), b"learn").await.unwrap(), b"learn");
    s.wait_warm().await;
    for i in 0..40u64 {
        let data = payload(100, 1000 + i);
        assert!(round_trip(s.addr(), &data).await.unwrap() == data, "warm-up tunnel {i}");
    }
    let counts = || async {
        (
            s.metric(KEPT_REQUESTS).await + s.metric("hyrelay_relay_repooled_connections_total").await,
            s.metric("hyrelay_hcm_reused_connections_total").await,
            s.metric("hyrelay_bridge_reused_connections_total").await,
        )
    };
    let before = counts().await;
    let sizes = [0usize, 1, 100, 64 * 1024, 300 * 1024];
    let n = 60u64;
    for i in 0..n {
        let data = payload(sizes[i as usize % sizes.len()], i);
        let back = round_trip(s.addr(), &data).await.unwrap();
        assert!(
            back == data,
            "tunnel {i}: {} bytes came back as {}",
            data.len(),
            back.len()
        );
    }
    // The last tunnel's connections come back after its end: bounded wait for the counts.
    let mut after = counts().await;
    for _ in 0..50 {
        if after.0 - before.0 >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = counts().await;
    }
    assert!(
        after.0 - before.0 >= n as f64,
        "connections kept by the relay: {before:?} -> {after:?} ({n} tunnels, a sender's and a pooled one each)"
    );
    // Once settled all of them are (60 of 60 on both sides in local runs); half leaves
    // room for a busy machine's timing.
    assert!(after.1 - before.1 >= (n / 2) as f64, "hcm: {before:?} -> {after:?}");
    assert!(after.2 - before.2 >= (n / 2) as f64, "bridge: {before:?} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_ride_kept_connections_ws() {
    tunnels_ride_kept_connections(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_ride_kept_connections_wss() {
    tunnels_ride_kept_connections(true).await;
}

/// A raw sender's connection to the relay and what it read past the last answer.
struct RawSender {
    stream: hyrelay::transport::Stream,
    buf: BytesMut,
}

impl RawSender {
    async fn open(rig: &Rig, hc: &str) -> RawSender {
        let cs = rig.send_cs(hc).await;
        let url = hyrelay::client::hc_url(&cs, hc, "connect", "raw");
        RawSender {
            stream: ws::open(&url, None).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// A connect request (opted in to reuse or not), with `before` written first in the
    /// same write.
    async fn connect(&mut self, rig: &Rig, hc: &str, reuse: bool, before: &[u8]) {
        self.connect_with(rig, hc, &[("X-Hyrelay-Reuse", reuse)], before).await;
    }

    /// A connect request with the opt-in headers that are `true`, `before` written first.
    async fn connect_with(&mut self, rig: &Rig, hc: &str, opt: &[(&str, bool)], before: &[u8]) {
        let cs = rig.send_cs(hc).await;
        let token = hyrelay::client::token(&cs, hc, Duration::from_secs(600));
        let url = hyrelay::client::hc_url(&cs, hc, "connect", "raw");
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nServiceBusAuthorization: {token}\r\n",
            url.target, url.host
        );
        for (name, _) in opt.iter().filter(|(_, on)| *on) {
            req.push_str(&format!("{name}: 1\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = before.to_vec();
        bytes.extend_from_slice(req.as_bytes());
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Reads the answer's head; `None` if the relay closed first.
    async fn answer(&mut self) -> Option<ResponseHeadOf> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.buf.split_to(end + 4);
                return Some(ResponseHeadOf(String::from_utf8_lossy(&head).into_owned()));
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                .await
                .expect("the relay answers or closes")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads one whole frame (unmasked, from the relay).
    async fn frame(&mut self) -> Option<(OpCode, Vec<u8>)> {
        loop {
            if let Some((f, used)) = parse_frame(&self.buf) {
                let _ = self.buf.split_to(used);
                return Some(f);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                .await
                .expect("a frame or the end")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }
}

/// A response head as text.
#[derive(Debug)]
struct ResponseHeadOf(String);

impl ResponseHeadOf {
    fn status(&self) -> &str {
        self.0.get(9..12).unwrap_or("")
    }
    fn promised(&self) -> bool {
        self.0.to_ascii_lowercase().contains("\r\nx-hyrelay-reuse: 1\r\n")
    }
}

/// One unmasked frame at the start of `buf` (short payloads only: these tests' frames).
fn parse_frame(buf: &[u8]) -> Option<((OpCode, Vec<u8>), usize)> {
    if buf.len() < 2 {
        return None;
    }
    let op = match buf[0] & 0x0f {
        2 => OpCode::Binary,
        8 => OpCode::Close,
        9 => OpCode::Ping,
        10 => OpCode::Pong,
        other => panic!("unexpected opcode {other}"),
    };
    let (len, at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => panic!("no long frames here"),
        n => (n as usize, 2),
    };
    let end = at + len;
    (buf.len() >= end).then(|| ((op, buf[at..end].to_vec()), end))
}

fn masked(op: OpCode, payload: &[u8]) -> Vec<u8> {
    hyrelay::proto::frame::encode_frame(true, op, Some([1, 2, 3, 4]), payload).to_vec()
}

fn close_1000() -> Vec<u8> {
    masked(OpCode::Close, &1000u16.to_be_bytes())
}

/// The listener's side of a standard rendezvous: the accept from its control channel,
/// then the rendezvous connection.
async fn rendezvous(
    ctl: &mut RawReader,
    rig: &Rig,
) -> (
    WsReader<tokio::io::ReadHalf<hyrelay::transport::Stream>>,
    tokio::io::WriteHalf<hyrelay::transport::Stream>,
) {
    let a = next_accept(ctl).await;
    let url = ws::WsUrl::parse(&a.address).unwrap();
    let c = ws::connect(&url, Some(&rig.tls), &[], Duration::from_secs(10))
        .await
        .unwrap();
    let (r, w) = tokio::io::split(c.stream);
    (WsReader::new(r, c.leftover, Role::Client, 1 << 20), w)
}

/// Driven raw against the relay: a sender that opted in gets the promise and, after a
/// clean close handshake, its next request is read on the same connection, also when it
/// arrives in the same write as its Close; nothing of one tunnel reaches the next. A
/// sender that did not opt in gets no promise and its connection is closed; one whose
/// tunnel ended without a clean close handshake is closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reads_a_kept_connections_next_request_only_after_a_clean_close() {
    let rig = Rig::new(false);
    let hc = "raw-kept";
    rig.create(hc, echo()).await;
    let (mut ctl, _ctl_w) = raw_listener(&rig, hc).await;
    let mut s = RawSender::open(&rig, hc).await;

    // Tunnel 1: data each way, then the listener closes first; the sender answers with its
    // Close and, in the same write, the next request.
    s.connect(&rig, hc, true, b"").await;
    let (mut lr, mut lw) = rendezvous(&mut ctl, &rig).await;
    let head = s.answer().await.expect("101");
    assert_eq!(head.status(), "101", "{head:?}");
    assert!(head.promised(), "an opted-in sender gets the promise: {head:?}");
    s.stream.write_all(&masked(OpCode::Binary, b"one up")).await.unwrap();
    let m = next_msg(&mut lr).await;
    assert_eq!(m, Some(Message::Binary(bytes::Bytes::from_static(b"one up"))));
    let mut w = WsWriter::new(&mut lw, Role::Client);
    w.send(true, OpCode::Binary, b"one down").await.unwrap();
    w.send_close(1000, "").await.unwrap();
    assert_eq!(s.frame().await, Some((OpCode::Binary, b"one down".to_vec())));
    assert_eq!(s.frame().await.map(|f| f.0), Some(OpCode::Close));
    let mut close_and_next = close_1000();
    // Bytes after the Close that are not a request would fail it; these are one.
    s.connect(&rig, hc, true, &std::mem::take(&mut close_and_next)).await;
    let m = next_msg(&mut lr).await;
    assert!(
        matches!(m, Some(Message::Close(_))),
        "the listener gets the sender's Close: {m:?}"
    );

    // Tunnel 2 on the same connection: a new accept, a new rendezvous, byte-exact.
    let (mut lr2, mut lw2) = rendezvous(&mut ctl, &rig).await;
    let head = s
        .answer()
        .await
        .expect("the second request is answered on the kept connection");
    assert_eq!(head.status(), "101", "{head:?}");
    s.stream.write_all(&masked(OpCode::Binary, b"two up")).await.unwrap();
    let m = next_msg(&mut lr2).await;
    assert_eq!(
        m,
        Some(Message::Binary(bytes::Bytes::from_static(b"two up"))),
        "nothing of tunnel 1 reaches tunnel 2"
    );
    // Now the sender closes first; the listener vanishes without its Close: not clean.
    s.stream.write_all(&close_1000()).await.unwrap();
    let m = next_msg(&mut lr2).await;
    assert!(matches!(m, Some(Message::Close(_))), "{m:?}");
    drop((lr2, lw2.shutdown().await));
    let f = s.frame().await.expect("the relay's 1001 for the vanished listener");
    assert_eq!(f.0, OpCode::Close);
    assert_eq!(&f.1[..2], &1001u16.to_be_bytes(), "going away");
    s.connect(&rig, hc, true, b"").await;
    assert!(
        s.answer().await.is_none(),
        "after an unclean end the relay closes the connection"
    );

    // A sender that did not opt in (Microsoft's clients): no promise, closed after a clean end.
    let mut s = RawSender::open(&rig, hc).await;
    s.connect(&rig, hc, false, b"").await;
    let (mut lr3, mut lw3) = rendezvous(&mut ctl, &rig).await;
    let head = s.answer().await.expect("101");
    assert_eq!(head.status(), "101");
    assert!(!head.promised(), "no opt-in, no promise: {head:?}");
    s.stream.write_all(&close_1000()).await.unwrap();
    let m = next_msg(&mut lr3).await;
    assert!(matches!(m, Some(Message::Close(_))), "{m:?}");
    WsWriter::new(&mut lw3, Role::Client)
        .send_close(1000, "")
        .await
        .unwrap();
    assert_eq!(s.frame().await.map(|f| f.0), Some(OpCode::Close));
    s.connect(&rig, hc, false, b"").await;
    assert!(s.answer().await.is_none(), "a connection without the promise is closed");
    drop(lw2);
}

/// The next message on `r`, within 10 s.
async fn next_msg<R: tokio::io::AsyncRead + Unpin>(r: &mut WsReader<R>) -> Option<Message> {
    tokio::time::timeout(Duration::from_secs(10), r.next_message(1 << 16))
        .await
        .expect("a message within 10 s")
        .expect("a well-formed message")
}

/// True if the next message on a pooled connection is an `accept`.
async fn next_accept_on(pr: &mut WsReader<hyrelay::transport::Stream>) -> bool {
    let m = next_msg(pr).await;
    match m {
        Some(Message::Text(t)) => matches!(control::decode(&t).unwrap(), Command::Accept(_)),
        other => panic!("expected an accept, got {other:?}"),
    }
}

/// A raw pooled rendezvous connection opted in to reuse, and the promise on its 101.
async fn raw_pooled_reuse(rig: &Rig, hc: &str) -> (WsReader<hyrelay::transport::Stream>, bool) {
    let cs = rig.listen_cs(hc).await;
    let token = hyrelay::client::token(&cs, hc, Duration::from_secs(600));
    let url = hyrelay::client::hc_url(&cs, hc, "listen", "pool");
    let headers = [
        ("ServiceBusAuthorization", token.as_str()),
        ("X-Hyrelay-Pool", "1"),
        ("X-Hyrelay-Reuse", "1"),
    ];
    let c = ws::connect(&url, Some(&rig.tls), &headers, Duration::from_secs(10))
        .await
        .unwrap();
    let promised = c.response.headers.get("X-Hyrelay-Reuse") == Some("1");
    (WsReader::new(c.stream, c.leftover, Role::Client, 1 << 20), promised)
}

/// Driven raw: a pooled connection whose tunnel ended with both Closes 1000 is back in the
/// relay's pool by itself (the next opted-in sender's `accept` comes on it, byte-exact,
/// nothing of the tunnel before); after a tunnel that ended with another code it is
/// closed; a ping sent right behind the Close retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_is_back_in_the_pool_only_after_a_normal_end() {
    let rig = Rig::with(false, |c| c.runtime.admin = Some("127.0.0.1:0".parse().unwrap()));
    let admin = rig.relay.admin_addr().unwrap();
    let hc = "raw-repool";
    rig.create(hc, echo()).await;
    // A listener's control channel, so the hybrid connection has one.
    let (_ctl, _ctl_w) = raw_listener(&rig, hc).await;
    let (mut pr, promised) = raw_pooled_reuse(&rig, hc).await;
    assert!(promised, "an opted-in pooled connection gets the promise");
    // The relay puts the connection back just after it forwarded the last Close: a sender
    // that came before that would go the standard way, so each round waits for it.
    let waiting = || async {
        wait_for(Duration::from_secs(10), || async {
            metric(&metrics_text(admin).await, "hyrelay_relay_warm_connections", hc) >= 1.0
        })
        .await
    };
    for round in 0..3u8 {
        assert!(
            waiting().await,
            "round {round}: the pooled connection waits in the pool"
        );
        let mut s = RawSender::open(&rig, hc).await;
        let early = [("X-Hyrelay-Early", true), ("X-Hyrelay-Reuse", true)];
        s.connect_with(&rig, hc, &early, b"").await;
        assert!(
            next_accept_on(&mut pr).await,
            "round {round}: the accept on the pooled connection"
        );
        let head = s.answer().await.expect("101");
        assert_eq!(head.status(), "101", "{head:?}");
        let up = format!("up {round}");
        s.stream
            .write_all(&masked(OpCode::Binary, up.as_bytes()))
            .await
            .unwrap();
        let m = next_msg(&mut pr).await;
        assert_eq!(
            m,
            Some(Message::Binary(bytes::Bytes::from(up))),
            "round {round}: only this tunnel's bytes"
        );
        // The sender closes first; the listener answers: code 1000 in rounds 0 and 1.
        s.stream.write_all(&close_1000()).await.unwrap();
        let m = next_msg(&mut pr).await;
        assert!(matches!(m, Some(Message::Close(_))), "{m:?}");
        let code = if round < 2 { 1000 } else { 4502 };
        WsWriter::new(pr.get_mut(), Role::Client)
            .send_close(code, "")
            .await
            .unwrap();
        assert_eq!(s.frame().await.map(|f| f.0), Some(OpCode::Close));
    }
    // Round 2 ended with 4502: the relay closed the pooled connection.
    let m = tokio::time::timeout(Duration::from_secs(10), pr.next_message(1 << 16))
        .await
        .unwrap();
    assert!(matches!(m, Ok(None) | Err(_)), "closed after an abnormal end: {m:?}");

    // A ping right behind the listener's Close asks to retire it: the relay answers Close.
    let (mut pr, _) = raw_pooled_reuse(&rig, hc).await;
    assert!(waiting().await, "the new pooled connection waits in the pool");
    let mut s = RawSender::open(&rig, hc).await;
    s.connect_with(&rig, hc, &[("X-Hyrelay-Early", true), ("X-Hyrelay-Reuse", true)], b"")
        .await;
    assert!(next_accept_on(&mut pr).await);
    assert_eq!(s.answer().await.expect("101").status(), "101");
    s.stream.write_all(&close_1000()).await.unwrap();
    let m = next_msg(&mut pr).await;
    assert!(matches!(m, Some(Message::Close(_))), "{m:?}");
    let mut both =
        hyrelay::proto::frame::encode_frame(true, OpCode::Close, Some([5, 6, 7, 8]), &1000u16.to_be_bytes()).to_vec();
    both.extend_from_slice(&hyrelay::proto::frame::encode_frame(
        true,
        OpCode::Ping,
        Some([5, 6, 7, 8]),
        b"retire",
    ));
    pr.get_mut().write_all(&both).await.unwrap();
    let m = next_msg(&mut pr).await;
    assert!(matches!(m, Some(Message::Close(_))), "the relay retires it: {m:?}");
}
