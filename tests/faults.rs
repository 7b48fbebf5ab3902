//! Faults, with real processes of the binary (`relay --plain`, `hcm add` + `hcm run`,
//! `bridge --config`), each configured through a file that `hyrelay check-config` accepts:
//!
//! 1. the relay killed (SIGKILL) and restarted on the same port and data directory during
//!    traffic: app connections end promptly while it is down, the hcm is registered again
//!    within 2 s of the relay being up, new tunnels are byte-exact;
//! 2. one of two hcms killed during traffic: from 1 s after the kill no new connection fails;
//! 3. an endpoint refusing, down (ICMP host unreachable) or blackholed (dial timeout): the
//!    sender gets 502/504 with the reason, and no descriptor or tunnel is left behind;
//! 4. a silently dead path between the relay and the hcm (a router namespace whose
//!    nftables drop every forwarded packet: no RST, no ICMP): every side detects it by
//!    pings within two ping periods, the hcm comes back when the path does;
//! 5. (tests/faults_churn.rs) 10,000 connect/disconnect cycles;
//! 6. the endpoint's link shaped with `tc tbf`: a bulk transfer is byte-exact at about the
//!    shaped rate and the processes' memory stays bounded (backpressure).
//!
//! Scenarios 3, 4 and 6 build network namespaces (`ip netns`, veth pairs, nftables, tc):
//! they need root or CAP_NET_ADMIN and fail saying so without it. The tests of this file
//! take a lock so that they run one at a time: their timings are the point.
//!
//! Set `HYRELAY_FAULTS_ECHO=1` to see every process's log as it runs.

mod fault_rig;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fault_rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The relay's config for these tests: plain ws (as `--plain` also says).
const RELAY_TOML: &str = "[tls]\nmode = \"none\"\n";

