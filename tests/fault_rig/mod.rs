//! Fixtures for the fault tests (`tests/faults.rs`, `tests/faults_churn.rs`): processes of
//! the hyrelay binary with their output captured line by line and time-stamped as it
//! arrives, network namespaces joined by veth pairs (with nftables rules and tc qdiscs
//! inside them), sockets opened from inside a namespace, an echo endpoint, and /proc
//! readings (open file descriptors, RSS).
//!
//! Everything is torn down on every path: [`Proc`] kills its child on drop (and prints the
//! tail of its log if the test is failing), [`Netns`] deletes its namespace on drop, and
//! namespaces left by a test binary that was killed are deleted by the next one. Namespace
//! names are `hyft-<pid>-<tag>`; interfaces are created directly inside them, so nothing
//! is added to the host's own network namespace.

#![allow(dead_code)]

#[path = "../common/data.rs"]
mod data;
#[allow(unused_imports)] // not every test crate uses it
pub use data::payload;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_hyrelay");

/// Serializes the tests of one binary: their timings (detection within two ping periods,
/// reconnect within 2 s, shaped rates) are only meaningful when they do not compete for
/// the two cores with each other. (An async lock: it is held across awaits, and a failing
/// test releases it as it unwinds.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// Lines a process wrote (stdout and stderr), each with the moment the test read it.
pub struct Log {
    name: String,
    /// When the process was started: every line is at or after it.
    pub start: Instant,
    lines: Mutex<VecDeque<(Instant, String)>>,
}

/// Lines kept per process; older ones are dropped.
const KEEP_LINES: usize = 20_000;

impl Log {
    fn push(&self, line: String) {
        if std::env::var_os("HYRELAY_FAULTS_ECHO").is_some() {
            eprintln!("[{}] {line}", self.name);
        }
        let mut l = self.lines.lock().unwrap();
        if l.len() == KEEP_LINES {
            l.pop_front();
        }
        l.push_back((Instant::now(), line));
    }

    /// The first line at or after `after` that `pred` accepts.
    pub fn find(&self, after: Instant, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        let l = self.lines.lock().unwrap();
        l.iter().find(|(t, s)| *t >= after && pred(s)).cloned()
    }

    /// Every line at or after `after` that `pred` accepts.
    pub fn all(&self, after: Instant, pred: impl Fn(&str) -> bool) -> Vec<(Instant, String)> {
        let l = self.lines.lock().unwrap();
        l.iter().filter(|(t, s)| *t >= after && pred(s)).cloned().collect()
    }

    /// Waits up to `limit` for a line at or after `after` that `pred` accepts.
    pub async fn wait(
        &self,
        after: Instant,
        limit: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let end = Instant::now() + limit;
        loop {
            if let Some(hit) = self.find(after, &pred) {
                return Some(hit);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn tail(&self, n: usize) -> Vec<String> {
        let l = self.lines.lock().unwrap();
        l.iter()
            .skip(l.len().saturating_sub(n))
            .map(|(_, s)| s.clone())
            .collect()
    }
}

/// A running hyrelay process (killed when dropped).
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    pub log: Arc<Log>,
}

fn pipe_lines(r: impl AsyncRead + Unpin + Send + 'static, log: Arc<Log>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            log.push(l);
        }
    });
}

impl Proc {
    /// Starts `hyrelay ARGS` (inside `ns` if given) with `HYRELAY_LOG=filter`.
    pub fn spawn(name: &str, ns: Option<&Netns>, args: &[String], filter: &str) -> Proc {
        let mut c = match ns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        c.args(args)
            .env("HYRELAY_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let pid = child.id().expect("a running child has a pid");
        let log = Arc::new(Log {
            name: name.to_owned(),
            start: Instant::now(),
            lines: Mutex::new(VecDeque::new()),
        });
        pipe_lines(child.stdout.take().unwrap(), log.clone());
        pipe_lines(child.stderr.take().unwrap(), log.clone());
        Proc {
            name: name.to_owned(),
            pid,
            child,
            log,
        }
    }

    /// SIGKILL, then waits (bounded) until the process is gone.
    pub async fn kill9(&mut self) {
        // SAFETY: kill(2) on our own child's pid; it is not reaped before `wait` below.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not die after SIGKILL", self.name))
            .unwrap();
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open file descriptors (/proc/PID/fd).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap_or_else(|e| panic!("{}: /proc/{}/fd: {e}", self.name, self.pid))
            .count()
    }

    /// Resident set size in KiB (VmRSS in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// Waits for the line `prefix ADDR...` and returns ADDR.
    pub async fn wait_addr(&self, prefix: &str, limit: Duration) -> (Instant, SocketAddr) {
        let (t, line) = self
            .log
            .wait(self.log.start, limit, |l| l.contains(prefix))
            .await
            .unwrap_or_else(|| panic!("{} never printed {prefix:?}: {:#?}", self.name, self.log.tail(20)));
        let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
        let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
        (t, addr)
    }
}

/// Resident set size of process `pid` in KiB (VmRSS in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let s =
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- last lines of {} (pid {}) ----", self.name, self.pid);
            for l in self.log.tail(40) {
                eprintln!("{l}");
            }
        }
        let _ = self.child.start_kill();
    }
}

