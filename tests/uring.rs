//! The end-to-end scenarios on the completion backend (`cargo test --features uring --test
//! uring`): a plain ws:// relay, and wss:// (TLS legs run there too). Each test checks that
//! its tunnels really ran there.
#![cfg(all(feature = "uring", target_os = "linux"))]

mod common;

use std::time::Duration;

use common::*;
use hyrelay::client;
use hyrelay::dataplane::backend::IoBackend;
use hyrelay::dataplane::uring;
use hyrelay::proto::frame::{self, OpCode, Role};
use hyrelay::transport::ws::{self, Message, WsReader, WsUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A relay on the completion backend, ws:// or (`tls`) wss://.
fn rig_on(tls: bool) -> Rig {
    Rig::with(tls, |c| c.runtime.io_backend = IoBackend::Uring)
}

/// A plain-ws relay on the completion backend.
fn rig() -> Rig {
    rig_on(false)
}

/// `name`, told apart for a wss:// run (the tunnel counts are per name, per process).
fn hc_name(name: &str, tls: bool) -> String {
    if tls { format!("{name}-tls") } else { name.to_owned() }
}

fn hcm(rig: &Rig, cs: &hyrelay::proto::connstr::ConnectionString) -> hyrelay::hcm::HcmHandle {
    let mut c = rig.hcm_config(vec![hyrelay::hcm::config::HcEntry::new(cs.clone(), None).unwrap()]);
    c.runtime.io_backend = IoBackend::Uring;
    hyrelay::hcm::start(c).unwrap()
}

fn bridge(rig: &Rig, hc: &str, cs: &hyrelay::proto::connstr::ConnectionString) -> hyrelay::bridge::BridgeHandle {
    let mut c = rig.bridge_config(hc, cs);
    c.runtime.io_backend = IoBackend::Uring;
    hyrelay::bridge::start(c).unwrap()
}

/// A chain bridge → relay → hcm → `endpoint`, all on the completion backend.
async fn chain(
    rig: &Rig,
    name: &str,
    endpoint: std::net::SocketAddr,
) -> (hyrelay::hcm::HcmHandle, hyrelay::bridge::BridgeHandle) {
    rig.create(name, endpoint).await;
    let h = hcm(rig, &rig.listen_cs(name).await);
    rig.wait_listeners(name, 1).await;
    let b = bridge(rig, name, &rig.send_cs(name).await);
    (h, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_round_trips() {
    let rig = rig();
    let (_h, b) = chain(&rig, "echo", echo()).await;
    let addr = b.addr_of("echo").unwrap();
    for (i, len) in [0usize, 1, 65535, 65536, 65537, 16 << 20].into_iter().enumerate() {
        let data = payload(len, i as u64);
        let back = round_trip(addr, &data).await.unwrap();
        assert_eq!(back.len(), data.len(), "length for {len}");
        assert!(back == data, "bytes differ for {len}");
    }
    // Each round trip is three tunnels: bridge splice, relay, hcm splice.
    assert_eq!(uring::tunnels_run("echo"), 18, "tunnels ran on io_uring");
}

/// An app and an endpoint each half-close in turn; the late bytes still arrive. Over
/// wss:// each TLS leg's `close_notify` ends its direction, as FIN does over ws://.
async fn half_close_from_either_side(tls: bool) {
    let rig = rig_on(tls);
    let (ep, mut received) = greeter();
    let (greet, echo2) = (hc_name("greet", tls), hc_name("echo2", tls));
    let (_h, b) = chain(&rig, &greet, ep).await;
    let mut s = tokio::net::TcpStream::connect(b.addr_of(&greet).unwrap())
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello from the endpoint");
    let late = payload(200_000, 7);
    s.write_all(&late).await.unwrap();
    s.shutdown().await.unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(arrived == late, "late bytes after the endpoint's half-close");
    assert_eq!(uring::tunnels_run(&greet), 3);

    let (_h2, b2) = chain(&rig, &echo2, echo()).await;
    let data = payload(300_000, 9);
    assert!(round_trip(b2.addr_of(&echo2).unwrap(), &data).await.unwrap() == data);
}

/// Two hundred tunnels at once, each byte-exact.
async fn two_hundred_concurrent_connections(tls: bool) {
    let rig = rig_on(tls);
    let many = hc_name("many", tls);
    let (_h, b) = chain(&rig, &many, echo()).await;
    let addr = b.addr_of(&many).unwrap();
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = payload(16 * 1024 + i as usize, i);
                let back = round_trip(addr, &data).await.expect("round trip");
                back == data
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap() as usize;
    }
    assert_eq!(ok, 200);
    assert_eq!(uring::tunnels_run(&many), 600);
}

/// What a tunnel's end does runs on the completion worker it ran on (no tokio task waits
/// for it): while tunnels are open the hcm counts them and the relay's usage shows them
/// active; once they end, the hcm's count is back to zero and the relay has the sender's
/// bytes, each tunnel's own, counted once.
async fn a_tunnels_end_is_counted_where_it_ran(tls: bool) {
    let rig = rig_on(tls);
    let name = hc_name("ends", tls);
    let (h, b) = chain(&rig, &name, echo()).await;
    let addr = b.addr_of(&name).unwrap();
    let active = || h.status().iter().map(|s| s.active_tunnels).sum::<u64>();
    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let data = vec![i; 1000];
        c.write_all(&data).await.unwrap();
        let mut back = vec![0u8; 1000];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
        open.push(c);
    }
    assert_eq!(active(), 3, "the hcm counts the open tunnels");
    let senders = rig.mgmt.show(&name).await.unwrap()["senders"].clone();
    assert_eq!(senders[0]["activeTunnels"], 3, "{senders:#}");
    for c in open {
        let (mut r, mut w) = c.into_split();
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    let ended = wait_for(Duration::from_secs(10), || async {
        let senders = rig.mgmt.show(&name).await.unwrap()["senders"].clone();
        active() == 0 && senders[0]["activeTunnels"] == 0
    })
    .await;
    let show = rig.mgmt.show(&name).await.unwrap();
    assert!(ended, "hcm active {}, relay {:#}", active(), show["senders"]);
    let sender = &show["senders"][0];
    assert_eq!(sender["tunnels"], 3, "{sender}");
    assert_eq!(sender["bytesSent"], 3000, "{sender}");
    assert_eq!(sender["bytesReceived"], 3000, "{sender}");
    assert_eq!(uring::tunnels_run(&name), 9, "tunnels ran on io_uring");
}

/// Tunnels that end with a FIN leave no io_uring worker thread behind. The kernel never
/// completes an io_uring shutdown inline: it hands each to an io-wq worker thread (a
/// thread wake-up and switch per socket, 8 % of all CPU in the setup workload), so the
/// engine shuts sockets down with a direct call. Other tests of this binary run alongside;
/// none of their operations goes to io-wq either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_tunnels_hand_no_work_to_io_uring_worker_threads() {
    let rig = rig();
    let (_h, b) = chain(&rig, "fin", echo()).await;
    let addr = b.addr_of("fin").unwrap();
    for i in 0..20u64 {
        let data = payload(1000, i);
        assert_eq!(round_trip(addr, &data).await.unwrap(), data);
    }
    assert_eq!(uring::tunnels_run("fin"), 60, "tunnels ran on io_uring");
    let io_wq: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("iou-wrk"))
        .collect();
    assert!(io_wq.is_empty(), "io_uring handed work to worker threads: {io_wq:?}");
}

