//! HTTP request/response mode (hc-protocol.md §6): plain HTTP senders → relay → our hcm →
//! a local HTTP server, and the relay's own answers (no listener, auth, deadlines, a
//! listener that dies) with a listener driven by the test.

mod common;
mod http_mode_client;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use http_mode_client::{Body, Sender};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyrelay::proto::connstr::ConnectionString;

// ---------------------------------------------------------------------------------------
// A local HTTP server (the endpoint) that reports what it received.

/// Starts the endpoint; returns its address.
///
/// - `/echo…`: 200, the request body back; `x-got-*` headers say what arrived.
/// - `/size/N`: N bytes of `payload(N, 9)`.
/// - `/status/N`: status N, no body.
fn endpoint() -> SocketAddr {
    serve_on_thread(|s, id| async move {
        let svc = hyper::service::service_fn(move |req| serve_endpoint(req, id));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
}

async fn serve_endpoint(req: Request<Incoming>, conn: usize) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let names: Vec<String> = parts.headers.keys().map(|k| k.as_str().to_owned()).collect();
    let got = |n: &str| {
        parts
            .headers
            .get(n)
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let chunked = got("transfer-encoding").contains("chunked");
    let data = body.collect().await?.to_bytes();
    let mut resp = if let Some(n) = path.strip_prefix("/size/") {
        Response::new(Full::new(Bytes::from(payload(n.parse().unwrap(), 9))))
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = code.parse::<u16>().unwrap().try_into().unwrap();
        r
    } else {
        Response::new(Full::new(data.clone()))
    };
    let h = resp.headers_mut();
    for (k, v) in [
        ("x-got-method", parts.method.to_string()),
        ("x-got-target", parts.uri.to_string()),
        ("x-got-host", got("host")),
        ("x-got-xff", got("x-forwarded-for")),
        ("x-got-forwarded", got("forwarded")),
        ("x-got-via", got("via")),
        ("x-got-headers", names.join(",")),
        ("x-got-len", data.len().to_string()),
        ("x-got-chunked", chunked.to_string()),
        ("x-conn", conn.to_string()),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    Ok(resp)
}

fn token(cs: &ConnectionString, hc: &str) -> String {
    hyrelay::client::token(cs, hc, Duration::from_secs(600))
}

/// A relay, an endpoint, an hcm serving `hc` for it; a sender token.
async fn published(hc: &str) -> (Rig, hyrelay::hcm::HcmHandle, String, SocketAddr) {
    published_with(hc, |_| {}).await
}

async fn published_with(
    hc: &str,
    tweak: impl FnOnce(&mut hyrelay::relay::config::RelayConfig),
) -> (Rig, hyrelay::hcm::HcmHandle, String, SocketAddr) {
    let rig = Rig::with(false, tweak);
    let ep = endpoint();
    rig.create(hc, ep).await;
    let hcm = rig.hcm(&rig.listen_cs(hc).await);
    rig.wait_listeners(hc, 1).await;
    let tok = token(&rig.send_cs(hc).await, hc);
    (rig, hcm, tok, ep)
}

/// As [`published`], with an admin listener on relay and hcm (metrics, status pages).
async fn published_with_admin(hc: &str) -> (Rig, hyrelay::hcm::HcmHandle, String) {
    published_with_admin_and(hc, |_| {}).await
}

/// [`published_with_admin`] with `tweak` applied to the hcm's configuration.
async fn published_with_admin_and(
    hc: &str,
    tweak: impl FnOnce(&mut hyrelay::hcm::config::HcmConfig),
) -> (Rig, hyrelay::hcm::HcmHandle, String) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let rig = Rig::with(false, |c| c.runtime.admin = Some(any));
    rig.create(hc, endpoint()).await;
    let mut cfg = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs(hc).await, None).unwrap(),
    ]);
    cfg.runtime.admin = Some(any);
    tweak(&mut cfg);
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners(hc, 1).await;
    let tok = token(&rig.send_cs(hc).await, hc);
    (rig, hcm, tok)
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_size_matrix_both_ways_through_relay_and_hcm() {
    let (rig, _hcm, tok, _) = published("api").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    for (i, len) in [0usize, 1024, 65_535, 65_536, 65_537, 10 << 20].into_iter().enumerate() {
        let data = payload(len, 50 + i as u64);
        // Request body of `len` echoed back: both directions at once.
        let g = s.send("POST", "/api/echo", &auth, Body::Bytes(data.clone())).await;
        assert_eq!(g.status, 200, "{len}: {}", String::from_utf8_lossy(&g.body));
        assert_eq!(g.h("x-got-len"), len.to_string(), "endpoint got {len}");
        assert_eq!(g.body.len(), len, "echo length for {len}");
        assert!(g.body[..] == data[..], "echo bytes for {len}");
        // Response of `len` to a GET.
        let g = s
            .send("GET", &format!("/api/size/{len}"), &auth, Body::Bytes(vec![]))
            .await;
        assert_eq!(g.status, 200);
        assert!(g.body[..] == payload(len, 9)[..], "GET of {len}");
        // Chunked request body of unknown size.
        let g = s.send("PUT", "/api/echo", &auth, Body::Chunked(data.clone())).await;
        assert_eq!((g.status, g.body.len()), (200, len), "chunked {len}");
        assert!(g.body[..] == data[..], "chunked echo bytes for {len}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_endpoint_and_the_sender_see() {
    let (rig, _hcm, tok, ep) = published("shop").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let q = format!("/shop/items/7?a=1&sb-hc-token={}&b=%2f%3a&sb-hc-id=x", urlenc(&tok));
    let g = s
        .send(
            "POST",
            &q,
            &[
                ("x-app", "v"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("authorization", "Bearer app"),
            ],
            Body::Bytes(b"hi".to_vec()),
        )
        .await;
    assert_eq!(g.status, 200, "{}", String::from_utf8_lossy(&g.body));
    // The entity name is gone, sb-hc-* too, the rest of the query is byte-exact.
    assert_eq!(g.h("x-got-target"), "/items/7?a=1&b=%2f%3a");
    assert_eq!(g.h("x-got-method"), "POST");
    // The endpoint's own Host; the sender's address forwarded; Via from the relay.
    assert_eq!(g.h("x-got-host"), ep.to_string());
    assert_eq!(g.h("x-got-xff"), "127.0.0.1");
    assert_eq!(g.h("x-got-forwarded"), "for=127.0.0.1");
    assert!(g.h("x-got-via").starts_with("1.1 127.0.0.1"), "{}", g.h("x-got-via"));
    let names = g.h("x-got-headers");
    assert!(names.contains("x-app"), "{names}");
    // The token was in the query, so Authorization is the app's and passes through.
    assert!(names.contains("authorization"), "{names}");
    for gone in ["x-hop", "servicebusauthorization", "connection", "keep-alive"] {
        assert!(
            !names.split(',').any(|n| n == gone),
            "{gone} reached the endpoint: {names}"
        );
    }
    // The answer came from the listener: Via present.
    assert!(g.h("via").contains("1.1 "), "via on the response: {:?}", g.headers);

    // HEAD: headers, no body; 204: no body.
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let g = s.send("HEAD", "/shop/size/5000", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (200, 0));
    let g = s.send("GET", "/shop/status/204", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (204, 0));
    let g = s.send("GET", "/shop/status/404", &auth, Body::Bytes(vec![])).await;
    assert_eq!(g.status, 404);
    assert!(!g.h("via").is_empty(), "a listener's 404 carries Via");

    // Keep-alive: the relay connection and the endpoint connection are both reused.
    let mut conns = HashMap::new();
    for _ in 0..5 {
        let g = s.send("GET", "/shop/echo", &auth, Body::Bytes(vec![])).await;
        assert_eq!(g.status, 200);
        *conns.entry(g.h("x-conn").to_owned()).or_insert(0) += 1;
    }
    assert!(conns.len() <= 2, "endpoint connections not reused: {conns:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_requests() {
    let (rig, _hcm, tok, _) = published("par").await;
    http_mode_client::parallel_echoes(rig.relay.local_addr(), "par", &tok, 100, |i| 100 + i * 997).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_what_it_must() {
    let rig = Rig::new(false);
    rig.create("lonely", endpoint()).await;
    let addr = rig.relay.local_addr();
    let send_tok = token(&rig.send_cs("lonely").await, "lonely");
    let listen_tok = token(&rig.listen_cs("lonely").await, "lonely");
    let mut s = Sender::connect(addr).await;
    // No listener: Azure's 404 (see README, "What differs from Azure").
    let g = s
        .send(
            "GET",
            "/lonely/x",
            &[("ServiceBusAuthorization", &send_tok)],
            Body::Bytes(vec![]),
        )
        .await;
    assert_eq!(g.status, 404, "{}", g.reason);
    assert_eq!(g.reason, "There are no listeners connected for the endpoint.");
    assert!(g.headers.get("via").is_none(), "the relay's own answers carry no Via");
    // Unknown hybrid connection.
    let g = s.send("GET", "/nosuch/x", &[], Body::Bytes(vec![])).await;
    assert_eq!(g.status, 404);
    // Wrong token: 401, and the body (unread) does not turn into a reset.
    let mut s = Sender::connect(addr).await;
    let bad = send_tok.replace("sig=", "sig=AAAA");
    let g = s
        .send(
            "POST",
            "/lonely/x",
            &[("ServiceBusAuthorization", &bad)],
            Body::Bytes(payload(300_000, 1)),
        )
        .await;
    assert_eq!(g.status, 401);
    // A Listen-only token cannot send: 403.
    let mut s = Sender::connect(addr).await;
    let g = s
        .send(
            "GET",
            "/lonely/x",
            &[("ServiceBusAuthorization", &listen_tok)],
            Body::Bytes(vec![]),
        )
        .await;
    assert_eq!(g.status, 403);
    // No token at all.
    let mut s = Sender::connect(addr).await;
    let g = s.send("GET", "/lonely/x", &[], Body::Bytes(vec![])).await;
    assert_eq!(g.status, 401);
    // HEAD of a refusal: no body.
    let mut s = Sender::connect(addr).await;
    let g = s.send("HEAD", "/lonely/x", &[], Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (401, 0));
}

/// A listener driven by the test: answers nothing (504 at the deadline), or drops its
/// control channel after the request arrived (502); the relay serves on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_vanishing_listeners() {
    let rig = Rig::with(false, |c| c.http.response_timeout = Duration::from_secs(2));
    rig.create("flaky", endpoint()).await;
    let tok = token(&rig.send_cs("flaky").await, "flaky");
    let addr = rig.relay.local_addr();
    let auth = [("ServiceBusAuthorization", tok.as_str())];

    let (mut r, w) = raw_listener(&rig, "flaky").await;
    rig.wait_listeners("flaky", 1).await;
    let mut s = Sender::connect(addr).await;
    let t0 = std::time::Instant::now();
    let g = s.send("GET", "/flaky/slow", &auth, Body::Bytes(vec![])).await;
    assert_eq!(g.status, 504, "{}", g.reason);
    assert!(t0.elapsed() >= Duration::from_secs(2), "504 before the deadline");
    assert!(
        next_request(&mut r).await.http.is_some(),
        "the listener got the request"
    );

    // The listener goes away while the sender waits: 502 at once.
    let mut s2 = Sender::connect(addr).await;
    let tok2 = tok.clone();
    let pending = tokio::spawn(async move {
        s2.send(
            "GET",
            "/flaky/x",
            &[("ServiceBusAuthorization", &tok2)],
            Body::Bytes(vec![]),
        )
        .await
    });
    next_request(&mut r).await;
    drop((r, w));
    let g = pending.await.unwrap();
    assert_eq!(g.status, 502, "{}", g.reason);
    rig.wait_listeners("flaky", 0).await;

    // The relay is fine afterwards: an hcm serves the same hybrid connection.
    let _hcm = rig.hcm(&rig.listen_cs("flaky").await);
    rig.wait_listeners("flaky", 1).await;
    let g = s.send("GET", "/flaky/echo", &auth, Body::Bytes(vec![])).await;
    assert_eq!(g.status, 200);
}

async fn next_request(r: &mut RawReader) -> hyrelay::proto::control::Request {
    use hyrelay::proto::control::Command;
    next_command(r, "request", |c| match c {
        Command::Request(req) => Some(req),
        _ => None,
    })
    .await
}

fn urlenc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Sends `head` and then `body` on a fresh connection (write errors ignored, as a client
/// that streams a body does), and returns everything read back until EOF.
async fn raw_exchange(addr: SocketAddr, head: &str, body: Vec<u8>) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = head.to_owned();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(head.as_bytes()).await;
        let _ = w.write_all(&body).await;
        w
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut out)).await;
    let read = read.expect("the relay did not close the connection");
    let _w = writer.await.unwrap();
    read.unwrap_or_else(|e| {
        panic!(
            "reading the answer failed ({e}); got {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    out
}

/// Issue 12 item 6: the answer to a HEAD has no body, and a refused request whose body is
/// still on its way gets its status, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_answers_head_and_refused_bodies() {
    let rig = Rig::new(false);
    rig.create("guarded", endpoint()).await;
    let addr = rig.relay.local_addr();
    for target in ["/nosuch/x", "/guarded/x", "/$hyrelay/v1/hybrid-connections"] {
        let got = raw_exchange(
            addr,
            &format!("HEAD {target} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"),
            vec![],
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        let (head, rest) = text.split_once("\r\n\r\n").expect("a complete head");
        assert!(head.starts_with("HTTP/1.1 4"), "{target}: {head}");
        assert_eq!(rest, "", "HEAD {target}: the answer carries a body");
    }
    let body = payload(512 * 1024, 3);
    for target in ["/guarded/x", "/nosuch/x", "/$hc/guarded"] {
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: h\r\nServiceBusAuthorization: SharedAccessSignature sr=x&sig=y&se=1&skn=z\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let got = raw_exchange(addr, &head, body.clone()).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 40"), "{target}: {text:?}");
    }
}

/// curl streaming a body without `Expect` to a request the relay refuses: curl must report
/// the status, not a send failure (issue 12 item 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_the_refusal_of_a_body_it_is_still_sending() {
    for tls in [false, true] {
        curl_refused(tls).await;
    }
}

async fn curl_refused(tls: bool) {
    let rig = Rig::new(tls);
    let scheme = if tls { "https://localhost" } else { "http://127.0.0.1" };
    rig.create("guarded", endpoint()).await;
    let port = rig.relay.local_addr().port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, payload(8 << 20, 4)).unwrap();
    for target in ["guarded/x", "$hc/guarded"] {
        let o = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    "-k",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    "Expect:",
                    "--data-binary",
                ])
                .arg(format!("@{}", file.display()))
                .arg(format!("{scheme}:{port}/{target}"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let code = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && code.starts_with('4'),
            "{target}: curl exit {:?}, code {code}, {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// `hyrelay hc token NAME --send|--listen [--ttl]`: a token plain HTTP senders can use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hc_token_command_makes_working_tokens() {
    let (rig, _hcm, _, _) = published("tokapi").await;
    let data_dir = rig.cfg.data_dir.display().to_string();
    let cli = |args: Vec<String>| async move {
        let o = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
                .args(&args)
                .env_remove("HYRELAY_CONNECTION_STRING")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    };
    let local = |extra: &[&str]| {
        let mut v: Vec<String> = ["hc", "--relay-data-dir", &data_dir, "token", "tokapi"]
            .map(String::from)
            .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let send = cli(local(&["--send", "--ttl", "10m"])).await;
    let listen = cli(local(&["--listen"])).await;
    let cs = rig.send_cs("tokapi").await.expose().to_owned();
    let offline = cli(vec![
        "hc".into(),
        "--connection-string".into(),
        cs,
        "token".into(),
        "tokapi".into(),
        "--send".into(),
    ])
    .await;
    assert!(
        send.starts_with("SharedAccessSignature ") && send.contains("skn=defaultSender"),
        "{send}"
    );
    assert!(listen.contains("skn=defaultListener"), "{listen}");
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    for tok in [&send, &offline] {
        let g = s
            .send(
                "GET",
                "/tokapi/echo",
                &[("ServiceBusAuthorization", tok)],
                Body::Bytes(vec![]),
            )
            .await;
        assert_eq!(g.status, 200, "{tok}: {}", g.reason);
    }
    // The token also works as `Authorization` (§6.1), and a Listen token cannot send.
    let g = s
        .send("GET", "/tokapi/echo", &[("Authorization", &send)], Body::Bytes(vec![]))
        .await;
    assert_eq!(g.status, 200);
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let g = s
        .send(
            "GET",
            "/tokapi/echo",
            &[("ServiceBusAuthorization", &listen)],
            Body::Bytes(vec![]),
        )
        .await;
    assert_eq!(g.status, 403);
}

/// `hyrelay doctor --http PATH`: one HTTP-mode round trip, told apart by who answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_an_http_round_trip_when_asked() {
    use hyrelay::cli::doctor::{Options, Step, Verdict, run_checks};
    let (rig, hcm, _, _) = published("doc").await;
    let opts = |cs: ConnectionString, path: Option<&str>| Options {
        ca_files: rig.ca_files(),
        http_path: path.map(str::to_owned),
        ..Options::new(cs)
    };
    let http_step = |r: &[hyrelay::cli::doctor::StepResult]| r.iter().find(|s| s.step == Step::Http).cloned();
    // Not asked: no HTTP step.
    let r = run_checks(&opts(rig.send_cs("doc").await, None)).await;
    assert!(http_step(&r).is_none());
    let r = run_checks(&opts(rig.send_cs("doc").await, Some("/echo?x=1"))).await;
    let s = http_step(&r).expect("an http step");
    assert_eq!(s.verdict, Verdict::Ok, "{s}");
    assert!(s.finding.contains("200") && s.finding.contains("listener"), "{s}");
    // A Listen string cannot send: the relay refuses the token.
    let r = run_checks(&opts(rig.listen_cs("doc").await, Some("/echo"))).await;
    let s = http_step(&r).unwrap();
    assert_eq!(s.verdict, Verdict::Fail, "{s}");
    assert!(s.finding.contains("403"), "{s}");
    // The endpoint's own error status comes from the listener: a warning.
    let r = run_checks(&opts(rig.send_cs("doc").await, Some("/status/500"))).await;
    assert_eq!(http_step(&r).unwrap().verdict, Verdict::Warn);
    // No listener: the relay's 404.
    drop(hcm);
    rig.wait_listeners("doc", 0).await;
    let r = run_checks(&opts(rig.send_cs("doc").await, Some("/echo"))).await;
    let s = http_step(&r).unwrap();
    assert_eq!(s.verdict, Verdict::Fail, "{s}");
    assert!(s.finding.contains("404"), "{s}");
}

/// GET on an admin listener; the body.
async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut s = Sender::connect(addr).await;
    let g = s.send("GET", path, &[], Body::Bytes(vec![])).await;
    assert_eq!(g.status, 200, "{path}");
    String::from_utf8(g.body.to_vec()).unwrap()
}

/// The status pages and metrics of relay and hcm count HTTP-mode requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_and_metrics_count_http_requests() {
    let (rig, hcm, tok) = published_with_admin("seen").await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    assert_eq!(
        s.send("GET", "/seen/echo", &auth, Body::Bytes(vec![])).await.status,
        200
    );
    assert_eq!(
        s.send("GET", "/seen/status/503", &auth, Body::Bytes(vec![]))
            .await
            .status,
        503
    );
    let relay_admin = rig.relay.admin_addr().unwrap();
    let v: serde_json::Value = serde_json::from_str(&admin_get(relay_admin, "/status").await).unwrap();
    let hc = &v["hybridConnections"][0];
    assert_eq!(hc["httpRequests"]["total"], 2, "{hc}");
    assert_eq!(hc["httpRequests"]["answeredByRelay"], 0, "{hc}");
    assert_eq!(hc["httpRequests"]["last"]["status"], 503, "{hc}");
    let page = admin_get(relay_admin, "/").await;
    assert!(page.contains("HTTP requests") && page.contains("last 503"), "{page}");
    let metrics = admin_get(relay_admin, "/metrics").await;
    assert!(
        metrics.contains("hyrelay_relay_http_requests_total{hc=\"seen\",code=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("hyrelay_relay_http_request_seconds"), "{metrics}");
    let hcm_admin = hcm.admin_addr().unwrap();
    let ok = wait_for(Duration::from_secs(5), || async {
        let v: serde_json::Value = serde_json::from_str(&admin_get(hcm_admin, "/status").await).unwrap();
        v["hybridConnections"][0]["httpRequests"] == 2
    })
    .await;
    assert!(ok, "{}", admin_get(hcm_admin, "/status").await);
    let page = admin_get(hcm_admin, "/").await;
    assert!(page.contains("HTTP requests") && page.contains("2, last 503"), "{page}");
    let metrics = admin_get(hcm_admin, "/metrics").await;
    assert!(
        metrics.contains("hyrelay_hcm_http_requests_total{hc=\"seen\",code=\"503\"} 1"),
        "{metrics}"
    );
}

/// The rendezvous-only `request` form for every request (what a listener on another relay
/// node gets in a cluster): small and empty requests too, HEAD and 204 included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_through_a_rendezvous() {
    let (rig, _hcm, tok, _) = published_with("rv", |c| c.http.inline_max = 0).await;
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    for len in [0usize, 1, 1024, 70_000] {
        let data = payload(len, 5);
        let g = s.send("POST", "/rv/echo?q=1", &auth, Body::Bytes(data.clone())).await;
        assert_eq!((g.status, g.body.len()), (200, len), "{}", g.reason);
        assert!(g.body[..] == data[..]);
        assert_eq!(g.h("x-got-target"), "/echo?q=1");
        let g = s.send("PUT", "/rv/echo", &auth, Body::Chunked(data.clone())).await;
        assert_eq!((g.status, g.body.len()), (200, len));
    }
    let g = s.send("HEAD", "/rv/size/10", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (200, 0));
    let g = s.send("GET", "/rv/status/204", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (204, 0));
}

/// Over TLS: curl (trusting the development CA) through relay and hcm, inline and
/// rendezvous, with `Expect: 100-continue` on the large body (curl's default past 1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_senders_with_curl() {
    let rig = Rig::new(true);
    rig.create("secure", endpoint()).await;
    let _hcm = rig.hcm(&rig.listen_cs("secure").await);
    rig.wait_listeners("secure", 1).await;
    let tok = token(&rig.send_cs("secure").await, "secure");
    let ca = rig.relay.ca_file().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let port = rig.relay.local_addr().port();
    for len in [10usize, 70_000, 2 << 20] {
        let data = payload(len, 8);
        let input = dir.path().join("in");
        std::fs::write(&input, &data).unwrap();
        let out = dir.path().join("out");
        let o = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("curl")
                .args(["-sS", "--cacert"])
                .arg(&ca)
                .args(["-o"])
                .arg(&out)
                .args(["-w", "%{http_code}", "-H"])
                .arg(format!("ServiceBusAuthorization: {tok}"))
                .arg("--data-binary")
                .arg(format!("@{}", input.display()))
                .arg(format!("https://localhost:{port}/secure/echo"))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(o.status.success(), "{len}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{len}");
        assert!(std::fs::read(&out).unwrap() == data, "echo over TLS, {len} bytes");
    }
}

/// Issue 9 item 3's rule on the hcm's side, for HTTP-mode answers: a relay that stops
/// reading cannot hold the hcm's control channel. A fake relay sends 300 requests whose
/// answers (60 KB each, inline) are more than the sockets buffer, and never reads: the hcm
/// must give the channel up within its dead-peer deadline and connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_reading_answers_loses_the_channel() {
    use hyrelay::proto::control::{HttpRequest, Request};
    use hyrelay::proto::frame::{OpCode, encode_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ep = endpoint();
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cs = ConnectionString::parse(&format!(
        "Endpoint=ws://{}/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath=t",
        relay.local_addr().unwrap()
    ))
    .unwrap();
    let entry = hyrelay::hcm::config::HcEntry::new(cs, Some(ep.to_string().parse().unwrap())).unwrap();
    let mut c = hyrelay::hcm::config::HcmConfig::new(tempfile::tempdir().unwrap().keep());
    c.runtime.set_workers(2).unwrap();
    c.hybrid_connections = vec![entry];
    c.ping_interval = Duration::from_millis(500);
    c.max_backoff = Duration::from_secs(1);
    let _hcm = hyrelay::hcm::start(c).unwrap();
    // The hcm's control channel: answer its upgrade.
    let accept = || async {
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), relay.accept())
            .await
            .expect("the hcm connects")
            .unwrap();
        let mut head = Vec::new();
        let req = loop {
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "the hcm hung up during the upgrade");
            head.extend_from_slice(&b[..n]);
            if let Some((r, _)) = hyrelay::proto::handshake::parse_request(&head, 1 << 16).unwrap() {
                break r;
            }
        };
        let up = hyrelay::proto::handshake::validate_upgrade(&req).unwrap();
        s.write_all(&hyrelay::proto::handshake::switching_protocols(&up.key, None))
            .await
            .unwrap();
        s
    };
    let mut chan = accept().await;
    for i in 0..300 {
        let r = Request {
            address: format!("ws://127.0.0.1:1/$hc/t?sb-hc-action=request&sb-hc-id={i}"),
            id: format!("r{i}"),
            http: Some(HttpRequest {
                request_target: "/t/size/60000".into(),
                method: "GET".into(),
                request_headers: vec![],
                remote_endpoint: None,
                body: false,
            }),
        };
        chan.write_all(&encode_frame(true, OpCode::Text, None, r.encode().as_bytes()))
            .await
            .unwrap();
    }
    // Nothing read from now on. The hcm's answers fill the sockets; its writes are bounded
    // by two ping periods, after which it drops the channel and connects again.
    let started = tokio::time::Instant::now();
    let again = tokio::time::timeout(Duration::from_secs(15), relay.accept()).await;
    assert!(
        again.is_ok(),
        "the hcm kept a channel whose relay stopped reading (waited {:?})",
        started.elapsed()
    );
    drop(chan);
}