/// A connection that keeps echoing 16 KiB chunks until it fails; returns (exchanges done,
/// when it ended). Panics if an echo comes back wrong.
async fn echo_loop(mut s: tokio::net::TcpStream, seed: u64, done: Arc<AtomicUsize>) -> (usize, Instant) {
    let mut n = 0;
    loop {
        let chunk = payload(16 * 1024, seed * 1000 + n as u64);
        if s.write_all(&chunk).await.is_err() {
            return (n, Instant::now());
        }
        let mut back = vec![0u8; chunk.len()];
        match tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back)).await {
            Ok(Ok(_)) => assert!(back == chunk, "echo {n} of connection {seed} came back wrong"),
            Ok(Err(_)) => return (n, Instant::now()),
            Err(_) => panic!("connection {seed} hung for 30 s"),
        }
        n += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_during_traffic() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = Echo::local().await;
    let mut relay = Relay::start(None, dir.path(), "127.0.0.1:0", RELAY_TOML, &[]).await;
    relay.create(None, "rs", &echo.addr.to_string()).await;
    let listen = relay.connection_string(None, "rs", false).await;
    let send = relay.connection_string(None, "rs", true).await;
    let _hcm = Hcm::start("hcm", None, &dir.path().join("hcm"), "", &[&listen], "hyrelay=info").await;
    relay.wait_listeners(None, "rs", 1).await;
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("rs", &send)], "hyrelay=debug").await;
    let app = bridge.addrs[0];
    let data = payload(200_000, 1);
    assert!(
        exchange(connect(None, app).await.unwrap(), &data, Duration::from_secs(30))
            .await
            .unwrap()
            == data
    );

    // Traffic: four connections echoing continuously.
    let done = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for i in 0..4 {
        let s = connect(None, app).await.unwrap();
        loops.push(tokio::spawn(echo_loop(s, i, done.clone())));
    }
    assert!(
        wait_until(Duration::from_secs(20), || async { done.load(Ordering::Relaxed) >= 40 }).await,
        "traffic flows before the kill"
    );

    let killed = Instant::now();
    relay.proc.kill9().await;
    // Tunnels in flight end promptly: the app sees EOF or a reset, not a hang.
    let mut ends = Vec::new();
    for l in loops {
        let (n, at) = tokio::time::timeout(Duration::from_secs(10), l)
            .await
            .expect("an in-flight connection ended within 10 s of the relay dying")
            .unwrap();
        assert!(n > 0);
        ends.push(at - killed);
    }
    let worst_inflight = ends.iter().max().copied().unwrap();
    assert!(
        worst_inflight <= Duration::from_secs(2),
        "in-flight tunnels ended after {ends:?}"
    );
    // The bridge says why each one ended.
    let closed = |l: &str| l.contains("tunnel_closed") && l.contains("end=") && !l.contains("end=closed both ways");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            bridge.proc.log.all(killed, closed).len() >= 4
        })
        .await,
        "the bridge logged why the four tunnels ended: {:#?}",
        bridge.proc.log.tail(20)
    );

    // New connections while the relay is down are reset at once, and the bridge logs why.
    let mut refusals = Vec::new();
    for i in 0..5u64 {
        let t = Instant::now();
        // The reset may come before the connect call returns (then it reports it).
        let end = match connect(None, app).await {
            Ok(mut s) => {
                let _ = s.write_all(&payload(100, i)).await;
                ended_within(&mut s, Duration::from_secs(5))
                    .await
                    .expect("the bridge ended the app's connection while the relay is down")
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                Instant::now()
            }
        };
        refusals.push(end - t);
    }
    let worst_refusal = refusals.iter().max().copied().unwrap();
    assert!(worst_refusal <= Duration::from_secs(2), "refusals took {refusals:?}");
    let why = bridge
        .proc
        .log
        .find(killed, |l| l.contains("relay_connect_failed"))
        .expect("the bridge logged relay_connect_failed");
    assert!(
        why.1.to_lowercase().contains("refused"),
        "the reason names the refused connection: {}",
        why.1
    );

    // The relay comes back on the same port and data directory after 3 s down.
    tokio::time::sleep_until(killed + Duration::from_secs(3)).await;
    // "Up" is the first moment its port accepts a connection again (probed every 10 ms).
    let addr = relay.addr;
    let probe = async move {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((), up) = tokio::join!(
        relay.restart(None),
        tokio::time::timeout(Duration::from_secs(30), probe)
    );
    let up = up.expect("the restarted relay accepts connections");
    let (back_at, _) = relay
        .proc
        .log
        .wait(relay.proc.log.start, Duration::from_secs(10), |l| {
            l.contains("listener_registered")
        })
        .await
        .expect("the hcm registered again");
    let back = back_at.saturating_duration_since(up);
    assert!(
        back <= Duration::from_secs(2),
        "the hcm was back {back:?} after the relay"
    );
    let list = relay.list(None).await;
    let row = list
        .lines()
        .find(|l| l.starts_with("rs "))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains("Connected") && row.split_whitespace().nth(3) == Some("1"),
        "{list}"
    );
    // New tunnels work and are byte-exact.
    for i in 0..5u64 {
        let d = payload(300_000, 10 + i);
        let got = exchange(connect(None, app).await.unwrap(), &d, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(got == d, "tunnel {i} after the restart");
    }
    eprintln!(
        "relay kill/restart: in-flight tunnels ended after {:?} ms (worst {} ms), refusals while down took \
         worst {} ms, hcm registered {} ms after the relay was up",
        ends.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ms(worst_inflight),
        ms(worst_refusal),
        ms(back)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_hcms_killed_during_traffic() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = Echo::local().await;
    let relay = Relay::start(None, dir.path(), "127.0.0.1:0", RELAY_TOML, &[]).await;
    relay.create(None, "ha", &echo.addr.to_string()).await;
    let listen = relay.connection_string(None, "ha", false).await;
    let send = relay.connection_string(None, "ha", true).await;
    let mut a = Hcm::start("hcm-a", None, &dir.path().join("hcm-a"), "", &[&listen], "hyrelay=info").await;
    let b = Hcm::start("hcm-b", None, &dir.path().join("hcm-b"), "", &[&listen], "hyrelay=info").await;
    relay.wait_listeners(None, "ha", 2).await;
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("ha", &send)], "hyrelay=info").await;
    let app = bridge.addrs[0];
    for i in 0..40u64 {
        let d = payload(1000, i);
        assert!(
            exchange(connect(None, app).await.unwrap(), &d, Duration::from_secs(30))
                .await
                .unwrap()
                == d
        );
    }
    let accepts = |h: &Hcm| {
        let h = h.dir.clone();
        async move {
            let d = h.display().to_string();
            let out = run_ok(None, &["hcm", "--data-dir", &d, "status", "--json"]).await;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["hybridConnections"][0]["accepts"].as_u64().unwrap()
        }
    };
    // The status files are written every second.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            accepts(&a).await + accepts(&b).await == 40
        })
        .await,
        "the hcms counted the 40 connections"
    );
    let (na, nb) = (accepts(&a).await, accepts(&b).await);
    assert!(na > 0 && nb > 0, "both hcms served connections: {na} / {nb}");

    // Traffic: three clients opening connection after connection, each echoing 32 KiB.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3u64 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let d = payload(32 * 1024, c * 100_000 + i);
                let ok = match connect(None, app).await {
                    Ok(s) => exchange(s, &d, Duration::from_secs(20)).await.is_ok_and(|got| got == d),
                    Err(_) => false,
                };
                results.push((started, ok));
                i += 1;
            }
            results
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    a.proc.kill9().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut early_failures = 0;
    let mut after = 0;
    for c in clients {
        for (started, ok) in tokio::time::timeout(Duration::from_secs(30), c).await.unwrap().unwrap() {
            if started >= killed + Duration::from_secs(1) {
                after += 1;
                assert!(ok, "a connection opened {:?} after the kill failed", started - killed);
            } else if !ok {
                early_failures += 1;
            }
        }
    }
    assert!(after > 0, "traffic ran past the first second after the kill");
    // Then 50 sequential connections, all byte-exact.
    for i in 0..50u64 {
        let d = payload(64 * 1024, 1_000_000 + i);
        let got = exchange(connect(None, app).await.unwrap(), &d, Duration::from_secs(20)).await;
        assert!(got.is_ok_and(|g| g == d), "sequential connection {i} after the kill");
    }
    relay.wait_listeners(None, "ha", 1).await;
    assert!(
        wait_until(Duration::from_secs(5), || async { accepts(&b).await >= nb + 50 }).await,
        "the surviving hcm took the 50 connections"
    );
    eprintln!(
        "hcm killed: {early_failures} connection(s) failed in the first second (in flight through the dead hcm), \
         {after} opened later during the traffic all succeeded, then 50 sequential succeeded"
    );
}

