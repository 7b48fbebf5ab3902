//! Shared fixtures: an in-process relay on 127.0.0.1:0 with a management client, hcms,
//! bridges, echo endpoints, and bounded waiting.

#![allow(dead_code)]

mod data;
#[allow(unused_imports)] // not every test crate uses it
pub use data::{payload, sha256_hex};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyrelay::bridge::config::{BridgeConfig, Forward, Listen};
use hyrelay::client::Management;
use hyrelay::hcm::config::{HcEntry, HcmConfig};
use hyrelay::proto::connstr::ConnectionString;
use hyrelay::relay::config::{RelayConfig, TlsSetting};
use tempfile::TempDir;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HYRELAY_TEST_LOG").unwrap_or_else(|_| "off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A relay with its data directory and a management client.
pub struct Rig {
    pub relay: hyrelay::relay::RelayHandle,
    pub dir: TempDir,
    pub tls: Arc<rustls::ClientConfig>,
    pub mgmt: Management,
    pub cfg: RelayConfig,
}

impl Rig {
    /// A relay with a development certificate (`tls`) or plain ws, 2 workers.
    pub fn new(tls: bool) -> Self {
        Self::with(tls, |_| {})
    }

    pub fn with(tls: bool, tweak: impl FnOnce(&mut RelayConfig)) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let setting = if tls {
            TlsSetting::SelfSigned { names: vec![] }
        } else {
            TlsSetting::Plain
        };
        let mut cfg = RelayConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("relay"), setting);
        cfg.runtime.set_workers(2).unwrap();
        tweak(&mut cfg);
        let relay = hyrelay::relay::start(cfg.clone()).unwrap();
        let ca: Vec<_> = relay.ca_file().map(|p| p.to_path_buf()).into_iter().collect();
        let client_tls = hyrelay::transport::tls::client_config(&ca).unwrap();
        let mgmt = Management::new(relay.manage_connection_string(), client_tls.clone());
        Self {
            relay,
            dir,
            tls: client_tls,
            mgmt,
            cfg,
        }
    }

    /// Stops the relay and starts a new one on the same port and data directory.
    pub fn restart(&mut self) {
        let mut cfg = self.cfg.clone();
        cfg.listen = self.relay.local_addr();
        self.relay.halt();
        self.relay = hyrelay::relay::start(cfg).unwrap();
    }

    pub fn ca_files(&self) -> Vec<std::path::PathBuf> {
        self.relay.ca_file().map(|p| p.to_path_buf()).into_iter().collect()
    }

    pub async fn create(&self, name: &str, endpoint: SocketAddr) {
        self.mgmt.create(name, Some(&endpoint.to_string()), true).await.unwrap();
    }

    pub async fn listen_cs(&self, name: &str) -> ConnectionString {
        self.mgmt.connection_string(name, false, false).await.unwrap()
    }

    pub async fn send_cs(&self, name: &str) -> ConnectionString {
        self.mgmt.connection_string(name, true, false).await.unwrap()
    }

    /// An hcm config for `cs` with short timers, 2 workers, trusting the relay's CA.
    pub fn hcm_config(&self, entries: Vec<HcEntry>) -> HcmConfig {
        let mut c = HcmConfig::new(tempfile::tempdir().unwrap().keep());
        c.runtime.set_workers(2).unwrap();
        c.ca_files = self.ca_files();
        c.hybrid_connections = entries;
        c.max_backoff = Duration::from_secs(2);
        c
    }

    pub fn hcm(&self, cs: &ConnectionString) -> hyrelay::hcm::HcmHandle {
        hyrelay::hcm::start(self.hcm_config(vec![HcEntry::new(cs.clone(), None).unwrap()])).unwrap()
    }

    pub fn bridge_config(&self, hc: &str, cs: &ConnectionString) -> BridgeConfig {
        let mut c = BridgeConfig::new(vec![Forward {
            hybrid_connection: hc.into(),
            listen: Listen::Addr("127.0.0.1:0".parse().unwrap()),
            connection_string: cs.clone(),
        }]);
        c.runtime.set_workers(2).unwrap();
        c.ca_files = self.ca_files();
        c.relay_timeout = Duration::from_secs(10);
        c
    }

    pub fn bridge(&self, hc: &str, cs: &ConnectionString) -> hyrelay::bridge::BridgeHandle {
        hyrelay::bridge::start(self.bridge_config(hc, cs)).unwrap()
    }

    /// Listener count the relay reports for `name`.
    pub async fn listeners(&self, name: &str) -> u64 {
        self.mgmt.show(name).await.unwrap()["listenerCount"].as_u64().unwrap()
    }

    pub async fn wait_listeners(&self, name: &str, n: u64) {
        let ok = wait_for(Duration::from_secs(15), || async { self.listeners(name).await == n }).await;
        assert!(
            ok,
            "{name} never reached {n} listeners (has {})",
            self.listeners(name).await
        );
    }
}