/// Open descriptors of each process once they have stopped changing (the same for half a
/// second; at most 10 s): a baseline that excludes connections still being closed, such as
/// those of a `hyrelay hc` command that just ran.
pub async fn settled_fds(procs: &[&Proc]) -> Vec<usize> {
    let mut last = Vec::new();
    let mut same = 0;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<usize> = procs.iter().map(|p| p.fds()).collect();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 10 || Instant::now() >= end {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most `limit`) until no process has more descriptors open than in `base`;
/// returns whether it got there and the last counts.
pub async fn fds_back_to(procs: &[&Proc], base: &[usize], limit: Duration) -> (bool, Vec<usize>) {
    let ok = wait_until(limit, || async { procs.iter().zip(base).all(|(p, b)| p.fds() <= *b) }).await;
    (ok, procs.iter().map(|p| p.fds()).collect())
}

/// Runs `hyrelay ARGS` to completion (inside `ns` if given): (success, stdout, stderr).
pub async fn run(ns: Option<&Netns>, args: &[&str]) -> (bool, String, String) {
    let mut c = match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &n.name, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    c.args(args)
        .env("HYRELAY_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .unwrap_or_else(|_| panic!("hyrelay {args:?} did not finish within 30 s"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`run`], asserting success; returns stdout.
pub async fn run_ok(ns: Option<&Netns>, args: &[&str]) -> String {
    let (ok, out, err) = run(ns, args).await;
    assert!(ok, "hyrelay {args:?} failed: {err}{out}");
    out
}

/// Writes a config file and has `hyrelay check-config` validate it.
pub async fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let p = path.to_str().unwrap();
    let out = run_ok(None, &["check-config", p]).await;
    assert!(out.contains("valid"), "{out}");
}

// ---------------------------------------------------------------------------------------
// The three roles

/// A relay process and where its state lives.
pub struct Relay {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// `--data-dir`, also what `hyrelay hc --relay-data-dir` takes.
    pub data_dir: PathBuf,
    config: PathBuf,
    extra: Vec<String>,
}

impl Relay {
    /// `hyrelay relay --plain --config DIR/relay.toml --listen LISTEN --data-dir DIR/relay`,
    /// with `toml` as the config file and `extra` flags.
    pub async fn start(ns: Option<&Netns>, dir: &Path, listen: &str, toml: &str, extra: &[&str]) -> Relay {
        let config = dir.join("relay.toml");
        write_config(&config, toml).await;
        let data_dir = dir.join("relay");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (proc, addr) = Self::launch(ns, &config, listen, &data_dir, &extra).await;
        Relay {
            proc,
            addr,
            data_dir,
            config,
            extra,
        }
    }

    async fn launch(
        ns: Option<&Netns>,
        config: &Path,
        listen: &str,
        data_dir: &Path,
        extra: &[String],
    ) -> (Proc, SocketAddr) {
        let mut args: Vec<String> = [
            "relay",
            "--plain",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            listen,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--workers",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn("relay", ns, &args, "hyrelay=info");
        let (_, addr) = proc
            .wait_addr("hyrelay relay listening on ", Duration::from_secs(30))
            .await;
        (proc, addr)
    }

    /// Starts the relay again on the same address and data directory (the old process
    /// must be gone).
    pub async fn restart(&mut self, ns: Option<&Netns>) {
        let (proc, addr) = Self::launch(ns, &self.config, &self.addr.to_string(), &self.data_dir, &self.extra).await;
        assert_eq!(addr, self.addr, "the relay came back on the same address");
        self.proc = proc;
    }

    fn dir_arg(&self) -> String {
        self.data_dir.display().to_string()
    }

    /// `hyrelay hc create NAME --endpoint ENDPOINT`.
    pub async fn create(&self, ns: Option<&Netns>, name: &str, endpoint: &str) {
        let d = self.dir_arg();
        let out = run_ok(
            ns,
            &["hc", "--relay-data-dir", &d, "create", name, "--endpoint", endpoint],
        )
        .await;
        assert!(out.contains(&format!("created {name}")), "{out}");
    }

    /// `hyrelay hc connection-string NAME --listen|--send`.
    pub async fn connection_string(&self, ns: Option<&Netns>, name: &str, send: bool) -> String {
        let d = self.dir_arg();
        let which = if send { "--send" } else { "--listen" };
        run_ok(ns, &["hc", "--relay-data-dir", &d, "connection-string", name, which])
            .await
            .trim()
            .to_owned()
    }

    /// `hyrelay hc show NAME --json`.
    pub async fn show(&self, ns: Option<&Netns>, name: &str) -> serde_json::Value {
        let d = self.dir_arg();
        let out = run_ok(ns, &["hc", "--relay-data-dir", &d, "show", name, "--json"]).await;
        serde_json::from_str(&out).unwrap()
    }

    /// `hyrelay hc list` (the table).
    pub async fn list(&self, ns: Option<&Netns>) -> String {
        let d = self.dir_arg();
        run_ok(ns, &["hc", "--relay-data-dir", &d, "list"]).await
    }

    /// Waits until the relay reports `n` listeners for `name` (through `hc show`).
    pub async fn wait_listeners(&self, ns: Option<&Netns>, name: &str, n: u64) {
        let ok = wait_until(Duration::from_secs(20), || async {
            self.show(ns, name).await["listenerCount"].as_u64() == Some(n)
        })
        .await;
        assert!(ok, "{name} never had {n} listeners: {}", self.show(ns, name).await);
    }
}

/// An hcm process: `hcm add` of each Listen connection string, then `hcm run`.
pub struct Hcm {
    pub proc: Proc,
    pub dir: PathBuf,
}

impl Hcm {
    pub async fn start(
        name: &str,
        ns: Option<&Netns>,
        dir: &Path,
        toml: &str,
        listen_cs: &[&str],
        filter: &str,
    ) -> Hcm {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("hcm.toml");
        write_config(&config, toml).await;
        let (c, d) = (config.to_str().unwrap(), dir.to_str().unwrap());
        for cs in listen_cs {
            let out = run_ok(ns, &["hcm", "--config", c, "--data-dir", d, "add", cs]).await;
            assert!(out.contains("added"), "{out}");
        }
        let args: Vec<String> = ["hcm", "--config", c, "--data-dir", d, "run", "--workers", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Hcm {
            proc: Proc::spawn(name, ns, &args, filter),
            dir: dir.to_owned(),
        }
    }

    /// `hyrelay hcm status --json` (the daemon's status file, written every second).
    pub async fn status(&self, ns: Option<&Netns>) -> serde_json::Value {
        let d = self.dir.display().to_string();
        let out = run_ok(ns, &["hcm", "--data-dir", &d, "status", "--json"]).await;
        serde_json::from_str(&out).unwrap()
    }

    /// A field of hybrid connection `hc` in the status (camelCase, e.g. `activeTunnels`),
    /// as a number.
    pub async fn status_u64(&self, ns: Option<&Netns>, hc: &str, field: &str) -> u64 {
        let st = self.status(ns).await;
        st["hybridConnections"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == hc))
            .and_then(|h| h[field].as_u64())
            .unwrap_or_else(|| panic!("no {field} for {hc} in {st}"))
    }
}

/// A bridge process with one forward per `(hybrid connection, send connection string)`,
/// each on 127.0.0.1 with a port of its own.
pub struct Bridge {
    pub proc: Proc,
    pub addrs: Vec<SocketAddr>,
}

impl Bridge {
    pub async fn start(ns: Option<&Netns>, dir: &Path, toml: &str, forwards: &[(&str, &str)], filter: &str) -> Bridge {
        std::fs::create_dir_all(dir).unwrap();
        let mut text = format!("{toml}\n");
        for (hc, cs) in forwards {
            text.push_str(&format!(
                "[[forward]]\nhybrid_connection = \"{hc}\"\nlisten = \"127.0.0.1:0\"\nconnection_string = \"{cs}\"\n"
            ));
        }
        let config = dir.join("bridge.toml");
        write_config(&config, &text).await;
        let args: Vec<String> = ["bridge", "--config", config.to_str().unwrap(), "--workers", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let proc = Proc::spawn("bridge", ns, &args, filter);
        let mut addrs = Vec::new();
        for (hc, _) in forwards {
            let suffix = format!(" -> hybrid connection {hc}");
            let (_, line) = proc
                .log
                .wait(proc.log.start, Duration::from_secs(30), |l| {
                    l.starts_with("forwarding ") && l.ends_with(&suffix)
                })
                .await
                .unwrap_or_else(|| panic!("the bridge never forwarded {hc}: {:#?}", proc.log.tail(20)));
            addrs.push(line["forwarding ".len()..line.len() - suffix.len()].parse().unwrap());
        }
        Bridge { proc, addrs }
    }
}

// ---------------------------------------------------------------------------------------
// Network namespaces

const NS_PREFIX: &str = "hyft-";

/// A network namespace of the test's own; deleted on drop.
pub struct Netns {
    pub name: String,
}

fn sh(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut c = std::process::Command::new(prog);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().map_err(|e| format!("cannot run {prog}: {e}"))?;
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes namespaces left behind by test processes that no longer exist (a test binary
/// killed before its guards ran).
fn reap_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NS_PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "del", &name], None);
        }
    }
}

impl Netns {
    /// Makes `hyft-<pid>-<tag>` with its loopback up. Fails the test with the reason if
    /// this process may not make namespaces (root or CAP_NET_ADMIN is needed).
    pub fn new(tag: &str) -> Netns {
        reap_stale_namespaces();
        let name = format!("{NS_PREFIX}{}-{tag}", std::process::id());
        if let Err(e) = sh("ip", &["netns", "add", &name], None) {
            panic!(
                "cannot make the network namespace {name}: {e}\nThe fault tests need root or CAP_NET_ADMIN \
                 (`ip netns add`) and iproute2 (scripts/setup-debian.sh installs it); CI runs them as root."
            );
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        sh("ip", &a, None).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ip netns exec NS PROG ARGS`.
    pub fn exec(&self, prog: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str(), prog];
        a.extend_from_slice(args);
        sh("ip", &a, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Loads an nftables script into the namespace's own ruleset (`nft -f -`).
    pub fn nft(&self, script: &str) {
        if sh("nft", &["--version"], None).is_err() {
            panic!("nft (nftables) is not installed; scripts/setup-debian.sh installs it");
        }
        sh("ip", &["netns", "exec", &self.name, "nft", "-f", "-"], Some(script)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `sysctl -w KEY=VALUE` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }

    /// Runs `f` on a new thread that has entered the namespace; sockets it makes stay in
    /// the namespace wherever they are used afterwards.
    pub async fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) with a namespace file we hold open; affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let _ = tx.send(f());
        });
        rx.await.expect("the namespace thread finished")
    }

    /// Like [`Netns::within`], running a future on a current-thread runtime inside the
    /// namespace (for clients that open their own sockets, like `ws::connect`).
    pub async fn block_on<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        self.within(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(fut)
        })
        .await
    }

    /// A TCP connection to `addr` from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let s = self
            .within(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .await?;
        s.set_nonblocking(true)?;
        TcpStream::from_std(s)
    }

    /// A TCP listener on `addr` inside the namespace.
    pub async fn bind(&self, addr: SocketAddr) -> TcpListener {
        let l = self
            .within(move || std::net::TcpListener::bind(addr))
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        TcpListener::from_std(l).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sh("ip", &["netns", "del", &self.name], None) {
            eprintln!("{e}");
        }
    }
}

/// A veth pair: `a_if` in `a` with `a_addr` (CIDR), `b_if` in `b` with `b_addr`, both up.
/// The pair is created directly in the two namespaces and goes away with them.
pub fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    sh(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A TCP connection to `addr`, from inside `ns` if one is given.
pub async fn connect(ns: Option<&Netns>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    match ns {
        Some(n) => n.connect(addr).await,
        None => TcpStream::connect(addr).await,
    }
}

// ---------------------------------------------------------------------------------------
// Endpoint and clients

/// An echo endpoint: accepted connections, and the moment each one ended.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub ended: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub fn start(listener: TcpListener) -> Echo {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (a, e) = (accepted.clone(), ended.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let e = e.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    e.lock().unwrap().push(Instant::now());
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo {
            addr,
            accepted,
            ended,
            task,
        }
    }

    /// An echo endpoint on 127.0.0.1 of the test's own namespace.
    pub async fn local() -> Echo {
        Echo::start(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub fn ended(&self) -> Vec<Instant> {
        self.ended.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `data` on `s` while reading the echo, then half-closes; returns what came back
/// (bounded by `limit`).
pub async fn exchange(s: TcpStream, data: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, r.read_to_end(&mut out)).await;
    let w = writer.await.unwrap();
    read.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "exchange timed out"))??;
    w?;
    Ok(out)
}

/// Reads until EOF or an error; `Some(when)` if that happened within `limit`.
pub async fn ended_within(s: &mut TcpStream, limit: Duration) -> Option<Instant> {
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}
