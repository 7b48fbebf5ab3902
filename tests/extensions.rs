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
    let m = tokio::time::timeout(Duration::from_secs(10), pr.next_message(1 << 16))
        .await
        .unwrap()
        .unwrap();
    let Some(Message::Text(t)) = m else {
        panic!("expected the accept, got {m:?}")
    };
    assert!(matches!(control::decode(&t).unwrap(), Command::Accept(_)));
    let m = tokio::time::timeout(Duration::from_secs(10), pr.next_message(1 << 16))
        .await
        .unwrap()
        .unwrap();
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