/// The value of the relay counter `hyrelay_relay_http_rendezvous_total{hc,how}` (0 if
/// unset).
fn rendezvous_count(metrics: &str, hc: &str, how: &str) -> u64 {
    let key = format!("hyrelay_relay_http_rendezvous_total{{hc=\"{hc}\",how=\"{how}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The relay's counts of rendezvous `opened` and `reused` for `hc`.
fn opened_and_reused(metrics: &str, hc: &str) -> (u64, u64) {
    (
        rendezvous_count(metrics, hc, "opened"),
        rendezvous_count(metrics, hc, "reused"),
    )
}

/// Issue 12 "several per rendezvous": after a request pushed on a rendezvous is answered,
/// the relay keeps that rendezvous and our hcm keeps reading it, so the same sender
/// connection's next requests (bodies in hand) travel on it: one rendezvous, many
/// requests, each byte-exact and counted. A streamed body closes it and opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_requests_on_one_rendezvous() {
    let (rig, hcm, tok) = published_with_admin("many").await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let relay_admin = rig.relay.admin_addr().unwrap();
    let mut s = Sender::connect(rig.relay.local_addr()).await;

    // Larger than inline: pushed on a rendezvous.
    let big = payload(100_000, 61);
    let g = s.send("POST", "/many/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    // Then six requests with their bodies in hand, responses small and large.
    let small = payload(1024, 62);
    let g = s.send("GET", "/many/echo?n=1", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len(), g.h("x-got-target")), (200, 0, "/echo?n=1"));
    let g = s.send("POST", "/many/echo", &auth, Body::Bytes(small.clone())).await;
    assert!(g.status == 200 && g.body[..] == small[..]);
    let g = s.send("HEAD", "/many/size/10", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (200, 0));
    let g = s.send("GET", "/many/size/200000", &auth, Body::Bytes(vec![])).await;
    assert!(g.status == 200 && g.body[..] == payload(200_000, 9)[..]);
    let g = s.send("GET", "/many/status/204", &auth, Body::Bytes(vec![])).await;
    assert_eq!((g.status, g.body.len()), (204, 0));
    let g = s.send("PUT", "/many/echo", &auth, Body::Chunked(small.clone())).await;
    assert!(g.status == 200 && g.body[..] == small[..] && g.h("x-got-len") == "1024");
    let m = admin_get(relay_admin, "/metrics").await;
    assert_eq!(
        opened_and_reused(&m, "many"),
        (1, 6),
        "one rendezvous carried seven requests"
    );
    // A streamed body does not go on the kept one: it is closed, another is opened.
    let g = s.send("POST", "/many/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..]);
    let m = admin_get(relay_admin, "/metrics").await;
    assert_eq!(rendezvous_count(&m, "many", "opened"), 2, "{m}");
    // The hcm counted every request.
    let hcm_admin = hcm.admin_addr().unwrap();
    let v: serde_json::Value = serde_json::from_str(&admin_get(hcm_admin, "/status").await).unwrap();
    assert_eq!(v["hybridConnections"][0]["httpRequests"], 8, "{v}");
}

/// A kept rendezvous that no request uses within `[http] kept_rendezvous_idle` is closed
/// and counted (`how="idle_closed"`); the sender's next request goes the usual way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_rendezvous_unused_for_its_idle_time_is_closed() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (rig, _hcm, tok, _) = published_with("idle", |c| {
        c.runtime.admin = Some(any);
        c.http.kept_idle = Duration::from_millis(300);
    })
    .await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let relay_admin = rig.relay.admin_addr().unwrap();
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    // Larger than inline: pushed on a rendezvous, which is then kept.
    let big = payload(100_000, 81);
    let g = s.send("POST", "/idle/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    let closed = wait_for(Duration::from_secs(5), || async {
        rendezvous_count(&admin_get(relay_admin, "/metrics").await, "idle", "idle_closed") == 1
    })
    .await;
    assert!(closed, "the kept rendezvous was not closed after 300 ms unused");
    // The next request of the same sender connection does not go on it.
    let g = s.send("POST", "/idle/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    let m = admin_get(relay_admin, "/metrics").await;
    assert_eq!(opened_and_reused(&m, "idle"), (2, 0), "{m}");
}

