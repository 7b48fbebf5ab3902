//! Issue 9 item 5: silent truncation. A tunnel that ends abnormally must end the local TCP
//! connection with a reset (ECONNRESET), on the bridge side (the app) and on the hcm side
//! (the endpoint), so neither can take it for a complete stream; a clean close (Close 1000
//! or a Close without a code) stays a FIN.
//!
//! Bridge side: the bridge's "relay" is a fake driven by this test, so it can end the
//! WebSocket every way a relay can: a Close with any code, vanishing (FIN), a reset, a
//! protocol error, or going silent. hcm side: a real relay, with the sender driven by this
//! test. Both sides also run on io_uring (`--features uring`). And the whole chain: an hcm
//! stopped mid-download resets the app; a complete download ends with a clean EOF.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hyrelay::dataplane::backend::IoBackend;
use hyrelay::proto::connstr::ConnectionString;
use hyrelay::proto::frame::{self, OpCode, close_code};
use hyrelay::proto::handshake;
use hyrelay::transport::ws;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Ping period of the bridges and hcms here: a silent peer is dead after two.
const PING: Duration = Duration::from_millis(250);

/// How the far end of the tunnel's WebSocket ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FarEnd {
    Close(u16),
    /// A Close frame with an empty payload.
    CloseNoCode,
    /// The connection ends without a Close (FIN).
    Vanish,
    /// The connection is reset.
    Reset,
    /// A frame no peer may send (an unmasked frame from a client, a masked one from a
    /// server).
    ProtocolError,
    /// No more frames, pings unanswered.
    Silent,
}

impl FarEnd {
    fn is_clean(self) -> bool {
        matches!(self, FarEnd::Close(close_code::NORMAL) | FarEnd::CloseNoCode)
    }
}

/// Every way a tunnel can end, clean ones included.
const ENDS: &[FarEnd] = &[
    FarEnd::Close(1000),
    FarEnd::CloseNoCode,
    FarEnd::Close(1001),
    FarEnd::Close(1011),
    FarEnd::Close(1002),
    FarEnd::Close(4000),
    FarEnd::Vanish,
    FarEnd::Reset,
    FarEnd::ProtocolError,
    FarEnd::Silent,
];

fn chunk(i: usize) -> Vec<u8> {
    payload(20_000, i as u64)
}

const CHUNKS: usize = 3;

/// Reads `s` to its end: the bytes and whether it ended with a clean EOF.
async fn read_all(mut s: impl tokio::io::AsyncRead + Unpin) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the local connection never ended");
    (got, end)
}

/// Checks how a local connection ended after the far end ended the tunnel `how`.
fn check(how: FarEnd, side: &str, got: &[u8], end: &std::io::Result<()>) {
    if how.is_clean() {
        assert!(end.is_ok(), "{side}, {how:?}: a clean end is a FIN, got {end:?}");
        let want: Vec<u8> = (0..CHUNKS).flat_map(chunk).collect();
        assert!(got == want, "{side}, {how:?}: every byte before the clean end");
    } else {
        let kind = end.as_ref().err().map(|e| e.kind());
        assert_eq!(
            kind,
            Some(ErrorKind::ConnectionReset),
            "{side}, {how:?}: an abnormal end must be a reset, not {end:?} after {} bytes",
            got.len()
        );
    }
}

/// Checks that a local connection whose tunnel never opened got nothing and a reset: it
/// must not end like a clean, empty answer.
fn never_opened((got, end): (Vec<u8>, std::io::Result<()>)) {
    assert!(got.is_empty(), "{} bytes arrived", got.len());
    assert_eq!(
        end.as_ref().err().map(|e| e.kind()),
        Some(ErrorKind::ConnectionReset),
        "a tunnel that never opened must not end like a clean one: {end:?}"
    );
}

// ---- bridge side: app ⇄ bridge ⇄ (fake relay driven here)

/// The server end of the bridge's WebSocket, accepted by the fake relay (what the bridge
/// sends is never read: it stays in the socket).
struct FakeRelayLeg {
    _r: tokio::net::tcp::OwnedReadHalf,
    w: tokio::net::tcp::OwnedWriteHalf,
}

