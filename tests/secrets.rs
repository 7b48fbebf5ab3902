//! Issue 9 item 12: secrets stay off command lines. Every role and command that takes a
//! connection string reads it from a file, standard input, the environment or a systemd
//! credential, and the key never shows in `/proc/PID/cmdline` of the running process.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use hyrelay::proto::connstr::{ConnectionString, Credential};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hyrelay"));
    c.kill_on_drop(true)
        .env_remove("HYRELAY_CONNECTION_STRING")
        .env_remove("HYRELAY_CONNECTION_STRING_FILE")
        .env("HYRELAY_LOG", "warn");
    c
}

fn key(cs: &ConnectionString) -> String {
    match &cs.credential {
        Credential::Key { key, .. } => key.expose().to_owned(),
        Credential::Token(t) => t.expose().to_owned(),
    }
}

/// The command line of a running process, NULs as spaces.
fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ")
}

fn write_secret(dir: &std::path::Path, name: &str, cs: &ConnectionString) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", cs.expose())).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_reach_the_command_line_of_a_running_role() {
    let rig = Rig::new(false);
    rig.create("vault", echo()).await;
    let (listen, send) = (rig.listen_cs("vault").await, rig.send_cs("vault").await);
    let dir = tempfile::tempdir().unwrap();

    // hcm: its config names a systemd credential; CREDENTIALS_DIRECTORY is what systemd
    // sets for a unit with LoadCredential=.
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    write_secret(&creds, "vault-listen", &listen);
    let cfg = dir.path().join("hcm.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[[hybrid_connection]]\nconnection_string_file = \"${{CREDENTIALS_DIRECTORY}}/vault-listen\"\n",
            dir.path().join("hcm")
        ),
    )
    .unwrap();
    let hcm = bin()
        .env("CREDENTIALS_DIRECTORY", &creds)
        .args(["hcm", "--config", cfg.to_str().unwrap(), "run"])
        .spawn()
        .unwrap();
    rig.wait_listeners("vault", 1).await;

    // bridge: the Send string from a file.
    let send_file = write_secret(dir.path(), "send.cs", &send);
    let mut bridge = bin()
        .args(["--log-level", "info", "bridge", "-L", "127.0.0.1:0=vault"])
        .arg("--connection-string-file")
        .arg(&send_file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(bridge.stderr.take().unwrap()).lines();
    let app = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let l = lines.next_line().await.unwrap().expect("bridge printed its port");
            if let Some(rest) = l.strip_prefix("forwarding ") {
                break rest.split(' ').next().unwrap().parse::<std::net::SocketAddr>().unwrap();
            }
        }
    })
    .await
    .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert_eq!(round_trip(app, b"sealed").await.unwrap(), b"sealed", "both roles work");

    for (role, pid) in [("hcm", hcm.id().unwrap()), ("bridge", bridge.id().unwrap())] {
        let line = cmdline(pid);
        assert!(line.contains("hyrelay"), "{line}");
        for k in [key(&listen), key(&send)] {
            assert!(!line.contains(&k), "{role}'s command line shows a key: {line}");
        }
        assert!(!line.contains("SharedAccessKey"), "{role}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_add_hc_and_doctor_read_stdin_files_and_the_environment() {
    let rig = Rig::new(false);
    rig.create("vault", echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hcm");
    let listen = rig.listen_cs("vault").await;

    // hcm add - : the string from standard input.
    let mut add = bin()
        .args(["hcm", "--data-dir", data.to_str().unwrap(), "add", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = add.stdin.take().unwrap();
    stdin
        .write_all(format!("{}\n", listen.expose()).as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = add.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("added vault"));

    // hc with the manage string from a file, options after the subcommand.
    let manage = write_secret(dir.path(), "manage.cs", &rig.relay.manage_connection_string());
    let out = bin()
        .args(["hc", "list", "--connection-string-file"])
        .arg(&manage)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vault"));

    // doctor with the string in the environment.
    let out = bin()
        .args(["doctor", "--json"])
        .env("HYRELAY_CONNECTION_STRING", rig.send_cs("vault").await.expose())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("\"step\":\"token\"") && l.contains("\"verdict\":\"OK\"")),
        "{text}"
    );

    // Standard input holds one secret; a second `-` is refused, not read as empty.
    let mut two = bin()
        .args([
            "bridge",
            "-L",
            "0=vault",
            "--connection-string",
            "-",
            "--connection-string-file",
            "-",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = two.stdin.take().unwrap();
    stdin.write_all(listen.expose().as_bytes()).await.unwrap();
    drop(stdin);
    let out = two.wait_with_output().await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already read"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_files_take_files_and_credentials_but_not_both() {
    let dir = tempfile::tempdir().unwrap();
    let cs = "Endpoint=sb://r/;SharedAccessKeyName=defaultListener;SharedAccessKey=k;EntityPath=db";
    let secret = dir.path().join("db.cs");
    std::fs::write(&secret, cs).unwrap();
    let cfg = dir.path().join("hcm.toml");
    let check = |text: String| {
        std::fs::write(&cfg, text).unwrap();
        hyrelay::cli::check_config(&cfg, None).map_err(|e| format!("{e:#}"))
    };
    check(format!("[[hybrid_connection]]\nconnection_string_file = {secret:?}\n")).unwrap();
    let e = check(format!(
        "[[hybrid_connection]]\nconnection_string_file = {secret:?}\nconnection_string = \"{cs}\"\n"
    ))
    .unwrap_err();
    assert!(e.contains("not both") && !e.contains("SharedAccessKey=k"), "{e}");
    let e = check("[[hybrid_connection]]\nconnection_string_file = \"-\"\n".into()).unwrap_err();
    assert!(e.contains("command line only"), "{e}");
    let e = check(format!(
        "[[hybrid_connection]]\nconnection_string_file = {:?}\n",
        dir.path().join("nope")
    ))
    .unwrap_err();
    assert!(e.contains("nope"), "{e}");
    // A credential only the unit can read: check-config accepts the file without it.
    check("[[hybrid_connection]]\nconnection_string_file = \"${CREDENTIALS_DIRECTORY}/db\"\n".into()).unwrap();
}

/// The relay's TLS key can be a systemd credential (`LoadCredential=relay.key:...` and
/// `key = "${CREDENTIALS_DIRECTORY}/relay.key"`): the unit's dynamic user cannot read a
/// root-only key in /etc, but it can read its credentials.
#[tokio::test]
async fn the_relay_reads_its_tls_key_from_a_systemd_credential() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(creds.join("relay.key"), key.serialize_pem()).unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nmode = \"files\"\ncert = \"{}\"\nkey = \"${{CREDENTIALS_DIRECTORY}}/relay.key\"\n",
        dir.path().join("data").display(),
        dir.path().join("cert.pem").display()
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, toml).unwrap();
    let mut relay = bin()
        .args(["relay", "--config"])
        .arg(&config)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(relay.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with("hyrelay relay listening on") {
                return true;
            }
        }
        false
    })
    .await;
    relay.kill().await.ok();
    assert_eq!(
        started.ok(),
        Some(true),
        "the relay started with the key from $CREDENTIALS_DIRECTORY"
    );
}
