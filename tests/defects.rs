//! Issue 9: defects found by probing the relay, hcm and bridge as an attacker or an unlucky
//! operator would. Each test names the item it covers and fails on the code before the fix.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyrelay::client;
use hyrelay::client::ManagementError;
use hyrelay::proto::connstr::{ConnectionString, Credential};
use hyrelay::proto::control;
use hyrelay::proto::frame::Role;
use hyrelay::proto::sas::create_token;
use hyrelay::transport::ws::{self, WsReader, WsUrl, WsWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key_of(cs: &ConnectionString) -> (String, String) {
    match &cs.credential {
        Credential::Key { name, key } => (name.clone(), key.expose().to_owned()),
        Credential::Token(_) => panic!("a key connection string"),
    }
}

/// Item 1: the relay refuses an endpoint that is not a host name or IP literal and a port,
/// with 400 and the reason (it used to store `db.local\n6.6.6.6\tbank.example.com:5432`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_relay_refuses_endpoints_that_are_not_host_and_port() {
    let rig = Rig::new(false);
    for bad in [
        "db.local\n6.6.6.6\tbank.example.com:5432",
        "db.local\r:5432",
        "db\0:1",
        "db\u{1b}[31m:1",
        "db local:1",
        "db:0",
        "db:65536",
        "1.2.3:80",
        "[::1:80",
    ] {
        match rig.mgmt.create("inj", Some(bad), true).await {
            Err(ManagementError::Refused { status, message }) => {
                assert_eq!(status, 400, "{bad:?}: {message}");
                assert!(message.contains("endpoint"), "{bad:?}: {message}");
                assert!(!message.chars().any(char::is_control), "{message:?}");
            }
            other => panic!("{bad:?} was not refused: {other:?}"),
        }
    }
    for good in ["db.corp.local:5432", "10.0.0.5:1433", "[fd00::5]:80", "sql_1.corp:1"] {
        rig.mgmt.create("ok", Some(good), true).await.unwrap();
        rig.mgmt.delete("ok").await.unwrap();
    }
}

/// Item 1: the bridge and the hcm never trust the metadata a relay sends: a relay whose
/// state holds an injected endpoint (stored before the fix) gets it refused by both, and
/// the hosts file is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_bridge_and_hcm_refuse_bad_metadata_from_a_relay() {
    let mut rig = Rig::new(false);
    rig.create("inj", echo()).await;
    let listen = rig.listen_cs("inj").await;
    let send = rig.send_cs("inj").await;
    // Rewrite the stored metadata as an older relay would have kept it, and restart.
    let state_file = rig.dir.path().join("relay/state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    state["hybridConnections"]["inj"]["userMetadata"] =
        serde_json::json!([{"key": "endpoint", "value": "db.local\n6.6.6.6\tbank.example.com:5432"}])
            .to_string()
            .into();
    rig.relay.halt();
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();
    let mut cfg = rig.cfg.clone();
    cfg.listen = rig.relay.local_addr();
    rig.relay = hyrelay::relay::start(cfg).unwrap();

    let hosts = rig.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let mut bc = rig.bridge_config("inj", &send);
    bc.forwards[0].listen = hyrelay::bridge::config::Listen::Resolve;
    bc.hosts_file = hosts.clone();
    let e = format!("{:#}", hyrelay::bridge::start(bc).unwrap_err());
    assert!(e.contains("not HOST:PORT") && e.contains("\\n6.6.6.6"), "{e}");
    assert!(!e.contains('\n') && !e.contains('\t'), "{e:?}");
    assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n");

    let hcm = rig.hcm(&listen);
    let refused = wait_for(Duration::from_secs(10), || async {
        hcm.status()
            .first()
            .and_then(|s| s.last_error.clone())
            .is_some_and(|e| e.contains("not HOST:PORT"))
    })
    .await;
    assert!(refused, "hcm status: {:?}", hcm.status());
    assert_eq!(
        rig.listeners("inj").await,
        0,
        "no control channel for an endpoint it cannot trust"
    );
}

