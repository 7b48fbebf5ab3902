//! Targets: what traffic goes through. A target is a list of steps (processes to spawn,
//! one-shot commands whose output later steps use, files or ports to wait for) and the entry
//! address clients connect to. Peers come from a JSON file (`scripts/bench-peers.sh` writes
//! one); hyrelay (one relay, or a relay cluster of two nodes on a Redis of its own) and
//! direct TCP are built here from the same types, so every target runs the same workload
//! code.
//!
//! Placeholders in files, argv, entry and waits: `{dir}` (the target's own directory),
//! `{endpoint}`, `{endpoint_port}`, `{port0}`..`{port9}` (free loopback ports), `{hyrelay}`,
//! and any name a `run` step captured.
//!
//! Invariant: a [`Running`] owns its processes; dropping it kills each one's process group,
//! and every child also gets SIGKILL from the kernel if the harness dies
//! (`PR_SET_PDEATHSIG`), so no exit path leaves a process behind.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: String,
    /// Where clients connect, e.g. `127.0.0.1:{port1}`.
    pub entry: String,
    /// File name (inside `{dir}`) to contents.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Most idle connections to open in the memory workload (default: as many as asked).
    #[serde(default)]
    pub idle_max: Option<usize>,
    /// The Redis the target runs on (e.g. `127.0.0.1:{port3}`), if any: its commands are
    /// counted around the setup workload (Redis commands per new tunnel).
    #[serde(default)]
    pub redis: Option<String>,
}

/// One step. Exactly one of `spawn` (with `argv`) or `run` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Start a long-running process with this name (measured: CPU, RSS).
    pub spawn: Option<String>,
    pub argv: Option<Vec<String>>,
    /// Run a command to completion (not measured).
    pub run: Option<Vec<String>>,
    /// Keep the trimmed stdout of `run` as a placeholder of this name.
    pub capture: Option<String>,
    /// Repeat `run` every 100 ms until its stdout contains this.
    pub until: Option<String>,
    /// After the step, wait until this address accepts connections.
    pub wait_port: Option<String>,
    /// After the step, wait until this file exists.
    pub wait_file: Option<String>,
}

impl TargetSpec {
    /// Direct TCP: clients connect to the endpoint itself.
    pub fn direct() -> Self {
        Self {
            name: "direct".into(),
            entry: "{endpoint}".into(),
            files: BTreeMap::new(),
            steps: vec![],
            idle_max: None,
            redis: None,
        }
    }

    /// hyrelay relay + hcm + bridge as three processes of the binary `{hyrelay}`;
    /// `relay_toml`, if given, is the relay's config file (flags override it).
    /// `extra` is appended to the relay's, the hcm's and the bridge's command line.
    pub fn hyrelay(name: &str, tls: bool, workers: Option<usize>, relay_toml: Option<&str>, extra: &[String]) -> Self {
        let h = Hyrelay::new(tls, workers, extra);
        let files = relay_toml
            .map(|t| ("relay.toml".to_string(), t.to_string()))
            .into_iter()
            .collect();
        let mut steps = vec![h.relay("relay", "{port0}", relay_toml.is_some())];
        steps.extend(h.tunnel("relay", "relay"));
        Self::through_bridge(name, files, steps, None)
    }

    /// A relay cluster (issue 10): `redis-server` on `{port3}` (no persistence), relay
    /// nodes `relay-a` on `{port0}` and `relay-b` on `{port2}` sharing it, the hcm on
    /// node A and the bridge on node A or, with `cross`, on node B (so every new tunnel is
    /// routed through Redis to A's listener). Plain ws:// only; `relay_toml` (if given) is
    /// the start of both nodes' config files, their `[cluster]` sections follow it.
    pub fn hyrelay_cluster(
        name: &str,
        cross: bool,
        workers: Option<usize>,
        relay_toml: Option<&str>,
        extra: &[String],
    ) -> Self {
        let h = Hyrelay::new(false, workers, extra);
        let base = relay_toml.unwrap_or("[tls]\nmode = \"none\"\n");
        let redis = Step {
            spawn: Some("redis".into()),
            argv: Some(strings(&[
                REDIS_SERVER,
                "--bind",
                "127.0.0.1",
                "--port",
                "{port3}",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                "{dir}",
            ])),
            wait_port: Some(CLUSTER_REDIS.into()),
            ..Step::default()
        };
        let mut files = BTreeMap::new();
        let mut steps = vec![redis];
        for (node, port) in [("relay-a", "{port0}"), ("relay-b", "{port2}")] {
            files.insert(
                format!("{node}.toml"),
                format!(
                    "{base}\n[cluster]\nredis = \"redis://{CLUSTER_REDIS}\"\npublic_url = \"ws://127.0.0.1:{port}\"\nnode_id = \"{node}\"\n"
                ),
            );
            steps.push(h.relay(node, port, true));
        }
        steps.extend(h.tunnel("relay-a", if cross { "relay-b" } else { "relay-a" }));
        Self::through_bridge(name, files, steps, Some(CLUSTER_REDIS))
    }