/// Accepts the bridge's connection and answers its upgrade.
async fn accept_upgrade(l: &TcpListener) -> FakeRelayLeg {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the bridge connects")
        .unwrap();
    let mut head = Vec::new();
    let (req, _) = loop {
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).await.unwrap();
        assert!(n > 0, "the bridge hung up during the upgrade");
        head.extend_from_slice(&b[..n]);
        if let Some(parsed) = handshake::parse_request(&head, 1 << 16).unwrap() {
            break parsed;
        }
    };
    let up = handshake::validate_upgrade(&req).unwrap();
    s.write_all(&handshake::switching_protocols(&up.key, None))
        .await
        .unwrap();
    let (_r, w) = s.into_split();
    FakeRelayLeg { _r, w }
}

fn bridge_to(relay: SocketAddr, backend: IoBackend) -> hyrelay::bridge::BridgeHandle {
    bridge_for("t", relay, backend)
}

/// A bridge forwarding hybrid connection `hc` (the io_uring tunnel counts are per name).
fn bridge_for(hc: &str, relay: SocketAddr, backend: IoBackend) -> hyrelay::bridge::BridgeHandle {
    let cs = ConnectionString::parse(&format!(
        "Endpoint=ws://{relay}/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath={hc}"
    ))
    .unwrap();
    let mut c = hyrelay::bridge::config::BridgeConfig::new(vec![hyrelay::bridge::config::Forward {
        hybrid_connection: hc.into(),
        listen: hyrelay::bridge::config::Listen::Addr("127.0.0.1:0".parse().unwrap()),
        connection_string: cs,
    }]);
    c.runtime.set_workers(1).unwrap();
    c.ping_interval = PING;
    c.relay_timeout = Duration::from_secs(10);
    c.runtime.io_backend = backend;
    hyrelay::bridge::start(c).unwrap()
}

/// Writes one frame to `w`, masked if `masked`.
async fn send(w: &mut (impl AsyncWriteExt + Unpin), opcode: OpCode, payload: &[u8], masked: bool) {
    let key = masked.then_some([3, 1, 4, 1]);
    w.write_all(&frame::encode_frame(true, opcode, key, payload))
        .await
        .unwrap();
}

/// Ends a WebSocket the way `how` says; `client` is the side we play (clients mask).
async fn end_ws(how: FarEnd, w: &mut tokio::net::tcp::OwnedWriteHalf, client: bool) {
    match how {
        FarEnd::Close(code) => send(w, OpCode::Close, &frame::close_payload(code, "test"), client).await,
        FarEnd::CloseNoCode => send(w, OpCode::Close, b"", client).await,
        FarEnd::Vanish => w.shutdown().await.unwrap(),
        FarEnd::Reset => {
            socket2::SockRef::from(w.as_ref())
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        FarEnd::ProtocolError => send(w, OpCode::Binary, b"wrongly masked", !client).await,
        FarEnd::Silent => {}
    }
}

/// The app downloads through the bridge; the fake relay sends three chunks, then ends the
/// WebSocket `how`. Returns what the app saw.
async fn bridge_side(how: FarEnd, backend: IoBackend) -> (Vec<u8>, std::io::Result<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge = bridge_to(l.local_addr().unwrap(), backend);
    let app = TcpStream::connect(bridge.addr_of("t").unwrap()).await.unwrap();
    let mut leg = accept_upgrade(&l).await;
    for i in 0..CHUNKS {
        send(&mut leg.w, OpCode::Binary, &chunk(i), false).await;
    }
    end_ws(how, &mut leg.w, false).await;
    let keep = if how == FarEnd::Reset {
        drop(leg);
        None
    } else {
        Some(leg)
    };
    let seen = read_all(app).await;
    drop((keep, bridge));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_resets_the_app_when_the_tunnel_ends_abnormally() {
    init_tracing();
    let runs = ENDS
        .iter()
        .map(|&how| async move { (how, bridge_side(how, IoBackend::Epoll).await) });
    for (how, (got, end)) in futures_join(runs).await {
        check(how, "bridge", &got, &end);
    }
}

/// The keep-alive rules (`session::Keepalive`) as the splice drives them: a ping every
/// period, and a peer that answers is never taken for dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_pings_each_period_and_a_peer_that_answers_stays_alive() {
    pings_each_period_and_a_peer_that_answers_stays_alive("t", IoBackend::Epoll).await;
}

async fn pings_each_period_and_a_peer_that_answers_stays_alive(hc: &str, backend: IoBackend) {
    use hyrelay::transport::ws::{Message, WsReader};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge = bridge_for(hc, l.local_addr().unwrap(), backend);
    let mut app = TcpStream::connect(bridge.addr_of(hc).unwrap()).await.unwrap();
    let FakeRelayLeg { _r: r, mut w } = accept_upgrade(&l).await;
    let mut r = WsReader::new(r, bytes::BytesMut::new(), hyrelay::proto::frame::Role::Server, 1 << 20);
    let mut pings = 0;
    let until = tokio::time::Instant::now() + PING * 6;
    while let Ok(m) = tokio::time::timeout_at(until, r.next_message(1 << 16)).await {
        if let Ok(Some(Message::Ping(p))) = m {
            pings += 1;
            send(&mut w, OpCode::Pong, &p, false).await;
        }
    }
    assert!(
        (3..=7).contains(&pings),
        "{pings} pings in six periods (one per period)"
    );
    // Still alive: data flows both ways.
    send(&mut w, OpCode::Binary, b"still here", false).await;
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"still here");
}