/// Item 1: no table prints a control character, whatever a relay sends.
#[test]
fn item1_tables_show_control_characters_escaped() {
    let out = hyrelay::cli::format_table(
        &["NAME", "ENDPOINT"],
        &[vec!["db\u{1b}[31m".into(), "db.local\n6.6.6.6\tbank:1".into()]],
    );
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
    assert_eq!(out.lines().count(), 2, "{out:?}");
    assert!(out.contains("db.local\\n6.6.6.6\\tbank:1"), "{out}");
}

/// A raw listener on `hc` whose socket has a tiny receive buffer and which never reads:
/// a frozen hcm (SIGSTOP) as the relay sees it.
async fn frozen_listener(rig: &Rig, hc: &str) -> hyrelay::transport::Stream {
    let cs = rig.listen_cs(hc).await;
    let token = client::token(&cs, hc, Duration::from_secs(600));
    let url = client::hc_url(&cs, hc, "listen", "frozen");
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(rig.relay.local_addr()).await.unwrap();
    let stream = hyrelay::transport::Stream::Plain(hyrelay::transport::sock::Sock::Live(tcp));
    ws::upgrade(stream, &url, &[("ServiceBusAuthorization", &token)])
        .await
        .expect("frozen listener's control channel")
        .stream
}

/// Item 3: a listener that stops reading while senders arrive is dropped within two ping
/// periods, and its senders go to the other listener. Before the fix the relay's write to
/// it blocked forever: it stayed registered and its senders timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_a_listener_that_stops_reading_is_dropped_and_its_senders_served() {
    let rig = Rig::with(false, |c| {
        // Two periods of 2 s: short for the test, long enough that the live hcm is never
        // taken for dead on a loaded machine.
        c.ping_interval = Duration::from_secs(2);
        c.accept_timeout = Duration::from_secs(20);
        c.max_head = 128 * 1024;
    });
    rig.create("frz", echo()).await;
    let listen = rig.listen_cs("frz").await;
    let _hcm = rig.hcm(&listen);
    rig.wait_listeners("frz", 1).await;
    let _frozen = frozen_listener(&rig, "frz").await;
    rig.wait_listeners("frz", 2).await;
    let frozen_at = Instant::now();
    // Big accepts (a 60 KB header each) fill the frozen listener's socket buffers fast.
    let send = rig.send_cs("frz").await;
    let pad = "p".repeat(60_000);
    let mut senders = Vec::new();
    for i in 0..120 {
        let (send, pad) = (send.clone(), pad.clone());
        senders.push(tokio::spawn(async move {
            let token = client::token(&send, "frz", Duration::from_secs(600));
            let url = client::hc_url(&send, "frz", "connect", &format!("s{i}"));
            ws::connect(
                &url,
                None,
                &[("ServiceBusAuthorization", &token), ("X-Pad", &pad)],
                Duration::from_secs(40),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }));
    }
    let dropped = wait_for(Duration::from_secs(10), || async { rig.listeners("frz").await == 1 }).await;
    assert!(
        dropped,
        "the frozen listener is still registered after {:?}",
        frozen_at.elapsed()
    );
    assert!(
        frozen_at.elapsed() < Duration::from_secs(7),
        "dropped after {:?} (two ping periods are 4 s)",
        frozen_at.elapsed()
    );
    for s in senders {
        let r = s.await.unwrap();
        assert!(r.is_ok(), "a sender was not served: {r:?}");
    }
}

/// Item 4: a listen or renewToken token with `se` near 2^64 neither panics the listener's
/// task nor leaks its registration (after 25 such connections the quota used to refuse
/// every real hcm until the relay restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_far_future_tokens_neither_panic_nor_leak_registrations() {
    let rig = Rig::new(false);
    rig.create("far", echo()).await;
    let cs = rig.listen_cs("far").await;
    let (name, key) = key_of(&cs);
    let resource = format!("http://{}/far", cs.endpoint.host);
    for i in 0..30u64 {
        let token = create_token(&resource, &name, &key, u64::MAX - i);
        let url = client::hc_url(&cs, "far", "listen", &format!("far-{i}"));
        let c = ws::connect(
            &url,
            None,
            &[("ServiceBusAuthorization", &token)],
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("connection {i} with a far-future token: {e}"));
        let (r, w) = tokio::io::split(c.stream);
        let mut reader = WsReader::new(r, c.leftover, Role::Client, 1 << 16);
        let mut writer = WsWriter::new(w, Role::Client);
        let renew = create_token(&resource, &name, &key, u64::MAX - 100 - i);
        writer.send_text(&control::encode_renew_token(&renew)).await.unwrap();
        writer.send_close(1000, "done").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match reader.next_message(1 << 16).await {
                    Ok(Some(ws::Message::Close(c))) => return c.code,
                    Ok(Some(_)) => {}
                    _ => return None,
                }
            }
        })
        .await
        .expect("the relay answers the close");
        assert_eq!(closed, Some(1000), "connection {i}: the channel ran normally");
    }
    rig.wait_listeners("far", 0).await;
    let _hcm = rig.hcm(&cs);
    rig.wait_listeners("far", 1).await;
}

