//! Micro-benchmarks of the sans-IO data path: WebSocket frame decode and encode, header
//! parsing and unmasking, at 125 B, 1 KiB, 16 KiB, 64 KiB and 1 MiB payloads; and the
//! data plane's buffer pool (get/put against a fresh allocation).
//!
//! `cargo bench --bench codec` (criterion; `-- decode` filters by name). Throughput is in
//! payload bytes. Decode runs over ~1 MiB of back-to-back frames per iteration, as a read
//! buffer full of frames would hold; masked frames are what the relay, hcm and bridge read
//! from a client, unmasked what they read from a server.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hyrelay::proto::frame::{Decoder, Item, MAX_HEADER_LEN, OpCode, Role, encode_frame, encode_header, parse_header};
use hyrelay::proto::mask::apply_mask;

const SIZES: &[(usize, &str)] = &[
    (125, "125B"),
    (1024, "1KiB"),
    (16 << 10, "16KiB"),
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
];
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Back-to-back binary frames of `size` payload bytes, about 1 MiB in all (at least one).
fn frames(size: usize, masked: bool) -> (BytesMut, u64) {
    let count = ((1 << 20) / size).max(1);
    let payload = vec![0x5au8; size];
    let mut buf = BytesMut::new();
    for _ in 0..count {
        buf.extend_from_slice(&encode_frame(true, OpCode::Binary, masked.then_some(KEY), &payload));
    }
    (buf, (count * size) as u64)
}

fn decode(c: &mut Criterion) {
    for (masked, role, name) in [
        (true, Role::Server, "frame_decode_masked"),
        (false, Role::Client, "frame_decode_unmasked"),
    ] {
        let mut g = c.benchmark_group(name);
        for &(size, label) in SIZES {
            let (input, bytes) = frames(size, masked);
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(label, |b| {
                b.iter_batched(
                    || input.clone(),
                    |mut buf| {
                        let mut dec = Decoder::new(role, 2 << 20);
                        let mut got = 0usize;
                        while let Some(item) = dec.decode(&mut buf).expect("valid frames") {
                            if let Item::Data(chunk) = item {
                                got += chunk.payload.len();
                            }
                        }
                        assert_eq!(got as u64, bytes);
                        black_box(got)
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        g.finish();
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode_masked");
    for &(size, label) in SIZES {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(label, |b| {
            b.iter(|| black_box(encode_frame(true, OpCode::Binary, Some(KEY), black_box(&payload))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("frame_header");
    for &(size, label) in SIZES {
        let mut out = [0u8; MAX_HEADER_LEN];
        g.bench_function(format!("encode_{label}"), |b| {
            b.iter(|| {
                black_box(encode_header(
                    true,
                    OpCode::Binary,
                    Some(KEY),
                    black_box(size as u64),
                    &mut out,
                ))
            })
        });
        let n = encode_header(true, OpCode::Binary, Some(KEY), size as u64, &mut out);
        let head = out[..n].to_vec();
        g.bench_function(format!("parse_{label}"), |b| {
            b.iter(|| black_box(parse_header(black_box(&head))))
        });
    }
    g.finish();
}

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for &(size, label) in SIZES {
        // One byte off an aligned start, as a payload after a 2- or 6-byte header would be.
        let mut buf = vec![0u8; size + 1];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(label, |b| b.iter(|| apply_mask(black_box(&mut buf[1..]), KEY, 1)));
    }
    g.finish();
}

/// The data-plane buffer pool on one thread, as a worker uses it: take a buffer when a
/// socket is readable, write a frame header's worth into it, give it back. `get_put` is
/// the steady state (a buffer from the reserve); `get_put_16` holds 16 at once, as a worker
/// with 16 busy connections would; `alloc_free` is what a fresh 64 KiB allocation costs
/// instead (zeroed, as the pool's are).
fn pool(c: &mut Criterion) {
    use hyrelay::dataplane::pool::{self, BUF_SIZE, PoolBuf};
    let get = || pool::try_acquire().expect("the default budget allows far more than 16 buffers");
    let mut g = c.benchmark_group("pool");
    g.bench_function("get_put", |b| {
        b.iter(|| {
            let mut buf = get();
            buf[..MAX_HEADER_LEN].fill(0x82);
            black_box(&buf);
        })
    });
    g.bench_function("get_put_16", |b| {
        b.iter(|| {
            let bufs: Vec<PoolBuf> = (0..16).map(|_| get()).collect();
            black_box(&bufs);
        })
    });
    g.bench_function("alloc_free", |b| {
        b.iter(|| {
            let mut buf = vec![0u8; BUF_SIZE].into_boxed_slice();
            buf[..MAX_HEADER_LEN].fill(0x82);
            black_box(&buf);
        })
    });
    g.finish();
    assert_eq!(pool::stats().in_use, 0, "every buffer went back");
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = decode, encode, unmask, pool }
criterion_main!(benches);
