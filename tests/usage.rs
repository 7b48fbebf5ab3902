//! Issue 14 item 10: per hybrid connection, the senders that used it lately (address, key
//! name, the bridge's client id, first/last seen, tunnels, bytes) in `hc show`, the relay's
//! `/status` and its page; the namespace quota `limits.max_hybrid_connections`.

mod common;

use std::time::Duration;

use common::*;
use hyrelay::hcm::config::HcEntry;

async fn hyrelay(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
        .args(args)
        .env("HYRELAY_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_are_listed_and_the_quota_holds() {
    let rig = Rig::with(false, |c| {
        c.max_hybrid_connections = std::num::NonZeroUsize::new(2);
        c.runtime.admin = Some("127.0.0.1:0".parse().unwrap());
    });
    let dir = rig.relay.data_dir().display().to_string();
    rig.create("db", echo()).await;
    rig.create("web", echo()).await;

    // The quota: a third is refused with a message naming the setting; after a delete
    // there is room again.
    let (ok, _, err) = hyrelay(&["hc", "--relay-data-dir", &dir, "create", "third", "--endpoint", "h:1"]).await;
    assert!(!ok, "a third hybrid connection was created");
    assert!(
        err.contains("403") && err.contains("at most 2") && err.contains("max_hybrid_connections"),
        "{err}"
    );
    let (ok, _, err) = hyrelay(&["hc", "--relay-data-dir", &dir, "delete", "web"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = hyrelay(&["hc", "--relay-data-dir", &dir, "create", "third", "--endpoint", "h:1"]).await;
    assert!(ok, "{err}");

    // Two bridges that name themselves differently; app-1 opens two tunnels.
    let _hcm =
        hyrelay::hcm::start(rig.hcm_config(vec![HcEntry::new(rig.listen_cs("db").await, None).unwrap()])).unwrap();
    rig.wait_listeners("db", 1).await;
    let send = rig.send_cs("db").await;
    let mut bridges = Vec::new();
    for id in ["app-1", "app-2"] {
        let mut c = rig.bridge_config("db", &send);
        c.client_id = id.into();
        bridges.push(hyrelay::bridge::start(c).unwrap());
    }
    let data = payload(1000, 3);
    for _ in 0..2 {
        assert!(round_trip(bridges[0].addr_of("db").unwrap(), &data).await.unwrap() == data);
    }
    assert_eq!(
        round_trip(bridges[1].addr_of("db").unwrap(), b"0123456789")
            .await
            .unwrap(),
        b"0123456789"
    );

    // hc show --json: both senders, with the tunnels' bytes once they ended.
    let mut show = serde_json::Value::Null;
    let mut counted = false;
    for _ in 0..50 {
        let (_, out, _) = hyrelay(&["hc", "--relay-data-dir", &dir, "show", "db", "--json"]).await;
        show = serde_json::from_str(&out).unwrap_or_default();
        let senders = show["senders"].as_array().cloned().unwrap_or_default();
        counted = senders.len() == 2 && senders.iter().all(|s| s["activeTunnels"] == 0);
        if counted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(counted, "{show:#}");
    let by_id = |id: &str| {
        show["senders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["clientId"] == id)
            .unwrap_or_else(|| panic!("no {id} in {show:#}"))
            .clone()
    };
    let app1 = by_id("app-1");
    assert_eq!(app1["tunnels"], 2, "{app1}");
    assert_eq!(app1["bytesSent"], 2000, "{app1}");
    assert_eq!(app1["bytesReceived"], 2000, "{app1}");
    assert_eq!(app1["keyName"], "defaultSender");
    assert_eq!(app1["remoteAddress"], "127.0.0.1");
    assert!(app1["firstSeen"].as_str().unwrap() <= app1["lastSeen"].as_str().unwrap());
    assert_eq!(by_id("app-2")["bytesSent"], 10);

    // The same in the table, the relay's /status and its page.
    let (ok, table, _) = hyrelay(&["hc", "--relay-data-dir", &dir, "show", "db"]).await;
    assert!(
        ok && table.contains("recent senders") && table.contains("app-1") && table.contains("app-2"),
        "{table}"
    );
    let admin = rig.relay.admin_addr().unwrap();
    let status: serde_json::Value = serde_json::from_str(&http_get(admin, "/status").await.1).unwrap();
    let db = status["hybridConnections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "db")
        .unwrap()
        .clone();
    assert_eq!(db["senders"].as_array().unwrap().len(), 2, "{db}");
    let page = http_get(admin, "/").await.1;
    assert!(page.contains("Recent senders") && page.contains("(+1 more)"), "{page}");
}
