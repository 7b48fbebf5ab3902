//! Compatibility with Microsoft's Node client `hyco-ws@1.0.5` (ws 1.1.5), driven through
//! the scripts in `tests/node/` against an in-process relay.
//!
//! Needs the Node rig: run `scripts/setup-node.sh` once (installs into
//! `target/node-rig`, or `$HYRELAY_NODE_RIG`). Without it these tests fail and say so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use hyrelay::proto::connstr::{ConnectionString, Credential};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How long any single expected event may take.
const STEP: Duration = Duration::from_secs(30);
/// Deadline handed to the Node scripts (they exit on their own after it).
const NODE_DEADLINE_MS: &str = "60000";

// ---------------------------------------------------------------------------------------
// The Node rig

fn rig_dir() -> PathBuf {
    match std::env::var_os("HYRELAY_NODE_RIG") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("node-rig"),
    }
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("node")
}

/// The rig directory; panics with instructions if node or hyco-ws is missing.
fn require_rig() -> PathBuf {
    let dir = rig_dir();
    let hyco = dir.join("node_modules").join("hyco-ws");
    let needed = [
        hyco.join("package.json"),
        hyco.join("node_modules").join("ws").join("package.json"),
        hyco.join("node_modules").join("moment").join("package.json"),
    ];
    let missing: Vec<String> = needed
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the hyco-ws Node rig is not installed (missing {}): run scripts/setup-node.sh \
         (or point HYRELAY_NODE_RIG at an installed rig)",
        missing.join(", ")
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(o) if o.status.success()),
        "`node` is not runnable ({node:?}): install Node.js and run scripts/setup-node.sh"
    );
    dir
}