// ---- hcm side: (sender driven here) ⇄ relay ⇄ hcm ⇄ endpoint

/// An app whose tunnel is still opening when the bridge stops (the relay has not answered
/// the upgrade) sees a reset, not the clean end of an empty answer. The app sends nothing:
/// it waits for the server to speak first, as MySQL, SMTP or FTP clients do (bytes left
/// unread in the socket would make the kernel reset it anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_whose_tunnel_is_still_opening_when_the_bridge_stops_is_reset() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge = bridge_to(l.local_addr().unwrap(), IoBackend::Epoll);
    let app = TcpStream::connect(bridge.addr_of("t").unwrap()).await.unwrap();
    let (_unanswered, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the bridge connects")
        .unwrap();
    tokio::task::spawn_blocking(move || bridge.stop()).await.unwrap();
    never_opened(read_all(app).await);
}

/// A rig whose hcm serves `hc` with `backend` and a short ping; the endpoint is a listener
/// the test accepts on.
async fn hcm_rig(backend: IoBackend) -> (Rig, hyrelay::hcm::HcmHandle, TcpListener) {
    let rig = Rig::with(false, |c| c.runtime.io_backend = backend);
    let endpoint = TcpListener::bind("127.0.0.1:0").await.unwrap();
    rig.create("t", endpoint.local_addr().unwrap()).await;
    let mut c = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("t").await, None).unwrap(),
    ]);
    c.ping_interval = PING;
    c.runtime.io_backend = backend;
    let hcm = hyrelay::hcm::start(c).unwrap();
    rig.wait_listeners("t", 1).await;
    (rig, hcm, endpoint)
}

