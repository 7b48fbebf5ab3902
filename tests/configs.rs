//! Every example in configs/ parses; broken configs fail with the field named.

use std::path::Path;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        hyrelay::cli::check_config(&path, None).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        seen += 1;
    }
    assert_eq!(seen, 3, "one example per role");
}

fn error_of(role: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{role}.toml"));
    std::fs::write(&p, text).unwrap();
    format!("{:#}", hyrelay::cli::check_config(&p, None).unwrap_err())
}

#[test]
fn broken_configs_name_the_field() {
    let cases = [
        ("relay", "listen = \"nowhere\"\n[tls]\nmode = \"none\"", "listen"),
        (
            "relay",
            "[tls]\nmode = \"none\"\n[listeners]\nping_interval = \"often\"",
            "ping_interval",
        ),
        (
            "relay",
            "[tls]\nmode = \"none\"\n[listeners]\nbalnce = \"random\"",
            "balnce",
        ),
        ("relay", "[tls]\nmode = \"sometimes\"", "mode"),
        ("relay", "listen = \"0.0.0.0:443\"", "tls"),
        ("relay", "workers = 0\n[tls]\nmode = \"none\"", "workers"),
        (
            "hcm",
            "[[hybrid_connection]]\nconnection_string = \"Endpoint=ftp://x/\"",
            "hybrid_connection[0].connection_string",
        ),
        (
            "hcm",
            "[[hybrid_connection]]\nconnection_string = \"Endpoint=sb://r/;SharedAccessKeyName=a;SharedAccessKey=b\"",
            "hybrid_connection[0]",
        ),
        (
            "hcm",
            "[[hybrid_connection]]\nconnection_string = \"Endpoint=sb://r/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=x\"\nendpoint = \"db\"",
            "hybrid_connection[0].endpoint",
        ),
        ("hcm", "token_ttl = \"5s\"", "token_ttl"),
        ("hcm", "proxy = \"socks5://proxy:1080\"", "only http:// proxies"),
        ("hcm", "no_proxy = [\"10.0.0.0/99\"]", "no_proxy"),
        (
            "relay",
            "[tls]\nmode = \"none\"\n[limits]\nmax_connections_per_ip = 0",
            "limits.max_connections_per_ip",
        ),
        (
            "relay",
            "[tls]\nmode = \"none\"\n[limits]\nauth_max_delay = \"0s\"",
            "limits.auth_max_delay",
        ),
        (
            "hcm",
            "allowed_endpoints = [\"db:5432\", \"db\"]",
            "allowed_endpoints[1]",
        ),
        ("bridge", "", "forward"),
        (
            "bridge",
            "[[forward]]\nhybrid_connection = \"x\"\nlisten = \"abc\"",
            "forward[0].listen",
        ),
        (
            "bridge",
            "[[forward]]\nhybrid_connection = \"x\"\nlisten = \"80\"",
            "forward[0].connection_string",
        ),
        (
            "bridge",
            "connection_string = \"Endpoint=sb://r/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=y\"\n[[forward]]\nhybrid_connection = \"x\"\nlisten = \"80\"",
            "forward[0]",
        ),
        ("bridge", "[[forward]\n", "TOML"),
    ];
    for (role, text, field) in cases {
        let e = error_of(role, text);
        assert!(
            e.contains(field),
            "{role} config {text:?}: error {e:?} does not name {field:?}"
        );
    }
}

#[test]
fn systemd_units_start_commands_that_parse() {
    use clap::Parser;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/systemd");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{}: no {section}", path.display());
        }
        assert!(
            text.contains("ExecReload=/bin/kill -HUP $MAINPID"),
            "{}",
            path.display()
        );
        assert!(
            text.contains("KillSignal=SIGTERM") && text.contains("NoNewPrivileges=yes"),
            "{}",
            path.display()
        );
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
        let args: Vec<&str> = exec.split_whitespace().collect();
        // By name: systemd finds /usr/local/bin/hyrelay or the package's /usr/bin/hyrelay.
        assert_eq!(args[0], "hyrelay");
        hyrelay::cli::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert_eq!(seen, 3, "one unit per role");
}