/// Our hcm closes a kept rendezvous that waited its `http_rendezvous_idle` for a request
/// (60 s by default; 300 ms here, below the relay's 30 s `kept_rendezvous_idle`): the
/// relay finds it closed when the sender's next request comes, sends that afresh, and
/// the sender gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hcm_closes_a_kept_rendezvous_that_waited_its_idle_time() {
    let (rig, hcm, tok) =
        published_with_admin_and("hidle", |c| c.http_rendezvous_idle = Duration::from_millis(300)).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let relay_admin = rig.relay.admin_addr().unwrap();
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    // Larger than inline: pushed on a rendezvous, which both sides then keep.
    let big = payload(100_000, 83);
    let g = s.send("POST", "/hidle/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    // The hcm closes it after its 300 ms (far inside the relay's 30 s).
    let hcm_admin = hcm.admin_addr().unwrap();
    let idle_closed = wait_for(Duration::from_secs(5), || async {
        let m = admin_get(hcm_admin, "/metrics").await;
        m.lines()
            .any(|l| l == "hyrelay_hcm_http_rendezvous_idle_closed_total{hc=\"hidle\"} 1")
    })
    .await;
    assert!(
        idle_closed,
        "the hcm did not count closing the kept rendezvous after 300 ms unused"
    );
    let small = payload(1000, 84);
    let g = s.send("POST", "/hidle/echo", &auth, Body::Bytes(small.clone())).await;
    assert!(g.status == 200 && g.body[..] == small[..], "{}", g.reason);
    let m = admin_get(relay_admin, "/metrics").await;
    assert_eq!(rendezvous_count(&m, "hidle", "closed_by_listener"), 1, "{m}");
    assert_eq!(opened_and_reused(&m, "hidle"), (1, 0), "{m}");
}