/// A sender uploads through the relay and the hcm; it sends three chunks, then ends its
/// WebSocket `how`. Returns what the endpoint saw.
async fn hcm_side(rig: &Rig, endpoint: &TcpListener, how: FarEnd) -> (Vec<u8>, std::io::Result<()>) {
    let cs = rig.send_cs("t").await;
    let token = hyrelay::client::token(&cs, "t", Duration::from_secs(600));
    let url = hyrelay::client::hc_url(&cs, "t", "connect", &hyrelay::proto::ids::new_id());
    let headers = [("ServiceBusAuthorization", token.as_str())];
    let (sender, accepted) = tokio::join!(ws::connect(&url, None, &headers, Duration::from_secs(10)), async {
        tokio::time::timeout(Duration::from_secs(10), endpoint.accept())
            .await
            .expect("the hcm dials the endpoint")
            .unwrap()
    });
    let sender = sender.unwrap();
    let d = sender.stream.detach(Default::default()).unwrap();
    assert!(d.tls.is_none(), "plain sender");
    d.sock.set_nonblocking(true).unwrap();
    let mut w = TcpStream::from_std(d.sock).unwrap();
    for i in 0..CHUNKS {
        send(&mut w, OpCode::Binary, &chunk(i), true).await;
    }
    let (r, mut w) = w.into_split();
    end_ws(how, &mut w, true).await;
    let keep = (how != FarEnd::Reset).then_some((r, w));
    let seen = read_all(accepted.0).await;
    drop(keep);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_resets_the_endpoint_when_the_tunnel_ends_abnormally() {
    let (rig, _hcm, endpoint) = hcm_rig(IoBackend::Epoll).await;
    for &how in ENDS {
        let (got, end) = hcm_side(&rig, &endpoint, how).await;
        check(how, "hcm", &got, &end);
    }
}

/// The hcm reached the endpoint but could not open the rendezvous (the fake relay answers
/// it 500): the endpoint's connection, which never carried a byte, is reset — not ended
/// with a FIN as if an app had connected and closed cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rendezvous_resets_the_endpoint() {
    let endpoint = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = relay.local_addr().unwrap();
    let cs = ConnectionString::parse(&format!(
        "Endpoint=ws://{at}/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath=t"
    ))
    .unwrap();
    let ep = endpoint.local_addr().unwrap().to_string().parse().unwrap();
    let mut c = hyrelay::hcm::config::HcmConfig::new(tempfile::tempdir().unwrap().keep());
    c.hybrid_connections = vec![hyrelay::hcm::config::HcEntry::new(cs, Some(ep)).unwrap()];
    let _hcm = hyrelay::hcm::start(c).unwrap();
    let mut channel = accept_upgrade(&relay).await;
    let accept = hyrelay::proto::control::Accept {
        address: format!("ws://{at}/$hc/t?sb-hc-action=accept&sb-hc-id=a1"),
        id: "a1".into(),
        connect_headers: vec![],
        remote_endpoint: None,
    };
    send(&mut channel.w, OpCode::Text, accept.encode().as_bytes(), false).await;
    // The hcm dials the endpoint and opens the rendezvous at the same time.
    let within = |what| async move { tokio::time::timeout(Duration::from_secs(10), what).await };
    let (dialled, rendezvous) = tokio::join!(within(endpoint.accept()), within(relay.accept()));
    let (dialled, mut rendezvous) = (
        dialled.expect("the hcm dials the endpoint").unwrap().0,
        rendezvous.expect("the hcm opens the rendezvous").unwrap().0,
    );
    let mut head = Vec::new();
    while handshake::parse_request(&head, 1 << 16).unwrap().is_none() {
        let mut b = [0u8; 4096];
        let n = rendezvous.read(&mut b).await.unwrap();
        assert!(n > 0, "the hcm hung up during the rendezvous upgrade");
        head.extend_from_slice(&b[..n]);
    }
    rendezvous
        .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    never_opened(read_all(dialled).await);
}

// ---- the whole chain

/// An endpoint that streams `total` bytes (in 16 KiB writes, `pause` apart) to each
/// connection, then closes it cleanly.
fn streamer(total: usize, pause: Duration) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let l = TcpListener::from_std(l).unwrap();
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let data = payload(total, 11);
                for c in data.chunks(16 * 1024) {
                    if s.write_all(c).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hcm_stopped_mid_download_resets_the_app_and_a_complete_one_ends_clean() {
    let rig = Rig::new(false);
    rig.create("full", streamer(1 << 20, Duration::ZERO)).await;
    rig.create("cut", streamer(64 << 20, Duration::from_millis(5))).await;
    let mut hc = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("full").await, None).unwrap(),
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("cut").await, None).unwrap(),
    ]);
    hc.runtime.set_workers(1).unwrap();
    let hcm = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners("full", 1).await;
    rig.wait_listeners("cut", 1).await;
    let full = rig.bridge("full", &rig.send_cs("full").await);
    let cut = rig.bridge("cut", &rig.send_cs("cut").await);

    // A complete download ends with a clean EOF and every byte.
    let (got, end) = read_all(TcpStream::connect(full.addr_of("full").unwrap()).await.unwrap()).await;
    assert!(end.is_ok(), "{end:?}");
    assert!(got == payload(1 << 20, 11));

    // The hcm goes away in the middle of a download: the app sees a reset.
    let mut app = TcpStream::connect(cut.addr_of("cut").unwrap()).await.unwrap();
    let mut first = vec![0u8; 100_000];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    hcm.stop();
    let (_, end) = read_all(app).await;
    assert_eq!(end.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
}

