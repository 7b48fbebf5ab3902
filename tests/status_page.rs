//! The status page in a real browser: Debian's Chromium, headless, against a running
//! relay and hcm. A connected hybrid connection must show as connected, a broken one as
//! broken. Chromium is installed by scripts/setup-debian.sh.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hyrelay::hcm::config::HcEntry;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The DOM of `url` after load, as Chromium renders it.
async fn dump_dom(url: &str) -> String {
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
                "--dump-dom",
                url,
            ])
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

/// `data-status` of the row named `name` in a dumped status page.
fn row_status(dom: &str, name: &str) -> Option<String> {
    let key = format!("data-name=\"{name}\" data-status=\"");
    let at = dom.find(&key)? + key.len();
    Some(dom[at..].split('"').next()?.to_owned())
}

fn admin_any() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_and_broken_hybrid_connections_in_chromium() {
    let rig = Rig::with(false, |c| c.admin = admin_any());
    rig.create("orders-db", echo()).await;
    rig.create("idle", echo()).await; // nobody listens: broken on the relay's page
    // The hcm serves orders-db, and a hybrid connection the relay does not have: broken.
    let mut ghost = rig.listen_cs("orders-db").await;
    ghost.entity_path = Some("ghost".into());
    let mut cfg = rig.hcm_config(vec![
        HcEntry::new(rig.listen_cs("orders-db").await, None).unwrap(),
        HcEntry::new(ghost, None).unwrap(),
    ]);
    cfg.admin = admin_any();
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("orders-db", 1).await;
    let ghost_down = wait_for(Duration::from_secs(10), || async {
        hcm.status().iter().any(|s| s.name == "ghost" && s.reconnects > 0)
    })
    .await;
    assert!(ghost_down);

    let relay_page = dump_dom(&format!("http://{}/", rig.relay.admin_addr().unwrap())).await;
    assert!(relay_page.contains("<h1>hyrelay relay</h1>"), "{relay_page}");
    assert_eq!(
        row_status(&relay_page, "orders-db").as_deref(),
        Some("ok"),
        "{relay_page}"
    );
    assert_eq!(
        row_status(&relay_page, "idle").as_deref(),
        Some("broken"),
        "{relay_page}"
    );
    assert!(relay_page.contains("Not connected"));

    let hcm_page = dump_dom(&format!("http://{}/", hcm.admin_addr().unwrap())).await;
    assert_eq!(row_status(&hcm_page, "orders-db").as_deref(), Some("ok"), "{hcm_page}");
    assert_eq!(row_status(&hcm_page, "ghost").as_deref(), Some("broken"), "{hcm_page}");
    assert!(hcm_page.contains("does not exist"), "the page says why: {hcm_page}");
}
