//! End to end through bridge → relay → hcm → endpoint, in process, on loopback.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_exact_round_trips_over_tls() {
    let rig = Rig::new(true);
    let ep = echo();
    rig.create("echo", ep).await;
    let hcm = rig.hcm(&rig.listen_cs("echo").await);
    rig.wait_listeners("echo", 1).await;
    let bridge = rig.bridge("echo", &rig.send_cs("echo").await);
    let addr = bridge.addr_of("echo").unwrap();
    for (i, len) in [0usize, 1, 65535, 65536, 65537, 16 << 20].into_iter().enumerate() {
        let data = payload(len, i as u64);
        let back = round_trip(addr, &data).await.unwrap();
        assert_eq!(back.len(), data.len(), "length for {len}");
        assert!(back == data, "bytes differ for {len}");
    }
    drop((bridge, hcm));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_either_side() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::new(false);
    let (ep, mut received) = greeter();
    rig.create("greet", ep).await;
    let _hcm = rig.hcm(&rig.listen_cs("greet").await);
    rig.wait_listeners("greet", 1).await;
    let bridge = rig.bridge("greet", &rig.send_cs("greet").await);
    let mut s = tokio::net::TcpStream::connect(bridge.addr_of("greet").unwrap())
        .await
        .unwrap();
    // The endpoint closed its side first: we see its bytes and then EOF...
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello from the endpoint");
    // ...and our direction is still open: what we send afterwards arrives.
    let late = payload(200_000, 7);
    s.write_all(&late).await.unwrap();
    s.shutdown().await.unwrap();
    let arrived = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(arrived == late, "late bytes after the endpoint's half-close");

    // The app closing first is the round trip: echo answers after our EOF.
    let ep = echo();
    rig.create("echo2", ep).await;
    let _hcm2 = rig.hcm(&rig.listen_cs("echo2").await);
    rig.wait_listeners("echo2", 1).await;
    let b2 = rig.bridge("echo2", &rig.send_cs("echo2").await);
    let data = payload(300_000, 9);
    assert!(round_trip(b2.addr_of("echo2").unwrap(), &data).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let rig = Rig::new(true);
    rig.create("many", echo()).await;
    let _hcm = rig.hcm(&rig.listen_cs("many").await);
    rig.wait_listeners("many", 1).await;
    let bridge = rig.bridge("many", &rig.send_cs("many").await);
    let addr = bridge.addr_of("many").unwrap();
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
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_file_mode_maps_the_endpoint_name_to_its_own_loopback_address() {
    use hyrelay::bridge::config::Listen;
    let rig = Rig::new(true);
    let ep = echo();
    // The metadata names a host only the bridge's hosts file knows; the hcm is told where
    // the service really is.
    rig.mgmt
        .create("named", Some(&format!("db.hyrelay.test:{}", ep.port())), true)
        .await
        .unwrap();
    let entry = hyrelay::hcm::config::HcEntry::new(rig.listen_cs("named").await, Some(ep.to_string().parse().unwrap()))
        .unwrap();
    let _hcm = hyrelay::hcm::start(rig.hcm_config(vec![entry])).unwrap();
    rig.wait_listeners("named", 1).await;

    let hosts = rig.dir.path().join("hosts");
    let original = "127.0.0.1\tlocalhost\n# keep me\n10.1.2.3 other.host\n";
    std::fs::write(&hosts, original).unwrap();
    let mut cfg = rig.bridge_config("named", &rig.send_cs("named").await);
    cfg.forwards[0].listen = Listen::Resolve;
    cfg.hosts_file = hosts.clone();
    let bridge = hyrelay::bridge::start(cfg).unwrap();
    let addr = bridge.addr_of("named").unwrap();
    assert_eq!(
        addr,
        format!("127.77.0.1:{}", ep.port()).parse().unwrap(),
        "own loopback address, endpoint's port"
    );
    let text = std::fs::read_to_string(&hosts).unwrap();
    assert!(text.starts_with(original), "other lines untouched:\n{text}");
    assert!(text.contains("127.77.0.1\tdb.hyrelay.test\n"), "{text}");
    let data = payload(70_000, 5);
    assert!(round_trip(addr, &data).await.unwrap() == data);
    bridge.stop();
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        original,
        "block removed on stop"
    );
}