/// One worker per process with a buffer budget of four buffers: each completion worker
/// gets a provided-buffer ring of one buffer and a pool of one. Forty tunnels at once run
/// the ring empty over and over, so every read path is taken: the multishot receive, its
/// end when the ring is empty, the read into a pool buffer that follows, and the receive
/// armed again. Every byte must still arrive, in order. Over wss:// each TLS leg reads
/// with one-shot receives and continues a partial record in the buffer it holds.
async fn a_one_buffer_ring_under_forty_tunnels_loses_no_byte(tls: bool) {
    let tiny = |rt: &mut hyrelay::config::RuntimeSettings| {
        rt.io_backend = IoBackend::Uring;
        rt.set_workers(1).unwrap();
        rt.set_budget_bytes(4 * hyrelay::dataplane::pool::BUF_SIZE).unwrap();
    };
    let rig = Rig::with(tls, |c| tiny(&mut c.runtime));
    let name = hc_name("tiny", tls);
    rig.create(&name, echo()).await;
    let mut hc = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs(&name).await, None).unwrap(),
    ]);
    tiny(&mut hc.runtime);
    let _h = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners(&name, 1).await;
    let mut bc = rig.bridge_config(&name, &rig.send_cs(&name).await);
    tiny(&mut bc.runtime);
    let b = hyrelay::bridge::start(bc).unwrap();
    let addr = b.addr_of(&name).unwrap();
    let tasks: Vec<_> = (0..40u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = payload(200_000 + i as usize * 997, i);
                let back = round_trip(addr, &data).await.expect("round trip");
                back == data
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("within 60 s")
            .unwrap() as usize;
    }
    assert_eq!(ok, 40, "every tunnel's bytes came back whole and in order");
    assert_eq!(uring::tunnels_run(&name), 120);
}

