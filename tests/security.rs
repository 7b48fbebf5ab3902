//! Security properties: TLS 1.2/1.3 only (a hand-made TLS 1.1 ClientHello is refused;
//! `sslscan` finds no old protocol and no weak cipher), credentials never reach listeners
//! (query token and header), slowloris does not lock real clients out (`slowhttptest`),
//! and the hcm dials only endpoints its `allowed_endpoints` list allows.
//!
//! `sslscan` and `slowhttptest` are Debian packages installed by `scripts/setup-debian.sh`
//! (run by `scripts/test.sh`); the tests that use them fail with that hint if they are missing.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use hyrelay::client;
use hyrelay::hcm::allow::AllowList;
use hyrelay::hcm::config::HcEntry;
use hyrelay::transport::ws;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A ClientHello offering exactly `version` (0x0302 = TLS 1.1, 0x0303 = TLS 1.2) with
/// ECDHE suites of that era, no `supported_versions` extension.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // session id
    // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256 (TLS 1.2 only), then the
    // CBC-SHA suites TLS 1.0/1.1 clients offer, and 3DES.
    let suites: [u16; 7] = [0xc02b, 0xc02f, 0xc009, 0xc013, 0x002f, 0x0035, 0x000a];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    suites.iter().for_each(|s| body.extend_from_slice(&s.to_be_bytes()));
    body.extend_from_slice(&[1, 0]); // compression: null
    let mut ext = Vec::new();
    let host = b"localhost";
    let mut sni = vec![0, (host.len() + 3) as u8, 0, 0, host.len() as u8];
    sni.extend_from_slice(host);
    push_ext(&mut ext, 0x0000, &sni);
    push_ext(&mut ext, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, P-256
    push_ext(&mut ext, 0x000b, &[1, 0]); // point formats: uncompressed
    if version >= 0x0303 {
        push_ext(&mut ext, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa_p256_sha256, rsa_pss
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn push_ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// Sends a ClientHello and returns the content type of the first record answered
/// (0x15 alert, 0x16 handshake) and everything read until the server closed.
async fn hello_answer(addr: SocketAddr, version: u16) -> (u8, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&client_hello(version)).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
            if version >= 0x0303 && out.len() > 5 {
                break; // a ServerHello: the server would wait for our next flight
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("server answered within 5 s");
    (out.first().copied().unwrap_or(0), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_client_hello_is_refused() {
    let rig = Rig::new(true);
    let addr = rig.relay.local_addr();
    // Control: the same hand-made hello offering TLS 1.2 gets a ServerHello.
    let (kind, _) = hello_answer(addr, 0x0303).await;
    assert_eq!(kind, 0x16, "TLS 1.2 hello answered with a handshake record");
    let (kind, bytes) = hello_answer(addr, 0x0302).await;
    assert_eq!(kind, 0x15, "TLS 1.1 hello answered with an alert: {bytes:02x?}");
    assert_eq!(bytes.get(5), Some(&2), "a fatal alert");
    assert!(bytes.len() <= 7, "nothing but the alert, then close: {bytes:02x?}");
}

fn tool(name: &str) -> std::process::Command {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{name}` is not installed: run scripts/setup-debian.sh (scripts/test.sh does)"
    );
    std::process::Command::new(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslscan_finds_only_tls12_and_tls13_with_strong_ciphers() {
    let rig = Rig::new(true);
    let target = format!("127.0.0.1:{}", rig.relay.local_addr().port());
    let mut cmd = tool("sslscan");
    cmd.args([
        "--no-colour",
        "--no-heartbleed",
        "--no-renegotiation",
        "--no-compression",
        "--no-check-certificate",
        &target,
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sslscan failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |proto: &str| {
        text.lines()
            .find(|l| l.starts_with(proto))
            .unwrap_or_default()
            .to_owned()
    };
    for old in ["SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"] {
        assert!(line(old).contains("disabled"), "{old} must be disabled:\n{text}");
    }
    for new in ["TLSv1.2", "TLSv1.3"] {
        assert!(line(new).contains("enabled"), "{new} must be enabled:\n{text}");
    }
    let ciphers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Accepted") || l.starts_with("Preferred"))
        .collect();
    assert!(!ciphers.is_empty(), "sslscan listed no cipher:\n{text}");
    for c in &ciphers {
        let weak = ["RC4", "DES", "NULL", "EXP", "anon", "MD5", "CBC", "-SHA "];
        assert!(!weak.iter().any(|w| c.contains(w)), "weak cipher offered: {c}");
        assert!(c.contains("GCM") || c.contains("CHACHA20"), "only AEAD suites: {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_never_reaches_the_listener() {
    let rig = Rig::new(false);
    rig.create("q", echo()).await;
    let (mut lr, _lw) = raw_listener(&rig, "q").await;
    rig.wait_listeners("q", 1).await;
    let send = rig.send_cs("q").await;
    let st = client::token(&send, "q", Duration::from_secs(600));
    let sig = st.split("sig=").nth(1).unwrap().split('&').next().unwrap().to_owned();
    let enc = percent_encoding::utf8_percent_encode(&st, percent_encoding::NON_ALPHANUMERIC).to_string();
    for name in ["sb-hc-token", "SB-HC-Token"] {
        let mut url = client::hc_url(&send, "q", "connect", "s");
        url.target = url
            .target
            .replace("/$hc/q?", &format!("/$hc/q/sub?app=1&{name}={enc}&"));
        let sender =
            tokio::spawn(async move { ws::connect(&url, None, &[], Duration::from_secs(5)).await.map(|_| ()) });
        let a = next_accept(&mut lr).await;
        let everything = format!("{} {:?} {:?}", a.address, a.connect_headers, a.remote_endpoint);
        assert!(!everything.to_ascii_lowercase().contains("sb-hc-token"), "{everything}");
        assert!(
            !everything.contains(&sig) && !everything.contains("SharedAccessSignature"),
            "{everything}"
        );
        assert!(
            a.address.contains("/$hc/q/sub?app=1&"),
            "the app's own query is kept: {}",
            a.address
        );
        sender.abort();
    }
}

/// Largest "connected:" count in slowhttptest's status output.
fn most_connected(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.split_once("connected:"))
        .filter_map(|(_, n)| n.chars().filter(char::is_ascii_digit).collect::<String>().parse().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_lock_out_real_clients() {
    // Default limits: the 10 s handshake timeout reaps the slow heads; 400 of them stay
    // under the unauthenticated (2 000) and per-address (1 000) caps, which bound memory.
    let rig = Rig::new(false);
    rig.create("live", echo()).await;
    let url = format!("http://127.0.0.1:{}/", rig.relay.local_addr().port());
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = tool("slowhttptest");
    cmd.args([
        "-H", "-c", "400", "-r", "400", "-i", "2", "-x", "24", "-p", "3", "-l", "20", "-u", &url,
    ]);
    cmd.stdout(log.reopen().unwrap()).stderr(Stdio::null());
    let mut attack = tokio::process::Command::from(cmd).kill_on_drop(true).spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A real listener registers and a real sender round-trips while the slow heads are held.
    let started = Instant::now();
    let _hcm = rig.hcm(&rig.listen_cs("live").await);
    rig.wait_listeners("live", 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "listener registered in {:?}",
        started.elapsed()
    );
    let bridge = rig.bridge("live", &rig.send_cs("live").await);
    let addr = bridge.addr_of("live").unwrap();
    for i in 0..5u64 {
        let data = payload(10_000, i);
        let t = Instant::now();
        let back = tokio::time::timeout(Duration::from_secs(5), round_trip(addr, &data)).await;
        assert!(
            matches!(&back, Ok(Ok(b)) if *b == data),
            "round trip {i} failed under slowloris"
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "round trip {i} took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "all done while the attack held its connections"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), attack.wait()).await;
    assert!(status.is_ok(), "slowhttptest ends within its 20 s");
    let out = std::fs::read_to_string(log.path()).unwrap();
    let out: String = out
        .split('\x1b')
        .map(|p| p.split_once('m').map_or(p, |(_, rest)| rest))
        .collect();
    assert!(
        most_connected(&out) >= 300,
        "the attack held at least 300 connections:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_refuses_endpoints_not_allowed() {
    let rig = Rig::new(false);
    let (allowed, other) = (echo(), echo());
    rig.create("ok", allowed).await;
    rig.create("meta", other).await;
    rig.create("override", allowed).await;
    let entries = vec![
        HcEntry::new(rig.listen_cs("ok").await, None).unwrap(),
        HcEntry::new(rig.listen_cs("meta").await, None).unwrap(),
        HcEntry::new(
            rig.listen_cs("override").await,
            Some(other.to_string().parse().unwrap()),
        )
        .unwrap(),
    ];
    let mut cfg = rig.hcm_config(entries);
    cfg.allowed_endpoints =
        AllowList::parse(&[format!("127.0.0.1:{}", allowed.port()), "*.example.com:*".into()]).unwrap();
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("ok", 1).await;
    let refused = wait_for(Duration::from_secs(10), || async {
        hcm.status()
            .iter()
            .filter(|s| s.last_error.as_deref().is_some_and(|e| e.contains("not allowed")))
            .count()
            == 2
    })
    .await;
    assert!(
        refused,
        "both refused, with the reason in the status: {:?}",
        hcm.status()
    );
    for name in ["meta", "override"] {
        let s = hcm.status().into_iter().find(|s| s.name == name).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some(other.to_string().as_str()));
        assert_eq!(rig.listeners(name).await, 0, "{name}: no control channel was opened");
    }
    let bridge = rig.bridge("ok", &rig.send_cs("ok").await);
    let data = payload(1000, 1);
    assert_eq!(round_trip(bridge.addr_of("ok").unwrap(), &data).await.unwrap(), data);
}

/// The hcm and the bridge share one TLS client config per process, so their repeated
/// connections to the relay (a rendezvous per tunnel, a sender per connection) resume the
/// TLS session instead of paying for a full handshake each time.
#[tokio::test]
async fn repeated_tls_connections_to_the_relay_resume() {
    use rustls::HandshakeKind;
    let rig = Rig::new(true);
    let connector = tokio_rustls::TlsConnector::from(rig.tls.clone());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let tcp = TcpStream::connect(rig.relay.local_addr()).await.unwrap();
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name.clone(), tcp))
            .await
            .expect("TLS handshake within 10 s")
            .unwrap();
        kinds.push(tls.get_ref().1.handshake_kind());
        // A request and its answer, as a WebSocket upgrade would be: reading is what
        // takes in the TLS 1.3 session tickets the relay sends after the handshake.
        tls.write_all(b"GET /$hc/none HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 "),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(
        kinds,
        [
            Some(HandshakeKind::Full),
            Some(HandshakeKind::Resumed),
            Some(HandshakeKind::Resumed)
        ]
    );
}
