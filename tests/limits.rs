//! Relay limits and timeouts, each hit on purpose: the handshake timeout (silent client,
//! half a head, stalled TLS), the head size (431), control-channel message size (1009),
//! control frames over 125 bytes (1002 on a control channel and on a tunnel leg), data
//! frames over `max_frame` on a tunnel (offender cut with 1009, other side told 1001), the
//! connection caps (global, per IP, unauthenticated), the auth-failure delay and the
//! rendezvous address expiry; and, against the relay binary as a child process, that its
//! memory stays bounded while all of these are hit and the caps come back exactly.
//!
//! Clients that need a distinct source address bind 127.0.0.x:0 before connecting
//! (Linux routes all of 127.0.0.0/8 to loopback); the relay itself listens on 127.0.0.1:0.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use hyrelay::client;
use hyrelay::proto::frame::{self, OpCode, Role, close_code};
use hyrelay::transport::ws::{self, ConnectError, Message, WsReader, WsUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP connection from source address `src` (127.0.0.x).
async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Reads until EOF or error; `Some(bytes read)` if that happened within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|_| out)
}

/// True if the relay closes a fresh connection from `src` at once (a cap refused it);
/// false if it holds it open (admitted, waiting for the head).
async fn refused(src: &str, addr: SocketAddr) -> bool {
    let mut s = connect_from(src, addr).await;
    closed_within(&mut s, Duration::from_millis(1500)).await.is_some()
}

/// Opens `n` idle connections from `src` and checks the relay holds each one open.
async fn idle_connections(src: &str, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(connect_from(src, addr).await);
    }
    // Give the workers a moment to admit them (admission happens on the worker).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in &mut v {
        assert!(
            closed_within(s, Duration::from_millis(5)).await.is_none(),
            "an idle connection within the caps is kept"
        );
    }
    v
}

async fn sender(rig: &Rig, hc: &str) -> Result<ws::ClientWs, ConnectError> {
    let cs = rig.send_cs(hc).await;
    let token = client::token(&cs, hc, Duration::from_secs(600));
    let url = client::hc_url(&cs, hc, "connect", "s1");
    ws::connect(
        &url,
        Some(&rig.tls),
        &[("ServiceBusAuthorization", &token)],
        Duration::from_secs(20),
    )
    .await
}

/// A joined tunnel driven by hand: (sender's connection, listener's rendezvous leg).
async fn tunnel(rig: &Rig, hc: &str) -> (ws::ClientWs, ws::ClientWs, RawReader, RawWriter) {
    let (mut lr, lw) = raw_listener(rig, hc).await;
    rig.wait_listeners(hc, 1).await;
    let (s, leg) = tokio::join!(sender(rig, hc), async {
        let a = next_accept(&mut lr).await;
        let url = WsUrl::parse(&a.address).unwrap();
        ws::connect(&url, Some(&rig.tls), &[], Duration::from_secs(10))
            .await
            .unwrap()
    });
    (s.unwrap(), leg, lr, lw)
}