/// Item 10: a control channel authenticated with a key that is then regenerated is closed
/// (1008, saying why) within the grace; `hcm status` shows the cause. A channel on the
/// other key is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_regenerated_key_closes_its_control_channels() {
    let rig = Rig::with(false, |c| c.revoked_key_grace = Duration::from_millis(500));
    rig.create("rk", echo()).await;
    let primary = rig.listen_cs("rk").await;
    let secondary = rig.mgmt.connection_string("rk", false, true).await.unwrap();
    let old = rig.hcm(&primary);
    let _other = rig.hcm(&secondary);
    rig.wait_listeners("rk", 2).await;
    let regenerated = Instant::now();
    rig.mgmt
        .regenerate_key("rk", false, Some("defaultListener"))
        .await
        .unwrap();
    rig.wait_listeners("rk", 1).await;
    assert!(
        regenerated.elapsed() < Duration::from_secs(5),
        "{:?}",
        regenerated.elapsed()
    );
    let shown = wait_for(Duration::from_secs(10), || async {
        old.status()
            .first()
            .and_then(|s| s.last_error.clone())
            .is_some_and(|e| e.contains("regenerated"))
    })
    .await;
    assert!(shown, "hcm status: {:?}", old.status());
    // It stays out: its reconnects are refused with the reason.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.listeners("rk").await, 1);
}

/// Item 13: a token minted for another host is refused (401), whatever `Host` the request
/// carries; tokens for the relay's own names still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_tokens_for_other_hosts_are_refused() {
    let rig = Rig::new(false);
    rig.create("aud", echo()).await;
    let cs = rig.listen_cs("aud").await;
    let (name, key) = key_of(&cs);
    let expiry = hyrelay::proto::sas::unix_now() + 600;
    for (action, token_host) in [("listen", "evil.example"), ("connect", "evil.example")] {
        let cs_for = if action == "listen" {
            cs.clone()
        } else {
            rig.send_cs("aud").await
        };
        let (name, key) = if action == "listen" {
            (name.clone(), key.clone())
        } else {
            key_of(&cs_for)
        };
        let token = create_token(&format!("http://{token_host}/aud"), &name, &key, expiry);
        let real = client::hc_url(&cs_for, "aud", action, "x");
        let claimed = WsUrl {
            host: token_host.into(),
            ..real.clone()
        };
        let stream = ws::open(&real, None).await.unwrap();
        let r = ws::upgrade(stream, &claimed, &[("ServiceBusAuthorization", &token)]).await;
        assert_eq!(
            r.err().and_then(|e| e.status()),
            Some(401),
            "{action} with a token for {token_host}"
        );
    }
    // The relay's own name (its listen address) still works.
    let good = create_token(&format!("http://{}/aud", cs.endpoint.host), &name, &key, expiry);
    let url = client::hc_url(&cs, "aud", "listen", "y");
    ws::connect(
        &url,
        None,
        &[("ServiceBusAuthorization", &good)],
        Duration::from_secs(10),
    )
    .await
    .expect("a token for the relay's own address");
}