    /// A hyrelay target: clients connect to the bridge of [`Hyrelay::tunnel`].
    fn through_bridge(name: &str, files: BTreeMap<String, String>, steps: Vec<Step>, redis: Option<&str>) -> Self {
        Self {
            name: name.into(),
            entry: "127.0.0.1:{port1}".into(),
            files,
            steps,
            idle_max: None,
            redis: redis.map(str::to_string),
        }
    }

    /// A relay config that lifts the connection caps (all benchmark traffic comes from one
    /// address, and the idle workload holds thousands of tunnels), if `bin` understands it:
    /// older binaries have no caps and reject unknown fields.
    pub fn hyrelay_relay_toml(bin: &Path, scratch: &Path) -> Option<String> {
        let toml = "[tls]\nmode = \"none\"\n\n[limits]\nmax_connections = 200000\nmax_connections_per_ip = 200000\nmax_unauthenticated = 100000\n";
        let f = scratch.join("relay-limits-probe.toml");
        std::fs::write(&f, toml).ok()?;
        let argv = [
            bin.display().to_string(),
            "check-config".into(),
            "--role".into(),
            "relay".into(),
            f.display().to_string(),
        ];
        run(&argv, Duration::from_secs(10)).ok().map(|_| toml.to_string())
    }

    /// Starts the target: writes its files, runs its steps, waits until a byte echoes through.
    pub fn start(&self, base: &Path, endpoint: SocketAddr, vars: &BTreeMap<String, String>) -> anyhow::Result<Running> {
        let dir = base.join(format!("{}-{}", sanitize(&self.name), std::process::id() ^ rand_u32()));
        std::fs::create_dir_all(&dir)?;
        let mut vars = vars.clone();
        vars.insert("dir".into(), dir.display().to_string());
        vars.insert("endpoint".into(), endpoint.to_string());
        vars.insert("endpoint_port".into(), endpoint.port().to_string());
        for (i, p) in free_ports(10)?.into_iter().enumerate() {
            vars.insert(format!("port{i}"), p.to_string());
        }
        for (name, body) in &self.files {
            std::fs::write(dir.join(name), fill(body, &vars)?)?;
        }
        let mut running = Running {
            dir: dir.clone(),
            procs: vec![],
            entry: endpoint,
            redis: None,
        };
        for step in &self.steps {
            running
                .step(step, &mut vars)
                .with_context(|| format!("target {}: step {step:?}", self.name))?;
        }
        running.entry = fill(&self.entry, &vars)?.parse().context("entry address")?;
        if let Some(r) = &self.redis {
            running.redis = Some(fill(r, &vars)?.parse().context("redis address")?);
        }
        crate::workloads::wait_echo(running.entry, Duration::from_secs(20)).with_context(|| {
            format!(
                "target {}: no byte echoed through {} within 20 s; logs in {}",
                self.name,
                running.entry,
                dir.display()
            )
        })?;
        Ok(running)
    }
}

/// `redis-server` of a cluster target, from PATH (Debian's package puts it in /usr/bin;
/// `scripts/setup-debian.sh` installs it).
const REDIS_SERVER: &str = "redis-server";
/// Where a cluster target's Redis listens.
const CLUSTER_REDIS: &str = "127.0.0.1:{port3}";

/// The command lines of one hyrelay binary's roles in a target: relay nodes, `hc` against
/// a node, the hcm and the bridge. A node `N` keeps its data in `{dir}/N` and its config
/// in `{dir}/N.toml`.
struct Hyrelay {
    tls: bool,
    /// Appended to every relay, hcm and bridge command line (`--workers` included).
    extra: Vec<String>,
}