/// Polls `f` every 50 ms until it is true or `limit` passes.
pub async fn wait_for<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Starts an echo endpoint on 127.0.0.1:0.
pub fn echo() -> SocketAddr {
    hyrelay::echo::spawn("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// A loopback endpoint served on a thread of its own (a current-thread runtime, so a busy
/// or finished test runtime never stalls it): `serve(connection, n)` runs on a task per
/// accepted connection, `n` counting them from 1. Returns its address.
pub fn serve_on_thread<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let mut n = 0;
            while let Ok((s, _)) = l.accept().await {
                n += 1;
                tokio::task::spawn_local(serve(s, n));
            }
        });
    });
    addr
}

/// An endpoint that greets, closes its sending side at once, and reports what it later
/// receives: checks that a half-close from the endpoint's side travels through.
pub fn greeter() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_on_thread(move |mut s, _| {
        let tx = tx.clone();
        async move {
            s.write_all(b"hello from the endpoint").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            tx.send(got).ok();
        }
    });
    (addr, rx)
}

/// Sends `data` through `addr`, half-closes, and returns everything read back.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "round trip timed out"))??;
    writer.await.unwrap()?;
    Ok(out)
}

/// The read half of a control channel driven by a test ([`raw_listener`]).
pub type RawReader = hyrelay::transport::ws::WsReader<tokio::io::ReadHalf<hyrelay::transport::Stream>>;
/// Its write half; keep it alive, or the channel closes.
pub type RawWriter = tokio::io::WriteHalf<hyrelay::transport::Stream>;

/// A loopback address that refuses connections while the returned socket lives: bound
/// but not listening, so nobody can take the port meanwhile, as anyone can take one a
/// closed listener released (a test that dials "a port with nothing on it" must not reach
/// another test's server).
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

/// A listener control channel on `hc` opened by the test itself (no hcm), to see exactly
/// what the relay sends.
pub async fn raw_listener(rig: &Rig, hc: &str) -> (RawReader, RawWriter) {
    raw_control_channel(&rig.listen_cs(hc).await, hc, Some(&rig.tls)).await
}

/// A listener control channel on `hc` with the Listen connection string `cs` (TLS with
/// `tls` when the relay's address is `wss://`); returns once the relay's 101 is in.
pub async fn raw_control_channel(
    cs: &ConnectionString,
    hc: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> (RawReader, RawWriter) {
    use hyrelay::{client, proto::frame::Role, transport::ws};
    let token = client::token(cs, hc, Duration::from_secs(600));
    let url = client::hc_url(cs, hc, "listen", "raw");
    let c = ws::connect(
        &url,
        tls,
        &[("ServiceBusAuthorization", &token)],
        Duration::from_secs(10),
    )
    .await
    .expect("raw listener's control channel");
    let (r, w) = tokio::io::split(c.stream);
    (ws::WsReader::new(r, c.leftover, Role::Client, 1 << 20), w)
}

/// The next control command `pick` takes (named `what` in failures) on a control channel,
/// skipping other messages; fails after 10 s.
pub async fn next_command<T>(
    r: &mut RawReader,
    what: &str,
    pick: impl Fn(hyrelay::proto::control::Command) -> Option<T>,
) -> T {
    use hyrelay::proto::control;
    use hyrelay::transport::ws::Message;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), r.next_message(1 << 17))
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s"))
            .expect("control channel read")
            .expect("control channel closed");
        if let Message::Text(t) = m
            && let Some(c) = pick(control::decode(&t).unwrap())
        {
            return c;
        }
    }
}

/// The next `accept` on a control channel, skipping other messages; fails after 10 s.
pub async fn next_accept(r: &mut RawReader) -> hyrelay::proto::control::Accept {
    use hyrelay::proto::control::Command;
    next_command(r, "accept", |c| match c {
        Command::Accept(a) => Some(a),
        _ => None,
    })
    .await
}

