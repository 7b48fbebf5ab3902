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
    let rig = Rig::with(false, |c| c.drain_timeout = Duration::from_secs(1));
    rig.create("t", echo()).await;
    let mut cfg = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("t").await, None).unwrap(),
    ]);
    cfg.drain_timeout = Duration::from_secs(1);
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