/// Connects as a sender from inside `ns` and returns the relay's rejection (status, reason).
async fn rejection(ns: &Netns, cs: &str, hc: &str) -> (u16, String) {
    use hyrelay::transport::ws::{self, ConnectError};
    let cs = hyrelay::proto::connstr::ConnectionString::parse(cs).unwrap();
    let hc = hc.to_owned();
    let r = ns
        .block_on(async move {
            let url = hyrelay::client::hc_url(&cs, &hc, "connect", "faults");
            let token = hyrelay::client::token(&cs, &hc, Duration::from_secs(300));
            ws::connect(
                &url,
                None,
                &[("ServiceBusAuthorization", &token)],
                Duration::from_secs(20),
            )
            .await
            .map(|_| ())
        })
        .await;
    match r {
        Err(ConnectError::Rejected { status, reason }) => (status, reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_are_rejected_with_the_reason_and_leave_nothing_behind() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    // The relay, hcm and bridge in `site`; the endpoints' host in `far`.
    let site = Arc::new(Netns::new("s3site"));
    let far = Netns::new("s3far");
    link(&site, "hf0", "10.77.3.1/24", &far, "hf0", "10.77.3.2/24");
    // In `far`: nothing listens on 7001 (refused: RST), 7002 answers ICMP host unreachable
    // (the host is down), 7003 drops the SYNs (blackholed: the dial times out).
    far.nft(
        "table inet hyft {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    \
         tcp dport 7002 reject with icmpx type host-unreachable\n    tcp dport 7003 drop\n  }\n}\n",
    );
    // Several SYNs a second to one port: without this the kernel rate-limits the ICMP
    // errors per destination and some "down" dials would time out instead.
    far.sysctl("net.ipv4.icmp_ratelimit", "0");
    let cases = [
        ("refused", "10.77.3.2:7001", 502, "connection refused"),
        ("down", "10.77.3.2:7002", 502, "no route to host"),
        ("blackhole", "10.77.3.2:7003", 504, "did not answer within 2s"),
    ];
    let ns = Some(&*site);
    let relay = Relay::start(ns, dir.path(), "127.0.0.1:9000", RELAY_TOML, &[]).await;
    let (mut listen, mut send) = (Vec::new(), Vec::new());
    for (name, endpoint, ..) in cases {
        relay.create(ns, name, endpoint).await;
        listen.push(relay.connection_string(ns, name, false).await);
        send.push(relay.connection_string(ns, name, true).await);
    }
    let listen_refs: Vec<&str> = listen.iter().map(String::as_str).collect();
    // Longer than the first SYN's retransmission (1 s): an ICMP error that reaches a socket
    // while its connect is still in the kernel's hands is only noted, and the retransmitted
    // SYN's error ends the dial (a 1 s timeout raced it: "down" then answered 504).
    let hcm_toml = "dial_timeout = \"2s\"\n";
    let hcm = Hcm::start(
        "hcm",
        ns,
        &dir.path().join("hcm"),
        hcm_toml,
        &listen_refs,
        "hyrelay=info",
    )
    .await;
    for (name, ..) in cases {
        relay.wait_listeners(ns, name, 1).await;
    }
    let forwards: Vec<(&str, &str)> = cases.iter().zip(&send).map(|(c, s)| (c.0, s.as_str())).collect();
    let bridge = Bridge::start(ns, &dir.path().join("bridge"), "", &forwards, "hyrelay=info").await;

    // One round: every case once as a sender of our own and once through the bridge.
    let round = |concurrent: usize| {
        let (site, send, addrs) = (site.clone(), send.clone(), bridge.addrs.clone());
        async move {
            let mut tasks = Vec::new();
            for _ in 0..concurrent {
                for (i, (name, endpoint, status, why)) in cases.into_iter().enumerate() {
                    let (inside, cs) = (site.clone(), send[i].clone());
                    tasks.push(tokio::spawn(async move {
                        let started = Instant::now();
                        let (got, reason) = rejection(&inside, &cs, name).await;
                        assert_eq!(got, status, "{name}: {reason}");
                        let r = reason.to_lowercase();
                        assert!(
                            r.contains(endpoint) && r.contains(why),
                            "{name}: the reason says why: {reason}"
                        );
                        (name, started.elapsed(), reason)
                    }));
                    let (inside, app) = (site.clone(), addrs[i]);
                    tasks.push(tokio::spawn(async move {
                        let started = Instant::now();
                        let mut s = inside.connect(app).await.unwrap();
                        let _ = s.write_all(b"hello").await;
                        ended_within(&mut s, Duration::from_secs(10))
                            .await
                            .unwrap_or_else(|| panic!("{name}: the app's connection was ended"));
                        (name, started.elapsed(), String::from("app connection reset"))
                    }));
                }
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(tokio::time::timeout(Duration::from_secs(30), t).await.unwrap().unwrap());
            }
            out
        }
    };
    // A first round, then the baseline.
    let first = round(1).await;
    for (name, took, reason) in &first {
        eprintln!("{name}: {reason} ({} ms)", ms(*took));
    }
    let procs = [&relay.proc, &hcm.proc, &bridge.proc];
    let base = settled_fds(&procs).await;
    // The bridge says why it reset the app's connections.
    for (name, _, status, why) in cases {
        let line = bridge
            .proc
            .log
            .find(bridge.proc.log.start, |l| {
                let hc = (format!("hc={name} "), format!("hc=\"{name}\""));
                l.contains("relay_connect_failed") && (l.contains(&hc.0) || l.contains(&hc.1))
            })
            .unwrap_or_else(|| panic!("the bridge logged the {name} refusal: {:#?}", bridge.proc.log.tail(20)));
        assert!(
            line.1.contains(&format!("status={status}")) && line.1.to_lowercase().contains(why),
            "{}",
            line.1
        );
    }
    // Five more rounds, each with every case twice at once.
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        for (_, took, _) in round(2).await {
            worst = worst.max(took);
        }
    }
    // Nothing is left behind: no tunnel open, descriptors back to the baseline.
    for (name, ..) in cases {
        assert_eq!(relay.show(ns, name).await["activeTunnels"], 0, "{name}");
        assert_eq!(hcm.status_u64(ns, name, "activeTunnels").await, 0, "{name}");
    }
    let (settled, now) = fds_back_to(&procs, &base, Duration::from_secs(15)).await;
    assert!(settled, "descriptors (relay, hcm, bridge) back to {base:?}: {now:?}");
    eprintln!(
        "endpoint failures: 33 senders and 33 app connections rejected, slowest {} ms; descriptors (relay, hcm, \
         bridge) {base:?} before, {now:?} after",
        ms(worst)
    );
}

/// For the router between the relay and the hcm: every forwarded packet is dropped, both
/// ways at once (one ruleset is one transaction), with no RST and no ICMP.
const DROP_FORWARDED: &str = "table inet hyft {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
     counter drop\n  }\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silently_dead_path_is_detected_by_pings_within_two_periods() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    // The relay and the bridge in `rns`, the hcm and its endpoint in `hns`, a router
    // between them in `mns` (where the path is cut).
    let rns = Netns::new("s4relay");
    let mns = Netns::new("s4router");
    let hns = Netns::new("s4hcm");
    link(&rns, "hf0", "10.77.4.1/30", &mns, "rt0", "10.77.4.2/30");
    link(&mns, "rt1", "10.77.5.1/30", &hns, "hf0", "10.77.5.2/30");
    mns.sysctl("net.ipv4.ip_forward", "1");
    rns.ip(&["route", "add", "10.77.5.0/30", "via", "10.77.4.2"]);
    hns.ip(&["route", "add", "10.77.4.0/30", "via", "10.77.5.1"]);
    let period = Duration::from_secs(1);
    let relay_toml = format!("{RELAY_TOML}[listeners]\nping_interval = \"1s\"\n");
    let relay = Relay::start(
        Some(&rns),
        dir.path(),
        "10.77.4.1:9000",
        &relay_toml,
        &["--public-url", "ws://10.77.4.1:9000"],
    )
    .await;
    let echo = Echo::start(hns.bind("127.0.0.1:0".parse().unwrap()).await);
    relay.create(Some(&rns), "dp", &echo.addr.to_string()).await;
    let listen = relay.connection_string(Some(&rns), "dp", false).await;
    let send = relay.connection_string(Some(&rns), "dp", true).await;
    assert!(listen.contains("//10.77.4.1:9000/"), "{listen}");
    let hcm_toml = "ping_interval = \"1s\"\nrelay_timeout = \"2s\"\n";
    let hcm = Hcm::start(
        "hcm",
        Some(&hns),
        &dir.path().join("hcm"),
        hcm_toml,
        &[&listen],
        "hyrelay=debug",
    )
    .await;
    relay.wait_listeners(Some(&rns), "dp", 1).await;
    let bridge_toml = "ping_interval = \"1s\"\n";
    let bridge = Bridge::start(
        Some(&rns),
        &dir.path().join("bridge"),
        bridge_toml,
        &[("dp", &send)],
        "hyrelay=debug",
    )
    .await;
    let app = bridge.addrs[0];
    let procs = [&relay.proc, &hcm.proc, &bridge.proc];
    // One tunnel first: after it the bridge keeps its warm connections to the relay (hyrelay
    // extensions), which belong in the baseline.
    let d = payload(100, 3);
    assert!(
        exchange(rns.connect(app).await.unwrap(), &d, Duration::from_secs(10))
            .await
            .unwrap()
            == d
    );
    assert!(wait_until(Duration::from_secs(5), || async { echo.ended().len() == 1 }).await);
    echo.ended.lock().unwrap().clear();
    let base = settled_fds(&procs).await;

    // A tunnel, idle for 2.5 periods: the pings keep it (and the control channel) up.
    let mut tunnel = rns.connect(app).await.unwrap();
    let d = payload(10_000, 4);
    tunnel.write_all(&d).await.unwrap();
    let mut back = vec![0u8; d.len()];
    tunnel.read_exact(&mut back).await.unwrap();
    assert!(back == d);
    tokio::time::sleep(period * 5 / 2).await;
    tunnel.write_all(b"still there?").await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
        .await
        .expect("an idle tunnel outlives two ping periods")
        .unwrap();
    assert_eq!(&back, b"still there?");
    assert!(echo.ended().is_empty());
    assert!(
        relay
            .proc
            .log
            .find(relay.proc.log.start, |l| l.contains("listener_unregistered"))
            .is_none()
    );

    // The path dies silently, both ways.
    mns.nft(DROP_FORWARDED);
    let dead = Instant::now();
    let dead_wall = std::time::SystemTime::now();
    let limit = Duration::from_secs(8);
    let (relay_saw, hcm_saw, app_saw, endpoint_saw) = tokio::join!(
        relay.proc.log.wait(dead, limit, |l| {
            l.contains("listener_unregistered") && l.contains("silent for two ping periods")
        }),
        hcm.proc.log.wait(dead, limit, |l| {
            l.contains("control_channel_down") && l.contains("relay silent for two ping periods")
        }),
        ended_within(&mut tunnel, limit),
        async {
            wait_until(limit, || async { !echo.ended().is_empty() }).await;
            echo.ended().first().copied()
        },
    );
    // Each side within two periods (plus 300 ms for scheduling), and not before one period
    // (it was the pings, not an error or a reset).
    let margin = Duration::from_millis(300);
    let times = [
        ("relay drops the control channel", relay_saw.map(|(t, _)| t - dead)),
        ("hcm drops the control channel", hcm_saw.map(|(t, _)| t - dead)),
        ("bridge tears the tunnel down", app_saw.map(|t| t - dead)),
        ("hcm tears the tunnel down", endpoint_saw.map(|t| t - dead)),
    ];
    let summary = format!(
        "path cut at {} (UTC): {times:?}",
        humantime::format_rfc3339_micros(dead_wall)
    );
    for (what, took) in times {
        let took = took.unwrap_or_else(|| panic!("{what}: not within {limit:?}; {summary}"));
        assert!(took <= period * 2 + margin, "{what} after {took:?}; {summary}");
        assert!(took >= period * 4 / 5, "{what} after only {took:?}; {summary}");
    }
    let times = times.map(|(w, t)| (w, t.unwrap()));
    // Both ends of the tunnel said it was the silence.
    let silent_tunnel = |l: &str| l.contains("tunnel_closed") && l.contains("peer silent for two ping periods");
    // (The lines may come just after the connections ended: wait for them.)
    for p in [&bridge.proc, &hcm.proc] {
        let said = p.log.wait(dead, Duration::from_secs(5), silent_tunnel).await;
        assert!(said.is_some(), "{}: {:#?}", p.name, p.log.tail(10));
    }
    assert_eq!(relay.show(Some(&rns), "dp").await["listenerCount"], 0);

    // The path comes back: the hcm registers again by itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rules = mns.exec("nft", &["list", "chain", "inet", "hyft", "forward"]);
    assert!(!rules.contains("packets 0 "), "the router dropped packets: {rules}");
    // Taken before the rule goes: the hcm may register while `nft` is still exiting.
    let healed = Instant::now();
    mns.exec("nft", &["delete", "table", "inet", "hyft"]);
    let (back_at, _) = relay
        .proc
        .log
        .wait(healed, Duration::from_secs(10), |l| l.contains("listener_registered"))
        .await
        .expect("the hcm registered again once the path was back");
    let d = payload(100_000, 5);
    let got = exchange(rns.connect(app).await.unwrap(), &d, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(got == d, "a new tunnel after the path came back");
    // Nothing of the dead tunnel or the dead control channel is left. The relay ends its
    // half of the dead tunnel after its abandon grace (5 s after the bridge's leg went).
    drop(tunnel);
    let idle = wait_until(Duration::from_secs(15), || async {
        relay.show(Some(&rns), "dp").await["activeTunnels"] == 0
            && hcm.status_u64(Some(&hns), "dp", "activeTunnels").await == 0
    })
    .await;
    assert!(idle, "no tunnel left in the relay's or the hcm's status");
    let (settled, now) = fds_back_to(&procs, &base, Duration::from_secs(15)).await;
    assert!(settled, "descriptors (relay, hcm, bridge) back to {base:?}: {now:?}");
    eprintln!(
        "dead path (ping period 1 s): {}; hcm registered again {} ms after the path came back; descriptors \
         (relay, hcm, bridge) {base:?} before, {now:?} after",
        times
            .iter()
            .map(|(w, t)| format!("{w} after {} ms", ms(*t)))
            .collect::<Vec<_>>()
            .join(", "),
        ms(back_at - healed)
    );
}

