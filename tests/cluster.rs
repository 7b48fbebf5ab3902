//! Issue 10: a relay cluster on Redis, with real processes: `redis-server` and `haproxy`
//! (Debian packages, installed by `scripts/setup-debian.sh`) started by each test on
//! loopback ports it picks, and relay nodes, hcms and bridges of the hyrelay binary.
//!
//! Every node gets its own data directory, listen port and admin port; its config file
//! names Redis, its own public URL (which its rendezvous addresses carry) and, behind
//! haproxy, the cluster's shared address for the connection strings it prints.

// Both fixtures load tests/common/data.rs; this file needs the namespaces' process rig and
// common's raw control channel.
#![allow(clippy::duplicate_mod)]

mod common;
mod fault_rig;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fault_rig::*;
use hyrelay::proto::connstr::ConnectionString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A loopback port nothing listens on now (for processes that must know their own URL
/// before they start).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tool(name: &str) -> &'static str {
    let path = match name {
        "redis-server" => "/usr/bin/redis-server",
        _ => "/usr/sbin/haproxy",
    };
    assert!(
        Path::new(path).exists(),
        "{path} is missing: scripts/setup-debian.sh installs it (the cluster tests need redis-server and haproxy)"
    );
    path
}

/// A redis-server on a loopback port, with an append-only file in `dir` (so a SIGKILL
/// and a restart keep the data, as a durable Redis does).
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    async fn start(dir: &Path) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
        };
        r.launch().await;
        r
    }

    async fn launch(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new(tool("redis-server"))
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", ""])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--protected-mode",
                "no",
            ])
            .args(["--dir", self.dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let up = wait_until(Duration::from_secs(10), || async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut s) => {
                    let mut b = [0u8; 7];
                    s.write_all(b"PING\r\n").await.is_ok() && s.read_exact(&mut b).await.is_ok() && &b == b"+PONG\r\n"
                }
                Err(_) => false,
            }
        })
        .await;
        assert!(up, "redis-server never answered on port {}", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.ok();
            c.wait().await.ok();
        }
    }

    /// Kills Redis and throws its data away: a Redis that lost everything.
    async fn wipe(&mut self) {
        self.kill9().await;
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A relay node of the cluster.
struct Node {
    relay: Relay,
    admin: SocketAddr,
    url: String,
}

impl Node {
    async fn start(dir: &Path, name: &str, redis: &Redis, service_url: Option<&str>) -> Node {
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let url = format!("ws://127.0.0.1:{port}");
        let mut toml = format!(
            "[tls]\nmode = \"none\"\n[cluster]\nredis = \"{}\"\npublic_url = \"{url}\"\nnode_id = \"{name}\"\n",
            redis.url()
        );
        if let Some(s) = service_url {
            toml.push_str(&format!("service_url = \"{s}\"\n"));
        }
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let relay = Relay::start(
            None,
            &d,
            &format!("127.0.0.1:{port}"),
            &toml,
            &["--admin", &admin.to_string()],
        )
        .await;
        Node { relay, admin, url }
    }

    /// The node's `/status` (JSON).
    async fn status(&self) -> serde_json::Value {
        let body = http_get(self.admin, "/status").await.1;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("status of {}: {e}: {body}", self.url))
    }

    /// `/readyz`: the status code and body.
    async fn readyz(&self) -> (u16, String) {
        http_get(self.admin, "/readyz").await
    }

    /// The hybrid connection `hc` in this node's status.
    async fn hc(&self, hc: &str) -> serde_json::Value {
        let st = self.status().await;
        st["hybridConnections"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == hc).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Whether this node holds a listener of `hc` itself.
    async fn holds_listener(&self, hc: &str) -> bool {
        self.hc(hc).await["listeners"]
            .as_array()
            .is_some_and(|a| a.iter().any(|l| l["node"].is_null()))
    }
}

/// A plain HTTP/1.1 GET to `addr`: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The runtime-information GET of `hc` on `node` with a token from `cs`: 200 when the
/// node has the hybrid connection and takes the key, 401 for a replaced key, 404 when gone.
async fn info_status(node: &Node, cs: &ConnectionString, hc: &str) -> u16 {
    let token = hyrelay::client::token(cs, hc, Duration::from_secs(600));
    let addr = node.relay.addr;
    http(
        addr,
        &format!("GET /{hc}?api-version=2016-07 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .0
}

/// `cs` with its endpoint moved to `to` (`ws://host:port`): the same key, another node.
fn pointed_at(cs: &str, to: &str) -> String {
    let mut parsed = ConnectionString::parse(cs).unwrap();
    parsed.endpoint = hyrelay::proto::connstr::RelayEndpoint::parse(to).unwrap();
    parsed.expose()
}

/// Waits until `f` holds; returns how long that took, or fails naming `what`.
async fn within<F, Fut>(limit: Duration, what: &str, f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    assert!(wait_until(limit, f).await, "{what}: not within {limit:?}");
    t.elapsed()
}

/// Nodes `n1`..`n{count}` on `redis`.
async fn nodes(dir: &Path, redis: &Redis, count: usize, service_url: Option<&str>) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 1..=count {
        nodes.push(Node::start(dir, &format!("n{i}"), redis, service_url).await);
    }
    nodes
}

async fn three(dir: &Path, redis: &Redis, service_url: Option<&str>) -> Vec<Node> {
    nodes(dir, redis, 3, service_url).await
}

/// What a cluster test starts from: the turn (one cluster test at a time), a directory,
/// a Redis of its own and `count` nodes on it.
async fn cluster(
    count: usize,
    service_url: Option<&str>,
) -> (
    tokio::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    Redis,
    Vec<Node>,
) {
    let turn = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(&dir.path().join("redis")).await;
    let nodes = nodes(dir.path(), &redis, count, service_url).await;
    (turn, dir, redis, nodes)
}

/// Creates `hc` (for `endpoint`) on `home` and starts an hcm for it (config `hcm_toml`)
/// with `home`'s Listen connection string; returns once `home` holds the listener and
/// every node of `others` sees it.
async fn serve_on(dir: &Path, home: &Node, others: &[&Node], hc: &str, endpoint: &str, hcm_toml: &str) -> Hcm {
    home.relay.create(None, hc, endpoint).await;
    let listen = home.relay.connection_string(None, hc, false).await;
    let hcm = Hcm::start("hcm", None, &dir.join("hcm"), hcm_toml, &[&listen], "hyrelay=info").await;
    within(Duration::from_secs(10), "the listener on its node", || async {
        home.holds_listener(hc).await
    })
    .await;
    for other in others {
        within(Duration::from_secs(5), "the other node sees the listener", || async {
            other.hc(hc).await["listeners"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
        .await;
    }
    hcm
}

/// A change made on any node (create, regenerate a key, delete) holds on every other node
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_reach_every_node_within_a_second() {
    let (_serial, _dir, redis, nodes) = cluster(3, None).await;
    let echo = Echo::local().await;

    nodes[0].relay.create(None, "db", &echo.addr.to_string()).await;
    let listen = ConnectionString::parse(&nodes[0].relay.connection_string(None, "db", false).await).unwrap();
    for n in &nodes[1..] {
        let took = within(
            Duration::from_secs(1),
            "created on n1, usable on the others",
            || async { info_status(n, &listen, "db").await == 200 },
        )
        .await;
        eprintln!("create reached {} in {} ms", n.url, ms(took));
    }

    run_ok(
        None,
        &[
            "hc",
            "--relay-data-dir",
            nodes[1].relay.data_dir.to_str().unwrap(),
            "regenerate-key",
            "db",
            "--primary",
        ],
    )
    .await;
    for n in [&nodes[0], &nodes[2]] {
        within(
            Duration::from_secs(1),
            "a key regenerated on n2 stops working",
            || async { info_status(n, &listen, "db").await == 401 },
        )
        .await;
    }
    let fresh = ConnectionString::parse(&nodes[1].relay.connection_string(None, "db", false).await).unwrap();
    for n in &nodes {
        assert_eq!(
            info_status(n, &fresh, "db").await,
            200,
            "the new key works on {}",
            n.url
        );
    }

    run_ok(
        None,
        &[
            "hc",
            "--relay-data-dir",
            nodes[2].relay.data_dir.to_str().unwrap(),
            "delete",
            "db",
        ],
    )
    .await;
    for n in &nodes[..2] {
        within(Duration::from_secs(1), "deleted on n3, gone on the others", || async {
            info_status(n, &fresh, "db").await == 404
        })
        .await;
    }
    let out = run_ok(None, &["cluster", "status", "--redis", &redis.url()]).await;
    for n in &nodes {
        assert!(out.contains(&n.url), "{out}");
    }
}

/// A listener on node 1 and a sender on node 3: 16 MiB byte-exact each way, and node 1
/// relays none of the tunnel's bytes (the hcm opened the rendezvous on node 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_on_another_node_than_the_listener_keeps_its_bytes_local() {
    let (_serial, dir, _redis, nodes) = cluster(3, None).await;
    let echo = Echo::local().await;
    let _hcm = serve_on(dir.path(), &nodes[0], &[&nodes[2]], "db", &echo.addr.to_string(), "").await;
    let send = nodes[2].relay.connection_string(None, "db", true).await;
    assert!(send.contains(&nodes[2].url[5..]));
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("db", &send)], "hyrelay=info").await;
    let data = payload(16 << 20, 7);
    let back = exchange(
        connect(None, bridge.addrs[0]).await.unwrap(),
        &data,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(back == data, "16 MiB byte-exact both ways through n3");
    // Counters are published once a second; both directions once the tunnel is done.
    within(Duration::from_secs(5), "n3 counts the bytes both ways", || async {
        let h = nodes[2].hc("db").await;
        h["bytesUp"].as_u64() == Some(16 << 20) && h["bytesDown"].as_u64() == Some(16 << 20)
    })
    .await;
    let on_n1 = nodes[0].hc("db").await;
    assert_eq!(
        (on_n1["bytesUp"].as_u64(), on_n1["bytesDown"].as_u64()),
        (Some(0), Some(0)),
        "no tunnel byte crossed n1: {on_n1}"
    );
}

/// A listener that has its 101 from one node is found by a sender on another node at
/// once, not after that node's next presence read (CI saw senders refused with 404 for
/// up to two beats after the hcm registered). Each round registers a fresh listener on
/// n1 and connects a sender to n2 right after the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listener_is_found_from_every_node_right_after_its_upgrade() {
    use hyrelay::{client, transport::ws};
    let (_serial, _dir, _redis, nodes) = cluster(2, None).await;
    for round in 0..3 {
        let hc = format!("fresh{round}");
        nodes[0].relay.create(None, &hc, "127.0.0.1:9").await;
        let listen = nodes[0].relay.connection_string(None, &hc, false).await;
        let send = nodes[0].relay.connection_string(None, &hc, true).await;
        // n2 knows the hybrid connection (the catalog), not yet any listener of it.
        within(Duration::from_secs(5), "n2 has the hybrid connection", || async {
            info_status(&nodes[1], &ConnectionString::parse(&send).unwrap(), &hc).await == 200
        })
        .await;
        let at_n1 = ConnectionString::parse(&pointed_at(&listen, &nodes[0].url)).unwrap();
        let (mut lr, _lw) = common::raw_control_channel(&at_n1, &hc, None).await;
        let cs = ConnectionString::parse(&pointed_at(&send, &nodes[1].url)).unwrap();
        let token = client::token(&cs, &hc, Duration::from_secs(600));
        let url = client::hc_url(&cs, &hc, "connect", "raw-sender");
        let mut sender = tokio::spawn(async move {
            ws::connect(
                &url,
                None,
                &[("ServiceBusAuthorization", &token)],
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
        });
        let accept = tokio::select! {
            a = common::next_accept(&mut lr) => a,
            r = &mut sender => panic!("round {round}: the sender on n2 ended before any accept: {:?}", r.unwrap()),
        };
        let rendezvous = ws::connect(
            &ws::WsUrl::parse(&accept.address).unwrap(),
            None,
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert!(rendezvous.is_ok(), "round {round}: rendezvous on n2");
        let r = tokio::time::timeout(Duration::from_secs(10), sender).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "round {round}: the sender on n2 got its 101: {r:?}"
        );
    }
}

/// Redis's count of `SMEMBERS` calls: one per presence read of any node.
/// Calls of Redis command `cmd` (lower case) so far, from `INFO commandstats`.
async fn command_calls(redis: &Redis, cmd: &str) -> u64 {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", redis.port)).await.unwrap();
    s.write_all(b"INFO commandstats\r\n").await.unwrap();
    // A bulk string: "$<len>\r\n<text>\r\n".
    let mut r = tokio::io::BufReader::new(s);
    let mut head = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut r, &mut head).await.unwrap();
    let len: usize = head.trim().trim_start_matches('$').parse().unwrap();
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    let prefix = format!("cmdstat_{cmd}:calls=");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.split(',').next().unwrap().parse().unwrap())
}

/// Presence reads so far (each reads the set of nodes).
async fn presence_reads(redis: &Redis) -> u64 {
    command_calls(redis, "smembers").await
}

/// Senders for a hybrid connection with no listener anywhere make their node read
/// presence before the 404 (a listener may have just arrived on another node), but a
/// crowd of them does not drive Redis: at most one such read per `MISS_FLOOR` (20 ms),
/// and those reads write nothing (the node's own record is written by its once-a-second
/// beat only; before, every such read rewrote it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_without_a_listener_read_presence_at_most_once_per_floor() {
    use hyrelay::{client, transport::ws};
    let (_serial, _dir, redis, nodes) = cluster(1, None).await;
    nodes[0].relay.create(None, "nobody", "127.0.0.1:9").await;
    let send = nodes[0].relay.connection_string(None, "nobody", true).await;
    let cs = ConnectionString::parse(&pointed_at(&send, &nodes[0].url)).unwrap();
    let token = client::token(&cs, "nobody", Duration::from_secs(600));
    let before = presence_reads(&redis).await;
    let sets_before = command_calls(&redis, "set").await;
    let started = Instant::now();
    let refused = Arc::new(AtomicUsize::new(0));
    let crowd: Vec<_> = (0..16)
        .map(|i| {
            let (cs, token, refused) = (cs.clone(), token.clone(), refused.clone());
            tokio::spawn(async move {
                for j in 0..25 {
                    let url = client::hc_url(&cs, "nobody", "connect", &format!("s{i}-{j}"));
                    let r = ws::connect(
                        &url,
                        None,
                        &[("ServiceBusAuthorization", &token)],
                        Duration::from_secs(10),
                    )
                    .await;
                    if matches!(r, Err(e) if e.status() == Some(404)) {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for c in crowd {
        c.await.unwrap();
    }
    let took = started.elapsed();
    let reads = presence_reads(&redis).await - before;
    let sets = command_calls(&redis, "set").await - sets_before;
    assert_eq!(
        refused.load(Ordering::Relaxed),
        400,
        "every sender is told there is no listener"
    );
    // The floor's share, plus the once-a-second beat and one read at either end.
    let bound = (took.as_millis() / 20 + took.as_secs() as u128 + 3) as u64;
    assert!(
        reads <= bound,
        "400 senders in {took:?} made {reads} presence reads (at most {bound})"
    );
    let set_bound = took.as_secs() + 2;
    assert!(
        sets <= set_bound,
        "400 senders in {took:?} made the node write its record {sets} times (at most {set_bound}: the beats)"
    );
}

/// A node that hears another node's announcement (its listeners changed) reads presence
/// and writes nothing: its own record has not changed, and its once-a-second beat renews
/// it. 24 listeners arriving one by one on n2 (25 is a hybrid connection's limit) are 24
/// announcements (a `SET` of n2's record and a `PUBLISH` each); n1 reads presence when it
/// hears them, so the `SET`s are n2's announcements plus the two nodes' beats (before, n1
/// also rewrote its own record for every announcement it heard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearing_another_nodes_announcement_only_reads() {
    let (_serial, _dir, redis, nodes) = cluster(2, None).await;
    nodes[0].relay.create(None, "heard", "127.0.0.1:9").await;
    let listen = nodes[0].relay.connection_string(None, "heard", false).await;
    let at_n2 = ConnectionString::parse(&pointed_at(&listen, &nodes[1].url)).unwrap();
    let send = nodes[0].relay.connection_string(None, "heard", true).await;
    within(Duration::from_secs(5), "n2 has the hybrid connection", || async {
        info_status(&nodes[1], &ConnectionString::parse(&send).unwrap(), "heard").await == 200
    })
    .await;
    let (sets0, pubs0) = (
        command_calls(&redis, "set").await,
        command_calls(&redis, "publish").await,
    );
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(common::raw_control_channel(&at_n2, "heard", None).await);
    }
    // n1 has heard of them all (and read after the last announcement).
    within(Duration::from_secs(5), "n1 sees n2's 24 listeners", || async {
        nodes[0].hc("heard").await["listeners"].as_array().map_or(0, Vec::len) == 24
    })
    .await;
    let took = started.elapsed();
    let sets = command_calls(&redis, "set").await - sets0;
    let pubs = command_calls(&redis, "publish").await - pubs0;
    assert!(pubs >= 24, "24 listener arrivals on n2 were announced {pubs} times");
    // n2's announcements, plus each node's beats (one a second, and one at either end).
    let bound = pubs + 2 * (took.as_secs() + 2);
    assert!(
        sets <= bound,
        "{pubs} announcements in {took:?} made {sets} writes of node records (at most {bound})"
    );
    drop(held);
}

/// 200 concurrent tunnels, senders spread over three nodes, two hcms on different nodes:
/// all byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tunnels_over_three_nodes_and_two_hcms() {
    let (_serial, dir, _redis, nodes) = cluster(3, None).await;
    let echo = Echo::local().await;
    nodes[0].relay.create(None, "db", &echo.addr.to_string()).await;
    let l1 = nodes[0].relay.connection_string(None, "db", false).await;
    let l2 = nodes[1].relay.connection_string(None, "db", false).await;
    let _h1 = Hcm::start("hcm1", None, &dir.path().join("hcm1"), "", &[&l1], "hyrelay=info").await;
    let _h2 = Hcm::start("hcm2", None, &dir.path().join("hcm2"), "", &[&l2], "hyrelay=info").await;
    for n in &nodes {
        within(Duration::from_secs(10), "every node sees both listeners", || async {
            n.hc("db").await["listeners"].as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    }
    let mut bridges = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let send = n.relay.connection_string(None, "db", true).await;
        bridges.push(
            Bridge::start(
                None,
                &dir.path().join(format!("bridge{i}")),
                "",
                &[("db", &send)],
                "hyrelay=warn",
            )
            .await,
        );
    }
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let app = bridges[i as usize % 3].addrs[0];
        tasks.push(tokio::spawn(async move {
            let data = payload(64 * 1024, i);
            let back = exchange(connect(None, app).await?, &data, Duration::from_secs(60)).await?;
            Ok::<bool, std::io::Error>(back == data)
        }));
    }
    let mut bad = 0;
    for t in tasks {
        if !matches!(t.await.unwrap(), Ok(true)) {
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of 200 tunnels failed or came back wrong");
}

/// haproxy with `port` in front of `nodes` (TCP, health-checked every 200 ms, a refused
/// connect re-dispatched to another node).
struct Haproxy {
    _child: Child,
    port: u16,
}

impl Haproxy {
    async fn start(dir: &Path, port: u16, nodes: &[&Node]) -> Haproxy {
        let mut cfg = format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  \
             retries 3\n  option redispatch\nfrontend relay\n  bind 127.0.0.1:{port}\n  default_backend nodes\nbackend nodes\n  balance roundrobin\n"
        );
        for (i, n) in nodes.iter().enumerate() {
            cfg.push_str(&format!(
                "  server n{} {} check inter 200 fall 1 rise 1\n",
                i + 1,
                &n.url["ws://".len()..]
            ));
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new(tool("haproxy"))
            .args(["-db", "-f", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(up, "haproxy never listened on {addr}");
        Haproxy { _child: child, port }
    }
}

/// Echoes 16 KiB chunks on `s` until `stop`, counting each in `done`; returns (exchanges,
/// whether every echo was right and the connection never failed).
async fn echo_until(
    mut s: tokio::net::TcpStream,
    seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> (usize, bool) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let chunk = payload(16 * 1024, seed * 1000 + n as u64);
        if s.write_all(&chunk).await.is_err() {
            return (n, false);
        }
        let mut back = vec![0u8; chunk.len()];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await {
            Ok(Ok(_)) if back == chunk => {
                if n == 0 {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n += 1
            }
            _ => return (n, false),
        }
    }
    (n, true)
}

/// Tunnels of `hc` open on the node itself (its `hyrelay_relay_active_tunnels` gauge).
async fn local_tunnels(n: &Node, hc: &str) -> u64 {
    let metrics = http_get(n.admin, "/metrics").await.1;
    let prefix = format!("hyrelay_relay_active_tunnels{{hc=\"{hc}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Behind haproxy: SIGKILL the node holding the hcm's control channel. The hcm is back on
/// another node within 2 s, no sender connect fails from 2 s after the kill on, and the
/// tunnels on the other nodes carry on byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_hcms_node_behind_haproxy() {
    let lb_port = free_port();
    let lb = format!("ws://127.0.0.1:{lb_port}");
    let (_serial, dir, _redis, mut nodes) = cluster(3, Some(&lb)).await;
    let _haproxy = Haproxy::start(dir.path(), lb_port, &nodes.iter().collect::<Vec<_>>()).await;
    let echo = Echo::local().await;
    nodes[0].relay.create(None, "db", &echo.addr.to_string()).await;
    let listen = nodes[0].relay.connection_string(None, "db", false).await;
    let send = nodes[0].relay.connection_string(None, "db", true).await;
    assert!(
        listen.contains(&format!("127.0.0.1:{}", _haproxy.port)),
        "service_url names haproxy: {listen}"
    );
    let _hcm = Hcm::start("hcm", None, &dir.path().join("hcm"), "", &[&listen], "hyrelay=info").await;
    let holder = Arc::new(std::sync::Mutex::new(None));
    within(Duration::from_secs(10), "the hcm registers on some node", || async {
        for (i, n) in nodes.iter().enumerate() {
            if n.holds_listener("db").await {
                *holder.lock().unwrap() = Some(i);
                return true;
            }
        }
        false
    })
    .await;
    let holder = holder.lock().unwrap().unwrap();
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("db", &send)], "hyrelay=info").await;
    let app = bridge.addrs[0];

    // Long tunnels, spread over the nodes by haproxy; those whose sender landed on the
    // killed node end with it, the others must not notice.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for i in 0..9 {
        let s = connect(None, app).await.unwrap();
        streams.push(tokio::spawn(echo_until(s, i, stop.clone(), started.clone())));
    }
    within(Duration::from_secs(10), "every stream is flowing", || async {
        started.load(Ordering::Relaxed) == 9
    })
    .await;
    // Published once a second: wait for the counts to cover all nine.
    let mut on_holder = 0;
    within(Duration::from_secs(5), "the nodes count the nine tunnels", || async {
        let mut total = 0;
        for n in &nodes {
            total += local_tunnels(n, "db").await;
        }
        total == 9
    })
    .await;
    on_holder += local_tunnels(&nodes[holder], "db").await;
    let killed_at = Instant::now();
    nodes[holder].relay.proc.kill9().await;
    let others: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holder)
        .map(|(_, n)| n)
        .collect();
    let back = within(Duration::from_secs(5), "the hcm is back on another node", || async {
        for n in &others {
            if n.holds_listener("db").await {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(2) + Duration::from_millis(500),
        "back after {back:?}"
    );

    // From 2 s after the kill on, every new connection works.
    let wait = Duration::from_secs(2).saturating_sub(killed_at.elapsed());
    tokio::time::sleep(wait).await;
    let failed = Arc::new(AtomicUsize::new(0));
    let mut checks = Vec::new();
    for i in 0..30u64 {
        let failed = failed.clone();
        checks.push(tokio::spawn(async move {
            let data = payload(4096, 900 + i);
            let ok = match connect(None, app).await {
                Ok(s) => exchange(s, &data, Duration::from_secs(20))
                    .await
                    .is_ok_and(|b| b == data),
                Err(_) => false,
            };
            if !ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in checks {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "sender connects failed after the node was gone"
    );
    stop.store(true, Ordering::Relaxed);
    let mut survived = 0;
    for s in streams {
        if s.await.unwrap().1 {
            survived += 1;
        }
    }
    // Every tunnel whose sender was on a surviving node ran on, byte-exact (checked per
    // chunk); only those on the killed node ended.
    assert_eq!(
        survived,
        9 - on_holder as usize,
        "{on_holder} of 9 tunnels were on the killed node"
    );
    nodes.remove(holder);
}

/// `hyrelay hc create new` through the node whose data directory is `data_dir`.
async fn create_new(data_dir: &str) -> (bool, String, String) {
    let args = [
        "hc",
        "--relay-data-dir",
        data_dir,
        "create",
        "new",
        "--endpoint",
        "10.0.0.1:1",
    ];
    run(None, &args).await
}

/// Redis SIGKILLed for 10 s: open tunnels go on, new tunnels to a listener on the same node
/// work, management writes get 503, and everything is consistent again within 2 s of Redis
/// returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_ten_seconds() {
    let (_serial, dir, mut redis, nodes) = cluster(2, None).await;
    let echo = Echo::local().await;
    let _hcm = serve_on(dir.path(), &nodes[0], &[], "db", &echo.addr.to_string(), "").await;
    let send = nodes[0].relay.connection_string(None, "db", true).await;
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("db", &send)], "hyrelay=info").await;
    let app = bridge.addrs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let open = tokio::spawn(echo_until(
        connect(None, app).await.unwrap(),
        1,
        stop.clone(),
        Arc::new(AtomicUsize::new(0)),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;

    redis.kill9().await;
    let n1 = nodes[0].relay.data_dir.to_str().unwrap().to_owned();
    within(Duration::from_secs(5), "n1 notices", || async {
        nodes[0].status().await["cluster"]["redisUp"] == false
    })
    .await;
    let (code, body) = nodes[0].readyz().await;
    assert_eq!(code, 200, "a node without Redis still serves its listeners: {body}");
    assert!(body.contains("degraded"), "{body}");
    let (ok, out, err) = create_new(&n1).await;
    assert!(
        !ok && format!("{out}{err}").contains("503"),
        "management writes are refused: {out}{err}"
    );
    for i in 0..5u64 {
        let data = payload(32 * 1024, 500 + i);
        let back = exchange(connect(None, app).await.unwrap(), &data, Duration::from_secs(20)).await;
        assert!(
            back.is_ok_and(|b| b == data),
            "new tunnel {i} to the listener on the same node"
        );
    }
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(Duration::from_secs(2))).await;

    redis.launch().await;
    let back = Instant::now();
    within(Duration::from_secs(2), "writes work again", || async {
        create_new(&n1).await.0
    })
    .await;
    let listen_new = ConnectionString::parse(&nodes[0].relay.connection_string(None, "new", false).await).unwrap();
    within(Duration::from_secs(1), "n2 has the new hybrid connection", || async {
        info_status(&nodes[1], &listen_new, "new").await == 200
    })
    .await;
    eprintln!("consistent {} ms after Redis returned", ms(back.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let (n, ok) = open.await.unwrap();
    assert!(
        ok && n > 0,
        "the open tunnel carried on byte-exact through the outage ({n} exchanges)"
    );
}

/// Redis restarted empty: no node re-creates the catalog (which would re-key everything);
/// `/readyz` says why; the old keys keep working; `cluster import --from-cache` restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_is_not_re_keyed() {
    let (_serial, dir, mut redis, nodes) = cluster(2, None).await;
    let echo = Echo::local().await;
    let _hcm = serve_on(dir.path(), &nodes[0], &[], "db", &echo.addr.to_string(), "").await;
    let send = nodes[1].relay.connection_string(None, "db", true).await;

    redis.wipe().await;
    redis.launch().await;
    for n in &nodes {
        within(Duration::from_secs(5), "readyz fails with the reason", || async {
            let (code, body) = n.readyz().await;
            code == 503 && body.contains("Redis holds no catalog")
        })
        .await;
    }
    let out = run_ok(None, &["cluster", "status", "--redis", &redis.url()]).await;
    assert!(out.contains("no catalog"), "nobody re-created it: {out}");
    // The keys did not change: a bridge with the old send string is served through n2
    // (once the nodes' presence is back in the emptied Redis, within a beat or two).
    within(Duration::from_secs(5), "n2 sees n1's listener again", || async {
        nodes[1].hc("db").await["listeners"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    let bridge = Bridge::start(None, &dir.path().join("bridge"), "", &[("db", &send)], "hyrelay=info").await;
    let data = payload(100_000, 3);
    let back = exchange(
        connect(None, bridge.addrs[0]).await.unwrap(),
        &data,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(back == data);

    let cache = nodes[0].relay.data_dir.join("cluster-cache.json");
    run_ok(
        None,
        &[
            "cluster",
            "import",
            "--redis",
            &redis.url(),
            "--from-cache",
            cache.to_str().unwrap(),
        ],
    )
    .await;
    for n in &nodes {
        within(Duration::from_secs(3), "ready again after the import", || async {
            n.readyz().await.0 == 200
        })
        .await;
    }
}

/// `cluster import` of a single relay's state: the hcm and bridge connection strings it
/// handed out work against every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_grows_into_a_cluster_without_re_keying() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("single")).unwrap();
    let single = Relay::start(
        None,
        &dir.path().join("single"),
        "127.0.0.1:0",
        "[tls]\nmode = \"none\"\n",
        &[],
    )
    .await;
    let echo = Echo::local().await;
    single.create(None, "db", &echo.addr.to_string()).await;
    let listen = single.connection_string(None, "db", false).await;
    let send = single.connection_string(None, "db", true).await;
    let data_dir = single.data_dir.clone();
    drop(single);

    let redis = Redis::start(&dir.path().join("redis")).await;
    let out = run_ok(
        None,
        &[
            "cluster",
            "import",
            "--redis",
            &redis.url(),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains("1 hybrid connections"), "{out}");
    let nodes = three(dir.path(), &redis, None).await;
    let _hcm = Hcm::start(
        "hcm",
        None,
        &dir.path().join("hcm"),
        "",
        &[&pointed_at(&listen, &nodes[0].url)],
        "hyrelay=info",
    )
    .await;
    within(Duration::from_secs(10), "the old listen string works on n1", || async {
        nodes[0].holds_listener("db").await
    })
    .await;
    for (i, n) in nodes.iter().enumerate() {
        let b = Bridge::start(
            None,
            &dir.path().join(format!("bridge{i}")),
            "",
            &[("db", &pointed_at(&send, &n.url))],
            "hyrelay=info",
        )
        .await;
        within(Duration::from_secs(5), "the node sees the listener", || async {
            n.hc("db").await["listeners"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
        let data = payload(50_000, i as u64);
        let back = exchange(connect(None, b.addrs[0]).await.unwrap(), &data, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(back == data, "the old send string works through {}", n.url);
    }
}

/// `configs/haproxy.cfg`, the README's load balancer for a cluster, is a valid haproxy
/// configuration.
#[test]
fn the_example_haproxy_config_is_valid() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/haproxy.cfg");
    let out = std::process::Command::new(tool("haproxy"))
        .args(["-c", "-f", cfg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An HTTP endpoint on loopback: answers every request 200 with its method, path and body
/// echoed (`<METHOD> <path>\n<body>`).
fn http_echo_endpoint() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let head = format!("{} {}\n", req.method(), req.uri().path());
                    let body = req.into_body().collect().await?.to_bytes();
                    let mut out = head.into_bytes();
                    out.extend_from_slice(&body);
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(bytes::Bytes::from(out))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A chunked HTTP/1.1 body decoded (as it is when it holds no chunk-size line).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n + 2 {
            return body.to_owned();
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

/// HTTP mode across nodes: a plain HTTP sender on n2, the only listener (an hcm) on n1.
/// The request command goes to n1 through Redis in the rendezvous-only form; the hcm
/// fetches the request (and a body above the inline limit) from n2 and answers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_on_another_node_than_the_listener() {
    let (_serial, dir, _redis, nodes) = cluster(2, None).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let ep = http_echo_endpoint();
    let _hcm = serve_on(dir.path(), n1, &[n2], "api", &ep.to_string(), "").await;
    let send = ConnectionString::parse(&n2.relay.connection_string(None, "api", true).await).unwrap();
    assert!(!n2.holds_listener("api").await);
    let token = hyrelay::client::token(&send, "api", Duration::from_secs(600));
    let addr = n2.relay.addr;
    let request = |method: &str, path: &str, body: &str| {
        format!(
            "{method} /api{path} HTTP/1.1\r\nHost: {addr}\r\nServiceBusAuthorization: {token}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let (status, body) = http(addr, &request("GET", "/v1/orders", "")).await;
    assert_eq!((status, dechunk(&body).as_str()), (200, "GET /v1/orders\n"));
    let (status, body) = http(addr, &request("POST", "/small", "hello")).await;
    assert_eq!((status, dechunk(&body).as_str()), (200, "POST /small\nhello"));
    // Above the 64 KiB inline limit: the body travels on the rendezvous.
    let big: String = (0..(1 << 20)).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let (status, body) = http(addr, &request("PUT", "/big", &big)).await;
    assert_eq!(status, 200);
    assert!(
        dechunk(&body).strip_prefix("PUT /big\n") == Some(big.as_str()),
        "1 MiB echoed whole"
    );
    let metrics = http_get(n2.admin, "/metrics").await.1;
    let routed = metrics
        .lines()
        .find(|l| {
            l.starts_with("hyrelay_cluster_accepts_routed_total")
                && l.contains("direction=\"to\"")
                && l.contains("result=\"ok\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(routed, Some(3.0), "three requests routed from n2 to n1");
}

/// The hcm's `hyrelay_hcm_warm_connections{hc}` (its rendezvous pool) from its admin listener.
async fn hcm_pool(admin: SocketAddr, hc: &str) -> u64 {
    let metrics = http_get(admin, "/metrics").await.1;
    metrics
        .lines()
        .find(|l| l.starts_with("hyrelay_hcm_warm_connections{") && l.contains(&format!("hc=\"{hc}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `n` short tunnels through `bridge`, `conc` at a time, each one echo; all must succeed.
async fn burst(bridge: SocketAddr, n: usize, conc: usize) {
    let left = Arc::new(AtomicUsize::new(n));
    let tasks: Vec<_> = (0..conc)
        .map(|w| {
            let left = left.clone();
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let d = payload(64, w as u64);
                    let s = connect(None, bridge).await.unwrap();
                    assert!(exchange(s, &d, Duration::from_secs(10)).await.unwrap() == d);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The hcm's pool sizes (from its admin listener at `admin`), sampled every 100 ms while
/// 600 tunnels go through `bridge`, 16 at a time, and for 500 ms after.
async fn pool_sizes_during_burst(admin: SocketAddr, bridge: SocketAddr) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sizes = Vec::new();
            // Bounded: the burst ends (or fails) within its tunnels' timeouts.
            while !stop.load(Ordering::Relaxed) && sizes.len() < 3000 {
                sizes.push(hcm_pool(admin, "pool").await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sizes
        })
    };
    burst(bridge, 600, 16).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap()
}

/// The hcm's rendezvous pool (a hyrelay extension) grows with the senders of the node it
/// is on, not with senders on other nodes, which it cannot serve: with the hcm's
/// connection string naming n1, a burst of tunnels from a bridge on n2 leaves the pool at
/// its minimum, and the same burst from a bridge on n1 grows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hcm_pool_grows_only_for_senders_it_can_serve() {
    let (_serial, dir, _redis, nodes) = cluster(2, None).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let echo = Echo::local().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = format!("admin = \"{admin}\"\n");
    let _hcm = serve_on(dir.path(), n1, &[n2], "pool", &echo.addr.to_string(), &toml).await;
    within(Duration::from_secs(5), "the pool at its minimum", || async {
        hcm_pool(admin, "pool").await == 2
    })
    .await;
    // Senders on n2: routed to the hcm's control channel on n1, never to its pool.
    let cs = n2.relay.connection_string(None, "pool", true).await;
    let far = Bridge::start(None, &dir.path().join("far"), "", &[("pool", &cs)], "hyrelay=info").await;
    let sizes = pool_sizes_during_burst(admin, far.addrs[0]).await;
    assert!(
        sizes.iter().all(|&n| n <= 2),
        "the pool grew for senders on another node: {sizes:?}"
    );
    // Senders on n1: the pool grows with them.
    let cs = n1.relay.connection_string(None, "pool", true).await;
    let near = Bridge::start(None, &dir.path().join("near"), "", &[("pool", &cs)], "hyrelay=info").await;
    let sizes = pool_sizes_during_burst(admin, near.addrs[0]).await;
    assert!(
        sizes.iter().any(|&n| n > 2),
        "the pool did not grow for its own node's senders: {sizes:?}"
    );
}
