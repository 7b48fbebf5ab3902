//! `hyrelay doctor` against an in-process relay on loopback: each step's verdict in the
//! situations the troubleshooting checklist is for, and the binary's exit code and output.

mod common;

use std::time::Duration;

use common::*;
use hyrelay::cli::doctor::{Options, Step, StepResult, Verdict, run_checks};
use hyrelay::proto::connstr::{ConnectionString, Credential};
use hyrelay::proto::secret::Secret;
use hyrelay::relay::config::TlsSetting;

use Verdict::{Fail, Ok as Pass, Skip, Warn};

fn options(rig: &Rig, cs: ConnectionString) -> Options {
    Options {
        ca_files: rig.ca_files(),
        ..Options::new(cs)
    }
}

/// Runs the checks with an overall bound (8 steps of at most 5 s each, plus slack).
async fn doctor(opts: &Options) -> Vec<StepResult> {
    tokio::time::timeout(Duration::from_secs(60), run_checks(opts))
        .await
        .expect("doctor finished")
}

fn step(results: &[StepResult], step: Step) -> &StepResult {
    results.iter().find(|r| r.step == step).expect("every step reports")
}

/// Asserts the verdict of every step, in order, and shows all lines when one differs.
fn assert_verdicts(results: &[StepResult], expected: [Verdict; 9]) {
    let got: Vec<Verdict> = results.iter().map(|r| r.verdict).collect();
    let steps: Vec<Step> = results.iter().map(|r| r.step).collect();
    let lines: Vec<String> = results.iter().map(ToString::to_string).collect();
    assert_eq!(steps, Step::ALL, "steps in order");
    assert_eq!(got, expected, "verdicts:\n{}", lines.join("\n"));
}