/// An endpoint that takes uploads: for each connection it reads to EOF, answers "ok" and
/// closes, and hands over what it read.
fn sink(listener: tokio::net::TcpListener) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut got = Vec::with_capacity(16 << 20);
            if s.read_to_end(&mut got).await.is_ok() && s.write_all(b"ok").await.is_ok() {
                let _ = s.shutdown().await;
            }
            let _ = tx.send(got);
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_endpoint_link_transfers_at_the_shaped_rate_with_bounded_memory() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    // The relay, hcm and bridge in `site`; the endpoint in `far`, behind a link whose
    // egress from `site` (hcm -> endpoint) is shaped to 32 Mbit/s: an upload from the app
    // crosses it. (Upload only, into a sink: the debug binaries keep up even on a busy
    // machine, so the link, not the CPU, sets the rate.)
    let site = Netns::new("s6site");
    let far = Netns::new("s6far");
    link(&site, "hf0", "10.77.6.1/24", &far, "hf0", "10.77.6.2/24");
    site.exec(
        "tc",
        &[
            "qdisc", "add", "dev", "hf0", "root", "tbf", "rate", "32mbit", "burst", "32kb", "latency", "50ms",
        ],
    );
    let shaped_bytes_per_sec = 32e6 / 8.0;
    // Small socket buffers in `site` (256 KiB at most per direction and socket) so that
    // the kernel cannot hide the backlog: without backpressure most of the payload would
    // pile up in some process's memory.
    site.sysctl("net.ipv4.tcp_rmem", "4096 65536 262144");
    site.sysctl("net.ipv4.tcp_wmem", "4096 65536 262144");
    let listener = far.bind("10.77.6.2:7000".parse().unwrap()).await;
    let ns = Some(&site);
    let relay = Relay::start(ns, dir.path(), "127.0.0.1:9000", RELAY_TOML, &[]).await;
    relay.create(ns, "bulk", "10.77.6.2:7000").await;
    let listen = relay.connection_string(ns, "bulk", false).await;
    let send = relay.connection_string(ns, "bulk", true).await;
    let hcm = Hcm::start("hcm", ns, &dir.path().join("hcm"), "", &[&listen], "hyrelay=info").await;
    relay.wait_listeners(ns, "bulk", 1).await;
    let bridge = Bridge::start(ns, &dir.path().join("bridge"), "", &[("bulk", &send)], "hyrelay=info").await;
    let app = bridge.addrs[0];
    let mut sunk = sink(listener);
    // One upload: the time until the endpoint answered, and whether it got `data` exactly.
    let mut upload = async |data: &[u8]| {
        let s = site.connect(app).await.unwrap();
        let started = Instant::now();
        let answer = exchange(s, data, Duration::from_secs(60)).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer, b"ok", "the endpoint took the upload");
        let got = tokio::time::timeout(Duration::from_secs(5), sunk.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got.len() == data.len() && got == data, "the upload arrived byte-exact");
        took
    };
    upload(&payload(1 << 20, 6)).await; // warm-up
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pids = [
        ("relay", relay.proc.pid),
        ("hcm", hcm.proc.pid),
        ("bridge", bridge.proc.pid),
    ];
    let base: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = vec![0u64; pids.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, (_, p)) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kib(*p));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    // 16 MiB up through the tunnel, byte-exact, timed until the endpoint answered.
    let data = payload(16 << 20, 7);
    let len = data.len();
    let took = upload(&data).await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let rate = len as f64 / took.as_secs_f64();
    let ratio = rate / shaped_bytes_per_sec;
    // TCP/IP and Ethernet headers take ~4 % of the shaped rate; the burst adds little.
    assert!(
        (0.75..=1.05).contains(&ratio),
        "{rate:.0} B/s is {ratio:.2} of the shaped rate"
    );
    // Bounded memory: at most half of the 16 MiB (the kernel's buffers in `site` hold at
    // most ~2 MiB of it, so without backpressure a process would have to hold the rest).
    let bound_kib = 8 * 1024;
    let growth: Vec<String> = pids
        .iter()
        .zip(base.iter().zip(&peak))
        .map(|((name, _), (b, p))| {
            let g = p.saturating_sub(*b);
            assert!(
                g <= bound_kib,
                "{name}: RSS grew by {g} KiB (from {b} KiB) during the transfer"
            );
            format!("{name} {b} -> {p} KiB (+{g})")
        })
        .collect();
    eprintln!(
        "shaped link (32 Mbit/s = {:.1} MB/s): 16 MiB uploaded in {} ms = {:.2} MB/s ({:.0} % of the shaped rate); \
         peak RSS: {}",
        shaped_bytes_per_sec / 1e6,
        ms(took),
        rate / 1e6,
        ratio * 100.0,
        growth.join(", ")
    );
}