/// An app that sent `request` and shut its output, through a bridge (`backend`) to the
/// fake relay: the bridge, the app, and the fake relay's reader and writer of the leg.
async fn app_done_sending(
    backend: IoBackend,
) -> (
    hyrelay::bridge::BridgeHandle,
    TcpStream,
    ws::WsReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bridge = bridge_to(l.local_addr().unwrap(), backend);
    let mut app = TcpStream::connect(bridge.addr_of("t").unwrap()).await.unwrap();
    app.write_all(b"request").await.unwrap();
    app.shutdown().await.unwrap();
    let leg = accept_upgrade(&l).await;
    let r = ws::WsReader::new(
        leg._r,
        bytes::BytesMut::new(),
        hyrelay::proto::frame::Role::Server,
        1 << 20,
    );
    (bridge, app, r, leg.w)
}

/// The fake relay sends Close(1000); the app reads to a clean EOF. Returns what it read.
async fn close_clean_and_read(w: &mut tokio::net::tcp::OwnedWriteHalf, app: TcpStream) -> Vec<u8> {
    send(w, OpCode::Close, &frame::close_payload(close_code::NORMAL, ""), false).await;
    let (got, end) = read_all(app).await;
    assert!(end.is_ok(), "a clean end: {end:?}");
    got
}

/// The app is done sending (FIN) while the download goes on: the bridge sends its
/// Close(1000) and then nothing at all — no ping, no pong — for three ping periods, though
/// it hears from the relay only every half period. (A relay stops reading a direction once
/// it has forwarded its Close; frames after it lay unread there, and a socket closed with
/// unread input is reset.) The download then ends clean.
async fn nothing_after_the_bridges_close(backend: IoBackend) {
    let (bridge, app, mut r, mut w) = app_done_sending(backend).await;
    let mut frames = Vec::new();
    let watch = async {
        while let Ok(Some(m)) = r.next_message(1 << 20).await {
            frames.push(m);
        }
    };
    let drive = async {
        // Chunks every half period (the bridge hears from us), for three periods.
        for i in 0..6 {
            tokio::time::sleep(PING / 2).await;
            send(&mut w, OpCode::Binary, &chunk(i), false).await;
        }
    };
    tokio::select! {
        _ = watch => panic!("the bridge ended the WebSocket while the download ran"),
        _ = drive => {}
    }
    let after_close: Vec<_> = frames
        .iter()
        .skip_while(|m| !matches!(m, ws::Message::Close(_)))
        .collect();
    assert!(
        matches!(frames.first(), Some(ws::Message::Binary(b)) if &b[..] == b"request"),
        "{frames:?}"
    );
    assert!(
        matches!(after_close.as_slice(), [ws::Message::Close(c)] if c.code == Some(close_code::NORMAL)),
        "after its Close the bridge sent {after_close:?} (all: {frames:?})"
    );
    let got = close_clean_and_read(&mut w, app).await;
    assert_eq!(got.len(), (0..6).map(|i| chunk(i).len()).sum::<usize>());
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_sends_nothing_after_its_close() {
    nothing_after_the_bridges_close(IoBackend::Epoll).await;
}

// ---- io_uring

#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_io_uring_the_bridge_resets_the_app_when_the_tunnel_ends_abnormally() {
    let runs = ENDS
        .iter()
        .map(|&how| async move { (how, bridge_side(how, IoBackend::Uring).await) });
    for (how, (got, end)) in futures_join(runs).await {
        check(how, "bridge (io_uring)", &got, &end);
    }
}

#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_io_uring_the_hcm_resets_the_endpoint_when_the_tunnel_ends_abnormally() {
    let (rig, _hcm, endpoint) = hcm_rig(IoBackend::Uring).await;
    for &how in ENDS {
        let (got, end) = hcm_side(&rig, &endpoint, how).await;
        check(how, "hcm (io_uring)", &got, &end);
    }
    let before = hyrelay::dataplane::uring::tunnels_run("t");
    assert!(
        before >= ENDS.len() as u64,
        "the hcm's tunnels ran on io_uring ({before})"
    );
}