/// Reads frames until a Close; returns its code. Panics if none comes within 5 s.
async fn close_code_of<R: tokio::io::AsyncRead + Unpin>(r: &mut WsReader<R>) -> u16 {
    let read = async {
        loop {
            match r.next_message(1 << 20).await {
                Ok(Some(Message::Close(c))) => return c.code.unwrap_or(1005),
                Ok(Some(_)) => continue,
                other => panic!("connection ended without a Close: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a Close within 5 s")
}

fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> BytesMut {
    frame::encode_frame(fin, opcode, Some([7, 7, 7, 7]), payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_silent_half_head_and_stalled_tls() {
    let rig = Rig::with(true, |c| c.handshake_timeout = Duration::from_secs(1));
    let addr = rig.relay.local_addr();
    let started = Instant::now();
    // Silent: connects and sends nothing (stuck before the TLS ClientHello).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Stalled in TLS: a record header announcing 512 bytes, then nothing.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    // Half a head: TLS completes, the request head never does.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut half = tokio_rustls::TlsConnector::from(rig.tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    half.write_all(b"GET /$hc/x?sb-hc-action=listen HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    half.flush().await.unwrap();
    let limit = Duration::from_secs(5);
    assert!(
        closed_within(&mut silent, limit).await.is_some(),
        "silent client closed"
    );
    assert!(closed_within(&mut stalled, limit).await.is_some(), "stalled TLS closed");
    let mut answer = Vec::new();
    let got = tokio::time::timeout(limit, half.read_to_end(&mut answer))
        .await
        .expect("half head closed");
    if got.is_ok() && !answer.is_empty() {
        assert!(
            answer.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after the 1 s timeout, took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431() {
    let rig = Rig::new(false);
    let mut s = TcpStream::connect(rig.relay.local_addr()).await.unwrap();
    let head = format!(
        "GET /$hc/x?sb-hc-action=listen HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    s.write_all(head.as_bytes()).await.ok();
    let out = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(out.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&out));
    // More header lines than the relay takes (96) is the same answer.
    let mut s = TcpStream::connect(rig.relay.local_addr()).await.unwrap();
    let lines: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: h\r\n{lines}\r\n").as_bytes())
        .await
        .ok();
    let out = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(out.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&out));
    // Just under the limit is read fine (and answered on its merits: 404, no such entity).
    let mut s = TcpStream::connect(rig.relay.local_addr()).await.unwrap();
    let head = format!(
        "GET /nothing HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(15 * 1024)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let out = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(out.starts_with(b"HTTP/1.1 404"), "{}", String::from_utf8_lossy(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_channel_limits() {
    let rig = Rig::new(false);
    rig.create("ctl", echo()).await;
    // One text frame over 64 KiB.
    let (mut r, mut w) = raw_listener(&rig, "ctl").await;
    w.write_all(&masked(OpCode::Text, true, &vec![b' '; 65 * 1024]))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut r).await, close_code::TOO_BIG);
    // A message over 64 KiB in two fragments of 40 KiB.
    let (mut r, mut w) = raw_listener(&rig, "ctl").await;
    w.write_all(&masked(OpCode::Text, false, &vec![b' '; 40 * 1024]))
        .await
        .unwrap();
    w.write_all(&masked(OpCode::Continuation, true, &vec![b' '; 40 * 1024]))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut r).await, close_code::TOO_BIG);
    // A ping with 126 bytes of payload.
    let (mut r, mut w) = raw_listener(&rig, "ctl").await;
    w.write_all(&masked(OpCode::Ping, true, &[1u8; 126])).await.unwrap();
    assert_eq!(close_code_of(&mut r).await, close_code::PROTOCOL_ERROR);
    // The relay is still fine: a well-behaved listener registers.
    let (_r, _w) = raw_listener(&rig, "ctl").await;
    rig.wait_listeners("ctl", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_channel_limit_is_configurable() {
    let rig = Rig::with(false, |c| c.max_control_message = 4096);
    rig.create("ctl", echo()).await;
    let (mut r, mut w) = raw_listener(&rig, "ctl").await;
    w.write_all(&masked(OpCode::Text, true, &vec![b' '; 5000]))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut r).await, close_code::TOO_BIG);
}

type LegReader = WsReader<hyrelay::transport::Stream>;

fn reader(c: ws::ClientWs) -> LegReader {
    WsReader::new(c.stream, c.leftover, Role::Client, 1 << 20)
}

/// Checks the offender got `code`, the other side 1001, and both were closed well before
/// the 5 s abandon grace.
async fn assert_cut(mut off: LegReader, mut oth: LegReader, code: u16, started: Instant) {
    let (a, b) = tokio::join!(close_code_of(&mut off), close_code_of(&mut oth));
    assert_eq!(a, code, "the offender is told why");
    assert_eq!(b, close_code::GOING_AWAY, "the other side is told its peer went away");
    for r in [off.get_mut(), oth.get_mut()] {
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(3), r.read_to_end(&mut rest)).await;
        assert!(eof.is_ok(), "both legs closed");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut at once, not after the grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_data_frame_over_max_frame_cuts_the_offender() {
    let rig = Rig::with(false, |c| c.max_frame = 64 * 1024);
    rig.create("big", echo()).await;
    let (mut s, leg, _lr, _lw) = tunnel(&rig, "big").await;
    // A small frame passes; then a 100 KiB frame's header (the payload need not follow).
    s.stream
        .write_all(&masked(OpCode::Binary, true, b"fine"))
        .await
        .unwrap();
    let mut hdr = [0u8; frame::MAX_HEADER_LEN];
    let n = frame::encode_header(true, OpCode::Binary, Some([1, 2, 3, 4]), 100 * 1024, &mut hdr);
    s.stream.write_all(&hdr[..n]).await.unwrap();
    s.stream.flush().await.unwrap();
    let started = Instant::now();
    let mut leg = reader(leg);
    let first = tokio::time::timeout(Duration::from_secs(5), leg.next_message(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, Some(Message::Binary(bytes::Bytes::from_static(b"fine"))));
    assert_cut(reader(s), leg, close_code::TOO_BIG, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_control_frame_over_125_bytes_cuts_the_offender() {
    let rig = Rig::new(false);
    rig.create("ctl", echo()).await;
    let (s, mut leg, _lr, _lw) = tunnel(&rig, "ctl").await;
    // This time the listener's leg misbehaves.
    leg.stream
        .write_all(&masked(OpCode::Ping, true, &[0u8; 200]))
        .await
        .unwrap();
    leg.stream.flush().await.unwrap();
    assert_cut(reader(leg), reader(s), close_code::PROTOCOL_ERROR, Instant::now()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap() {
    let rig = Rig::with(false, |c| c.max_connections_per_ip = 3);
    let addr = rig.relay.local_addr();
    let mut held = idle_connections("127.0.0.1", addr, 3).await;
    assert!(
        refused("127.0.0.1", addr).await,
        "a 4th connection from the same address is closed at once"
    );
    assert!(!refused("127.0.0.2", addr).await, "another address is not affected");
    held.pop();
    let ok = wait_for(Duration::from_secs(5), || async { !refused("127.0.0.1", addr).await }).await;
    assert!(ok, "closing one frees its slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_cap() {
    let rig = Rig::with(false, |c| c.max_connections = 4);
    let addr = rig.relay.local_addr();
    let mut held = idle_connections("127.0.0.3", addr, 2).await;
    held.extend(idle_connections("127.0.0.4", addr, 2).await);
    assert!(
        refused("127.0.0.5", addr).await,
        "a 5th connection from anywhere is closed at once"
    );
    drop(held);
    let ok = wait_for(Duration::from_secs(5), || async { !refused("127.0.0.5", addr).await }).await;
    assert!(ok, "slots come back when connections close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_cap_spares_authenticated_connections() {
    let rig = Rig::with(false, |c| c.max_unauthenticated = 3);
    rig.create("un", echo()).await;
    // The management client's connection-string fetch happens before the flood.
    let cs = rig.listen_cs("un").await;
    let addr = rig.relay.local_addr();
    // Two authenticated listeners do not count against the cap.
    let (_r1, _w1) = raw_listener(&rig, "un").await;
    let (_r2, _w2) = raw_listener(&rig, "un").await;
    rig.wait_listeners("un", 2).await;
    let held = idle_connections("127.0.0.6", addr, 3).await;
    assert!(
        refused("127.0.0.7", addr).await,
        "a 4th connection still in the handshake is refused"
    );
    drop(held);
    // With the flood gone, a new listener authenticates again.
    let token = client::token(&cs, "un", Duration::from_secs(600));
    let url = client::hc_url(&cs, "un", "listen", "third");
    let ok = wait_for(Duration::from_secs(5), || async {
        ws::connect(
            &url,
            None,
            &[("ServiceBusAuthorization", &token)],
            Duration::from_secs(2),
        )
        .await
        .is_ok()
    })
    .await;
    assert!(ok, "unauthenticated slots come back");
}

/// A runtime-information GET from `src` with `auth`; returns the status and how long the
/// answer took.
async fn info_get(src: &str, addr: SocketAddr, auth: &str) -> (u16, Duration) {
    let started = Instant::now();
    let mut s = connect_from(src, addr).await;
    let req = format!(
        "GET /thr?api-version=2017-04 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let out = closed_within(&mut s, Duration::from_secs(15)).await.expect("answered");
    let status = String::from_utf8_lossy(&out[..12.min(out.len())])
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_auth_failures_are_delayed_per_address() {
    let rig = Rig::with(false, |c| {
        c.auth_failures_before_delay = 2;
        c.auth_max_delay = Duration::from_secs(1);
    });
    rig.create("thr", echo()).await;
    let addr = rig.relay.local_addr();
    let cs = rig.listen_cs("thr").await;
    let good = client::token(&cs, "thr", Duration::from_secs(600));
    let bad = good.replace("sig=", "sig=AAAA");
    let mut times = Vec::new();
    for _ in 0..5 {
        let (status, took) = info_get("127.0.0.8", addr, &bad).await;
        assert_eq!(status, 401);
        times.push(took);
    }
    let fast = Duration::from_millis(200);
    assert!(
        times[0] < fast && times[1] < fast,
        "the first two failures are answered at once: {times:?}"
    );
    assert!(times[2] >= Duration::from_millis(240), "then 250 ms: {times:?}");
    assert!(times[3] >= Duration::from_millis(490), "then 500 ms: {times:?}");
    assert!(
        times[4] >= Duration::from_millis(990) && times[4] < Duration::from_millis(1900),
        "capped at 1 s: {times:?}"
    );
    // A success from the throttled address is delayed too and does not reset the count.
    let (status, took) = info_get("127.0.0.8", addr, &good).await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(990), "{took:?}");
    // Other addresses are not slowed down, failing or not.
    let (status, took) = info_get("127.0.0.9", addr, &bad).await;
    assert_eq!((status, took < fast), (401, true), "{took:?}");
    let (status, took) = info_get("127.0.0.9", addr, &good).await;
    assert_eq!((status, took < fast), (200, true), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendezvous_address_expires_with_the_accept_timeout() {
    let rig = Rig::with(false, |c| c.accept_timeout = Duration::from_secs(1));
    rig.create("exp", echo()).await;
    let (mut lr, _lw) = raw_listener(&rig, "exp").await;
    rig.wait_listeners("exp", 1).await;
    let (s, a) = tokio::join!(sender(&rig, "exp"), next_accept(&mut lr));
    match s {
        Err(ConnectError::Rejected { status: 404, .. }) => {}
        other => panic!(
            "the sender gets 404 after the accept timeout, got {:?}",
            other.map(|_| ())
        ),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = WsUrl::parse(&a.address).unwrap();
    match ws::connect(&url, None, &[], Duration::from_secs(5)).await {
        Err(ConnectError::Rejected { status: 403, .. }) => {}
        other => panic!("an expired rendezvous address must be 403, got {:?}", other.map(|_| ())),
    }
}

/// The relay binary as a child process, plain, with `limits` as its `[limits]` table.
struct ChildRelay {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    manage: hyrelay::proto::connstr::ConnectionString,
}

impl ChildRelay {
    fn start(limits: &str) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, format!("[limits]\n{limits}\n")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
            .args([
                "--log-level",
                "warn",
                "relay",
                "--plain",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
            ])
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stderr to its end, so the relay never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("hyrelay relay listening on ") {
                    tx.send(a.trim().parse::<SocketAddr>().unwrap()).ok();
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay printed its address");
        let cli: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("data").join(hyrelay::relay::CLI_FILE)).unwrap())
                .unwrap();
        let manage =
            hyrelay::proto::connstr::ConnectionString::parse(cli["connectionString"].as_str().unwrap()).unwrap();
        Self {
            child,
            addr,
            _dir: dir,
            manage,
        }
    }

    /// Resident set size in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` connections from each of `srcs`, each sending `bytes` and then holding still
/// (those a cap refused are already closed by the relay).
async fn flood(addr: SocketAddr, srcs: &[&str], n: usize, bytes: &[u8]) -> Vec<TcpStream> {
    let mut all = Vec::new();
    for src in srcs {
        for _ in 0..n {
            let mut s = connect_from(src, addr).await;
            let _ = s.write_all(bytes).await;
            all.push(s);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_limits_are_hit() {
    let relay = ChildRelay::start(
        "handshake_timeout = \"10s\"\nmax_connections = 600\nmax_connections_per_ip = 200\nmax_unauthenticated = 400\nauth_failures_before_delay = 3\nauth_max_delay = \"300ms\"",
    );
    let addr = relay.addr;
    let mgmt = hyrelay::client::Management::new(
        relay.manage.clone(),
        hyrelay::transport::tls::client_config(&[]).unwrap(),
    );
    mgmt.create("thr", Some("127.0.0.1:9"), true).await.unwrap();
    for _ in 0..20 {
        let _ = info_get("127.0.0.1", addr, "none").await;
    }
    let baseline = relay.rss_kib();
    let mut peak = baseline;
    let srcs = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"];
    let half_head = format!(
        "GET /$hc/thr?sb-hc-action=listen HTTP/1.1\r\nHost: h\r\nX-Pad: {}",
        "p".repeat(4000)
    );
    for _ in 0..3 {
        // 1 000 half heads: over the global, per-address and unauthenticated caps.
        let held = flood(addr, &srcs, 200, half_head.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        peak = peak.max(relay.rss_kib());
        drop(held);
        // 100 oversized heads (431) and 200 failed authentications (401, delayed).
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(20 * 1024));
        let mut held = flood(addr, &srcs[..2], 50, big.as_bytes()).await;
        for s in &mut held {
            let _ = closed_within(s, Duration::from_secs(5)).await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let src = srcs[i % srcs.len()];
            tasks.spawn(async move {
                info_get(src, addr, "SharedAccessSignature sr=x&sig=bad&se=1&skn=y")
                    .await
                    .0
            });
            if tasks.len() >= 50 {
                assert!(matches!(tasks.join_next().await, Some(Ok(401 | 0))));
            }
        }
        while let Some(r) = tasks.join_next().await {
            assert!(matches!(r, Ok(401 | 0)), "{r:?}");
        }
        peak = peak.max(relay.rss_kib());
    }
    // Everything handed back: exactly the caps are available again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = relay.rss_kib();
    let mut held = idle_connections("127.0.0.30", addr, 200).await;
    assert!(
        refused("127.0.0.30", addr).await,
        "per-address cap exact after the flood"
    );
    held.extend(idle_connections("127.0.0.31", addr, 200).await);
    assert!(
        refused("127.0.0.32", addr).await,
        "unauthenticated cap exact after the flood"
    );
    drop(held);
    eprintln!("relay RSS: baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        peak < baseline + 128 * 1024,
        "peak RSS {peak} KiB vs baseline {baseline} KiB"
    );
    assert!(
        after < baseline + 32 * 1024,
        "RSS after the flood {after} KiB vs baseline {baseline} KiB"
    );
}
