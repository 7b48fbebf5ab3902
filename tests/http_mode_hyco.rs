//! Microsoft's `hyco-https@1.4.5` listener (tests/node/https_listener.js) behind our relay,
//! with hyper and curl senders (hc-protocol.md §6, §10 items 17–21).
//!
//! Needs the Node rig: run `scripts/setup-node.sh` once. Without it these tests fail and
//! say so.

mod common;
mod http_mode_client;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use http_mode_client::{Body, Sender};
use tokio::io::{AsyncBufReadExt, BufReader};

const STEP: Duration = Duration::from_secs(30);

fn rig_dir() -> PathBuf {
    match std::env::var_os("HYRELAY_NODE_RIG") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("node-rig"),
    }
}

/// The hyco-https listener process; killed when dropped.
struct Listener {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Listener {
    /// Starts the listener on `hc` and waits until the relay counts `expect` listeners.
    async fn start(rig: &Rig, hc: &str, expect: u64) -> Listener {
        let rig_dir = rig_dir();
        assert!(
            rig_dir
                .join("node_modules/hyco-https/node_modules/ws/package.json")
                .is_file(),
            "the hyco-https Node rig is not installed: run scripts/setup-node.sh"
        );
        let (name, key) = match &rig.listen_cs(hc).await.credential {
            hyrelay::proto::connstr::Credential::Key { name, key } => (name.clone(), key.expose().to_owned()),
            other => panic!("{other:?}"),
        };
        let uri = format!(
            "ws://127.0.0.1:{}/$hc/{hc}?sb-hc-action=listen",
            rig.relay.local_addr().port()
        );
        let mut child = tokio::process::Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/https_listener.js"))
            .env("HYRELAY_NODE_RIG", &rig_dir)
            .env("HC_LISTEN_URI", uri)
            .env("HC_KEY_NAME", name)
            .env("HC_KEY", key)
            .env("HC_TIMEOUT_MS", "120000")
            .env("NODE_NO_WARNINGS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start node");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut l = Listener { child, lines };
        l.expect("LISTENING").await;
        rig.wait_listeners(hc, expect).await;
        l
    }

    async fn expect(&mut self, prefix: &str) -> String {
        let end = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(end, self.lines.recv()).await {
                Ok(Some(l)) if l.starts_with(prefix) => return l,
                Ok(Some(_)) => {}
                other => panic!("no {prefix} from the hyco-https listener: {other:?}"),
            }
        }
    }
}

/// What https_listener.js sends for `size/N`.
fn sized(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + 7) & 255) as u8).collect()
}

async fn setup(hc: &str) -> (Rig, Listener, String) {
    setup_with(hc, 64 * 1024).await
}

async fn setup_with(hc: &str, inline_max: usize) -> (Rig, Listener, String) {
    let rig = Rig::with(false, |c| {
        c.http.response_timeout = Duration::from_secs(3);
        c.http.inline_max = inline_max;
        c.runtime.admin = Some("127.0.0.1:0".parse().unwrap());
    });
    rig.create(hc, echo()).await;
    let l = Listener::start(&rig, hc, 1).await;
    let tok = hyrelay::client::token(&rig.send_cs(hc).await, hc, Duration::from_secs(600));
    (rig, l, tok)
}