impl Hyrelay {
    fn new(tls: bool, workers: Option<usize>, extra: &[String]) -> Self {
        let mut extra = extra.to_vec();
        if let Some(n) = workers {
            extra.extend(["--workers".to_string(), n.to_string()]);
        }
        Self { tls, extra }
    }

    /// `{hyrelay} --log-level warn` and `args`.
    fn cmd(args: &[&str]) -> Vec<String> {
        [strings(&["{hyrelay}", "--log-level", "warn"]), strings(args)].concat()
    }

    /// `--ca-file` of `node`'s self-signed CA with TLS, else nothing.
    fn ca(&self, node: &str) -> Vec<String> {
        if self.tls {
            vec!["--ca-file".into(), format!("{{dir}}/{node}/tls/ca.pem")]
        } else {
            vec![]
        }
    }

    /// Starts relay node `node` on `127.0.0.1:{port}`, with its config file if `config`.
    fn relay(&self, node: &str, port: &str, config: bool) -> Step {
        let mode = if self.tls { "--self-signed" } else { "--plain" };
        let listen = format!("127.0.0.1:{port}");
        let data = format!("{{dir}}/{node}");
        let mut argv = Self::cmd(&["relay", mode, "--listen", &listen, "--data-dir", &data]);
        if config {
            argv.extend(["--config".to_string(), format!("{{dir}}/{node}.toml")]);
        }
        argv.extend(self.extra.iter().cloned());
        Step {
            spawn: Some(node.into()),
            argv: Some(argv),
            wait_file: Some(format!("{data}/cli.json")),
            wait_port: Some(listen),
            ..Step::default()
        }
    }

    /// `hc` against relay node `node`, then `rest`.
    fn hc(node: &str, rest: &[&str]) -> Vec<String> {
        let data = format!("{{dir}}/{node}");
        [Self::cmd(&["hc", "--relay-data-dir", &data]), strings(rest)].concat()
    }

    /// The hybrid connection `bench` to `{endpoint}`: created on node `listen` with the
    /// hcm's listener there, and the bridge on `127.0.0.1:{port1}` sending through node
    /// `send`, started once `send` sees the listener (at once on the same node, within a
    /// presence beat on another).
    fn tunnel(&self, listen: &str, send: &str) -> Vec<Step> {
        let run = |argv: Vec<String>, capture: Option<&str>, until: Option<&str>| Step {
            run: Some(argv),
            capture: capture.map(str::to_string),
            until: until.map(str::to_string),
            ..Step::default()
        };
        let hcm = ["hcm", "--data-dir", "{dir}/hcm"];
        let bridge = Self::cmd(&[
            "bridge",
            "-L",
            "127.0.0.1:{port1}=bench",
            "--connection-string",
            "{send_cs}",
        ]);
        vec![
            run(
                Self::hc(listen, &["create", "bench", "--endpoint", "{endpoint}"]),
                None,
                None,
            ),
            run(
                Self::hc(listen, &["connection-string", "bench", "--listen"]),
                Some("listen_cs"),
                None,
            ),
            run(Self::cmd(&[&hcm[..], &["add", "{listen_cs}"]].concat()), None, None),
            Step {
                spawn: Some("hcm".into()),
                argv: Some(
                    [
                        Self::cmd(&[&hcm[..], &["run"]].concat()),
                        self.ca(listen),
                        self.extra.clone(),
                    ]
                    .concat(),
                ),
                ..Step::default()
            },
            run(Self::hc(send, &["--json", "list"]), None, Some("\"listenerCount\": 1")),
            run(
                Self::hc(send, &["connection-string", "bench", "--send"]),
                Some("send_cs"),
                None,
            ),
            Step {
                spawn: Some("bridge".into()),
                argv: Some([bridge, self.ca(send), self.extra.clone()].concat()),
                wait_port: Some("127.0.0.1:{port1}".into()),
                ..Step::default()
            },
        ]
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A started target.
pub struct Running {
    pub dir: PathBuf,
    pub entry: SocketAddr,
    /// [`TargetSpec::redis`], filled in.
    pub redis: Option<SocketAddr>,
    pub procs: Vec<(String, Child)>,
}

impl Running {
    fn step(&mut self, step: &Step, vars: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
        if let (Some(name), Some(argv)) = (&step.spawn, &step.argv) {
            let argv = argv.iter().map(|a| fill(a, vars)).collect::<anyhow::Result<Vec<_>>>()?;
            let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
            let child = command(&argv)?
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {argv:?}"))?;
            self.procs.push((name.clone(), child));
        } else if let Some(argv) = &step.run {
            let argv = argv.iter().map(|a| fill(a, vars)).collect::<anyhow::Result<Vec<_>>>()?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let out = run(&argv, Duration::from_secs(10))?;
                match &step.until {
                    Some(want) if !out.contains(want.as_str()) => {
                        if Instant::now() > deadline {
                            bail!("{argv:?} never printed {want:?}; last output: {out}");
                        }
                        self.check_alive()?;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        if let Some(var) = &step.capture {
                            vars.insert(var.clone(), out.trim().to_string());
                        }
                        break;
                    }
                }
            }
        } else {
            bail!("a step needs `spawn` with `argv`, or `run`");
        }
        if let Some(f) = &step.wait_file {
            let f = PathBuf::from(fill(f, vars)?);
            self.wait(&format!("file {}", f.display()), || f.exists())?;
        }
        if let Some(a) = &step.wait_port {
            let a: SocketAddr = fill(a, vars)?.parse().context("wait_port")?;
            self.wait(&format!("port {a}"), || {
                TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
            })?;
        }
        Ok(())
    }

    fn wait(&mut self, what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{what} not ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// An error naming the first spawned process that has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.procs {
            if let Some(st) = c.try_wait()? {
                bail!("{name} exited ({st}); see {}/{name}.log", self.dir.display());
            }
        }
        Ok(())
    }

