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
    let (ok, _, err) = output(&["check-config", "/nonexistent/relay.toml"]).await;
    assert!(!ok && err.contains("no such file"), "{err}");
}

/// Issue 14 item 3: plain logs off a terminal, `--log-level` over `HYRELAY_LOG`, each cause
/// of an error once.
#[tokio::test]
async fn logs_are_plain_the_flag_wins_and_causes_print_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .env("HYRELAY_LOG", "error")
        .args([
            "--log-level",
            "info",
            "relay",
            "--plain",
            "--listen",
            &addr,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        !err.contains('\x1b'),
        "no ANSI codes when stderr is not a terminal: {err:?}"
    );
    assert!(
        err.contains(" WARN ") && err.contains("TLS is off"),
        "--log-level info wins: {err}"
    );
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: cannot listen on"), "{last}");
    assert_eq!(last.matches("in use").count(), 1, "each cause once: {last}");
}

/// Issue 14 item 4: help on every flag and positional, both choices named, completions and
/// man pages.
#[tokio::test]
async fn help_everywhere_choices_named_completions_and_man_pages() {
    use clap::CommandFactory;
    fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments() {
            let id = a.get_id().as_str();
            if id != "help" && id != "version" && a.get_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in c.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&hyrelay::cli::Cli::command(), "hyrelay", &mut missing);
    assert!(missing.is_empty(), "arguments without help: {missing:?}");

    let (ok, _, err) = output(&["hc", "regenerate-key", "db"]).await;
    assert!(!ok && err.contains("--primary") && err.contains("--secondary"), "{err}");
    let (ok, _, err) = output(&["hc", "connection-string", "db"]).await;
    assert!(!ok && err.contains("--listen") && err.contains("--send"), "{err}");

    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = output(&["completions", shell]).await;
        assert!(
            ok && out.contains("hyrelay") && out.contains("connection-string-file"),
            "{shell}: {err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = output(&["manpages", dir.path().to_str().unwrap()]).await;
    assert!(ok, "{err}");
    for page in ["hyrelay.1", "hyrelay-hcm-show.1", "hyrelay-hc-regenerate-key.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
}

/// Issue 14 item 4: the hints `relay` and `hc create` print work exactly as printed, with
/// a data directory that is not the default; an unknown CA says to pass --ca-file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printed_hints_work_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let mut relay = bin()
        .current_dir(dir.path())
        .args([
            "--log-level",
            "warn",
            "relay",
            "--plain",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(relay.stderr.take().unwrap()).lines();
    let hint = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let l = lines.next_line().await.unwrap().expect("relay printed its hint");
            if let Some(h) = l.strip_prefix("manage it on this machine with: ") {
                break h.split("   (").next().unwrap().to_owned();
            }
        }
    })
    .await
    .unwrap();
    assert!(hint.contains("--relay-data-dir"), "{hint}");
    let run = |cmd: String| {
        let d = dir.path().to_owned();
        async move {
            let words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
            assert_eq!(words[0], "hyrelay", "{cmd}");
            let out = bin().current_dir(d).args(&words[1..]).output().await.unwrap();
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    run(hint.clone()).await;
    let created = run(hint.replace(" list", " create sql --endpoint db.corp.local:1433")).await;
    let next: Vec<String> = created
        .lines()
        .map(|l| l.trim().trim_start_matches("next:").trim())
        .filter(|l| l.starts_with("hyrelay "))
        .map(|l| l.split("   (").next().unwrap().trim().to_owned())
        .collect();
    assert_eq!(next.len(), 2, "{created}");
    for cmd in next {
        run(cmd).await;
    }
    let listen = std::fs::read_to_string(dir.path().join("sql.listen")).unwrap();
    assert!(listen.contains("defaultListener") && listen.contains("EntityPath=sql"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("sql.send"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "--output writes owner-only");
    relay.kill().await.ok();

    // A TLS relay whose CA is not given: the error says what to do.
    let rig = Rig::new(true);
    let manage = dir.path().join("manage.cs");
    std::fs::write(&manage, rig.relay.manage_connection_string().expose()).unwrap();
    let (ok, _, err) = output(&["hc", "list", "--connection-string-file", manage.to_str().unwrap()]).await;
    assert!(!ok && err.contains("--ca-file"), "{err}");
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

    // hcm show: everything about one hybrid connection, never the key (issue 14 item 4).
    let key = match &rig.listen_cs("seg").await.credential {
        hyrelay::proto::connstr::Credential::Key { key, .. } => key.expose().to_owned(),
        _ => unreachable!(),
    };
    let (ok, out, err) = output(&["hcm", "--data-dir", &data_dir, "show", "seg"]).await;
    assert!(ok, "{err}");
    for needle in [
        "key name",
        "defaultListener",
        "token expires",
        "relay <-> hcm",
        "hcm <-> endpoint",
        "1 accepted",
    ] {
        assert!(out.contains(needle), "{needle:?} missing: {out}");
    }
    assert!(!out.contains(&key), "hcm show prints no key: {out}");
    let (ok, _, err) = output(&["hcm", "--data-dir", &data_dir, "show", "nope"]).await;
    assert!(!ok && err.contains("not served"), "{err}");

    // After the hcm stopped, its status shows no tunnels (issue 14 item 8).
    drop(_hcm);
    let (ok, _, err) = output(&["hcm", "--data-dir", &data_dir, "status"]).await;
    assert!(!ok && err.contains("not running") && err.contains("stopped"), "{err}");
    let (_, out, _) = output(&["hcm", "--data-dir", &data_dir, "show", "seg"]).await;
    assert!(out.contains("not running"), "{out}");
}

/// Issue 14 item 2: `hcm add`/`remove` run as root reach an hcm that runs as another user
/// (the unit's `DynamicUser=`; here `nobody`, through setpriv) and owns its data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_add_and_remove_reach_an_hcm_running_as_another_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (it runs the hcm as nobody)");
    }
    let (uid, gid) = (65534u32, 65534u32);
    let rig = Rig::new(false);
    rig.create("db", echo()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hcm");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = data.display().to_string();
    // The binary under test may sit where nobody cannot reach it (a clone under /root):
    // run a link to it (or a copy) from the test's own directory.
    let exe = dir.path().join("hyrelay");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_hyrelay"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_hyrelay"), &exe).unwrap();
    }
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut hcm = Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
            "--clear-groups",
        ])
        .arg(&exe)
        .args(["hcm", "--data-dir", &d, "run"])
        .env("HYRELAY_LOG", "warn")
        .kill_on_drop(true)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once it runs (its status file is there; at start it sweeps temporary files),
    // root adds a hybrid connection from a root-only file.
    assert!(
        wait_for(Duration::from_secs(15), || async { data.join("status.json").exists() }).await,
        "the hcm started as nobody"
    );
    let cs_file = dir.path().join("db.listen");
    std::fs::write(&cs_file, rig.listen_cs("db").await.expose()).unwrap();
    std::fs::set_permissions(&cs_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, _, err) = output(&[
        "hcm",
        "--data-dir",
        &d,
        "add",
        "--connection-string-file",
        cs_file.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    let meta = std::fs::metadata(data.join("connections.json")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (uid, gid, 0o600));
    assert!(
        wait_for(Duration::from_secs(15), || async { rig.listeners("db").await == 1 }).await,
        "the hcm running as nobody picked up `hcm add`"
    );
    let bridge = rig.bridge("db", &rig.send_cs("db").await);
    assert_eq!(round_trip(bridge.addr_of("db").unwrap(), b"hi").await.unwrap(), b"hi");
    let (ok, out, err) = output(&["hcm", "--data-dir", &d, "remove", "db"]).await;
    assert!(ok && out.contains("removed db"), "{err}");
    assert_eq!(std::fs::metadata(data.join("connections.json")).unwrap().uid(), uid);
    assert!(
        wait_for(Duration::from_secs(15), || async { rig.listeners("db").await == 0 }).await,
        "the hcm running as nobody picked up `hcm remove`"
    );
    hcm.kill().await.ok();
}

/// `cli.json` of a relay serving a certificate from files with a `public_url` names that
/// URL, whose host the certificate is for (it need not name `localhost`, which the file
/// named before, so `hyrelay hc` failed the certificate check); a relay with the
/// development certificate keeps `localhost`, which that certificate names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_json_names_the_public_url_of_a_relay_with_a_certificate() {
    use hyrelay::proto::connstr::{ConnectionString, RelayEndpoint};
    let cli_endpoint = |rig: &Rig| {
        let cli: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rig.relay.data_dir().join(hyrelay::relay::CLI_FILE)).unwrap())
                .unwrap();
        ConnectionString::parse(cli["connectionString"].as_str().unwrap())
            .unwrap()
            .endpoint
    };
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let public = RelayEndpoint {
        tls: true,
        host: "relay.test".into(),
        port: 8443,
    };
    let certified = Rig::with(true, |c| {
        c.tls = hyrelay::relay::config::TlsSetting::Files { cert, key };
        c.public_url = Some(public.clone());
    });
    assert_eq!(cli_endpoint(&certified), public);
    let development = Rig::with(true, |c| c.public_url = Some(public.clone()));
    assert_eq!(cli_endpoint(&development).host, "localhost");
}