const SIZES: [usize; 5] = [0, 1024, 65_535, 65_537, 10 << 20];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_body_matrix_with_a_hyper_sender() {
    let (rig, _l, tok) = setup("hyco").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    for (i, len) in SIZES.into_iter().enumerate() {
        let data = payload(len, 70 + i as u64);
        for chunked in [false, true] {
            let body = if chunked {
                Body::Chunked(data.clone())
            } else {
                Body::Bytes(data.clone())
            };
            let g = s.send("POST", "/hyco/echo?x=1&sb-hc-id=7", &auth, body).await;
            assert_eq!(g.status, 200, "{len} chunked={chunked}: {}", g.reason);
            assert_eq!(
                g.h("x-got-len"),
                len.to_string(),
                "listener got {len} (chunked={chunked})"
            );
            assert_eq!(g.h("x-got-sha256"), sha256_hex(&data), "listener's bytes for {len}");
            assert_eq!(g.body.len(), len, "echo length {len}");
            assert!(g.body[..] == data[..], "echo bytes {len}");
            assert_eq!(g.h("x-got-url"), "/hyco/echo?x=1", "requestTarget without sb-hc-*");
            assert!(g.h("x-got-via").starts_with("1.1 "), "Via to the listener");
            assert!(!g.h("via").is_empty(), "Via to the sender");
        }
        let g = s
            .send("GET", &format!("/hyco/size/{len}"), &auth, Body::Bytes(vec![]))
            .await;
        assert_eq!(g.status, 200);
        assert_eq!(g.body.len(), len, "GET size {len}");
        assert!(g.body[..] == sized(len)[..], "GET bytes {len}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_body_matrix_with_curl() {
    let (rig, _l, tok) = setup("curl").await;
    let dir = tempfile::tempdir().unwrap();
    let port = rig.relay.local_addr().port();
    for (i, len) in SIZES.into_iter().enumerate() {
        let data = payload(len, 90 + i as u64);
        let input = dir.path().join(format!("in-{len}"));
        std::fs::write(&input, &data).unwrap();
        let output = dir.path().join(format!("out-{len}"));
        let url = format!("http://127.0.0.1:{port}/curl/echo");
        let code = curl(
            &["-X", "POST", "--data-binary", &format!("@{}", input.display())],
            &tok,
            &url,
            &output,
        )
        .await;
        assert_eq!(code, "200", "curl POST {len}");
        assert!(std::fs::read(&output).unwrap() == data, "curl echo bytes {len}");
        let url = format!("http://127.0.0.1:{port}/curl/size/{len}");
        let code = curl(&[], &tok, &url, &output).await;
        assert_eq!(code, "200", "curl GET {len}");
        assert!(std::fs::read(&output).unwrap() == sized(len), "curl GET bytes {len}");
    }
}

/// Runs curl (bounded); returns the status code it printed.
async fn curl(args: &[&str], tok: &str, url: &str, out: &Path) -> String {
    let o = tokio::time::timeout(
        STEP,
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "60", "-o"])
            .arg(out)
            .args(["-w", "%{http_code}", "-H"])
            .arg(format!("ServiceBusAuthorization: {tok}"))
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl timed out")
    .expect("curl runs");
    assert!(
        o.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_statuses_heads_and_streams() {
    let (rig, _l, tok) = setup("misc").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let g = s.send("POST", "/misc/desc", &auth, Body::Bytes(b"x".to_vec())).await;
    assert_eq!(
        (g.status, g.reason.as_str(), &g.body[..]),
        (201, "Made Here", &b"made"[..])
    );
    // hyco-https sends a stray empty binary message after a body-less response (§4.3).
    for _ in 0..3 {
        let g = s.send("GET", "/misc/status/204", &auth, Body::Bytes(vec![])).await;
        assert_eq!((g.status, g.body.len()), (204, 0));
    }
    let g = s.send("HEAD", "/misc/size/100", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (200, 0));
    // A response written in parts (one fragmented message on the control channel).
    let g = s.send("GET", "/misc/parts", &auth, Body::Bytes(vec![])).await;
    assert_eq!(&g.body[..], b"part1,part2,part3");
    // Listener statuses pass through, even 502 and 504 (Via tells them apart).
    for code in [404u16, 502, 504] {
        let g = s
            .send("GET", &format!("/misc/status/{code}"), &auth, Body::Bytes(vec![]))
            .await;
        assert_eq!(g.status, code);
        assert!(!g.h("via").is_empty(), "{code} from the listener carries Via");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_hundred_parallel_requests() {
    let (rig, _l, tok) = setup("many").await;
    // Every fifth one over 64 KiB: inline and rendezvous at once, out of order.
    let len = |i: usize| if i.is_multiple_of(5) { 70_000 + i } else { 10 * i };
    http_mode_client::parallel_echoes(rig.relay.local_addr(), "many", &tok, 100, len).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_slow_then_killed_listener() {
    let (rig, mut l, tok) = setup("dying").await;
    let addr = rig.relay.local_addr();
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let mut s = Sender::connect(addr).await;
    let g = s.send("GET", "/dying/slow", &auth, Body::Bytes(vec![])).await;
    assert_eq!(g.status, 504, "{}", g.reason);
    // Killed while a request waits: 502 without waiting for the deadline.
    let tok2 = tok.clone();
    let waiting = tokio::spawn(async move {
        let mut s = Sender::connect(addr).await;
        let t0 = std::time::Instant::now();
        let g = s
            .send(
                "GET",
                "/dying/slow",
                &[("ServiceBusAuthorization", &tok2)],
                Body::Bytes(vec![]),
            )
            .await;
        (g.status, t0.elapsed())
    });
    l.expect("REQUEST GET /dying/slow").await;
    l.expect("REQUEST GET /dying/slow").await;
    l.child.kill().await.unwrap();
    let (status, took) = waiting.await.unwrap();
    assert_eq!(status, 502);
    assert!(took < Duration::from_secs(3), "502 only after {took:?}");
    rig.wait_listeners("dying", 0).await;
    // The relay is fine afterwards.
    let _l2 = Listener::start(&rig, "dying", 1).await;
    let g = s
        .send("POST", "/dying/echo", &auth, Body::Bytes(b"again".to_vec()))
        .await;
    assert_eq!((g.status, &g.body[..]), (200, &b"again"[..]));
}

/// hyco-https serves rendezvous-only requests for small and empty bodies too (the form a
/// listener gets from another relay node in a cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_takes_every_request_from_a_rendezvous() {
    let (rig, _l, tok) = setup_with("rv", 0).await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    for len in [0usize, 1024, 70_000] {
        let data = payload(len, 6);
        let g = s.send("POST", "/rv/echo", &auth, Body::Bytes(data.clone())).await;
        assert_eq!((g.status, g.body.len()), (200, len), "{}", g.reason);
        assert!(g.body[..] == data[..]);
        let g = s
            .send("GET", &format!("/rv/size/{len}"), &auth, Body::Bytes(vec![]))
            .await;
        assert!(g.status == 200 && g.body[..] == sized(len)[..], "GET {len}");
    }
    let g = s.send("GET", "/rv/status/204", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (204, 0));
}

/// The relay counter `hyrelay_relay_http_rendezvous_total{hc,how}` on the rig's admin
/// listener (0 if unset).
async fn rendezvous_count(rig: &Rig, hc: &str, how: &str) -> u64 {
    let mut s = Sender::connect(rig.relay.admin_addr().unwrap()).await;
    let g = s.send("GET", "/metrics", &[], Body::Bytes(vec![])).await;
    let key = format!("hyrelay_relay_http_rendezvous_total{{hc=\"{hc}\",how=\"{how}\"}} ");
    String::from_utf8_lossy(&g.body)
        .lines()
        .find_map(|l| l.strip_prefix(&key).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// hyco-https reads further requests on a rendezvous the relay pushed a request on: after
/// a 70 kB POST (pushed), the same sender connection's next requests travel on that
/// rendezvous, byte-exact, large responses included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyco_https_answers_several_requests_on_one_rendezvous() {
    let (rig, _l, tok) = setup("again").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let big = payload(70_000, 8);
    let g = s.send("POST", "/again/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    let small = payload(2000, 9);
    let g = s.send("POST", "/again/echo", &auth, Body::Bytes(small.clone())).await;
    assert!(g.status == 200 && g.body[..] == small[..], "{}", g.reason);
    let g = s.send("GET", "/again/size/100000", &auth, Body::Bytes(vec![])).await;
    assert!(g.status == 200 && g.body[..] == sized(100_000)[..], "{}", g.reason);
    let g = s.send("GET", "/again/status/204", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (204, 0));
    let g = s.send("GET", "/again/size/10", &auth, Body::Bytes(vec![])).await;
    assert!(g.status == 200 && g.body[..] == sized(10)[..], "{}", g.reason);
    assert_eq!(
        (
            rendezvous_count(&rig, "again", "opened").await,
            rendezvous_count(&rig, "again", "reused").await
        ),
        (1, 4),
        "one rendezvous carried all five requests"
    );
}