/// The same on the completion engine's timer (a silent peer's end is in the test above).
#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_io_uring_the_bridge_pings_each_period_and_a_peer_that_answers_stays_alive() {
    pings_each_period_and_a_peer_that_answers_stays_alive("keepalive", IoBackend::Uring).await;
    let runs = hyrelay::dataplane::uring::tunnels_run("keepalive");
    assert_eq!(runs, 1, "the tunnel ran on io_uring");
}

#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_io_uring_the_bridge_sends_nothing_after_its_close() {
    nothing_after_the_bridges_close(IoBackend::Uring).await;
}

/// Runs the futures at once (each is a task) and returns their results in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

// ---- half-close with a slow answer

/// The app sends a request and shuts its output; the answer comes six ping periods later.
/// The relay here is a fake that, like Microsoft's listeners, never pings: silence after
/// the bridge's own Close is no sign of death (before, the bridge cut the tunnel after two
/// silent periods and the app got a reset instead of the answer).
async fn a_slow_answer_after_the_apps_fin_arrives(backend: IoBackend) {
    let (bridge, app, mut r, mut w) = app_done_sending(backend).await;
    let first = tokio::time::timeout(Duration::from_secs(10), r.next_message(1 << 20)).await;
    assert!(
        matches!(&first, Ok(Ok(Some(ws::Message::Binary(b)))) if &b[..] == b"request"),
        "{first:?}"
    );
    let close = tokio::time::timeout(Duration::from_secs(10), r.next_message(1 << 20)).await;
    assert!(
        matches!(&close, Ok(Ok(Some(ws::Message::Close(c)))) if c.code == Some(close_code::NORMAL)),
        "{close:?}"
    );
    // Six ping periods of silence from this side: no frame, no pong.
    tokio::select! {
        m = r.next_message(1 << 20) => panic!("the bridge ended the WebSocket or sent more: {m:?}"),
        _ = tokio::time::sleep(PING * 6) => {}
    }
    send(&mut w, OpCode::Binary, b"slow answer", false).await;
    assert_eq!(close_clean_and_read(&mut w, app).await, b"slow answer");
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_after_the_apps_fin_reaches_the_app() {
    a_slow_answer_after_the_apps_fin_arrives(IoBackend::Epoll).await;
}

#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_io_uring_a_slow_answer_after_the_apps_fin_reaches_the_app() {
    a_slow_answer_after_the_apps_fin_arrives(IoBackend::Uring).await;
}

/// The whole chain (bridge, relay, hcm; one ping period for both): the app sends a request
/// and shuts its output, the endpoint answers six periods later. The hcm, having the
/// sender's Close, pings on; the bridge, having sent its Close, hears those pings and
/// waits. The answer arrives, and the end is clean on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_whole_chain_a_half_closed_tunnel_waits_for_a_slow_endpoint() {
    let rig = Rig::new(false);
    let endpoint = TcpListener::bind("127.0.0.1:0").await.unwrap();
    rig.create("slow", endpoint.local_addr().unwrap()).await;
    let mut hc = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("slow").await, None).unwrap(),
    ]);
    hc.ping_interval = PING;
    let _hcm = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners("slow", 1).await;
    let mut bc = rig.bridge_config("slow", &rig.send_cs("slow").await);
    bc.ping_interval = PING;
    let bridge = hyrelay::bridge::start(bc).unwrap();

    let served = tokio::spawn(async move {
        let (mut s, _) = endpoint.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        tokio::time::sleep(PING * 6).await;
        s.write_all(b"slow answer").await.unwrap();
        s.shutdown().await.unwrap();
        req
    });
    let mut app = TcpStream::connect(bridge.addr_of("slow").unwrap()).await.unwrap();
    app.write_all(b"request").await.unwrap();
    app.shutdown().await.unwrap();
    let (got, end) = tokio::time::timeout(Duration::from_secs(20), read_all(app))
        .await
        .unwrap();
    assert!(end.is_ok(), "a clean end: {end:?}");
    assert_eq!(got, b"slow answer");
    let req = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req, b"request");
}
