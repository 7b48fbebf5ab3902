//! Live reload: hybrid connections and forwards added, removed and re-keyed from the
//! config file without dropping the tunnels of the others; an invalid file changes nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hyrelay::proto::connstr::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An echo exchange on an open tunnel: proves it still carries data.
async fn still_flows(s: &mut tokio::net::TcpStream, seed: u64) {
    let d = payload(10_000, seed);
    s.write_all(&d).await.unwrap();
    let mut back = vec![0u8; d.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == d, "tunnel carries data");
}

fn write_hcm_config(path: &Path, data_dir: &Path, ca: &[std::path::PathBuf], hcs: &[&ConnectionString]) {
    let mut t = format!(
        "data_dir = {:?}\nca_files = {:?}\nping_interval = \"5s\"\n",
        data_dir, ca
    );
    for cs in hcs {
        t.push_str(&format!(
            "[[hybrid_connection]]\nconnection_string = {:?}\n",
            cs.expose()
        ));
    }
    // Write atomically, as editors and config management do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, t).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_reload_adds_removes_and_rekeys_without_dropping_tunnels() {
    let rig = Rig::new(false);
    rig.create("a", echo()).await;
    rig.create("b", echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hcm.toml");
    let a1 = rig.listen_cs("a").await;
    write_hcm_config(&file, &dir.path().join("data"), &rig.ca_files(), &[&a1]);
    let mut cfg = hyrelay::hcm::config::HcmConfig::from_file(hyrelay::config::load_toml(&file).unwrap()).unwrap();
    cfg.config_file = Some(file.clone());
    cfg.runtime.set_workers(2).unwrap();
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("a", 1).await;
    let bridge_a = rig.bridge("a", &rig.send_cs("a").await);
    let mut held = tokio::net::TcpStream::connect(bridge_a.addr_of("a").unwrap())
        .await
        .unwrap();
    still_flows(&mut held, 1).await;

    // Add b and re-key a (the relay's primary key was regenerated): b comes up, a
    // reconnects with the new key, and the tunnel opened under the old one keeps going.
    rig.mgmt.regenerate_key("a", false, None).await.unwrap();
    let a2 = rig.listen_cs("a").await;
    assert_ne!(a1, a2);
    write_hcm_config(
        &file,
        &dir.path().join("data"),
        &rig.ca_files(),
        &[&a2, &rig.listen_cs("b").await],
    );
    rig.wait_listeners("b", 1).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            hcm.status()
                .iter()
                .any(|s| s.name == "a" && s.state == hyrelay::hcm::state::ChannelState::Connected && s.reconnects == 0)
                && hcm.status().len() == 2
        })
        .await,
        "a restarted with its new key: {:?}",
        hcm.status()
    );
    still_flows(&mut held, 2).await;

    // An invalid file is refused; everything keeps running.
    std::fs::write(&file, "ping_interval = \"soon\"\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hcm.status().len(), 2);
    assert_eq!(rig.listeners("b").await, 1);
    still_flows(&mut held, 3).await;

    // Remove b (and SIGHUP-style reload on request): b's listener goes, a's tunnel stays.
    write_hcm_config(&file, &dir.path().join("data"), &rig.ca_files(), &[&a2]);
    hcm.reload();
    rig.wait_listeners("b", 0).await;
    assert_eq!(rig.listeners("a").await, 1);
    still_flows(&mut held, 4).await;
}

fn write_bridge_config(path: &Path, ca: &[std::path::PathBuf], forwards: &[(&str, &ConnectionString)]) {
    let mut t = format!("ca_files = {:?}\n", ca);
    for (listen, cs) in forwards {
        let hc = cs.entity_path.clone().unwrap();
        t.push_str(&format!(
            "[[forward]]\nhybrid_connection = {hc:?}\nlisten = {listen:?}\nconnection_string = {:?}\n",
            cs.expose()
        ));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, t).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_reload_adds_removes_and_rotates_forwards() {
    let rig = Rig::new(true);
    rig.create("a", echo()).await;
    rig.create("b", echo()).await;
    let _ha = rig.hcm(&rig.listen_cs("a").await);
    let _hb = rig.hcm(&rig.listen_cs("b").await);
    rig.wait_listeners("a", 1).await;
    rig.wait_listeners("b", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.toml");
    let (pa, pb) = (free_port(), free_port());
    let sa = rig.send_cs("a").await;
    write_bridge_config(&file, &rig.ca_files(), &[(&pa, &sa)]);
    let mut cfg = hyrelay::bridge::config::BridgeConfig::from_file(hyrelay::config::load_toml(&file).unwrap()).unwrap();
    cfg.config_file = Some(file.clone());
    cfg.runtime.set_workers(2).unwrap();
    let bridge = hyrelay::bridge::start(cfg).unwrap();
    let mut held = tokio::net::TcpStream::connect(&pa).await.unwrap();
    still_flows(&mut held, 1).await;

    // Add b; rotate a to its secondary key.
    let sa2 = rig.mgmt.connection_string("a", true, true).await.unwrap();
    write_bridge_config(&file, &rig.ca_files(), &[(&pa, &sa2), (&pb, &rig.send_cs("b").await)]);
    assert!(wait_for(Duration::from_secs(10), || async { bridge.bound().len() == 2 }).await);
    assert_eq!(round_trip(pb.parse().unwrap(), b"to b").await.unwrap(), b"to b");
    // Old primary gone: only the rotated credentials can still connect.
    rig.mgmt
        .regenerate_key("a", false, Some("defaultSender"))
        .await
        .unwrap();
    assert_eq!(round_trip(pa.parse().unwrap(), b"to a").await.unwrap(), b"to a");
    still_flows(&mut held, 2).await;

    // Invalid file: nothing changes.
    std::fs::write(&file, "[[forward]]\nhybrid_connection = \"a\"\nlisten = \"nowhere\"\n").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bridge.bound().len(), 2);

    // Remove b: its port closes, a's tunnel goes on.
    write_bridge_config(&file, &rig.ca_files(), &[(&pa, &sa2)]);
    assert!(wait_for(Duration::from_secs(10), || async { bridge.bound().len() == 1 }).await);
    assert!(
        wait_for(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(&pb).await.is_err()
        })
        .await,
        "b's port is closed"
    );
    still_flows(&mut held, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_running_hcm_process() {
    use std::process::Stdio;
    let rig = Rig::new(false);
    rig.create("x", echo()).await;
    rig.create("y", echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hcm.toml");
    write_hcm_config(&file, &dir.path().join("data"), &[], &[&rig.listen_cs("x").await]);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"))
        .args(["--log-format", "json", "hcm", "--config", file.to_str().unwrap(), "run"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    rig.wait_listeners("x", 1).await;
    // The watcher would notice the change too; SIGHUP makes the reload immediate.
    write_hcm_config(
        &file,
        &dir.path().join("data"),
        &[],
        &[&rig.listen_cs("x").await, &rig.listen_cs("y").await],
    );
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    rig.wait_listeners("y", 1).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).await.unwrap();
    assert!(err.contains("\"event\":\"reload_applied\""), "{err}");
}