/// Item 14: `doctor` runs do not trip the auth-failure delay for their host (its
/// WebSocket step makes a token-less upgrade, which used to count as a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item14_doctor_does_not_throttle_its_own_host() {
    let rig = Rig::with(false, |c| {
        c.auth_failures_before_delay = 1;
        c.auth_max_delay = Duration::from_secs(3);
    });
    rig.create("doc", echo()).await;
    let cs = rig.listen_cs("doc").await;
    for _ in 0..4 {
        let opts = hyrelay::cli::doctor::Options::new(cs.clone());
        tokio::time::timeout(Duration::from_secs(60), hyrelay::cli::doctor::run_checks(&opts))
            .await
            .expect("doctor finished");
    }
    let started = Instant::now();
    let token = client::token(&cs, "doc", Duration::from_secs(600));
    let mut s = tokio::net::TcpStream::connect(rig.relay.local_addr()).await.unwrap();
    let req = format!(
        "GET /doc?api-version=2016-07 HTTP/1.1\r\nHost: {}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n",
        rig.relay.local_addr()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "answered after {:?}: the doctor runs were counted as failures",
        started.elapsed()
    );
}

/// Item 11: the hcm is back within 2 s of every relay restart, not only the first (the
/// backoff used to keep growing across restarts a minute apart: 18-27 s by the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item11_hcm_is_back_quickly_after_every_relay_restart() {
    let mut rig = Rig::new(false);
    rig.create("rst", echo()).await;
    let cs = rig.listen_cs("rst").await;
    let mut cfg = rig.hcm_config(vec![hyrelay::hcm::config::HcEntry::new(cs, None).unwrap()]);
    cfg.max_backoff = Duration::from_secs(30);
    cfg.stable_after = Duration::from_secs(1);
    let _hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("rst", 1).await;
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rig.restart();
        let restarted = Instant::now();
        let back = wait_for(Duration::from_secs(10), || async { rig.listeners("rst").await == 1 }).await;
        assert!(back, "round {round}: the hcm did not come back");
        assert!(
            restarted.elapsed() < Duration::from_secs(2),
            "round {round}: back after {:?}",
            restarted.elapsed()
        );
    }
}

/// Item 6: a second relay (or bridge) does not start on a port another one serves, and a
/// second relay or hcm does not start on a data directory in use; both say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_ports_and_data_directories_are_exclusive() {
    let rig = Rig::new(false);
    let taken = rig.relay.local_addr();
    let other_dir = tempfile::tempdir().unwrap();
    let mut cfg = rig.cfg.clone();
    cfg.listen = taken;
    cfg.data_dir = other_dir.path().join("relay");
    let e = format!("{:#}", hyrelay::relay::start(cfg).unwrap_err());
    assert!(e.contains("already in use by another process"), "{e}");

    let mut same_dir = rig.cfg.clone();
    same_dir.listen = "127.0.0.1:0".parse().unwrap();
    let e = format!("{:#}", hyrelay::relay::start(same_dir).unwrap_err());
    assert!(e.contains("in use by another hyrelay process"), "{e}");

    rig.create("ex", echo()).await;
    let mut bc = rig.bridge_config("ex", &rig.send_cs("ex").await);
    bc.forwards[0].listen = hyrelay::bridge::config::Listen::Addr(taken);
    let e = format!("{:#}", hyrelay::bridge::start(bc).unwrap_err());
    assert!(e.contains("already in use by another process"), "{e}");

    let hcm_cfg = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("ex").await, None).unwrap(),
    ]);
    let _first = hyrelay::hcm::start(hcm_cfg.clone()).unwrap();
    let e = format!("{:#}", hyrelay::hcm::start(hcm_cfg).unwrap_err());
    assert!(e.contains("in use by another hyrelay process"), "{e}");
}

/// Item 7: leftovers of interrupted writes are removed at start; a deleted state.json next
/// to the namespace's credentials is not replaced by a new namespace unless asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_state_directory_is_handled_with_care() {
    let mut rig = Rig::new(false);
    rig.create("st", echo()).await;
    let dir = rig.cfg.data_dir.clone();
    rig.relay.halt();
    std::fs::write(dir.join(".state.json.tmp31337"), b"{\"keys\": \"1,200 revoked keys\"}").unwrap();
    let mut cfg = rig.cfg.clone();
    cfg.listen = rig.relay.local_addr();
    rig.relay = hyrelay::relay::start(cfg.clone()).unwrap();
    assert!(!dir.join(".state.json.tmp31337").exists(), "leftover removed at start");
    assert!(dir.join("state.json.bak").exists(), "the previous version is kept");
    rig.relay.halt();
    std::fs::remove_file(dir.join("state.json")).unwrap();
    let e = format!("{:#}", hyrelay::relay::start(cfg.clone()).unwrap_err());
    assert!(e.contains("--new-namespace") && e.contains("state.json.bak"), "{e}");
    cfg.new_namespace = true;
    rig.relay = hyrelay::relay::start(cfg).unwrap();
}

