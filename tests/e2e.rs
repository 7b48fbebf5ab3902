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