/// A running Node script: stdout lines arrive on a channel, stderr is kept for reports.
/// The child is killed when this is dropped.
struct Node {
    name: String,
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    fn spawn(name: &str, script: &str, args: &[&str], envs: &[(&str, String)]) -> Node {
        let rig = require_rig();
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(scripts_dir().join(script))
            .args(args)
            .env("HYRELAY_NODE_RIG", &rig)
            .env("HC_TIMEOUT_MS", NODE_DEADLINE_MS)
            .env("NODE_NO_WARNINGS", "1")
            .env_remove("NODE_EXTRA_CA_CERTS")
            .env_remove("NODE_TLS_REJECT_UNAUTHORIZED")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start node {script}: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap();
                if s.len() < 64 << 10 {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Node {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    fn transcript(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.seen.join("\n"),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    /// Waits (bounded) for the next line matching `pred`; panics with the transcript.
    async fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(end, self.lines.recv()).await {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Ok(None) => {
                    let st = self.child.try_wait().ok().flatten();
                    panic!(
                        "{}: output ended (exit {st:?}) before {what}\n{}",
                        self.name,
                        self.transcript()
                    );
                }
                Err(_) => panic!("{}: no {what} within {STEP:?}\n{}", self.name, self.transcript()),
            }
        }
    }

    /// Waits (bounded) for the line starting with `prefix`.
    async fn expect_prefix(&mut self, prefix: &str) -> String {
        self.expect(prefix, |l| l.starts_with(prefix)).await
    }

    /// Reads the rest of the output and waits (bounded) for the exit status.
    async fn finish(&mut self) -> ExitStatus {
        let end = tokio::time::Instant::now() + STEP;
        while let Ok(Some(l)) = tokio::time::timeout_at(end, self.lines.recv()).await {
            self.seen.push(l);
        }
        match tokio::time::timeout_at(end, self.child.wait()).await {
            Ok(Ok(st)) => st,
            Ok(Err(e)) => panic!("{}: wait failed: {e}\n{}", self.name, self.transcript()),
            Err(_) => panic!("{}: did not exit within {STEP:?}\n{}", self.name, self.transcript()),
        }
    }

    /// Every line seen so far that starts with `prefix`.
    fn seen_with(&self, prefix: &str) -> Vec<String> {
        self.seen.iter().filter(|l| l.starts_with(prefix)).cloned().collect()
    }

    /// Kills the process (bounded) and reads what it printed.
    async fn kill(&mut self) {
        let _ = tokio::time::timeout(STEP, self.child.kill()).await;
        self.drain();
    }

    /// Takes in every line already printed, without waiting.
    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Relay-side helpers

/// How the Node scripts reach the relay: `ws://127.0.0.1:PORT` or `wss://localhost:PORT`.
fn base_url(rig: &Rig) -> String {
    let port = rig.relay.local_addr().port();
    if rig.relay.ca_file().is_some() {
        format!("wss://localhost:{port}")
    } else {
        format!("ws://127.0.0.1:{port}")
    }
}

fn listen_uri(rig: &Rig, entity: &str) -> String {
    format!("{}/$hc/{entity}?sb-hc-action=listen", base_url(rig))
}

fn send_uri(rig: &Rig, entity: &str) -> String {
    format!("{}/$hc/{entity}?sb-hc-action=connect", base_url(rig))
}

/// Environment every script of this rig needs (the CA for TLS).
fn tls_env(rig: &Rig) -> Vec<(&'static str, String)> {
    rig.relay
        .ca_file()
        .map(|ca| vec![("NODE_EXTRA_CA_CERTS", ca.display().to_string())])
        .unwrap_or_default()
}

/// `(key name, key)` of a connection string.
fn key_of(cs: &ConnectionString) -> (String, String) {
    match &cs.credential {
        Credential::Key { name, key } => (name.clone(), key.expose().to_owned()),
        other => panic!("connection string without a key: {other:?}"),
    }
}

/// Env that makes a script sign its own token with hyco-ws's `createRelayToken`.
fn key_env(cs: &ConnectionString) -> Vec<(&'static str, String)> {
    let (name, key) = key_of(cs);
    vec![("HC_KEY_NAME", name), ("HC_KEY", key)]
}

/// One WebSocket message for the sender script.
#[derive(Clone)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
}

impl Msg {
    fn kind(&self) -> &'static str {
        match self {
            Msg::Text(_) => "text",
            Msg::Binary(_) => "binary",
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Msg::Text(s) => s.as_bytes(),
            Msg::Binary(b) => b,
        }
    }

    /// `"<kind> <len> <sha256>"`, as the scripts print it.
    fn signature(&self) -> String {
        format!("{} {} {}", self.kind(), self.bytes().len(), sha256_hex(self.bytes()))
    }
}

/// Writes the messages file the sender script reads; returns the env pointing at it.
fn messages_env(rig: &Rig, tag: &str, msgs: &[Msg]) -> (&'static str, String) {
    let list: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::json!({ "type": m.kind(), "b64": B64.encode(m.bytes()) }))
        .collect();
    let path = rig.dir.path().join(format!("messages-{tag}.json"));
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    ("HC_MESSAGES_FILE", path.display().to_string())
}

fn sample_messages() -> Vec<Msg> {
    vec![
        Msg::Text("hello from hyco-ws".into()),
        Msg::Binary((0..=255u8).collect()),
        Msg::Text("grüße ✓ — ünïcödé".into()),
        Msg::Binary(payload(70_000, 7)),
        Msg::Text("x".repeat(130_000)),
        Msg::Binary(vec![0]),
    ]
}

