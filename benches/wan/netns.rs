//! The WAN: three network namespaces `app | relay | private` joined by two delayed links,
//! each a pair of TAP devices (one per namespace) and a [`super::delay`] line between them.
//!
//! ```text
//!  app 10.77.30.1 ─tap─[delay]─tap─ 10.77.30.2 relay 10.77.31.1 ─tap─[delay]─tap─ 10.77.31.2 private
//! ```
//!
//! The relay namespace routes between the two (so direct TCP from app to private crosses
//! both links); the app and private namespaces have a route to each other through it.
//! Names are `hywan-<pid>-<tag>`; everything is deleted when [`Wan`] drops (TAP devices go
//! with their descriptors, namespaces are deleted), and namespaces of dead bench processes
//! are reaped at start.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

use super::delay::{self, Shape};

pub const APP_IP: &str = "10.77.30.1";
pub const RELAY_IP: &str = "10.77.30.2";
pub const RELAY_PRIVATE_SIDE_IP: &str = "10.77.31.1";
pub const PRIVATE_IP: &str = "10.77.31.2";
const PREFIX: &str = "hywan-";

/// A network namespace; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        sh("ip", &["netns", "add", &name]).context("ip netns add (needs root or CAP_NET_ADMIN)")?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a).map(|_| ())
    }

    /// Runs `f` on a new thread inside the namespace and waits for it.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> anyhow::Result<T> {
            enter(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// A command that runs `argv` inside the namespace.
    pub fn command(&self, argv: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

fn enter(path: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| path.to_owned())?;
    // SAFETY: setns(2) with a namespace file we hold open; affects this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn sh(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `hywan-<pid>-*` namespaces whose bench process is gone.
fn reap_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "del", &name]);
        }
    }
}

/// A TAP device made inside `ns` (IFF_TAP | IFF_NO_PI, non-blocking); it lives as long as
/// the descriptor.
fn tap(ns: &Netns, name: &str) -> anyhow::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = ns.within(move || -> anyhow::Result<OwnedFd> {
        // SAFETY: open(2) of a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            bail!("/dev/net/tun: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads a `struct ifreq`, which IfReq lays out (40 bytes).
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            bail!("TUNSETIFF: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })??;
    Ok(fd)
}

/// One delayed link: its shape and the two direction threads.
struct Link {
    shape: Arc<Shape>,
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    /// `a_if` in `a` with `a_addr`, `b_if` in `b` with `b_addr`, `one_way` each direction.
    fn new(
        a: (&Netns, &str, &str),
        b: (&Netns, &str, &str),
        one_way: Duration,
        stop: &Arc<AtomicBool>,
    ) -> anyhow::Result<Link> {
        let fa = Arc::new(tap(a.0, a.1)?);
        let fb = Arc::new(tap(b.0, b.1)?);
        for (ns, ifname, addr) in [a, b] {
            ns.ip(&["addr", "add", addr, "dev", ifname])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        let shape = Arc::new(Shape::default());
        let mut threads = vec![];
        for (from, to) in [(fa.clone(), fb.clone()), (fb, fa)] {
            let (shape, stop) = (shape.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("wan-delay".into())
                    .spawn(move || delay::run(from, to, one_way, shape, stop))?,
            );
        }
        Ok(Link { shape, threads })
    }
}

/// The three namespaces and two links.
pub struct Wan {
    pub app: Netns,
    pub relay: Netns,
    pub private: Netns,
    links: Vec<Link>,
    stop: Arc<AtomicBool>,
}

impl Wan {
    /// Builds it with `link_rtt` per link (so app ⇄ private is twice that).
    pub fn new(link_rtt: Duration) -> anyhow::Result<Wan> {
        reap_stale();
        let (app, relay, private) = (Netns::new("app")?, Netns::new("relay")?, Netns::new("private")?);
        let stop = Arc::new(AtomicBool::new(false));
        let one_way = link_rtt / 2;
        let l1 = Link::new(
            (&app, "wan0", &format!("{APP_IP}/24")),
            (&relay, "wan0", &format!("{RELAY_IP}/24")),
            one_way,
            &stop,
        )?;
        let l2 = Link::new(
            (&relay, "wan1", &format!("{RELAY_PRIVATE_SIDE_IP}/24")),
            (&private, "wan1", &format!("{PRIVATE_IP}/24")),
            one_way,
            &stop,
        )?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &relay.name,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        app.ip(&["route", "add", "10.77.31.0/24", "via", RELAY_IP])?;
        private.ip(&["route", "add", "10.77.30.0/24", "via", RELAY_PRIVATE_SIDE_IP])?;
        Ok(Wan {
            app,
            relay,
            private,
            links: vec![l1, l2],
            stop,
        })
    }

    /// Sets both links' rate (bits per second; 0 = unlimited).
    pub fn set_rate(&self, bps: u64) {
        for l in &self.links {
            l.shape.rate_bps.store(bps, Ordering::Relaxed);
        }
    }

    /// Frames dropped at the queue limit so far.
    pub fn dropped(&self) -> u64 {
        self.links.iter().map(|l| l.shape.dropped.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in &mut self.links {
            for t in l.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
