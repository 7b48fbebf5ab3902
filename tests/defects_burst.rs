//! Issue 9 item 9 (backlog cliff): a burst of 2,000 new tunnels through one bridge in one
//! go is carried, none lost to 503 "full backlog". Its own test binary, so that its 16,000
//! sockets do not count against the descriptors of other tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_a_burst_of_2000_new_tunnels_is_carried() {
    const N: usize = 2000;
    let rig = Rig::new(false);
    rig.create("burst", echo()).await;
    let _hcm = rig.hcm(&rig.listen_cs("burst").await);
    rig.wait_listeners("burst", 1).await;
    let bridge = rig.bridge("burst", &rig.send_cs("burst").await);
    let app = bridge.addr_of("burst").unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            let msg = format!("tunnel {i:05}\n");
            let r = tokio::time::timeout(Duration::from_secs(60), async {
                let mut s = tokio::net::TcpStream::connect(app).await?;
                s.write_all(msg.as_bytes()).await?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(back)
            })
            .await;
            match r {
                Ok(Ok(back)) if back == msg.as_bytes() => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Ok(Ok(_)) => Err(format!("tunnel {i}: wrong echo")),
                Ok(Err(e)) => Err(format!("tunnel {i}: {e}")),
                Err(_) => Err(format!("tunnel {i}: no echo within 60 s")),
            }
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} tunnels failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(ok.load(Ordering::Relaxed), N);
    eprintln!("{N} tunnels in {:?}", started.elapsed());
}