/// GET `path` from an admin listener at `addr` (one HTTP/1.1 exchange, `Connection:
/// close`): the status code and the body.
#[allow(dead_code)]
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// One tunnel through `rig` where the sender sends Close, then (200 ms later, out of
/// order) a ping, and the listener then sends 8 MiB and its Close to a slow reader: the
/// sender must get all of it and the Close (relay_protocol.rs and uring.rs).
#[allow(dead_code)]
pub async fn late_frame_after_close_keeps_the_download_whole(rig: &Rig) {
    use bytes::BytesMut;
    use hyrelay::proto::frame::Role;
    use hyrelay::proto::frame::{OpCode, encode_frame};
    use hyrelay::transport::ws::{self, Message, WsReader, WsUrl};
    use tokio::io::AsyncWriteExt;
    const TOTAL: usize = 8 << 20;
    const CHUNK: usize = 64 << 10;
    rig.create("tail", echo()).await;
    let (mut lr, _lw) = raw_listener(rig, "tail").await;
    rig.wait_listeners("tail", 1).await;
    let cs = rig.send_cs("tail").await;
    let token = hyrelay::client::token(&cs, "tail", Duration::from_secs(600));
    let url = hyrelay::client::hc_url(&cs, "tail", "connect", "late-1");
    let auth = [("ServiceBusAuthorization", token.as_str())];
    let (s, leg) = tokio::join!(ws::connect(&url, None, &auth, Duration::from_secs(20)), async {
        let a = next_accept(&mut lr).await;
        let url = WsUrl::parse(&a.address).unwrap();
        ws::connect(&url, None, &[], Duration::from_secs(10)).await.unwrap()
    });
    let mut s = s.expect("sender accepted");
    let mut leg = leg;
    // The sender is done sending: Close(1000), then (out of order) a ping.
    // (Apart, so that the relay has read the Close, and stopped reading, before the ping.)
    let bye = encode_frame(true, OpCode::Close, Some([9, 8, 7, 6]), &1000u16.to_be_bytes());
    s.stream.write_all(&bye).await.unwrap();
    s.stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = encode_frame(true, OpCode::Ping, Some([1, 2, 3, 4]), b"late");
    s.stream.write_all(&late).await.unwrap();
    s.stream.flush().await.unwrap();
    // The listener sends more than the sockets buffer, then its Close.
    let download = tokio::spawn(async move {
        let data = payload(CHUNK, 7);
        for _ in 0..TOTAL / CHUNK {
            let f = encode_frame(true, OpCode::Binary, Some([5, 6, 7, 8]), &data);
            leg.stream.write_all(&f).await?;
        }
        let f = encode_frame(true, OpCode::Close, Some([5, 6, 7, 8]), &1000u16.to_be_bytes());
        leg.stream.write_all(&f).await?;
        leg.stream.flush().await?;
        // Keep the leg open until the relay closes it.
        let mut sink = vec![0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut leg.stream, &mut sink).await? > 0 {}
        std::io::Result::Ok(())
    });
    // The sender reads late and slowly, so the relay's last writes are still queued when
    // it ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut r = WsReader::new(
        &mut s.stream,
        std::mem::replace(&mut s.leftover, BytesMut::new()),
        Role::Client,
        1 << 20,
    );
    let mut got = 0usize;
    let ended = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), r.next_message(1 << 20))
            .await
            .expect("the download stalled");
        match m {
            Ok(Some(Message::Binary(b))) => {
                got += b.len();
                // A slow reader, so the relay's output queue is full when it ends.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(Some(Message::Close(c))) => break Ok(c),
            Ok(Some(_)) => {}
            Ok(None) => break Err("EOF before the Close".to_owned()),
            Err(e) => break Err(format!("{e}")),
        }
    };
    assert!(
        ended.is_ok() && got == TOTAL,
        "the sender got {got} of {TOTAL} bytes, then {ended:?}"
    );
    drop(r);
    drop(s);
    tokio::time::timeout(Duration::from_secs(10), download)
        .await
        .expect("the relay closed the listener's leg")
        .unwrap()
        .unwrap();
}

/// GET /metrics from an admin address.
pub async fn metrics_text(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// The value of `name{hc="hc"}` in a metrics text (0 when absent).
pub fn metric(text: &str, name: &str, hc: &str) -> f64 {
    let prefix = format!("{name}{{hc=\"{hc}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
