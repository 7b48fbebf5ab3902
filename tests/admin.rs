//! The admin listener of each role: metrics, health, readiness, status JSON and page.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hyrelay::hcm::config::HcEntry;

/// Sends `HEAD path`; returns the response head and whatever came after it.
async fn head_request(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
    (String::from_utf8_lossy(&out[..end]).into_owned(), out[end..].to_vec())
}

/// Every value of a `result`, `reason` or `direction` label in the exposition is named in
/// its family's HELP text (issue 14 item 7).
fn help_names_every_label_value(exposition: &str) {
    let mut help = std::collections::HashMap::new();
    for l in exposition.lines() {
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            help.insert(name.to_owned(), text.to_owned());
        }
    }
    let mut checked = 0;
    for l in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels)) = l.split_once('{') else {
            continue;
        };
        let name = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        for label in ["result", "reason", "direction"] {
            if let Some(v) = labels
                .split(&format!("{label}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
            {
                let text = help.get(name).unwrap_or_else(|| panic!("{name} has no HELP"));
                assert!(
                    text.split([' ', ',', '.', ':']).any(|w| w == v),
                    "HELP of {name} does not name {label}={v:?}: {text}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} labelled series");
}

/// `promtool check metrics` finds nothing to complain about.
fn promtool_check(exposition: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: run scripts/setup-promtool.sh");
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
}

/// The entry of hybrid connection `name` in a `/status` document.
fn hc_entry(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["hybridConnections"]
        .as_array()
        .expect("hybridConnections is a list")
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {status}"))
        .clone()
}

fn admin_any() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_hcm_and_bridge_report_truthfully() {
    let rig = Rig::with(false, |c| c.runtime.admin = admin_any());
    let relay_admin = rig.relay.admin_addr().unwrap();
    rig.create("good", echo()).await;
    let (_refusing, dead) = refusing_addr();
    rig.create("broken", dead).await;
    rig.create("idle", echo()).await;

    let mut hc = rig.hcm_config(vec![
        HcEntry::new(rig.listen_cs("good").await, None).unwrap(),
        HcEntry::new(rig.listen_cs("broken").await, None).unwrap(),
        HcEntry::new(rig.listen_cs("idle").await, None).unwrap(),
    ]);
    hc.runtime.admin = admin_any();
    let hcm = hyrelay::hcm::start(hc).unwrap();
    let hcm_admin = hcm.admin_addr().unwrap();
    rig.wait_listeners("good", 1).await;
    rig.wait_listeners("broken", 1).await;
    rig.wait_listeners("idle", 1).await;

    let mut bc = rig.bridge_config("good", &rig.send_cs("good").await);
    bc.runtime.admin = admin_any();
    let bridge = hyrelay::bridge::start(bc).unwrap();
    let bridge_admin = bridge.admin_addr().unwrap();
    let data = payload(100_000, 1);
    assert!(round_trip(bridge.addr_of("good").unwrap(), &data).await.unwrap() == data);
    // A sender for the broken one is rejected by the hcm (endpoint refuses).
    let b2 = rig.bridge("broken", &rig.send_cs("broken").await);
    assert!(
        round_trip(b2.addr_of("broken").unwrap(), b"x")
            .await
            .map(|v| v.is_empty())
            .unwrap_or(true)
    );

    for a in [relay_admin, hcm_admin, bridge_admin] {
        let (s, body) = http_get(a, "/healthz").await;
        assert_eq!(s, 200);
        assert!(body.contains("\"status\": \"ok\""), "{body}");
    }
    assert_eq!(http_get(relay_admin, "/readyz").await.0, 200);
    assert_eq!(http_get(bridge_admin, "/readyz").await.0, 200);
    // A forward with no listener behind it is not ready, and says why (issue 14 item 8).
    rig.create("nobody", echo()).await;
    let mut lonely = rig.bridge_config("nobody", &rig.send_cs("nobody").await);
    lonely.runtime.admin = admin_any();
    let lonely = hyrelay::bridge::start(lonely).unwrap();
    let (code, body) = http_get(lonely.admin_addr().unwrap(), "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("No listener") && body.contains("\"listeners\": 0"),
        "{body}"
    );
    // Every control channel of the hcm is up, so it is ready, although one endpoint is down...
    assert_eq!(http_get(hcm_admin, "/readyz").await.0, 200);
    // ...and its status says which segment is broken.
    let (_, st) = http_get(hcm_admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    let broken = hc_entry(&v, "broken");
    assert_eq!(broken["state"], "Connected");
    assert_eq!(broken["lastDial"]["ok"], false);
    let good = hc_entry(&v, "good");
    assert_eq!(good["lastDial"]["ok"], true);

    // Relay status: sender connects per result, bytes once the workers flushed (1 s).
    assert!(
        wait_for(Duration::from_secs(5), || async {
            let (_, st) = http_get(relay_admin, "/status").await;
            let v: serde_json::Value = serde_json::from_str(&st).unwrap();
            let g = hc_entry(&v, "good");
            g["bytesUp"].as_u64() == Some(100_000) && g["bytesDown"].as_u64() == Some(100_000)
        })
        .await,
        "relay counted the tunnel's bytes"
    );
    let (_, st) = http_get(relay_admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    let b = hc_entry(&v, "broken");
    assert_eq!(b["lastSenderConnect"]["result"], "rejected", "{b}");

    // Metrics: HELP lines, bounded labels, the relay's and hcm's families.
    // In one test process the three roles share a registry: each admin's scrape makes
    // its own role's idle series exist; the last scrape shows them all.
    http_get(hcm_admin, "/metrics").await;
    http_get(lonely.admin_addr().unwrap(), "/metrics").await;
    let (s, m) = http_get(relay_admin, "/metrics").await;
    assert_eq!(s, 200);
    for needle in [
        "# HELP hyrelay_relay_listeners",
        "hyrelay_relay_sender_connects_total{hc=\"good\",result=\"accepted\"}",
        "hyrelay_relay_sender_connects_total{hc=\"broken\",result=\"rejected\"}",
        "hyrelay_relay_bytes_total{hc=\"good\",direction=\"up\"}",
        "hyrelay_relay_rendezvous_seconds_bucket",
        "hyrelay_hcm_endpoint_dials_total{hc=\"broken\",result=\"refused\"}",
        "hyrelay_hcm_control_channel_up{hc=\"good\"} 1",
        "hyrelay_bridge_relay_connects_total{hc=\"good\",result=\"ok\"}",
        "hyrelay_buffer_pool_budget_bytes",
        "hyrelay_build_info",
        // Issue 14 item 7: a configured but idle hybrid connection has its series at zero
        // in every role, and the process metrics are there.
        "hyrelay_relay_bytes_total{hc=\"idle\",direction=\"up\"} 0",
        "hyrelay_relay_sender_connects_total{hc=\"idle\",result=\"abandoned\"} 0",
        "hyrelay_hcm_accepts_total{hc=\"idle\"} 0",
        "hyrelay_hcm_endpoint_dials_total{hc=\"idle\",result=\"refused\"} 0",
        "hyrelay_hcm_control_channel_up{hc=\"idle\"} 1",
        "hyrelay_bridge_local_connections_total{hc=\"nobody\"} 0",
        "hyrelay_bridge_relay_connects_total{hc=\"nobody\",result=\"ok\"} 0",
        "hyrelay_relay_control_channels_closed_total{reason=\"stalled\"} 0",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}");
    }
    help_names_every_label_value(&m);
    promtool_check(&m);
    // HEAD: the head a GET gets, no body (issue 14 item 7).
    for path in ["/metrics", "/healthz", "/status", "/", "/nope"] {
        let (head, body) = head_request(relay_admin, path).await;
        assert!(
            head.contains("Content-Length: ") && !head.contains("Content-Length: 0\r"),
            "{path}: {head}"
        );
        assert!(body.is_empty(), "HEAD {path} sent a body of {} bytes", body.len());
    }

    // Stop the relay: the bridge is no longer ready, the hcm neither.
    drop(rig);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            http_get(bridge_admin, "/readyz").await.0 == 503
        })
        .await
    );
    assert!(
        wait_for(Duration::from_secs(15), || async {
            http_get(hcm_admin, "/readyz").await.0 == 503
        })
        .await
    );
    let (_, page) = http_get(hcm_admin, "/").await;
    assert!(page.contains("data-name=\"good\" data-status=\"broken\""), "{page}");
}