    /// The pids of the spawned processes, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    /// Lines of the processes' logs that look like warnings or errors (at most `max`).
    pub fn log_complaints(&self, max: usize) -> Vec<String> {
        let mut out = vec![];
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let bad: Vec<String> = text.lines().map(plain).filter(|l| is_complaint(l)).collect();
            if !bad.is_empty() {
                out.push(format!("{name}: {} warning/error lines, first: {}", bad.len(), bad[0]));
                out.extend(
                    bad.iter()
                        .skip(1)
                        .take(max.saturating_sub(1))
                        .map(|l| format!("{name}:   {l}")),
                );
            }
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, c) in &self.procs {
            // SIGTERM to the group first so the processes may clean up, SIGKILL after 2 s.
            // SAFETY: kill(2) with a negative pid signals a process group we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for (_, c) in &mut self.procs {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above; the group may already be gone, which is harmless.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

fn is_complaint(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    // Expected here: the plain-ws relay's start-up reminder, and Redis's advice on
    // vm.overcommit_memory (about background saves, which a cluster target's Redis never makes).
    ["warn", "error", "panic", "fatal", "alert"]
        .iter()
        .any(|w| l.contains(w))
        && !l.contains("tls is off")
        && !l.contains("memory overcommit")
}

/// A log line without colour codes and without a leading timestamp, so repeats compare equal.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequence: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    let t = out.trim();
    match t.split_once(' ') {
        Some((first, rest)) if first.len() >= 19 && first.as_bytes()[4] == b'-' && first.contains('T') => {
            rest.trim().to_string()
        }
        _ => t.to_string(),
    }
}

/// A command in its own process group that dies with the harness.
fn command(argv: &[String]) -> anyhow::Result<Command> {
    let Some((prog, args)) = argv.split_first() else {
        bail!("empty argv")
    };
    let mut c = Command::new(prog);
    c.args(args).stdin(Stdio::null()).process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(c)
}

/// Runs `argv` to completion within `limit`; its stdout, or an error with its stderr.
fn run(argv: &[String], limit: Duration) -> anyhow::Result<String> {
    let mut child = command(argv)?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {argv:?}"))?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{argv:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{argv:?}: {}: {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Replaces every `{name}` with its value; an unknown name is an error.
pub fn fill(s: &str, vars: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            bail!("unclosed placeholder in {s:?}")
        };
        let key = &rest[i + 1..i + j];
        match vars.get(key) {
            Some(v) => out.push_str(v),
            None => bail!("unknown placeholder {{{key}}} in {s:?}"),
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `n` distinct free loopback ports (bound to 0 and released; good enough on a quiet machine).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let ls = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    ls.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect()
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos()
}