type Reader = WsReader<tokio::io::ReadHalf<hyrelay::transport::Stream>>;
type Writer = tokio::io::WriteHalf<hyrelay::transport::Stream>;

/// A sender and a listener joined through the relay by hand: (sender, listener) halves.
async fn joined(rig: &Rig, hc: &str) -> ((Reader, Writer), (Reader, Writer), (Reader, Writer)) {
    rig.create(hc, echo()).await;
    let cs = rig.listen_cs(hc).await;
    let token = client::token(&cs, hc, Duration::from_secs(600));
    let url = client::hc_url(&cs, hc, "listen", "raw");
    let c = ws::connect(
        &url,
        Some(&rig.tls),
        &[("ServiceBusAuthorization", &token)],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (cr, cw) = tokio::io::split(c.stream);
    let mut control = WsReader::new(cr, c.leftover, Role::Client, 1 << 20);
    rig.wait_listeners(hc, 1).await;
    let scs = rig.send_cs(hc).await;
    let stoken = client::token(&scs, hc, Duration::from_secs(600));
    let surl = client::hc_url(&scs, hc, "connect", "s");
    let sheaders = [("ServiceBusAuthorization", stoken.as_str())];
    let (s, l) = tokio::join!(
        ws::connect(&surl, Some(&rig.tls), &sheaders, Duration::from_secs(20)),
        async {
            let a = loop {
                let m = control.next_message(1 << 16).await.unwrap().unwrap();
                if let Message::Text(t) = m
                    && let hyrelay::proto::control::Command::Accept(a) = hyrelay::proto::control::decode(&t).unwrap()
                {
                    break a;
                }
            };
            ws::connect(
                &WsUrl::parse(&a.address).unwrap(),
                Some(&rig.tls),
                &[],
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        }
    );
    let s = s.unwrap();
    let split = |c: ws::ClientWs| {
        let (r, w) = tokio::io::split(c.stream);
        (WsReader::new(r, c.leftover, Role::Client, 1 << 20), w)
    };
    (split(s), split(l), (control, cw))
}

async fn send(w: &mut Writer, opcode: OpCode, payload: &[u8]) {
    w.write_all(&frame::encode_frame(true, opcode, Some(rand_key()), payload))
        .await
        .unwrap();
    w.flush().await.unwrap();
}

fn rand_key() -> [u8; 4] {
    [7, 1, 9, 3]
}

async fn next(r: &mut Reader) -> Option<Message> {
    tokio::time::timeout(Duration::from_secs(10), r.next_message(1 << 20))
        .await
        .unwrap()
        .unwrap()
}

/// Close frames pass both ways and the legs then end. Over wss:// they end with
/// `close_notify` (a bare TCP EOF would be an error at the reader).
async fn relay_tunnel_forwards_close_and_half_close(tls: bool) {
    let rig = rig_on(tls);
    let name = hc_name("closes", tls);
    let ((mut sr, mut sw), (mut lr, mut lw), _control) = joined(&rig, &name).await;
    send(&mut sw, OpCode::Binary, b"hi").await;
    assert_eq!(
        next(&mut lr).await,
        Some(Message::Binary(bytes::Bytes::from_static(b"hi")))
    );
    // The sender's Close reaches the listener; the listener may still send afterwards.
    send(&mut sw, OpCode::Close, &frame::close_payload(1000, "bye")).await;
    match next(&mut lr).await {
        Some(Message::Close(c)) => assert_eq!((c.code, c.reason.as_str()), (Some(1000), "bye")),
        other => panic!("expected the sender's Close, got {other:?}"),
    }
    send(&mut lw, OpCode::Binary, b"late").await;
    assert_eq!(
        next(&mut sr).await,
        Some(Message::Binary(bytes::Bytes::from_static(b"late")))
    );
    send(&mut lw, OpCode::Close, &frame::close_payload(1000, "")).await;
    match next(&mut sr).await {
        Some(Message::Close(c)) => assert_eq!(c.code, Some(1000)),
        other => panic!("expected the listener's Close, got {other:?}"),
    }
    // Then both connections end (FIN).
    assert_eq!(next(&mut sr).await, None);
    assert_eq!(next(&mut lr).await, None);
    assert_eq!(uring::tunnels_run(&name), 1);
}

/// The other side hears 1001 when one goes away (over wss://, cut without `close_notify`).
async fn relay_sends_1001_when_a_side_vanishes(tls: bool) {
    let rig = rig_on(tls);
    let name = hc_name("vanish", tls);
    let ((mut sr, _sw), (lr, lw), _control) = joined(&rig, &name).await;
    drop((lr, lw));
    match next(&mut sr).await {
        Some(Message::Close(c)) => assert_eq!(c.code, Some(1001)),
        other => panic!("expected Close(1001), got {other:?}"),
    }
    assert_eq!(uring::tunnels_run(&name), 1, "the tunnel ran on io_uring");
}

/// A frame over the relay's limit: 1009 to its sender, 1001 to the other side.
async fn relay_cuts_an_oversized_frame_with_1009(tls: bool) {
    let rig = Rig::with(tls, |c| {
        c.runtime.io_backend = IoBackend::Uring;
        c.max_frame = 4096;
    });
    let name = hc_name("big", tls);
    let ((mut sr, mut sw), (mut lr, _lw), _control) = joined(&rig, &name).await;
    send(&mut sw, OpCode::Binary, &vec![1u8; 5000]).await;
    // The listener hears 1001 (the sender broke the protocol), the sender 1009.
    let m = next(&mut lr).await;
    assert!(matches!(&m, Some(Message::Close(c)) if c.code == Some(1001)), "{m:?}");
    let m = next(&mut sr).await;
    assert!(matches!(&m, Some(Message::Close(c)) if c.code == Some(1009)), "{m:?}");
    assert_eq!(uring::tunnels_run(&name), 1, "the tunnel ran on io_uring");
}

/// `wss://` end to end on io_uring: the bridge's and the hcm's TLS WebSockets and both of
/// the relay's TLS legs run on the completion workers, with their records opened in the
/// buffers they arrive in. Sizes around the 16 KiB record and the 64 KiB buffer, and one
/// large enough for many reads that end in the middle of a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_tunnels_run_on_io_uring_byte_exact() {
    let rig = Rig::with(true, |c| c.runtime.io_backend = IoBackend::Uring);
    let (_h, b) = chain(&rig, "tls", echo()).await;
    let addr = b.addr_of("tls").unwrap();
    let sizes = [1usize, 0, 16383, 16384, 16385, 65535, 65537, 100_000, 8 << 20];
    for (i, len) in sizes.into_iter().enumerate() {
        let data = payload(len, i as u64);
        let back = round_trip(addr, &data).await.unwrap();
        assert_eq!(back.len(), data.len(), "length for {len}");
        assert!(back == data, "bytes differ for {len}");
    }
    // Three tunnels per round trip: bridge splice, relay, hcm splice.
    assert_eq!(
        uring::tunnels_run("tls"),
        3 * sizes.len() as u64,
        "TLS tunnels ran on io_uring"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_falls_back_or_refuses_as_configured() {
    // On this machine io_uring works (the probe says so); `auto` picks it.
    assert!(
        hyrelay::dataplane::backend::probe().is_ok(),
        "io_uring is available to the test"
    );
    let mut rt = hyrelay::config::RuntimeSettings::default();
    rt.set_workers(1).unwrap();
    rt.set_budget_mib(1).unwrap();
    rt.io_backend = IoBackend::Auto;
    let w = hyrelay::dataplane::Workers::start_with("t", &rt).unwrap();
    assert!(w.completion().is_some());
    w.stop();
    rt.io_backend = IoBackend::Epoll;
    let w = hyrelay::dataplane::Workers::start_with("t", &rt).unwrap();
    assert!(w.completion().is_none());
    w.stop();
}

/// The io_uring relay engine closes its legs lingering too (see relay_protocol.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_frame_after_close_keeps_the_download_whole_on_io_uring() {
    let rig = rig();
    late_frame_after_close_keeps_the_download_whole(&rig).await;
    assert_eq!(uring::tunnels_run("tail"), 1, "the relay's tunnel ran on io_uring");
}

/// The scenarios that take `tls`, as tests over ws:// (`over_ws::`) and wss:// (`over_wss::`).
macro_rules! on_ws_and_wss {
    ($($scenario:ident),* $(,)?) => {
        mod over_ws {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(false).await;
                }
            )*
        }
        mod over_wss {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(true).await;
                }
            )*
        }
    };
}

on_ws_and_wss!(
    a_tunnels_end_is_counted_where_it_ran,
    half_close_from_either_side,
    two_hundred_concurrent_connections,
    a_one_buffer_ring_under_forty_tunnels_loses_no_byte,
    relay_tunnel_forwards_close_and_half_close,
    relay_sends_1001_when_a_side_vanishes,
    relay_cuts_an_oversized_frame_with_1009,
);