/// A listener that closes its rendezvous after each response (as .NET's does) while the
/// relay sends the next request on it: the listener never handled that request, so the
/// relay sends it afresh and the sender gets its answer; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_rendezvous_closed_by_the_listener_loses_no_request() {
    use hyrelay::proto::control::{self, Command, Response};
    use hyrelay::proto::frame::{OpCode, Role};
    use hyrelay::transport::ws::{self, Message, WsReader, WsWriter};
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let rig = Rig::with(false, |c| c.runtime.admin = Some(any));
    rig.create("net", endpoint()).await;
    let tok = token(&rig.send_cs("net").await, "net");
    let (mut r, mut w) = raw_listener(&rig, "net").await;
    rig.wait_listeners("net", 1).await;
    let addr = rig.relay.local_addr();
    let sender = tokio::spawn(async move {
        let auth = [("ServiceBusAuthorization", tok.as_str())];
        let mut s = Sender::connect(addr).await;
        let first = s.send("POST", "/net/a", &auth, Body::Bytes(payload(100_000, 3))).await;
        let second = s.send("GET", "/net/b", &auth, Body::Bytes(vec![])).await;
        (first, second)
    });
    let response = |id: &str, body: bool| Response {
        request_id: id.to_owned(),
        status_code: 200,
        status_description: Some("OK".into()),
        response_headers: vec![("x-on".into(), "rendezvous".into())],
        body,
    };
    // The first request: rendezvous-only on the control channel; fetched and answered on
    // its rendezvous, which the listener leaves open for now.
    let req = next_request(&mut r).await;
    assert!(req.http.is_none(), "a 100 kB body goes through a rendezvous");
    let c = ws::connect(
        &ws::WsUrl::parse(&req.address).unwrap(),
        None,
        &[],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (rr, rw) = tokio::io::split(c.stream);
    let mut rv_r = WsReader::new(rr, c.leftover, Role::Client, 1 << 20);
    let mut rv_w = WsWriter::new(rw, Role::Client);
    let next = |m: Result<Option<Message>, ws::WsError>| match m.unwrap().unwrap() {
        Message::Text(t) => control::decode(&t).unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    };
    let full = match next(rv_r.next_message(1 << 20).await) {
        Command::Request(q) => q,
        other => panic!("{other:?}"),
    };
    assert!(matches!(rv_r.next_message(1 << 20).await, Ok(Some(Message::Binary(b))) if b.len() == 100_000));
    rv_w.send_text(&Response::encode(&response(&full.id, true)))
        .await
        .unwrap();
    rv_w.send(true, OpCode::Binary, b"first").await.unwrap();
    // The second request arrives on the kept rendezvous; the listener closes instead.
    let pushed = tokio::time::timeout(Duration::from_secs(10), rv_r.next_message(1 << 20))
        .await
        .expect("the next request on the kept rendezvous");
    match next(pushed) {
        Command::Request(q) => assert_eq!(q.http.unwrap().request_target, "/net/b"),
        other => panic!("{other:?}"),
    }
    rv_w.send_close(1000, "").await.unwrap();
    // It comes again on the control channel, and is answered there.
    let again = next_request(&mut r).await;
    let http = again.http.expect("a body-less request goes inline");
    assert_eq!(http.request_target, "/net/b");
    let mut cw = WsWriter::new(&mut w, Role::Client);
    cw.send_text(&Response::encode(&response(&again.id, true)))
        .await
        .unwrap();
    cw.send(true, OpCode::Binary, b"second").await.unwrap();
    let (first, second) = tokio::time::timeout(Duration::from_secs(20), sender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.status, &first.body[..]), (200, &b"first"[..]));
    assert_eq!(
        (second.status, &second.body[..]),
        (200, &b"second"[..]),
        "{}",
        second.reason
    );
    let m = admin_get(rig.relay.admin_addr().unwrap(), "/metrics").await;
    assert_eq!(rendezvous_count(&m, "net", "closed_by_listener"), 1, "{m}");
}

