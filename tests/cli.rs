//! The `hyrelay` binary: `up`, `hc`, `hcm add/list/remove`, `check-config`, `--version`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hyrelay"));
    c.kill_on_drop(true).env("HYRELAY_LOG", "warn");
    c
}

async fn output(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), bin().args(args).output())
        .await
        .expect("command finished")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_whole_chain_serves_admin_and_drains_on_ctrl_c() {
    let mut child = bin()
        .args([
            "up",
            "--relay-listen",
            "127.0.0.1:0",
            "--bridge-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut app, mut admin) = (None, None);
    let mut listen_cs = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(a) = l.trim().strip_prefix("connect your app to:") {
                app = Some(a.trim().parse::<std::net::SocketAddr>().unwrap());
            }
            if let Some(a) = l.trim().strip_prefix("admin (metrics, health, status page): http://") {
                admin = Some(a.trim_end_matches('/').parse::<std::net::SocketAddr>().unwrap());
            }
            listen_cs |= l.contains("SharedAccessKeyName=defaultListener") && l.contains("EntityPath=demo");
            if l.starts_with("Ctrl-C") {
                break;
            }
        }
    })
    .await
    .expect("up printed its banner");
    assert!(listen_cs, "up prints the listen connection string");
    let app = app.expect("app address printed");
    let data = payload(100_000, 1);
    assert!(round_trip(app, &data).await.unwrap() == data);

    // One admin listener for all three roles.
    let admin = admin.expect("admin address printed");
    let (code, status) = http_get(admin, "/status").await;
    assert_eq!(code, 200, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    for role in ["relay", "hcm", "bridge"] {
        assert_eq!(v[role]["role"], role, "{v}");
    }
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let (_, metrics) = http_get(admin, "/metrics").await;
    for family in [
        "hyrelay_relay_listeners",
        "hyrelay_hcm_control_channel_up",
        "hyrelay_bridge_relay_connects_total",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    let (_, page) = http_get(admin, "/").await;
    assert!(page.contains("data-role=\"relay\"") && page.contains("data-role=\"bridge\""));

    // A long transfer through `up`, then Ctrl-C (SIGINT) in the middle: it finishes
    // byte-exact during the drain, and `up` exits 0 once it has.
    let total = 3 << 20;
    let transfer = tokio::spawn(slow_echo(app, total, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    send_signal(child.id().unwrap() as i32, "INT");
    assert!(
        transfer.await.unwrap() == payload(total, 7),
        "the transfer survived Ctrl-C"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exited")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Sends `total` bytes to an echo through `addr` over about `over`; returns the echo.
async fn slow_echo(addr: std::net::SocketAddr, total: usize, over: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = payload(total, 7);
    let writer = tokio::spawn(async move {
        for c in data.chunks(total / 30) {
            w.write_all(c).await.unwrap();
            tokio::time::sleep(over / 30).await;
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    back
}

/// GET `path`; status and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out[9..12].parse().unwrap();
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

fn send_signal(pid: i32, sig: &str) {
    std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hc_commands_against_a_local_relay() {
    let rig = Rig::new(true);
    let dir = rig.relay.data_dir().display().to_string();
    let hc = |extra: &[&str]| {
        let mut a = vec!["hc", "--relay-data-dir", dir.as_str()];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        output(&refs).await
    };
    let (ok, out, err) = run(hc(&["create", "sql", "--endpoint", "db.corp.local:1433"])).await;
    assert!(ok, "{err}");
    assert!(out.contains("created sql -> db.corp.local:1433"), "{out}");
    let (ok, out, _) = run(hc(&["list"])).await;
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("NAME"));
    assert!(out.contains("sql") && out.contains("Not connected"), "{out}");
    let (ok, listen, _) = run(hc(&["connection-string", "sql", "--listen"])).await;
    assert!(
        ok && listen.starts_with("Endpoint=sb://localhost:")
            && listen.contains("defaultListener")
            && listen.trim_end().ends_with("EntityPath=sql"),
        "{listen}"
    );
    let _hcm = rig.hcm(&hyrelay::proto::connstr::ConnectionString::parse(listen.trim()).unwrap());
    rig.wait_listeners("sql", 1).await;
    let (_, out, _) = run(hc(&["list"])).await;
    assert!(out.contains("Connected"), "{out}");
    let (ok, out, _) = run(hc(&["show", "sql", "--json"])).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["listenerCount"], 1);
    let old = v["rules"][1]["secondaryKey"].as_str().unwrap().to_owned();
    let (ok, _, _) = run(hc(&["regenerate-key", "sql", "--secondary"])).await;
    assert!(ok);
    let (_, send2, _) = run(hc(&["connection-string", "sql", "--send", "--secondary"])).await;
    assert!(!send2.contains(&old), "secondary key changed");
    let (ok, _, err) = run(hc(&["create", "sql", "--endpoint", "x:1"])).await;
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, _, err) = run(hc(&["create", "bad", "--endpoint", "nope"])).await;
    assert!(!ok && err.contains("--endpoint"), "{err}");
    let (ok, out, _) = run(hc(&["delete", "sql"])).await;
    assert!(ok && out.contains("deleted sql"));
    let (ok, _, err) = run(hc(&["show", "sql"])).await;
    assert!(!ok && err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_add_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let cs = "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=defaultListener;SharedAccessKey=abc=;EntityPath=db";
    let (ok, out, err) = output(&["hcm", "--data-dir", &d, "add", cs, "--endpoint", "db.local:5432"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("added db (relay relay.example:9443)"), "{out}");
    let (ok, out, _) = output(&["hcm", "--data-dir", &d, "list"]).await;
    assert!(ok);
    assert!(out.contains("not running") && out.contains("db.local:5432"), "{out}");
    assert!(!out.contains("abc="), "keys are not printed");
    let (ok, _, err) = output(&[
        "hcm",
        "--data-dir",
        &d,
        "add",
        "Endpoint=sb://r/;SharedAccessKeyName=a;SharedAccessKey=b",
    ])
    .await;
    assert!(!ok && err.contains("EntityPath"), "{err}");
    let (ok, out, _) = output(&["hcm", "--data-dir", &d, "remove", "DB"]).await;
    assert!(ok && out.contains("removed DB"));
    let (ok, _, err) = output(&["hcm", "--data-dir", &d, "remove", "db"]).await;
    assert!(!ok && err.contains("was not added"), "{err}");
}

#[tokio::test]
async fn check_config_and_version() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out, _) = output(&["check-config", &format!("{root}/configs/relay.toml")]).await;
    assert!(ok && out.contains("valid relay configuration"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("hcm.toml");
    std::fs::write(&bad, "dial_timeout = \"soon\"\n").unwrap();
    let (ok, _, err) = output(&["check-config", bad.to_str().unwrap()]).await;
    assert!(!ok && err.contains("dial_timeout"), "{err}");
    let (ok, out, _) = output(&["--version"]).await;
    assert!(ok && out.starts_with("hyrelay "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_status_shows_each_segment_and_hc_list_the_last_connect() {
    let rig = Rig::new(false);
    rig.create("seg", echo()).await;
    let cfg = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("seg").await, None).unwrap(),
    ]);
    let data_dir = cfg.data_dir.display().to_string();
    let _hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("seg", 1).await;
    let bridge = rig.bridge("seg", &rig.send_cs("seg").await);
    assert_eq!(round_trip(bridge.addr_of("seg").unwrap(), b"hi").await.unwrap(), b"hi");
    let ok = wait_for(Duration::from_secs(10), || async {
        let (ok, out, _) = output(&["hcm", "--data-dir", &data_dir, "status"]).await;
        ok && out.contains("Connected since") && out.contains("ok in")
    })
    .await;
    assert!(ok, "{:?}", output(&["hcm", "--data-dir", &data_dir, "status"]).await);
    let dir = rig.relay.data_dir().display().to_string();
    let (ok, out, _) = output(&["hc", "--relay-data-dir", &dir, "list"]).await;
    assert!(
        ok && out.contains("LAST SENDER CONNECT") && out.contains("accepted"),
        "{out}"
    );
}
