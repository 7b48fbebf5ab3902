//! Issue 9 item 2: buffers and sockets stuck after a burst of tunnels closes at once.
//!
//! 2,000 tunnels go through one bridge (bridge → relay → hcm → echo), then every app
//! half-closes at the same moment. Each tunnel must end (the app reads the echo's EOF)
//! within seconds, every pooled buffer must come back, and a new tunnel must open at once
//! afterwards. The buffer budgets are small (16 buffers per worker) so that the burst is
//! far bigger than any pool: before the fix, reading a tunnel's EOF kept the buffer it was
//! read into until the tunnel ended, and the tunnel's end needed a second buffer (to read
//! the peer's Close), so a burst larger than the budget stalled for two ping periods. On
//! io_uring a read that found the provided-buffer ring empty took a pool buffer before any
//! data was there, so idle tunnels ate the pool and new tunnels stalled.
//!
//! Both backends' tests (the second with `--features uring`) take ~16,000 descriptors each,
//! so they run one at a time.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hyrelay::dataplane::backend::IoBackend;
use hyrelay::dataplane::pool::BUF_SIZE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TUNNELS: usize = 2_000;
/// Opened this many at a time (the relay's pending-accept backlog is not under test here).
const OPEN_AT_ONCE: usize = 50;
/// Per worker: 16 buffers of 64 KiB.
const BUDGET_PER_WORKER: usize = 16 * BUF_SIZE;

/// Opens one tunnel and proves it works with a short exchange.
async fn open(addr: SocketAddr, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let msg = format!("tunnel {i:05}");
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("tunnel {i} did not answer"))
        .unwrap();
    assert_eq!(back, msg.as_bytes());
    s
}

/// Half-closes `s` and waits for the tunnel's EOF; true if it came within `limit`.
async fn close_and_wait(mut s: TcpStream, limit: Duration) -> bool {
    if s.shutdown().await.is_err() {
        return false;
    }
    let mut rest = Vec::new();
    matches!(tokio::time::timeout(limit, s.read_to_end(&mut rest)).await, Ok(Ok(_)))
}

/// Bytes of pooled buffers `role`'s workers hold now, from the process's metrics.
fn pool_in_use(role: &str) -> f64 {
    let text = hyrelay::telemetry::metrics::handle().expect("recorder").render();
    text.lines()
        .filter(|l| l.starts_with("hyrelay_buffer_pool_in_use_bytes{") && l.contains(&format!("role=\"{role}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One burst at a time in this process (descriptors).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn burst(backend: IoBackend) {
    let _one = ONE_AT_A_TIME.lock().await;
    let budget = 2 * BUDGET_PER_WORKER;
    let rig = Rig::with(false, |c| {
        c.runtime.set_budget_bytes(budget).unwrap();
        c.runtime.io_backend = backend;
    });
    rig.create("burst", echo()).await;
    let mut hc = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("burst").await, None).unwrap(),
    ]);
    hc.runtime.set_budget_bytes(budget).unwrap();
    hc.runtime.io_backend = backend;
    let _hcm = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners("burst", 1).await;
    let mut bc = rig.bridge_config("burst", &rig.send_cs("burst").await);
    bc.runtime.set_budget_bytes(budget).unwrap();
    bc.runtime.io_backend = backend;
    let bridge = hyrelay::bridge::start(bc).unwrap();
    let addr = bridge.addr_of("burst").unwrap();

    let mut open_tunnels = Vec::with_capacity(TUNNELS);
    for batch in (0..TUNNELS).collect::<Vec<_>>().chunks(OPEN_AT_ONCE) {
        let opening: Vec<_> = batch.iter().map(|&i| tokio::spawn(open(addr, i))).collect();
        for t in opening {
            open_tunnels.push(t.await.unwrap());
        }
    }

    // Every app half-closes at once; each tunnel must end promptly.
    let started = Instant::now();
    let closing: Vec<_> = open_tunnels
        .into_iter()
        .map(|s| tokio::spawn(close_and_wait(s, Duration::from_secs(10))))
        .collect();
    let mut ended = 0;
    for t in closing {
        ended += t.await.unwrap() as usize;
    }
    let took = started.elapsed();
    assert_eq!(
        ended, TUNNELS,
        "tunnels that ended within 10 s of the burst (took {took:?})"
    );

    // A new tunnel opens at once after the burst.
    let t = Instant::now();
    let data = payload(200_000, 9);
    let back = tokio::time::timeout(Duration::from_secs(3), round_trip(addr, &data))
        .await
        .expect("a new tunnel right after the burst")
        .unwrap();
    assert!(back == data);
    assert!(t.elapsed() < Duration::from_secs(3));

    // Every buffer is back (the metrics are published once a second).
    for role in ["bridge", "hcm", "relay"] {
        let back = wait_for(Duration::from_secs(4), || async { pool_in_use(role) == 0.0 }).await;
        assert!(
            back,
            "{role}'s workers still hold {} bytes of buffers",
            pool_in_use(role)
        );
    }
}

// Issue 9 item 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_closing_tunnels_frees_its_buffers_at_once() {
    burst(IoBackend::Epoll).await;
}

// Issue 9 item 2, on the completion backend.
#[cfg(all(feature = "uring", target_os = "linux"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_closing_tunnels_frees_its_buffers_at_once_on_io_uring() {
    burst(IoBackend::Uring).await;
}
