//! Work per tunnel stays on the data-plane worker that serves the tunnel. A test binary of
//! its own: it counts the context switches of named threads of this process, which other
//! tests' hcms would add to.

mod common;

use std::time::Duration;

use common::*;

/// Context switches so far of this process's threads named `name`.
fn switches(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// A pooled rendezvous connection that an app's tunnel used is replaced on the hcm worker
/// that used it: the pool's task, on the hcm's control thread, is not woken per tunnel
/// (it was, and then spawned the replacement onto another worker: two cross-thread
/// wake-ups per new tunnel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_pooled_connection_is_replaced_without_waking_the_hcm_control_thread() {
    let rig = Rig::with(false, |c| c.runtime.admin = Some("127.0.0.1:0".parse().unwrap()));
    let admin = rig.relay.admin_addr().unwrap();
    rig.create("w", echo()).await;
    let _hcm = rig.hcm(&rig.listen_cs("w").await);
    rig.wait_listeners("w", 1).await;
    let bridge = rig.bridge("w", &rig.send_cs("w").await);
    let addr = bridge.addr_of("w").unwrap();
    // The first tunnel is how the bridge learns the relay's offer; then the pools fill.
    assert_eq!(round_trip(addr, b"first").await.unwrap(), b"first");
    let warm = wait_for(Duration::from_secs(10), || async {
        metric(&metrics_text(admin).await, "hyrelay_relay_warm_connections", "w") >= 1.0
    })
    .await;
    assert!(warm, "the hcm never pooled a rendezvous connection");
    let pooled = || async { metric(&metrics_text(admin).await, "hyrelay_relay_pooled_rendezvous_total", "w") };
    let (pooled_before, before) = (pooled().await, switches("hyrelay-hcm-ctl"));
    for i in 0..200u32 {
        let data = i.to_be_bytes();
        assert_eq!(round_trip(addr, &data).await.unwrap(), data, "tunnel {i}");
    }
    let woke = switches("hyrelay-hcm-ctl") - before;
    let used = pooled().await - pooled_before;
    assert!(used >= 150.0, "only {used} of 200 tunnels used a pooled rendezvous");
    assert!(
        (woke as f64) < used / 4.0,
        "the hcm's control thread switched {woke} times for {used} pooled tunnels"
    );
}