/// Item 8: with a larger `max_head_bytes`, a sender's headers that grow under JSON
/// escaping never make an `accept` larger than the listener's 64 KiB: the hcm's control
/// channel stays up (it used to be dropped with 1009) and the tunnel works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_accepts_stay_within_what_a_listener_may_receive() {
    let rig = Rig::with(false, |c| c.max_head = 512 * 1024);
    rig.create("big", echo()).await;
    let hcm = rig.hcm(&rig.listen_cs("big").await);
    rig.wait_listeners("big", 1).await;
    let send = rig.send_cs("big").await;
    let quotes = "\"".repeat(30_000); // 60,000 bytes once escaped
    let token = client::token(&send, "big", Duration::from_secs(600));
    let url = client::hc_url(&send, "big", "connect", "big-1");
    let conn = ws::connect(
        &url,
        None,
        &[
            ("ServiceBusAuthorization", &token),
            ("X-Q1", &quotes),
            ("X-Q2", &quotes),
        ],
        Duration::from_secs(20),
    )
    .await
    .expect("the sender is accepted");
    let (r, w) = tokio::io::split(conn.stream);
    let mut writer = WsWriter::new(w, Role::Client);
    let mut reader = WsReader::new(r, conn.leftover, Role::Client, 1 << 20);
    writer
        .send(true, hyrelay::proto::frame::OpCode::Binary, b"ping")
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), reader.next_message(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Some(ws::Message::Binary(bytes::Bytes::from_static(b"ping"))));
    let st = &hcm.status()[0];
    assert_eq!((st.reconnects, st.last_error.as_deref()), (0, None), "{st:?}");
}

/// Item 9: the bridge retries a 503 "full backlog" briefly before it resets the app: here
/// the only listener does not read, so its backlog fills and senders get 503; a second
/// listener arrives while the bridge retries, and the app's connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_bridge_retries_a_full_backlog_briefly() {
    let rig = Rig::with(false, |c| {
        c.max_pending_accepts = 16;
        c.max_head = 128 * 1024;
    });
    rig.create("bk", echo()).await;
    let _frozen = frozen_listener(&rig, "bk").await;
    rig.wait_listeners("bk", 1).await;
    let send = rig.send_cs("bk").await;
    // Fill the frozen listener's socket (60 KB accepts), then its backlog of 16.
    let pad = "p".repeat(60_000);
    let connect = |i: usize, pad: &str| {
        let token = client::token(&send, "bk", Duration::from_secs(600));
        let url = client::hc_url(&send, "bk", "connect", &format!("w{i}"));
        let req = hyrelay::proto::handshake::client_request(
            &url.host_header(),
            &url.target,
            "dGhlIHNhbXBsZSBub25jZQ==",
            &[("ServiceBusAuthorization", &token), ("X-Pad", pad)],
        );
        async move {
            let mut stream = ws::open(&url, None).await.unwrap();
            stream.write_all(&req).await.unwrap();
            stream
        }
    };
    let mut waiting = Vec::new();
    for i in 0..300 {
        waiting.push(connect(i, &pad).await);
    }
    let mut busy = false;
    for i in 0..100 {
        let mut probe = connect(1000 + i, "").await;
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_millis(200), probe.read_exact(&mut head)).await {
            Ok(Ok(_)) if &head[9..12] == b"503" => {
                busy = true;
                break;
            }
            _ => waiting.push(probe),
        }
    }
    assert!(busy, "the frozen listener's backlog never filled");
    let bridge = rig.bridge("bk", &send);
    let app = bridge.addr_of("bk").unwrap();
    let trip = tokio::spawn(async move { round_trip(app, b"through the second listener").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _hcm = rig.hcm(&rig.listen_cs("bk").await);
    let back = trip
        .await
        .unwrap()
        .expect("the app's connection was served after a retry");
    assert_eq!(back, b"through the second listener");
}
