//! What registered files would buy the io_uring backend (issue 13 item 2), measured outside
//! hyrelay so the answer does not depend on how we would wire them in.
//!
//! `cargo bench --features uring --bench uring_files [-- --pairs 64,2000 --secs 4 --runs 3]`
//!
//! One thread, one ring, `pairs` loopback TCP connections each echoing a 1 KiB message back
//! and forth (a receive, then a send, per message and side), every socket busy at once. The
//! same loop runs with each operation naming its socket by descriptor (`plain`: the kernel
//! takes a reference to the file per operation, `fget`) and by its slot in a registered
//! table (`fixed`), alternating, `runs` times each; it prints CPU ns per operation (user +
//! system, the process) and the ratio of the medians. Then the cost of keeping a table in
//! step with sockets that come and go: one slot cleared and set again
//! (`IORING_REGISTER_FILES_UPDATE`, twice per socket's life).
//!
//! An idle thread keeps the process multi-threaded, as the daemon is (a single-threaded
//! process has a cheaper file look-up the daemon never gets).

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uring_files: io_uring only (Linux)");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use io_uring::{IoUring, cqueue, opcode, squeue, types};

    const MSG: usize = 1024;

    struct Opts {
        pairs: Vec<usize>,
        secs: u64,
        runs: usize,
    }

    fn opts() -> Opts {
        let mut o = Opts {
            pairs: vec![64, 2000],
            secs: 4,
            runs: 3,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--pairs" => o.pairs = val().split(',').map(|p| p.parse().expect("--pairs N[,N]")).collect(),
                "--secs" => o.secs = val().parse().expect("--secs N"),
                "--runs" => o.runs = val().parse().expect("--runs N"),
                // `cargo bench` adds `--bench`.
                _ => {}
            }
        }
        o
    }

    /// CPU time of the whole process so far (user + system).
    fn cpu() -> Duration {
        // SAFETY: getrusage fills the struct it is given.
        let u = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let t = |v: libc::timeval| Duration::from_secs(v.tv_sec as u64) + Duration::from_micros(v.tv_usec as u64);
        t(u.ru_utime) + t(u.ru_stime)
    }

    /// `pairs` connected loopback pairs, as one list (a, b, a, b, ...).
    fn sockets(pairs: usize) -> Vec<TcpStream> {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut socks = Vec::with_capacity(2 * pairs);
        for _ in 0..pairs {
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            a.set_nodelay(true).expect("nodelay");
            b.set_nodelay(true).expect("nodelay");
            socks.push(a);
            socks.push(b);
        }
        socks
    }

    /// A receive or send on socket `i`, by descriptor or by registered slot `i`.
    fn entry(fixed: bool, fd: i32, i: usize, send: bool, ptr: *mut u8, len: usize) -> squeue::Entry {
        let e = match (fixed, send) {
            (false, false) => opcode::Recv::new(types::Fd(fd), ptr, len as u32).build(),
            (false, true) => opcode::Send::new(types::Fd(fd), ptr, len as u32).build(),
            (true, false) => opcode::Recv::new(types::Fixed(i as u32), ptr, len as u32).build(),
            (true, true) => opcode::Send::new(types::Fixed(i as u32), ptr, len as u32).build(),
        };
        let e = if fixed { e.flags(squeue::Flags::FIXED_FILE) } else { e };
        e.user_data(((i as u64) << 1) | u64::from(send))
    }

    /// CPU ns per operation over `secs` of echoing on `pairs` connections.
    fn run(fixed: bool, pairs: usize, secs: u64) -> f64 {
        let socks = sockets(pairs);
        let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let n = fds.len();
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(4096)
            .expect("an io_uring");
        if fixed {
            ring.submitter().register_files(&fds).expect("register_files");
        }
        let mut bufs = vec![vec![0u8; MSG]; n];
        // Each pair's first side starts with one message on its way.
        for s in socks.iter().step_by(2) {
            (&*s).write_all(&[7u8; MSG]).expect("prime");
        }
        let mut got = vec![0usize; n];
        let mut pending: Vec<squeue::Entry> = (0..n)
            .map(|i| entry(fixed, fds[i], i, false, bufs[i].as_mut_ptr(), MSG))
            .collect();
        let (mut ops, start, c0) = (0u64, Instant::now(), cpu());
        while start.elapsed() < Duration::from_secs(secs) {
            {
                let mut sq = ring.submission();
                while let Some(e) = pending.pop() {
                    // SAFETY: every buffer outlives the ring (both dropped at the end).
                    if unsafe { sq.push(&e) }.is_err() {
                        pending.push(e);
                        break;
                    }
                }
            }
            ring.submit_and_wait(1).expect("submit");
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c: cqueue::Entry| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in done {
                ops += 1;
                let (i, send) = ((ud >> 1) as usize, ud & 1 == 1);
                assert!(res > 0, "operation failed: {}", std::io::Error::from_raw_os_error(-res));
                if send {
                    assert_eq!(res as usize, MSG, "short send");
                    pending.push(entry(fixed, fds[i], i, false, bufs[i].as_mut_ptr(), MSG));
                    continue;
                }
                got[i] += res as usize;
                if got[i] < MSG {
                    let rest = bufs[i][got[i]..].as_mut_ptr();
                    pending.push(entry(fixed, fds[i], i, false, rest, MSG - got[i]));
                } else {
                    got[i] = 0;
                    pending.push(entry(fixed, fds[i], i, true, bufs[i].as_mut_ptr(), MSG));
                }
            }
        }
        (cpu() - c0).as_nanos() as f64 / ops as f64
    }

    /// CPU ns to clear one registered slot and set it again.
    fn slot_update(pairs: usize) -> f64 {
        let socks = sockets(pairs);
        let fds: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let ring = IoUring::new(64).expect("an io_uring");
        ring.submitter().register_files(&fds).expect("register_files");
        let k = 100_000;
        let c0 = cpu();
        for j in 0..k {
            let i = j % fds.len();
            ring.submitter()
                .register_files_update(i as u32, &[-1])
                .expect("clear a slot");
            ring.submitter()
                .register_files_update(i as u32, &[fds[i]])
                .expect("set a slot");
        }
        (cpu() - c0).as_nanos() as f64 / k as f64
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    pub fn main() {
        let o = opts();
        std::thread::spawn(|| std::thread::sleep(Duration::from_secs(24 * 3600)));
        println!("| pairs | plain CPU ns/op (runs) | fixed CPU ns/op (runs) | fixed / plain |");
        println!("|---|---|---|---|");
        for &pairs in &o.pairs {
            let (mut plain, mut fixed) = (Vec::new(), Vec::new());
            for _ in 0..o.runs {
                plain.push(run(false, pairs, o.secs));
                fixed.push(run(true, pairs, o.secs));
            }
            let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            let (p, f) = (median(plain.clone()), median(fixed.clone()));
            println!(
                "| {pairs} | {p:.0} ({}) | {f:.0} ({}) | {:.3}× |",
                show(&plain),
                show(&fixed),
                f / p
            );
        }
        println!(
            "slot cleared and set again (IORING_REGISTER_FILES_UPDATE ×2): {:.0} CPU ns",
            slot_update(64)
        );
    }
}
