//! Outbound proxies against a real one: Debian's tinyproxy (installed by
//! `scripts/setup-debian.sh`), started by each test on a port of its own.
//!
//! 1. hcm and bridge through an authenticating proxy to a TLS relay: byte-exact, and the
//!    proxy's log shows the tunnels;
//! 2. what a 407 (no credentials, wrong ones), a refused CONNECT and a dead proxy look like
//!    to a client and in an hcm's status;
//! 3. NO_PROXY: a matching relay is reached directly (the proxy is dead), a non-matching
//!    one is not;
//! 4. proof that no byte goes around the proxy: the hcm, the bridge, `hc` and `doctor` run
//!    in a network namespace whose only way to the relay's namespace is the proxy's
//!    namespace (no routing between them), and the relay sees every peer at the proxy's
//!    address.

// Both fixtures load tests/common/data.rs; this file needs the in-process rig and the
// namespaces.
#![allow(clippy::duplicate_mod)]

mod common;
mod fault_rig;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{Rig, round_trip, wait_for};
use hyrelay::transport::proxy::{Proxy, ProxyConfig, ProxyError};
use hyrelay::transport::ws::{self, ConnectError};

/// A tinyproxy process with its own config and log file; killed on drop.
struct Tinyproxy {
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

/// What a proxy allows.
struct ProxyRules<'a> {
    /// Where it listens (inside `ns` if given); port 0 picks a free one.
    listen: SocketAddr,
    /// Clients allowed, as tinyproxy `Allow` values.
    allow: &'a str,
    /// Basic credentials it demands.
    auth: Option<(&'a str, &'a str)>,
    /// Ports it tunnels to (CONNECT elsewhere: 403).
    connect_ports: &'a [u16],
}

