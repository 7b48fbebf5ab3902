//! A splice through an in-process chain on loopback: client -> bridge -> relay -> hcm ->
//! echo endpoint, all in this process (the test fixtures of tests/common), plain ws:// and TLS.
//!
//! `cargo bench --bench splice`. Figures: one 64-byte round trip on an open tunnel, 1 MiB
//! echoed through an open tunnel, and a new tunnel with one 64-byte exchange. Client, relay,
//! hcm and bridge share the machine's cores, so this measures the whole chain's cost, not
//! one role's; the load harness (`--bench load`) measures separate processes.

// The tests' fixtures; skipped by rustfmt here, they are formatted with the tests.
#[path = "../tests/common/mod.rs"]
#[rustfmt::skip]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A running chain; dropping it stops every role.
struct Chain {
    entry: SocketAddr,
    _parts: (hyrelay::bridge::BridgeHandle, hyrelay::hcm::HcmHandle, common::Rig),
}

fn chain(rt: &tokio::runtime::Runtime, tls: bool) -> Chain {
    let rig = common::Rig::new(tls);
    let ep = common::echo();
    rt.block_on(async {
        rig.create("bench", ep).await;
        let hcm = rig.hcm(&rig.listen_cs("bench").await);
        rig.wait_listeners("bench", 1).await;
        let bridge = rig.bridge("bench", &rig.send_cs("bench").await);
        let entry = bridge.addr_of("bench").expect("bridge bound");
        Chain {
            entry,
            _parts: (bridge, hcm, rig),
        }
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn splice(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (tls, name) in [(false, "splice_ws"), (true, "splice_tls")] {
        let ch = chain(&rt, tls);
        let mut g = c.benchmark_group(name);

        let mut s = connect(ch.entry);
        let msg = [0x42u8; 64];
        let mut back = [0u8; 64];
        g.bench_function("rtt_64B", |b| {
            b.iter(|| {
                s.write_all(&msg).unwrap();
                s.read_exact(&mut back).unwrap();
            })
        });

        let big = vec![0x17u8; 1 << 20];
        let mut back = vec![0u8; 1 << 20];
        g.throughput(Throughput::Bytes(big.len() as u64));
        g.bench_function("echo_1MiB", |b| {
            b.iter(|| {
                let mut w = s.try_clone().unwrap();
                std::thread::scope(|sc| {
                    sc.spawn(|| w.write_all(&big).unwrap());
                    s.read_exact(&mut back).unwrap();
                });
            })
        });
        drop(s);

        g.throughput(Throughput::Elements(1));
        g.bench_function("connect_exchange_64B", |b| {
            b.iter(|| {
                let mut s = connect(ch.entry);
                s.write_all(&msg).unwrap();
                s.read_exact(&mut back[..64]).unwrap();
            })
        });
        g.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = splice }
criterion_main!(benches);