/// Starts the hyco-ws echo listener on `entity` and waits until the relay counts it.
async fn start_listener(
    rig: &Rig,
    entity: &str,
    name: &str,
    extra: Vec<(&'static str, String)>,
    expect_count: u64,
) -> Node {
    let mut envs = tls_env(rig);
    envs.push(("HC_LISTEN_URI", listen_uri(rig, entity)));
    envs.extend(extra);
    let mut l = Node::spawn(name, "listener.js", &[], &envs);
    let line = l.expect("LISTENING", |s| s.starts_with("LISTENING")).await;
    // No permessage-deflate on the control channel although ws 1.1.5 offers it (§10.6).
    assert_eq!(line, "LISTENING extensions=", "{}", l.transcript());
    rig.wait_listeners(entity, expect_count).await;
    l
}

/// Runs the sender script to completion and checks that every message came back as sent.
async fn send_and_check_echo(
    rig: &Rig,
    entity: &str,
    tag: &str,
    msgs: &[Msg],
    extra: Vec<(&'static str, String)>,
) -> Node {
    let mut envs = tls_env(rig);
    envs.push(("HC_SEND_URI", send_uri(rig, entity)));
    envs.push(messages_env(rig, tag, msgs));
    envs.extend(extra);
    let mut s = Node::spawn(&format!("sender-{tag}"), "sender.js", &[], &envs);
    let open = s.expect_prefix("OPEN 1 ").await;
    // No permessage-deflate on the sender leg either.
    assert!(open.ends_with(" extensions="), "{}", s.transcript());
    for (i, m) in msgs.iter().enumerate() {
        let got = s.expect_prefix("RECV 1 ").await;
        assert_eq!(
            got,
            format!("RECV 1 {}", m.signature()),
            "echo {i} differs (type, length or content)\n{}",
            s.transcript()
        );
    }
    s.expect("COMPLETE 1", |l| l == "COMPLETE 1").await;
    s.expect("DONE", |l| l == "DONE").await;
    let st = s.finish().await;
    assert!(st.success(), "sender exit {st:?}\n{}", s.transcript());
    // The relay completes the close handshake (ws 1.1.5 would otherwise wait 30 s, §10.11).
    assert_eq!(
        s.seen_with("CLOSED "),
        vec!["CLOSED 1 1000".to_owned()],
        "close handshake\n{}",
        s.transcript()
    );
    s
}

/// Checks that the listener received `msgs` (in order) on its `n`th connection.
async fn check_listener_saw(l: &mut Node, n: u32, msgs: &[Msg]) {
    for (i, m) in msgs.iter().enumerate() {
        let want = format!("MESSAGE {n} {}", m.signature());
        let got = l
            .expect(&format!("message {i} on connection {n}"), |s| {
                s.starts_with(&format!("MESSAGE {n} "))
            })
            .await;
        assert_eq!(got, want, "listener message {i}\n{}", l.transcript());
    }
}

/// Runs token.js and returns `(SR, TOKEN)`.
async fn hyco_token(args: &[&str]) -> (String, String) {
    let mut t = Node::spawn("token", "token.js", args, &[]);
    let sr = t.expect_prefix("SR ").await["SR ".len()..].to_owned();
    let token = t.expect_prefix("TOKEN ").await["TOKEN ".len()..].to_owned();
    let st = t.finish().await;
    assert!(st.success(), "token.js exit {st:?}\n{}", t.transcript());
    (sr, token)
}

// ---------------------------------------------------------------------------------------
// (a) hyco-ws listener ↔ relay ↔ hyco-ws sender

async fn hyco_to_hyco(tls: bool) {
    require_rig();
    let rig = Rig::new(tls);
    rig.create("hyco-echo", echo()).await;
    let mut l = start_listener(
        &rig,
        "hyco-echo",
        "listener",
        key_env(&rig.listen_cs("hyco-echo").await),
        1,
    )
    .await;
    let msgs = sample_messages();
    let send = key_env(&rig.send_cs("hyco-echo").await);

    send_and_check_echo(&rig, "hyco-echo", "1", &msgs, send.clone()).await;
    l.expect("CONNECTION 1", |s| s.starts_with("CONNECTION 1")).await;
    check_listener_saw(&mut l, 1, &msgs).await;
    // The sender's Close(1000) reaches the listener's rendezvous socket.
    let close = l.expect_prefix("CLOSE 1 ").await;
    assert_eq!(close, "CLOSE 1 1000", "listener close code\n{}", l.transcript());

    // A second connection over the same control channel works just as well.
    let again = vec![Msg::Text("second".into()), Msg::Binary(payload(3000, 2))];
    send_and_check_echo(&rig, "hyco-echo", "2", &again, send).await;
    check_listener_saw(&mut l, 2, &again).await;

    l.drain();
    assert!(
        l.seen_with("LISTEN_ERROR").is_empty(),
        "control channel errors\n{}",
        l.transcript()
    );
    assert!(
        l.seen_with("CONN_ERROR").is_empty(),
        "rendezvous errors\n{}",
        l.transcript()
    );
    assert_eq!(rig.listeners("hyco-echo").await, 1, "listener stayed registered");

    // The listener process dies: the relay drops it (§4.6).
    l.kill().await;
    rig.wait_listeners("hyco-echo", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_listener_and_hyco_sender_echo() {
    hyco_to_hyco(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_listener_and_hyco_sender_echo_over_tls() {
    hyco_to_hyco(true).await;
}

/// A subprotocol offered by the sender is chosen by hyco-ws (first entry) and echoed on
/// both legs (hc-protocol.md §10.13); ws 1.1.5 fails the handshake otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_subprotocol_reaches_both_sides() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("proto", echo()).await;
    let mut l = start_listener(&rig, "proto", "listener", key_env(&rig.listen_cs("proto").await), 1).await;
    let msgs = vec![Msg::Text("with protocol".into())];
    let mut extra = key_env(&rig.send_cs("proto").await);
    extra.push(("HC_PROTOCOL", "chat".into()));
    let s = send_and_check_echo(&rig, "proto", "p", &msgs, extra).await;
    assert_eq!(
        s.seen_with("OPEN "),
        vec!["OPEN 1 protocol=chat extensions=".to_owned()],
        "{}",
        s.transcript()
    );
    let open = l.expect_prefix("OPEN 1 ").await;
    assert!(
        open.starts_with("OPEN 1 protocol=chat extensions= "),
        "{}",
        l.transcript()
    );
}

// ---------------------------------------------------------------------------------------
// (b) hyco-ws sender → relay → our hcm → TCP echo

async fn hyco_sender_to_hcm(tls: bool) {
    require_rig();
    let rig = Rig::new(tls);
    rig.create("tcp-echo", echo()).await;
    let hcm = rig.hcm(&rig.listen_cs("tcp-echo").await);
    rig.wait_listeners("tcp-echo", 1).await;
    let send = key_env(&rig.send_cs("tcp-echo").await);

    for (tag, msgs) in [
        ("b1", vec![Msg::Binary(b"ping over tcp".to_vec())]),
        (
            "b2",
            vec![
                Msg::Binary((0..=255u8).collect()),
                Msg::Binary(payload(65_537, 3)),
                Msg::Binary(payload(1 << 20, 4)),
                Msg::Binary(vec![0xff; 10]),
            ],
        ),
    ] {
        let all: Vec<u8> = msgs.iter().flat_map(|m| m.bytes().to_vec()).collect();
        let mut envs = tls_env(&rig);
        envs.push(("HC_SEND_URI", send_uri(&rig, "tcp-echo")));
        envs.push(("HC_COLLECT", "bytes".into()));
        envs.push(messages_env(&rig, tag, &msgs));
        envs.extend(send.clone());
        let mut s = Node::spawn(&format!("sender-{tag}"), "sender.js", &[], &envs);
        s.expect_prefix("OPEN 1 ").await;
        let got = s.expect_prefix("RECV_BYTES 1 ").await;
        assert_eq!(
            got,
            format!("RECV_BYTES 1 {} {}", all.len(), sha256_hex(&all)),
            "bytes through hcm/TCP echo differ\n{}",
            s.transcript()
        );
        let st = s.finish().await;
        assert!(st.success(), "sender exit {st:?}\n{}", s.transcript());
        assert_eq!(
            s.seen_with("CLOSED "),
            vec!["CLOSED 1 1000".to_owned()],
            "{}",
            s.transcript()
        );
    }
    drop(hcm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_sender_through_hcm_to_tcp_echo() {
    hyco_sender_to_hcm(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_sender_through_hcm_to_tcp_echo_over_tls() {
    hyco_sender_to_hcm(true).await;
}

// ---------------------------------------------------------------------------------------
// (c) our bridge → relay → hyco-ws echo listener

async fn bridge_to_hyco(tls: bool) {
    require_rig();
    let rig = Rig::new(tls);
    rig.create("to-node", echo()).await;
    let mut l = start_listener(&rig, "to-node", "listener", key_env(&rig.listen_cs("to-node").await), 1).await;
    let bridge = rig.bridge("to-node", &rig.send_cs("to-node").await);
    let addr = bridge.addr_of("to-node").unwrap();

    // Write, read exactly as many bytes back, then close: independent of half-close.
    for (i, len) in [1usize, 1000, 65_537, 1 << 20].into_iter().enumerate() {
        let data = payload(len, 100 + i as u64);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.split();
        let mut back = vec![0u8; len];
        let (wr, rd) = tokio::time::timeout(STEP, async {
            tokio::join!(w.write_all(&data), r.read_exact(&mut back))
        })
        .await
        .unwrap_or_else(|_| panic!("echo of {len} bytes through hyco-ws timed out\n{}", l.transcript()));
        wr.unwrap();
        rd.unwrap_or_else(|e| panic!("reading the echo of {len} bytes: {e}\n{}", l.transcript()));
        assert!(back == data, "bytes differ for {len}\n{}", l.transcript());
    }

    // Half-close: everything written before EOF comes back, then EOF.
    for (i, len) in [0usize, 7, 200_000].into_iter().enumerate() {
        let data = payload(len, 200 + i as u64);
        let back = round_trip(addr, &data)
            .await
            .unwrap_or_else(|e| panic!("round trip of {len} bytes: {e}\n{}", l.transcript()));
        assert_eq!(back.len(), data.len(), "length for {len}");
        assert!(back == data, "bytes differ for {len}");
    }

    l.drain();
    assert!(
        l.seen_with("MESSAGE ")
            .iter()
            .all(|m| m.split(' ').nth(2) == Some("binary")),
        "the bridge sends binary messages only\n{}",
        l.transcript()
    );
    assert!(
        l.seen_with("CONN_ERROR").is_empty(),
        "rendezvous errors\n{}",
        l.transcript()
    );
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_hyco_listener_echo() {
    bridge_to_hyco(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_hyco_listener_echo_over_tls() {
    bridge_to_hyco(true).await;
}

// ---------------------------------------------------------------------------------------
// (d) tokens from hyco-ws's createRelayToken

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_tokens_are_accepted_and_wrong_keys_refused() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("tok", echo()).await;
    let port = rig.relay.local_addr().port().to_string();
    let (lname, lkey) = key_of(&rig.listen_cs("tok").await);
    let (sname, skey) = key_of(&rig.send_cs("tok").await);
    let (rname, rkey) = key_of(&rig.relay.manage_connection_string());
    let ok = vec![Msg::Text("token ok".into()), Msg::Binary(vec![1, 2, 3])];

    // Entity-scoped, the package's own URI helper: sr = http://127.0.0.1:443/tok.
    let (sr, token) = hyco_token(&[
        "--ns",
        "127.0.0.1",
        "--path",
        "tok",
        "--key-name",
        &lname,
        "--key",
        &lkey,
    ])
    .await;
    assert_eq!(sr, "http://127.0.0.1:443/tok");
    let mut l1 = start_listener(&rig, "tok", "listener-entity", vec![("HC_TOKEN", token)], 1).await;

    // Entity-scoped for the real address: sr = http://127.0.0.1:PORT/tok.
    let uri = send_uri(&rig, "tok");
    let (sr, token) = hyco_token(&["--uri", &uri, "--key-name", &sname, "--key", &skey]).await;
    assert_eq!(sr, format!("http://127.0.0.1:{port}/tok"));
    send_and_check_echo(&rig, "tok", "entity", &ok, vec![("HC_TOKEN", token)]).await;

    // The same in the sb-hc-token query parameter (appendRelayToken).
    send_and_check_echo(
        &rig,
        "tok",
        "query",
        &ok,
        vec![
            ("HC_KEY_NAME", sname.clone()),
            ("HC_KEY", skey.clone()),
            ("HC_TOKEN_IN_QUERY", "1".into()),
        ],
    )
    .await;

    // Namespace-wide (README style `createRelayToken('http://' + ns, …)`) with the root key,
    // for a second listener and for a sender.
    let (sr, ns_token) = hyco_token(&["--uri", "http://127.0.0.1", "--key-name", &rname, "--key", &rkey]).await;
    assert_eq!(sr, "http://127.0.0.1/");
    let mut l2 = start_listener(
        &rig,
        "tok",
        "listener-namespace",
        vec![("HC_TOKEN", ns_token.clone())],
        2,
    )
    .await;
    send_and_check_echo(&rig, "tok", "namespace", &ok, vec![("HC_TOKEN", ns_token)]).await;
    // Namespace-wide with the port: sr = http://127.0.0.1:PORT/.
    let (sr, token) = hyco_token(&[
        "--uri",
        &format!("http://127.0.0.1:{port}"),
        "--key-name",
        &rname,
        "--key",
        &rkey,
    ])
    .await;
    assert_eq!(sr, format!("http://127.0.0.1:{port}/"));
    send_and_check_echo(&rig, "tok", "namespace-port", &ok, vec![("HC_TOKEN", token)]).await;

    // Each connection went to one of the two listeners.
    l1.drain();
    l2.drain();
    let served = l1.seen_with("CONNECTION ").len() + l2.seen_with("CONNECTION ").len();
    assert_eq!(served, 4, "\n{}\n{}", l1.transcript(), l2.transcript());

    // Wrong key, right key name: 401 for a sender…
    let wrong = B64.encode(payload(32, 99));
    assert_ne!(wrong, skey);
    let (_, bad) = hyco_token(&["--uri", &uri, "--key-name", &sname, "--key", &wrong]).await;
    let refused = refused_sender(&rig, "tok", "wrong-key", vec![("HC_TOKEN", bad)]).await;
    assert!(refused.starts_with("HTTP_STATUS 1 401 "), "wrong key: {refused}");

    // …and for a listener (hyco-ws surfaces it as an error on the server).
    let mut envs = vec![
        ("HC_LISTEN_URI", listen_uri(&rig, "tok")),
        ("HC_KEY_NAME", lname.clone()),
        ("HC_KEY", wrong.clone()),
        ("HC_EXIT_ON_ERROR", "1".into()),
    ];
    envs.extend(tls_env(&rig));
    let mut bad_l = Node::spawn("listener-wrong-key", "listener.js", &[], &envs);
    let err = bad_l.expect_prefix("LISTEN_ERROR ").await;
    assert_eq!(
        err,
        "LISTEN_ERROR unexpected server response (401)",
        "{}",
        bad_l.transcript()
    );
    let st = bad_l.finish().await;
    assert_eq!(st.code(), Some(3), "{}", bad_l.transcript());
    assert!(bad_l.seen_with("LISTENING").is_empty(), "{}", bad_l.transcript());

    // Expired (createRelayToken with a negative lifetime): 401.
    let (_, expired) = hyco_token(&["--uri", &uri, "--key-name", &sname, "--key", &skey, "--ttl", "-120"]).await;
    let refused = refused_sender(&rig, "tok", "expired", vec![("HC_TOKEN", expired)]).await;
    assert!(refused.starts_with("HTTP_STATUS 1 401 "), "expired token: {refused}");

    // A Send-only rule cannot listen: 403.
    let mut envs = vec![
        ("HC_LISTEN_URI", listen_uri(&rig, "tok")),
        ("HC_KEY_NAME", sname.clone()),
        ("HC_KEY", skey.clone()),
        ("HC_EXIT_ON_ERROR", "1".into()),
    ];
    envs.extend(tls_env(&rig));
    let mut send_l = Node::spawn("listener-send-rule", "listener.js", &[], &envs);
    let err = send_l.expect_prefix("LISTEN_ERROR ").await;
    assert_eq!(
        err,
        "LISTEN_ERROR unexpected server response (403)",
        "{}",
        send_l.transcript()
    );
    send_l.finish().await;

    // Still two listeners, and the good ones still work.
    assert_eq!(rig.listeners("tok").await, 2);
    send_and_check_echo(&rig, "tok", "after", &ok, key_env(&rig.send_cs("tok").await)).await;
}

/// Runs a sender that must be refused; returns its `HTTP_STATUS …` line.
async fn refused_sender(rig: &Rig, entity: &str, tag: &str, extra: Vec<(&'static str, String)>) -> String {
    let mut envs = tls_env(rig);
    envs.push(("HC_SEND_URI", send_uri(rig, entity)));
    envs.push(("HC_MESSAGES", "[]".into()));
    envs.extend(extra);
    let mut s = Node::spawn(&format!("sender-{tag}"), "sender.js", &[], &envs);
    let line = s
        .expect("HTTP_STATUS or OPEN", |l| {
            l.starts_with("HTTP_STATUS ") || l.starts_with("OPEN ")
        })
        .await;
    assert!(
        line.starts_with("HTTP_STATUS "),
        "{tag}: the relay accepted the sender\n{}",
        s.transcript()
    );
    let st = s.finish().await;
    assert_eq!(st.code(), Some(3), "{}", s.transcript());
    line
}

// ---------------------------------------------------------------------------------------
// More of what hyco-ws needs (hc-protocol.md §10)

/// Eight connections opened in the same tick: ws 1.1.5 derives Sec-WebSocket-Key from
/// the millisecond clock, so the senders (and the listener's rendezvous sockets) share
/// keys (§11). The relay must not use the key as an identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hyco_senders_with_identical_keys() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("many", echo()).await;
    let mut l = start_listener(&rig, "many", "listener", key_env(&rig.listen_cs("many").await), 1).await;
    let msgs = vec![
        Msg::Text("parallel".into()),
        Msg::Binary(payload(50_000, 5)),
        Msg::Text("end".into()),
    ];
    const N: usize = 8;
    let mut envs = tls_env(&rig);
    envs.push(("HC_SEND_URI", send_uri(&rig, "many")));
    envs.push(("HC_CONNECTIONS", N.to_string()));
    envs.push(messages_env(&rig, "many", &msgs));
    envs.extend(key_env(&rig.send_cs("many").await));
    let mut s = Node::spawn("sender-many", "sender.js", &[], &envs);
    s.expect("DONE", |l| l == "DONE").await;
    let st = s.finish().await;
    assert!(st.success(), "sender exit {st:?}\n{}", s.transcript());
    assert_eq!(s.seen_with("COMPLETE ").len(), N, "{}", s.transcript());
    let mut closed = s.seen_with("CLOSED ");
    closed.sort();
    let want: Vec<String> = (1..=N).map(|c| format!("CLOSED {c} 1000")).collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(closed, want_sorted, "{}", s.transcript());
    // Every echo matched its own connection (sender.js checks order and content).
    for c in 1..=N {
        let recv = s.seen_with(&format!("RECV {c} "));
        let expect: Vec<String> = msgs.iter().map(|m| format!("RECV {c} {}", m.signature())).collect();
        assert_eq!(recv, expect, "connection {c}\n{}", s.transcript());
    }
    // The listener served N separate rendezvous connections, each with all messages.
    let end = tokio::time::Instant::now() + STEP;
    while l.seen_with("MESSAGE ").len() < N * msgs.len() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        l.drain();
    }
    for n in 1..=N {
        let got: Vec<String> = l.seen_with(&format!("MESSAGE {n} "));
        let expect: Vec<String> = msgs.iter().map(|m| format!("MESSAGE {n} {}", m.signature())).collect();
        assert_eq!(got, expect, "listener connection {n}\n{}", l.transcript());
    }
}

/// A sender path suffix and application query reach the listener in the accept address
/// (`/$hc/{entity}/{suffix}?{sender query}&sb-hc-…`, §5.2) and the connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_suffix_and_query_reach_hyco_listener() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("sfx", echo()).await;
    let mut l = start_listener(&rig, "sfx", "listener", key_env(&rig.listen_cs("sfx").await), 1).await;
    let msgs = vec![Msg::Text("suffix".into())];
    let uri = format!(
        "{}/$hc/sfx/api/v1?app=1&other=x%20y&sb-hc-action=connect",
        base_url(&rig)
    );
    let mut envs = tls_env(&rig);
    envs.push(("HC_SEND_URI", uri));
    envs.push(messages_env(&rig, "sfx", &msgs));
    envs.extend(key_env(&rig.send_cs("sfx").await));
    let mut s = Node::spawn("sender-sfx", "sender.js", &[], &envs);
    s.expect("DONE", |l| l == "DONE").await;
    assert!(s.finish().await.success(), "{}", s.transcript());
    assert_eq!(s.seen_with("RECV 1 "), vec![format!("RECV 1 {}", msgs[0].signature())]);
    let open = l.expect_prefix("OPEN 1 ").await;
    assert_eq!(
        open,
        "OPEN 1 protocol= extensions= target=/$hc/sfx/api/v1?app=1&other=x%20y",
        "accept address as the listener sees it\n{}",
        l.transcript()
    );
}

/// Refusals a hyco-ws sender sees as HTTP statuses (§5.1, §7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_sender_refusals() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("lonely", echo()).await;
    let send = key_env(&rig.send_cs("lonely").await);
    let root = key_env(&rig.relay.manage_connection_string());

    // No listener connected.
    let line = refused_sender(&rig, "lonely", "no-listener", send.clone()).await;
    assert!(line.starts_with("HTTP_STATUS 1 404 "), "no listener: {line}");
    // Unknown entity (namespace key, so only the entity lookup can fail).
    let line = refused_sender(&rig, "nosuch", "unknown", root).await;
    assert!(line.starts_with("HTTP_STATUS 1 404 "), "unknown entity: {line}");
    // No token at all.
    let line = refused_sender(&rig, "lonely", "no-token", vec![]).await;
    assert!(line.starts_with("HTTP_STATUS 1 401 "), "no token: {line}");
}

/// A close by the hyco-ws listener reaches the hyco-ws sender with its code (§5.5), and a
/// listener that drops TCP without a Close makes the relay close the sender with 1001.
/// Both promptly: ws 1.1.5 only reports `close` once the relay has closed the TCP
/// connection (§10.11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_cross_the_relay() {
    require_rig();
    let rig = Rig::new(false);
    rig.create("closing", echo()).await;
    let mut l = start_listener(&rig, "closing", "listener", key_env(&rig.listen_cs("closing").await), 1).await;
    let send = key_env(&rig.send_cs("closing").await);

    for (n, (tag, command, want_code)) in [("close", "__close__ 4001", 4001u16), ("drop", "__drop__", 1001)]
        .into_iter()
        .enumerate()
    {
        let n = n + 1;
        let first = Msg::Text(format!("before {tag}"));
        let msgs = vec![first.clone(), Msg::Text(command.into())];
        let mut envs = tls_env(&rig);
        envs.push(("HC_SEND_URI", send_uri(&rig, "closing")));
        envs.push(("HC_EXPECT_PEER_CLOSE", "1".into()));
        envs.push(messages_env(&rig, tag, &msgs));
        envs.extend(send.clone());
        let mut s = Node::spawn(&format!("sender-{tag}"), "sender.js", &[], &envs);
        let recv = s.expect_prefix("RECV 1 ").await;
        assert_eq!(recv, format!("RECV 1 {}", first.signature()), "{}", s.transcript());
        let t0 = tokio::time::Instant::now();
        let closed = s.expect_prefix("PEER_CLOSE 1 ").await;
        let took = t0.elapsed();
        let code: Option<u16> = closed.split(' ').nth(2).and_then(|c| c.parse().ok());
        assert_eq!(
            code,
            Some(want_code),
            "{tag}: close code at the sender\n{}",
            s.transcript()
        );
        if tag == "close" {
            assert_eq!(
                closed,
                "PEER_CLOSE 1 4001 requested by sender",
                "close reason\n{}",
                s.transcript()
            );
        }
        assert!(
            took < Duration::from_secs(5),
            "{tag}: the sender saw the close only after {took:?}"
        );
        let st = s.finish().await;
        assert!(st.success(), "sender exit {st:?}\n{}", s.transcript());
        if tag == "close" {
            // The sender's answering Close goes back to the listener.
            let c = l.expect_prefix(&format!("CLOSE {n} ")).await;
            assert_eq!(c, format!("CLOSE {n} 4001"), "{}", l.transcript());
        }
    }
    // The control channel is unaffected.
    assert_eq!(rig.listeners("closing").await, 1);
}
