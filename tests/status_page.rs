//! The status page in a real browser: Debian's Chromium, headless, against a running
//! relay and hcm. A connected hybrid connection must show as connected, a broken one as
//! broken. Chromium is installed by scripts/setup-debian.sh.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hyrelay::hcm::config::HcEntry;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `extra` arguments; returns stdout.
async fn chromium(url: &str, extra: &[&str]) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/setup-debian.sh (installs Debian's chromium)"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--no-first-run",
                &format!("--user-data-dir={}", profile.path().display()),
            ])
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished in time")
    .expect("chromium ran");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM of `url` after load, as Chromium renders it.
async fn dump_dom(url: &str) -> String {
    chromium(url, &["--dump-dom"]).await
}

/// A screenshot of `url` at `width` x `height` into `target/status-page-NAME.png` (kept for
/// a person to look at); returns its size in bytes.
async fn screenshot(url: &str, name: &str, width: u32, height: u32) -> u64 {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("status-page-{name}.png"));
    std::fs::remove_file(&path).ok();
    chromium(
        url,
        &[
            &format!("--screenshot={}", path.display()),
            &format!("--window-size={width},{height}"),
            "--hide-scrollbars",
        ],
    )
    .await;
    std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
}

/// `data-status` of the row named `name` in a dumped status page.
fn row_status(dom: &str, name: &str) -> Option<String> {
    let key = format!("data-name=\"{name}\" data-status=\"");
    let at = dom.find(&key)? + key.len();
    Some(dom[at..].split('"').next()?.to_owned())
}

/// The HTML of the row named `name`.
fn row<'a>(dom: &'a str, name: &str) -> &'a str {
    let at = dom
        .find(&format!("data-name=\"{name}\""))
        .unwrap_or_else(|| panic!("no row {name}: {dom}"));
    let end = dom[at..].find("</tr>").unwrap() + at;
    &dom[at..end]
}

/// Every row's status word is one that its colour class allows: no red "Connected".
fn words_match_colours(dom: &str) {
    let allowed = |class: &str| -> &[&str] {
        match class {
            "ok" => &["Connected", "Ready"],
            "degraded" => &["Endpoint failing", "Senders failing", "Connects failing"],
            "broken" => &["Disconnected", "No listener", "Relay unreachable"],
            _ => &["Connecting", "Stopped"],
        }
    };
    for part in dom.split("data-status=\"").skip(1) {
        let class = part.split('"').next().unwrap();
        let state = part.split("class=\"state\"").nth(1).unwrap();
        let word = state.split("</span>").nth(1).unwrap().split("</td>").next().unwrap();
        assert!(allowed(class).contains(&word), "{word:?} shown as {class}");
    }
}

/// GET / from an admin listener (no browser), to seed the page's history.
async fn get(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
}

fn admin_any() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

/// Issue 14 item 5: word and colour agree, last errors are filled, times are relative with
/// the absolute time on hover, a hybrid connection whose senders all fail is degraded,
/// each row has a chart of the last 15 minutes, and the page fits a narrow window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_degraded_and_broken_hybrid_connections_in_chromium() {
    let rig = Rig::with(false, |c| c.runtime.admin = admin_any());
    rig.create("orders-db", echo()).await;
    rig.create("idle", echo()).await; // nobody listens: broken on the relay's page
    let (_refusing, dead) = refusing_addr();
    rig.create("refusing", dead).await; // served, but its endpoint refuses every dial
    // The hcm serves orders-db, refusing, and a hybrid connection the relay does not have.
    let mut ghost = rig.listen_cs("orders-db").await;
    ghost.entity_path = Some("ghost".into());
    let mut cfg = rig.hcm_config(vec![
        HcEntry::new(rig.listen_cs("orders-db").await, None).unwrap(),
        HcEntry::new(rig.listen_cs("refusing").await, None).unwrap(),
        HcEntry::new(ghost, None).unwrap(),
    ]);
    cfg.runtime.admin = admin_any();
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("orders-db", 1).await;
    rig.wait_listeners("refusing", 1).await;
    let ghost_down = wait_for(Duration::from_secs(10), || async {
        hcm.status().iter().any(|s| s.name == "ghost" && s.reconnects > 0)
    })
    .await;
    assert!(ghost_down);
    let mut bc = rig.bridge_config("orders-db", &rig.send_cs("orders-db").await);
    bc.runtime.admin = admin_any();
    let bridge = hyrelay::bridge::start(bc).unwrap();
    let refusing = rig.bridge("refusing", &rig.send_cs("refusing").await);
    let data = payload(400_000, 3);
    assert!(round_trip(bridge.addr_of("orders-db").unwrap(), &data).await.unwrap() == data);
    let _ = round_trip(refusing.addr_of("refusing").unwrap(), b"x").await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // workers publish bytes each second

    let relay_url = format!("http://{}/", rig.relay.admin_addr().unwrap());
    // A first look seeds each chart's history; the next one draws it.
    for a in [rig.relay.admin_addr(), hcm.admin_addr(), bridge.admin_addr()] {
        get(a.unwrap()).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let relay_page = dump_dom(&relay_url).await;
    assert!(relay_page.contains("<h1>hyrelay relay</h1>"), "{relay_page}");
    words_match_colours(&relay_page);
    assert_eq!(row_status(&relay_page, "orders-db").as_deref(), Some("ok"));
    assert_eq!(row_status(&relay_page, "idle").as_deref(), Some("broken"));
    assert!(row(&relay_page, "idle").contains("No listener"));
    assert_eq!(
        row_status(&relay_page, "refusing").as_deref(),
        Some("degraded"),
        "every sender fails: {}",
        row(&relay_page, "refusing")
    );
    let r = row(&relay_page, "refusing");
    assert!(
        r.contains("class=\"err\"") && r.contains("rejected"),
        "last error filled: {r}"
    );
    assert!(
        r.contains("<time datetime=\"") && r.contains(" title=\"") && r.contains(" ago</time>"),
        "{r}"
    );
    let r = row(&relay_page, "orders-db");
    assert!(
        r.contains("<svg class=\"chart\"") && r.contains("polyline class=\"active\""),
        "{r}"
    );
    assert!(!relay_page.contains("src=\"http"), "no external assets");

    let hcm_page = dump_dom(&format!("http://{}/", hcm.admin_addr().unwrap())).await;
    words_match_colours(&hcm_page);
    assert_eq!(row_status(&hcm_page, "orders-db").as_deref(), Some("ok"), "{hcm_page}");
    assert_eq!(row_status(&hcm_page, "ghost").as_deref(), Some("broken"), "{hcm_page}");
    assert!(row(&hcm_page, "ghost").contains("does not exist"), "the page says why");
    assert_eq!(row_status(&hcm_page, "refusing").as_deref(), Some("degraded"));
    assert!(
        row(&hcm_page, "refusing").contains("hcm ⇄ endpoint:"),
        "{}",
        row(&hcm_page, "refusing")
    );

    let bridge_page = dump_dom(&format!("http://{}/", bridge.admin_addr().unwrap())).await;
    words_match_colours(&bridge_page);
    assert_eq!(row_status(&bridge_page, "orders-db").as_deref(), Some("ok"));

    // Pictures for a person: a wide and a narrow window.
    assert!(screenshot(&relay_url, "relay-wide", 1400, 500).await > 10_000);
    assert!(screenshot(&relay_url, "relay-narrow", 420, 1400).await > 10_000);
    assert!(screenshot(&format!("http://{}/", hcm.admin_addr().unwrap()), "hcm-wide", 1400, 500).await > 10_000);
}