fn key_of(cs: &ConnectionString) -> String {
    match &cs.credential {
        Credential::Key { key, .. } => key.expose().to_owned(),
        Credential::Token(t) => t.expose().to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_ok_with_a_connected_hcm() {
    let rig = Rig::new(true);
    rig.create("db", echo()).await;
    let listen = rig.listen_cs("db").await;
    let _hcm = rig.hcm(&listen);
    rig.wait_listeners("db", 1).await;

    let results = doctor(&options(&rig, listen)).await;
    assert_verdicts(&results, [Pass; 9]);
    let tls = step(&results, Step::Tls);
    assert!(
        tls.finding.contains("TLS 1.3") && tls.finding.contains("days left"),
        "{tls}"
    );
    let token = step(&results, Step::Token);
    assert!(
        token.finding.contains("key defaultListener") && token.finding.contains("accepted for listen"),
        "{token}"
    );
    // The listen test's own control channel is gone before the count is read.
    assert!(
        step(&results, Step::Listeners)
            .finding
            .starts_with("1 listener connected"),
        "{}",
        step(&results, Step::Listeners)
    );

    let results = doctor(&options(&rig, rig.send_cs("db").await)).await;
    assert_verdicts(&results, [Pass; 9]);
    let token = step(&results, Step::Token);
    assert!(token.finding.contains("accepted for connect"), "{token}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_fails_the_token_step() {
    let rig = Rig::new(true);
    rig.create("db", echo()).await;
    let mut cs = rig.listen_cs("db").await;
    cs.credential = Credential::Key {
        name: "defaultListener".into(),
        key: Secret::random_key(),
    };

    let results = doctor(&options(&rig, cs)).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Pass, Pass, Fail, Skip, Skip, Skip]);
    let token = step(&results, Step::Token);
    assert!(token.finding.contains("401"), "{token}");
    assert!(
        token.fix.as_deref().unwrap().contains("connection-string db --listen"),
        "{token}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_hybrid_connection_is_forbidden() {
    let rig = Rig::new(true);
    rig.create("a", echo()).await;
    rig.create("b", echo()).await;
    // A SharedAccessSignature scoped to "a", used for "b".
    let root = rig.relay.manage_connection_string();
    let token = hyrelay::client::token(&root, "a", Duration::from_secs(600));
    let cs = ConnectionString {
        endpoint: root.endpoint.clone(),
        credential: Credential::Token(Secret::new(token)),
        entity_path: Some("b".into()),
    };
    let results = doctor(&options(&rig, cs)).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Pass, Pass, Fail, Skip, Skip, Skip]);
    let token = step(&results, Step::Token);
    assert!(
        token.finding.contains("403") && token.finding.contains("given SharedAccessSignature"),
        "{token}"
    );
    assert!(
        token
            .finding
            .contains(&format!("scope http://{}/a,", root.endpoint.host)),
        "{token}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_is_reported() {
    let rig = Rig::new(true);
    rig.create("db", echo()).await;

    let results = doctor(&options(&rig, rig.listen_cs("db").await)).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Pass, Pass, Pass, Fail, Pass, Pass]);
    let listeners = step(&results, Step::Listeners);
    assert!(listeners.finding.contains("no listener"), "{listeners}");
    assert!(
        listeners.fix.as_deref().unwrap().contains("start an hcm"),
        "{listeners}"
    );

    // A Send string: "no listeners" means the token was accepted.
    let results = doctor(&options(&rig, rig.send_cs("db").await)).await;
    let token = step(&results, Step::Token);
    assert_eq!(token.verdict, Pass, "{token}");
    assert!(token.finding.contains("404"), "{token}");
    assert_eq!(step(&results, Step::Listeners).verdict, Fail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_the_endpoint_step() {
    let rig = Rig::new(true);
    let (_refusing, dead) = refusing_addr();
    rig.create("db", dead).await;
    let listen = rig.listen_cs("db").await;
    let _hcm = rig.hcm(&listen);
    rig.wait_listeners("db", 1).await;

    let results = doctor(&options(&rig, listen)).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Pass, Pass, Pass, Pass, Pass, Fail]);
    let tcp = step(&results, Step::EndpointTcp);
    assert!(
        tcp.finding.contains(&dead.to_string()) && tcp.finding.contains("refused"),
        "{tcp}"
    );

    // --endpoint overrides the metadata.
    let mut opts = options(&rig, rig.listen_cs("db").await);
    opts.endpoint = Some(echo().to_string().parse().unwrap());
    assert_verdicts(&doctor(&opts).await, [Pass; 9]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down_fails_tcp_and_skips_the_rest() {
    let (_refusing, dead) = refusing_addr();
    let cs = format!(
        "Endpoint=sb://127.0.0.1:{}/;SharedAccessKeyName=defaultListener;SharedAccessKey={};EntityPath=db",
        dead.port(),
        Secret::random_key().expose()
    );
    let results = doctor(&Options::new(ConnectionString::parse(&cs).unwrap())).await;
    assert_verdicts(&results, [Pass, Pass, Fail, Skip, Skip, Skip, Skip, Skip, Skip]);
    assert!(step(&results, Step::RelayTcp).finding.contains("refused"));

    // An endpoint given on the command line is still checked.
    let mut opts = Options::new(ConnectionString::parse(&cs).unwrap());
    opts.endpoint = Some(echo().to_string().parse().unwrap());
    assert_verdicts(
        &doctor(&opts).await,
        [Pass, Pass, Fail, Skip, Skip, Skip, Skip, Pass, Pass],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_relay_host_fails_dns() {
    let cs = format!(
        "Endpoint=sb://nonexistent.invalid/;SharedAccessKeyName=defaultListener;SharedAccessKey={};EntityPath=db",
        Secret::random_key().expose()
    );
    let results = doctor(&Options::new(ConnectionString::parse(&cs).unwrap())).await;
    assert_verdicts(&results, [Pass, Fail, Skip, Skip, Skip, Skip, Skip, Skip, Skip]);
    assert!(step(&results, Step::RelayDns).finding.contains("nonexistent.invalid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_points_to_ca_file() {
    let rig = Rig::new(true);
    rig.create("db", echo()).await;
    let opts = Options::new(rig.listen_cs("db").await); // no --ca-file
    let results = doctor(&opts).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Fail, Skip, Skip, Skip, Skip, Skip]);
    assert!(step(&results, Step::Tls).fix.as_deref().unwrap().contains("--ca-file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_relay_skips_tls() {
    let rig = Rig::new(false);
    rig.create("db", echo()).await;
    let listen = rig.listen_cs("db").await;
    let _hcm = rig.hcm(&listen);
    rig.wait_listeners("db", 1).await;
    let results = doctor(&options(&rig, listen)).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Skip, Pass, Pass, Pass, Pass, Pass]);
    assert!(step(&results, Step::Tls).finding.contains("ws://"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_about_to_expire_warns() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = short_lived_certificate(dir.path(), 5);
    let rig = Rig::with(true, |cfg| cfg.tls = TlsSetting::Files { cert, key });
    let cs = format!(
        "Endpoint=sb://localhost:{}/;SharedAccessKeyName=defaultListener;SharedAccessKey={};EntityPath=db",
        rig.relay.local_addr().port(),
        Secret::random_key().expose()
    );
    let mut opts = Options::new(ConnectionString::parse(&cs).unwrap());
    opts.ca_files = vec![ca];
    let results = doctor(&opts).await;
    let tls = step(&results, Step::Tls);
    assert_eq!(tls.verdict, Warn, "{tls}");
    assert!(
        tls.finding.contains("4 days left") || tls.finding.contains("5 days left"),
        "{tls}"
    );
    assert!(tls.fix.as_deref().unwrap().contains("renew"), "{tls}");
    // The relay is fine otherwise: it answers, and knows no hybrid connection "db".
    assert_eq!(step(&results, Step::Upgrade).verdict, Pass);
    assert!(step(&results, Step::Token).finding.contains("does not exist"));
}

/// A CA and a `localhost` certificate from it that expires in `days`; returns the files.
fn short_lived_certificate(
    dir: &std::path::Path,
    days: u64,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let now = hyrelay::proto::sas::unix_now();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.not_before = epoch + Duration::from_secs(now - 86_400);
    ca.not_after = epoch + Duration::from_secs(now + 365 * 86_400);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.not_before = epoch + Duration::from_secs(now - 86_400);
    leaf.not_after = epoch + Duration::from_secs(now + days * 86_400);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf_cert.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_wide_manage_string_lists_listeners() {
    let rig = Rig::new(true);
    rig.create("served", echo()).await;
    rig.create("idle", echo()).await;
    let _hcm = rig.hcm(&rig.listen_cs("served").await);
    rig.wait_listeners("served", 1).await;

    let results = doctor(&options(&rig, rig.relay.manage_connection_string())).await;
    assert_verdicts(&results, [Pass, Pass, Pass, Pass, Pass, Pass, Warn, Skip, Skip]);
    assert!(step(&results, Step::Token).finding.contains("Manage"));
    let listeners = step(&results, Step::Listeners);
    assert!(
        listeners.finding.contains("idle: 0") && listeners.finding.contains("served: 1"),
        "{listeners}"
    );
}

/// Runs the binary with the connection string in the environment; returns success,
/// stdout and stderr.
async fn run_binary(cs: &ConnectionString, rig: &Rig, extra: &[&str]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hyrelay"));
    cmd.arg("doctor")
        .args(extra)
        .env("HYRELAY_CONNECTION_STRING", cs.expose())
        .env("HYRELAY_LOG", "debug")
        .kill_on_drop(true);
    for v in ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(v);
    }
    for ca in rig.ca_files() {
        cmd.arg("--ca-file").arg(ca);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("doctor exited")
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exit_code_and_no_key_material() {
    let rig = Rig::new(true);
    rig.create("db", echo()).await;
    let listen = rig.listen_cs("db").await;
    let send = rig.send_cs("db").await;
    let secrets = [key_of(&listen), key_of(&send)];
    let assert_clean = |out: &str| {
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "key material in output:\n{out}");
        }
        assert!(!out.contains("sig="), "token in output:\n{out}");
    };

    // No listener yet: exit non-zero, one line per step.
    let (ok, stdout, stderr) = run_binary(&send, &rig, &[]).await;
    assert!(!ok, "{stdout}{stderr}");
    assert_eq!(stdout.lines().count(), 9, "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL  listeners")), "{stdout}");
    assert_clean(&stdout);
    assert_clean(&stderr);

    let _hcm = rig.hcm(&listen);
    rig.wait_listeners("db", 1).await;
    let (ok, stdout, stderr) = run_binary(&listen, &rig, &["--json", "--timeout", "10s"]).await;
    assert!(ok, "{stdout}{stderr}");
    let steps: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 9, "{stdout}");
    assert!(steps.iter().all(|s| s["verdict"] == "OK"), "{stdout}");
    assert_eq!(steps[5]["step"], "token");
    assert_clean(&stdout);
    assert_clean(&stderr);
}