impl Tinyproxy {
    async fn start(ns: Option<&fault_rig::Netns>, rules: ProxyRules<'_>) -> Tinyproxy {
        assert!(
            std::process::Command::new("tinyproxy").arg("-v").output().is_ok(),
            "tinyproxy is not installed; scripts/setup-debian.sh installs it"
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tinyproxy.log");
        let mut addr = rules.listen;
        if addr.port() == 0 {
            // tinyproxy cannot report a port it picked: take a free one from the kernel.
            addr.set_port(std::net::TcpListener::bind(addr).unwrap().local_addr().unwrap().port());
        }
        let mut conf = format!(
            "Port {}\nListen {}\nTimeout 60\nMaxClients 200\nLogLevel Connect\nLogFile \"{}\"\nAllow {}\nDisableViaHeader Yes\n",
            addr.port(),
            addr.ip(),
            log.display(),
            rules.allow
        );
        for p in rules.connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((u, p)) = rules.auth {
            conf.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, conf).unwrap();
        let mut cmd = match ns {
            Some(n) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", &n.name, "tinyproxy"]);
                c
            }
            None => tokio::process::Command::new("tinyproxy"),
        };
        cmd.arg("-d")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("tinyproxy starts");
        let ready = wait_for(Duration::from_secs(10), || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Reloading config file finished"))
        })
        .await;
        assert!(
            ready,
            "tinyproxy did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Tinyproxy {
            addr,
            log,
            _dir: dir,
            _child: child,
        }
    }

    /// `CONNECT` requests the proxy logged.
    fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("): CONNECT ").map(|(_, r)| r.to_owned()))
            .collect()
    }

    fn url(&self, auth: Option<(&str, &str)>) -> String {
        match auth {
            Some((u, p)) => format!("http://{u}:{p}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    fn config(&self, auth: Option<(&str, &str)>) -> ProxyConfig {
        ProxyConfig::new(Some(Proxy::parse(&self.url(auth)).unwrap()), None)
    }
}

const USER: (&str, &str) = ("hyrelay", "s3cret-proxy-pw");

fn local_rules<'a>(auth: Option<(&'a str, &'a str)>, ports: &'a [u16]) -> ProxyRules<'a> {
    ProxyRules {
        listen: "127.0.0.1:0".parse().unwrap(),
        allow: "127.0.0.1",
        auth,
        connect_ports: ports,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hcm_and_bridge_through_an_authenticating_proxy() {
    let rig = Rig::new(true);
    let port = rig.relay.local_addr().port();
    let proxy = Tinyproxy::start(None, local_rules(Some(USER), &[port])).await;
    rig.create("px", common::echo()).await;
    let (listen, send) = (rig.listen_cs("px").await, rig.send_cs("px").await);
    let mut hc = rig.hcm_config(vec![hyrelay::hcm::config::HcEntry::new(listen, None).unwrap()]);
    hc.proxy = proxy.config(Some(USER));
    let _hcm = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners("px", 1).await;
    let mut bc = rig.bridge_config("px", &send);
    bc.proxy = proxy.config(Some(USER));
    let bridge = hyrelay::bridge::start(bc).unwrap();
    let data = common::payload(256 * 1024, 7);
    for _ in 0..3 {
        let back = round_trip(bridge.addr_of("px").unwrap(), &data).await.unwrap();
        assert!(back == data, "the echo came back different");
    }
    // The control channel, the runtime-information GET, three senders and their three
    // rendezvous: every one is a tunnel to the relay's port.
    let connects = proxy.connects();
    let to_relay = connects.iter().filter(|c| c.contains(&format!(":{port} "))).count();
    assert!(
        to_relay >= 8,
        "expected at least 8 tunnels to the relay, the proxy logged {connects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refusals_are_told_apart() {
    let rig = Rig::new(false);
    let port = rig.relay.local_addr().port();
    let proxy = Tinyproxy::start(None, local_rules(Some(USER), &[port])).await;
    let url = ws::WsUrl::parse(&format!("ws://127.0.0.1:{port}/$hc/x?sb-hc-action=listen")).unwrap();
    let attempt = |cfg: ProxyConfig, url: ws::WsUrl| async move {
        ws::connect_via(&url, None, &cfg, &[], Duration::from_secs(10)).await
    };
    let proxy_error = |r: Result<ws::ClientWs, ConnectError>| match r {
        Err(ConnectError::Proxy(e)) => e,
        other => panic!("expected a proxy error, got {other:?}"),
    };

    let e = proxy_error(attempt(proxy.config(None), url.clone()).await);
    assert!(matches!(e, ProxyError::AuthRequired { .. }), "{e}");
    assert!(e.to_string().contains("requires authentication (407"), "{e}");
    let e = proxy_error(attempt(proxy.config(Some((USER.0, "wrong-password"))), url.clone()).await);
    assert!(matches!(e, ProxyError::AuthRejected { .. }), "{e}");
    assert!(
        !e.to_string().contains("wrong-password"),
        "the password is never shown: {e}"
    );
    // A port the proxy does not tunnel to.
    let mut elsewhere = url.clone();
    elsewhere.port = port.wrapping_add(1).max(1);
    let e = proxy_error(attempt(proxy.config(Some(USER)), elsewhere).await);
    assert!(matches!(e, ProxyError::Refused { status: 403, .. }), "{e}");
    assert!(e.to_string().contains("refused to CONNECT"), "{e}");
    // With the right credentials the relay answers (404: no such hybrid connection).
    match attempt(proxy.config(Some(USER)), url.clone()).await {
        Err(ConnectError::Rejected { status: 404, .. }) => {}
        other => panic!("expected the relay's 404 through the proxy, got {other:?}"),
    }
    // A proxy that is not there.
    let (_refusing, dead) = common::refusing_addr();
    let cfg = ProxyConfig::new(Some(Proxy::parse(&format!("http://{dead}")).unwrap()), None);
    let e = proxy_error(attempt(cfg, url).await);
    assert!(
        e.is_unreachable() && e.to_string().contains("cannot reach the proxy"),
        "{e}"
    );

    // An hcm without credentials says why in its status, and never connects.
    rig.create("px", common::echo()).await;
    let mut hc = rig.hcm_config(vec![
        hyrelay::hcm::config::HcEntry::new(rig.listen_cs("px").await, None).unwrap(),
    ]);
    hc.proxy = proxy.config(None);
    let hcm = hyrelay::hcm::start(hc).unwrap();
    let said = wait_for(Duration::from_secs(10), || async {
        hcm.status()
            .first()
            .and_then(|s| s.last_error.as_deref())
            .is_some_and(|e| e.contains("requires authentication"))
    })
    .await;
    assert!(said, "status: {:?}", hcm.status());
    assert_eq!(rig.listeners("px").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_reaches_matching_relays_directly() {
    let rig = Rig::new(false);
    rig.create("np", common::echo()).await;
    let (listen, send) = (rig.listen_cs("np").await, rig.send_cs("np").await);
    let (_refusing, dead) = common::refusing_addr();
    let dead_proxy = format!("http://{dead}");
    // The proxy is dead: only a bypass can work. CIDR for the hcm, a name list for the bridge.
    let via = |no_proxy: &[&str]| {
        let list: Vec<String> = no_proxy.iter().map(|s| s.to_string()).collect();
        ProxyConfig::from_settings(Some(&dead_proxy), Some(&list)).unwrap()
    };
    let mut hc = rig.hcm_config(vec![hyrelay::hcm::config::HcEntry::new(listen, None).unwrap()]);
    hc.proxy = via(&["10.0.0.0/8", "127.0.0.0/8"]);
    let _hcm = hyrelay::hcm::start(hc).unwrap();
    rig.wait_listeners("np", 1).await;
    let mut bc = rig.bridge_config("np", &send);
    bc.proxy = via(&["relay.example.com", "127.0.0.1"]);
    let bridge = hyrelay::bridge::start(bc).unwrap();
    let data = common::payload(64 * 1024, 3);
    assert!(round_trip(bridge.addr_of("np").unwrap(), &data).await.unwrap() == data);
    // Not on the list: the bridge tries the dead proxy and the app's connection fails.
    let mut bc = rig.bridge_config("np", &send);
    bc.proxy = via(&["relay.example.com"]);
    let other = hyrelay::bridge::start(bc).unwrap();
    let back = round_trip(other.addr_of("np").unwrap(), b"ping").await;
    assert!(back.map(|b| b.is_empty()).unwrap_or(true), "no bytes came back");
}

// ---------------------------------------------------------------------------------------
// Around the proxy: namespaces

/// `ip netns exec NS hyrelay ARGS` with `env` set; (success, stdout + stderr).
async fn run_in(ns: &fault_rig::Netns, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = tokio::process::Command::new("ip");
    c.args(["netns", "exec", &ns.name, fault_rig::BIN]).args(args);
    for v in [
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(v);
    }
    c.envs(env.iter().copied())
        .env("HYRELAY_LOG", "warn")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("hyrelay finished")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_byte_goes_around_the_proxy() {
    use fault_rig::{Bridge, Hcm, Netns, Relay, link};
    // site (hcm, bridge, app, endpoint) | proxy | relay: the proxy's namespace does not
    // route, so the site reaches the relay's namespace only through tinyproxy.
    let site = Netns::new("pxsite");
    let mid = Netns::new("pxmid");
    let far = Netns::new("pxrelay");
    link(&site, "px0", "10.77.20.1/24", &mid, "px0", "10.77.20.2/24");
    link(&mid, "px1", "10.77.21.1/24", &far, "px1", "10.77.21.2/24");
    mid.sysctl("net.ipv4.ip_forward", "0");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        Some(&far),
        dir.path(),
        "10.77.21.2:9100",
        "[tls]\nmode = \"none\"\n",
        &["--public-url", "ws://10.77.21.2:9100"],
    )
    .await;
    let proxy = Tinyproxy::start(
        Some(&mid),
        ProxyRules {
            listen: "10.77.20.2:3128".parse().unwrap(),
            allow: "10.77.20.0/24",
            auth: Some(USER),
            connect_ports: &[9100],
        },
    )
    .await;
    let url = proxy.url(Some(USER));
    let endpoint = site.bind("127.0.0.1:0".parse().unwrap()).await;
    let echo = fault_rig::Echo::start(endpoint);
    relay.create(Some(&far), "wall", &echo.addr.to_string()).await;
    let listen = relay.connection_string(Some(&far), "wall", false).await;
    let send = relay.connection_string(Some(&far), "wall", true).await;

    // The site cannot reach the relay by itself.
    assert!(site.connect("10.77.21.2:9100".parse().unwrap()).await.is_err());

    let toml = format!("proxy = \"{url}\"\n");
    let hcm = Hcm::start(
        "hcm",
        Some(&site),
        &dir.path().join("hcm"),
        &toml,
        &[&listen],
        "hyrelay=info",
    )
    .await;
    relay.wait_listeners(Some(&far), "wall", 1).await;
    let bridge = Bridge::start(
        Some(&site),
        &dir.path().join("bridge"),
        &toml,
        &[("wall", &send)],
        "hyrelay=info",
    )
    .await;
    for seed in 0..3 {
        let data = fault_rig::payload(128 * 1024, seed);
        let s = site.connect(bridge.addrs[0]).await.unwrap();
        let back = fault_rig::exchange(s, &data, Duration::from_secs(30)).await.unwrap();
        assert!(back == data, "tunnel {seed} came back different");
    }
    // The relay saw the hcm at the proxy's address.
    let shown = relay.show(Some(&far), "wall").await;
    let remotes: Vec<&str> = shown["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["remoteAddress"].as_str())
        .collect();
    assert!(
        !remotes.is_empty() && remotes.iter().all(|r| r.starts_with("10.77.21.1:")),
        "listeners seen from {remotes:?}"
    );

    // `hc` with --proxy, `doctor` with HTTPS_PROXY: from the site too.
    let cli: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(relay.data_dir.join("cli.json")).unwrap()).unwrap();
    let manage = cli["connectionString"].as_str().unwrap().to_owned();
    let (ok, out) = run_in(
        &site,
        &["hc", "--connection-string", &manage, "--proxy", &url, "list"],
        &[],
    )
    .await;
    assert!(ok && out.contains("wall"), "{out}");
    let (ok, out) = run_in(&site, &["hc", "--connection-string", &manage, "list"], &[]).await;
    assert!(!ok, "without the proxy the relay is out of reach: {out}");
    let (ok, out) = run_in(
        &site,
        &[
            "doctor",
            "--connection-string",
            &listen,
            "--endpoint",
            &echo.addr.to_string(),
        ],
        &[("HTTPS_PROXY", url.as_str())],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.lines().next().is_some_and(|l| l.starts_with("OK    proxy")),
        "{out}"
    );
    assert!(!out.contains(USER.1), "the proxy password is never printed: {out}");
    let tunnels = proxy.connects();
    assert!(
        tunnels.iter().all(|c| c.starts_with("10.77.21.2:9100 ")),
        "only the relay is tunnelled to: {tunnels:?}"
    );
    assert!(!hcm.proc.log.tail(500).iter().any(|l| l.contains(USER.1)));
    assert!(!bridge.proc.log.tail(500).iter().any(|l| l.contains(USER.1)));
}
