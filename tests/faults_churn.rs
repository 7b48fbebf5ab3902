//! Fault scenario 5 (the others are in tests/faults.rs): 10,000 connect/disconnect cycles
//! through bridge -> relay -> hcm -> echo endpoint, real processes on loopback, 8 at a
//! time. Afterwards every process's open file descriptors are back at their baseline and
//! its RSS within 10 MiB of it (the slack covers allocator arenas and pools that grew to
//! the concurrency, not per-connection leaks: 10 MiB over 10,000 cycles would be ~1 KiB
//! per connection); no tunnel is left open in the relay's or the hcm's status.
//!
//! The cycles mix how apps go away: most exchange 64 bytes and close; every fourth closes
//! right after connecting (before its tunnel is up), half of those with a reset.
//!
//! In a binary of its own so that it does not share the two cores with the timing tests.

mod fault_rig;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fault_rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const CYCLES: usize = 10_000;
const CONCURRENCY: usize = 8;
const RSS_SLACK_KIB: u64 = 10 * 1024;

/// One connect/disconnect cycle; panics if an echo comes back wrong.
async fn cycle(app: std::net::SocketAddr, i: usize) {
    let mut s = tokio::net::TcpStream::connect(app).await.unwrap();
    match i % 8 {
        3 => {}                                                                    // FIN at once
        7 => socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap(), // RST at once
        _ => {
            let d = payload(64, i as u64);
            s.write_all(&d).await.unwrap();
            let mut back = [0u8; 64];
            tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
                .await
                .unwrap_or_else(|_| panic!("cycle {i} hung"))
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
            assert_eq!(&back[..], &d[..], "cycle {i}");
        }
    }
}

/// Runs cycles `range` with `CONCURRENCY` at a time.
async fn cycles(app: std::net::SocketAddr, range: std::ops::Range<usize>) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let next = next.clone();
        let end = range.end;
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return;
                }
                cycle(app, i).await;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connect_disconnect_cycles_leave_fds_and_rss_at_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let echo = Echo::local().await;
    let relay = Relay::start(None, dir.path(), "127.0.0.1:0", "[tls]\nmode = \"none\"\n", &[]).await;
    relay.create(None, "churn", &echo.addr.to_string()).await;
    let listen = relay.connection_string(None, "churn", false).await;
    let send = relay.connection_string(None, "churn", true).await;
    let hcm = Hcm::start("hcm", None, &dir.path().join("hcm"), "", &[&listen], "hyrelay=warn").await;
    relay.wait_listeners(None, "churn", 1).await;
    let bridge = Bridge::start(
        None,
        &dir.path().join("bridge"),
        "",
        &[("churn", &send)],
        "hyrelay=warn",
    )
    .await;
    let app = bridge.addrs[0];
    let procs = [&relay.proc, &hcm.proc, &bridge.proc];

    // Warm-up (pools, allocator arenas, per-worker state reach their working size), then
    // the baseline once the warm-up's tunnels are gone.
    cycles(app, 0..500).await;
    let base_fds = settled_fds(&procs).await;
    let base_rss: Vec<u64> = procs.iter().map(|p| p.rss_kib()).collect();

    let started = Instant::now();
    cycles(app, 500..500 + CYCLES).await;
    let took = started.elapsed();
    let (ok, fds) = fds_back_to(&procs, &base_fds, Duration::from_secs(20)).await;
    assert!(
        ok,
        "descriptors (relay, hcm, bridge) back to {base_fds:?} after the cycles: {fds:?}"
    );
    let rss: Vec<u64> = procs.iter().map(|p| p.rss_kib()).collect();
    for ((p, b), r) in procs.iter().zip(&base_rss).zip(&rss) {
        assert!(
            *r <= b + RSS_SLACK_KIB,
            "{}: RSS {r} KiB after the cycles, baseline {b} KiB (slack {RSS_SLACK_KIB} KiB)",
            p.name
        );
    }
    assert_eq!(relay.show(None, "churn").await["activeTunnels"], 0);
    let idle = wait_until(Duration::from_secs(5), || async {
        hcm.status_u64(None, "churn", "activeTunnels").await == 0
    })
    .await;
    assert!(idle, "the hcm reports no active tunnel");
    // Every cycle that exchanged data reached the endpoint (those that left at once may not).
    assert!(
        echo.accepted.load(Ordering::SeqCst) >= CYCLES * 3 / 4,
        "the cycles reached the endpoint"
    );
    eprintln!(
        "{CYCLES} cycles ({CONCURRENCY} at a time) in {} ms ({:.0}/s); fds (relay, hcm, bridge) {base_fds:?} -> \
         {fds:?}; RSS KiB {base_rss:?} -> {rss:?} (slack {RSS_SLACK_KIB} KiB)",
        ms(took),
        CYCLES as f64 / took.as_secs_f64()
    );
}