/// A kept rendezvous is used only while its listener is registered: once the listener's
/// key is regenerated (the relay closes its control channel), the revoked hcm gets no
/// more requests through the rendezvous it kept; the sender is told there is no listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_rendezvous_dies_with_its_listener() {
    let (rig, _hcm, tok, _) = published("rev").await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let mut s = Sender::connect(rig.relay.local_addr()).await;
    let big = payload(100_000, 71);
    let g = s.send("POST", "/rev/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    rig.mgmt
        .regenerate_key("rev", false, Some("defaultListener"))
        .await
        .unwrap();
    rig.wait_listeners("rev", 0).await;
    let g = s.send("GET", "/rev/echo", &auth, Body::Bytes(vec![])).await;
    assert_eq!(
        g.status, 404,
        "served after the listener's key was revoked: {}",
        g.reason
    );
}

/// A request on a kept rendezvous counts against `max_requests_per_listener` like any
/// other: with the listener at its limit it gets 503, not a way around the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_rendezvous_respects_the_listeners_request_limit() {
    use tokio::io::AsyncWriteExt;
    let (rig, _hcm, tok, _) = published_with("lim", |c| c.http.max_requests_per_listener = 1).await;
    let auth = [("ServiceBusAuthorization", tok.as_str())];
    let mut kept = Sender::connect(rig.relay.local_addr()).await;
    let big = payload(100_000, 72);
    let g = kept.send("POST", "/lim/echo", &auth, Body::Bytes(big.clone())).await;
    assert!(g.status == 200 && g.body[..] == big[..], "{}", g.reason);
    // Another sender's upload takes the listener's one request: more than inline of its
    // body has arrived, the rest never comes.
    let mut upload = tokio::net::TcpStream::connect(rig.relay.local_addr()).await.unwrap();
    let head = format!(
        "POST /lim/echo HTTP/1.1\r\nHost: h\r\nServiceBusAuthorization: {tok}\r\nContent-Length: 1000000\r\n\r\n"
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&payload(200_000, 73)).await.unwrap();
    // Until a third sender is refused, the upload is not counted yet.
    let mut probe = Sender::connect(rig.relay.local_addr()).await;
    let mut at_limit = false;
    for _ in 0..50 {
        if probe.send("GET", "/lim/echo", &auth, Body::Bytes(vec![])).await.status == 503 {
            at_limit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(at_limit, "the upload never took the listener's request slot");
    let g = kept.send("GET", "/lim/echo", &auth, Body::Bytes(vec![])).await;
    assert_eq!(
        g.status, 503,
        "a request on the kept rendezvous went past the listener's limit: {}",
        g.reason
    );
    drop(upload);
}
