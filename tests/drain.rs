//! Graceful drain: told to stop, the relay and the hcm stop taking new work but let the
//! tunnels that are running finish byte-exact, within the drain timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyrelay::dataplane::drain::Force;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Streams `total` bytes through `addr` in chunks over about `over`, reading the echo at
/// the same time; returns what came back.
async fn slow_stream(addr: std::net::SocketAddr, total: usize, over: Duration) -> Vec<u8> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = payload(total, 42);
    let chunks = 50;
    let step = total / chunks;
    let writer = tokio::spawn(async move {
        for c in data.chunks(step) {
            w.write_all(c).await.unwrap();
            tokio::time::sleep(over / chunks as u32).await;
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_hcm_drain_while_tunnels_stream() {
    let mut rig = Rig::new(false);
    rig.create("d", echo()).await;
    let hcm = rig.hcm(&rig.listen_cs("d").await);
    rig.wait_listeners("d", 1).await;
    let bridge = rig.bridge("d", &rig.send_cs("d").await);
    let addr = bridge.addr_of("d").unwrap();
    let relay_addr = rig.relay.local_addr();

    let streams: Vec<_> = (0..3)
        .map(|_| tokio::spawn(slow_stream(addr, 4 << 20, Duration::from_secs(3))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Both told to stop while the data is still flowing.
    // A stand-in takes the rig's place (with a data directory of its own: one relay per
    // directory) so that this one can be moved to the drain thread.
    let spare_dir = tempfile::tempdir().unwrap();
    let mut spare = rig.cfg.clone();
    spare.data_dir = spare_dir.path().join("relay");
    let relay = std::mem::replace(&mut rig.relay, hyrelay::relay::start(spare).unwrap());
    let started = Instant::now();
    let hcm_drain = std::thread::spawn(move || hcm.drain(&Force::default()));
    let relay_drain = std::thread::spawn(move || relay.drain(&Force::default()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(relay_addr).await.is_err(),
        "a draining relay takes no new connections"
    );

    for s in streams {
        let back = s.await.unwrap();
        assert!(
            back == payload(4 << 20, 42),
            "tunnel finished byte-exact during the drain"
        );
    }
    let (h, r) = (hcm_drain.join().unwrap(), relay_drain.join().unwrap());
    assert_eq!((h.remaining, r.remaining), (0, 0), "hcm {h:?}, relay {r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drained when the tunnels ended, not at the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait() {
    let rig = Rig::with(false, |c| c.runtime.drain_timeout = Duration::from_secs(1));
    rig.create("t", echo()).await;
    let mut cfg = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("t").await, None).unwrap(),
    ]);
    cfg.runtime.drain_timeout = Duration::from_secs(1);
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("t", 1).await;
    let bridge = rig.bridge("t", &rig.send_cs("t").await);
    // A tunnel that never ends by itself.
    let mut idle = tokio::net::TcpStream::connect(bridge.addr_of("t").unwrap())
        .await
        .unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).await.unwrap();
    let started = Instant::now();
    let r = tokio::task::spawn_blocking(move || hcm.drain(&Force::default()))
        .await
        .unwrap();
    assert_eq!(r.remaining, 1);
    assert!(started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(5));
    // After the hard stop the app sees its connection end.
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut one))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_hcm_process() {
    use std::process::Stdio;
    let rig = Rig::new(false);
    rig.create("p", echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cs = rig.listen_cs("p").await.expose();
    let add = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
        .args(["hcm", "--data-dir", &d, "add", &cs])
        .output()
        .await
        .unwrap();
    assert!(add.status.success());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
        .args(["--log-level", "info", "hcm", "--data-dir", &d, "run"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    rig.wait_listeners("p", 1).await;
    let bridge = rig.bridge("p", &rig.send_cs("p").await);
    let stream = tokio::spawn(slow_stream(
        bridge.addr_of("p").unwrap(),
        2 << 20,
        Duration::from_secs(2),
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    // The control channel goes at once; the tunnel goes on.
    rig.wait_listeners("p", 0).await;
    assert!(stream.await.unwrap() == payload(2 << 20, 42));
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exited")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    assert!(
        err.contains("drain_started") && err.contains("hcm: drained in"),
        "{err}"
    );
}

/// Collects a child's stderr lines into a shared string.
fn collect(child: &mut tokio::process::Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    use tokio::io::AsyncBufReadExt;
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let o = out.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            let mut s = o.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    out
}

async fn wait_text(log: &std::sync::Arc<std::sync::Mutex<String>>, needle: &str, times: usize) {
    let ok = wait_for(Duration::from_secs(20), || async {
        log.lock().unwrap().matches(needle).count() >= times
    })
    .await;
    assert!(ok, "never saw {needle:?} x{times}: {}", log.lock().unwrap());
}

/// Issue 14 item 3: a normal stop closes TLS properly (close_notify), so neither side logs
/// "peer closed connection without sending TLS close_notify" or a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_stop_closes_tls_properly_on_both_sides() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let bin = || {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"));
        c.kill_on_drop(true).env_remove("HYRELAY_LOG").current_dir(dir.path());
        c
    };
    let mut relay = bin()
        .args([
            "--log-level",
            "info",
            "relay",
            "--self-signed",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "relay",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let relay_log = collect(&mut relay);
    wait_text(&relay_log, "hyrelay relay listening on", 1).await;
    for args in [
        vec![
            "hc",
            "--relay-data-dir",
            "relay",
            "create",
            "t",
            "--endpoint",
            "127.0.0.1:9",
        ],
        vec![
            "hc",
            "--relay-data-dir",
            "relay",
            "connection-string",
            "t",
            "--listen",
            "--output",
            "t.listen",
        ],
        vec![
            "hcm",
            "--data-dir",
            "hcm",
            "add",
            "--connection-string-file",
            "t.listen",
        ],
    ] {
        let out = bin().args(&args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let hcm_run = || {
        bin()
            .args([
                "--log-level",
                "info",
                "hcm",
                "--data-dir",
                "hcm",
                "run",
                "--ca-file",
                "relay/tls/ca.pem",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The hcm stops: the relay sees the listener leave normally.
    let mut hcm = hcm_run();
    let _hcm_log = collect(&mut hcm);
    wait_text(&relay_log, "listener_registered", 1).await;
    std::process::Command::new("kill")
        .args(["-TERM", &hcm.id().unwrap().to_string()])
        .status()
        .unwrap();
    wait_text(&relay_log, "listener_unregistered", 1).await;
    assert!(hcm.wait().await.unwrap().success());
    // The relay stops: the hcm sees the channel close normally.
    let mut hcm = hcm_run();
    let hcm_log = collect(&mut hcm);
    wait_text(&relay_log, "listener_registered", 2).await;
    std::process::Command::new("kill")
        .args(["-TERM", &relay.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(relay.wait().await.unwrap().success());
    wait_text(&hcm_log, "control_channel_down", 1).await;
    hcm.kill().await.ok();
    let (r, h) = (relay_log.lock().unwrap().clone(), hcm_log.lock().unwrap().clone());
    for (who, log) in [("relay", &r), ("hcm", &h)] {
        assert!(
            !log.contains("close_notify"),
            "{who} logged a TLS close without close_notify:\n{log}"
        );
        assert!(!log.contains("protocol error"), "{who}:\n{log}");
    }
    assert!(r.contains("closed by listener (1000)"), "{r}");
    assert!(h.contains("relay closed the control channel (1001"), "{h}");
}
