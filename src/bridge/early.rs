//! The bridge's side of the hyrelay extensions (`proto::extensions`): warm connections to
//! the relay and early data.
//!
//! Until a relay has advertised `early-data` on a 101, a forward uses the standard
//! protocol alone. From then on ([`Warm::learn`]):
//! - a few connections to the relay are kept open with TCP (and TLS) done but nothing sent
//!   ([`Warm::maintain`]): parked, so any worker can take one, and replaced before the
//!   relay's advertised head timeout (at 70 % of it) so the relay never sees them idle out;
//! - a new app connection takes one, sends its upgrade request with `X-Hyrelay-Early: 1`
//!   and, without waiting for the answer, the app's bytes as WebSocket frames
//!   ([`connect`]), at most [`EARLY_LIMIT`] of them; the relay holds them until the tunnel
//!   is joined. If the warm connection turns out dead before any answer, the same bytes go
//!   out again on a fresh one, so nothing the app sent is lost.
//!
//! Invariants: a warm connection is used at most once (it leaves the queue under the lock);
//! it carries no request until an app connection exists, so it never makes the relay send
//! an `accept`, and the endpoint never sees a connection no app opened.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proto::connstr::RelayEndpoint;
use crate::proto::extensions::{ADVERTISE_HEADER, Advertised};
use crate::proto::frame::{self, OpCode};
use crate::proto::handshake::ResponseHead;
use crate::transport::Stream;
use crate::transport::proxy::ProxyConfig;
use crate::transport::ws::{self, ClientWs, ConnectError, WsUrl};

/// App bytes sent ahead of the relay's answer at most (the relay holds up to 64 KiB).
pub const EARLY_LIMIT: usize = 32 * 1024;
/// Warm connections kept at most per forward.
pub const MAX_WARM: usize = 8;
/// How often the warm queue is refreshed and refilled.
const TICK: Duration = Duration::from_millis(250);

/// One forward's extension state.
#[derive(Default)]
pub(crate) struct Warm {
    /// What the relay advertised (once a 101 said so), with the relay it came from.
    offered: Mutex<Option<(RelayEndpoint, Advertised)>>,
    /// Parked warm connections: relay, when opened, stream.
    idle: Mutex<VecDeque<(RelayEndpoint, Instant, Stream)>>,
    /// App connections served, for sizing.
    served: AtomicU64,
    /// Wakes [`Warm::maintain`] when a warm connection was taken.
    taken: tokio::sync::Notify,
}

/// How warm connections are opened.
pub(crate) struct Dialer {
    pub tls: Arc<rustls::ClientConfig>,
    pub proxy: ProxyConfig,
}

impl Warm {
    /// Records a 101's advertisement from `relay`; true the first time early data is
    /// offered (the caller then starts [`Warm::maintain`]).
    pub fn learn(&self, relay: &RelayEndpoint, answer: &ResponseHead) -> bool {
        let a = Advertised::parse(answer.headers.get(ADVERTISE_HEADER));
        let mut offered = self.offered.lock().unwrap_or_else(|e| e.into_inner());
        let first = offered.is_none() && a.early_data;
        if a.early_data {
            *offered = Some((relay.clone(), a));
        }
        first
    }

    /// True when `relay` offered early data.
    pub fn early(&self, relay: &RelayEndpoint) -> bool {
        matches!(&*self.offered.lock().unwrap_or_else(|e| e.into_inner()), Some((r, a)) if r == relay && a.early_data)
    }

    /// Counts an app connection (for sizing).
    pub fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// How long a warm connection to the advertising relay may wait: 70 % of its head
    /// timeout (default 10 s).
    fn max_age(&self) -> Duration {
        let secs = self
            .offered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|(_, a)| a.head_timeout_secs)
            .unwrap_or(10);
        Duration::from_secs(u64::from(secs)).mul_f64(0.7)
    }

    /// A fresh warm connection to `relay`, unparked onto this worker.
    pub fn take(&self, relay: &RelayEndpoint) -> Option<Stream> {
        let max_age = self.max_age();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((r, at, mut s)) = idle.pop_front() {
            if &r == relay && at.elapsed() < max_age && s.unpark().is_ok() {
                self.taken.notify_one();
                return Some(s);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Keeps warm connections to the forward's relay (`relay()` reads its current
    /// connection string) until `stop`: stale ones dropped, the queue refilled (every tick,
    /// and at once when one is taken) to two more than a quarter of the app connections of
    /// the last second (at most [`MAX_WARM`]).
    pub async fn maintain(
        self: Arc<Self>,
        hc: String,
        relay: impl Fn() -> RelayEndpoint,
        dialer: Arc<Dialer>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(TICK);
        let mut window: VecDeque<u64> = VecDeque::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.taken.notified() => {}
                _ = stop.cancelled() => break,
            }
            let max_age = self.max_age();
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(_, at, _)| at.elapsed() < max_age);
            let served = self.served.load(Ordering::Relaxed);
            window.push_back(served);
            if window.len() > 4 {
                window.pop_front();
            }
            let rate = served - window.front().copied().unwrap_or(served);
            let want = (rate as usize / 4 + 2).min(MAX_WARM);
            // Shrink back as the rate falls: the oldest go first.
            {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                while idle.len() > want {
                    idle.pop_front();
                }
            }
            let endpoint = relay();
            for _ in self.len()..want {
                // Bounded: a relay that stopped answering must not stall the refresh.
                let opened = tokio::time::timeout(Duration::from_secs(10), open(&endpoint, &dialer)).await;
                match opened.unwrap_or_else(|_| Err(ConnectError::Timeout(Duration::from_secs(10)))) {
                    Ok(mut s) => {
                        if s.park().is_ok() {
                            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                            idle.push_back((endpoint.clone(), Instant::now(), s));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(hc = %hc, error = %e, "cannot open a warm connection to the relay");
                        break;
                    }
                }
            }
            metrics::gauge!(crate::telemetry::metrics::warm_connections("bridge"), "hc" => hc.clone())
                .set(self.len() as f64);
        }
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
        metrics::gauge!(crate::telemetry::metrics::warm_connections("bridge"), "hc" => hc).set(0.0);
    }
}

async fn open(relay: &RelayEndpoint, dialer: &Dialer) -> Result<Stream, ConnectError> {
    let tls = relay.tls.then_some(&dialer.tls);
    ws::open_stream(&relay.host, relay.port, tls, &dialer.proxy).await
}

/// Opens the sender WebSocket for `url` on `warm` (or a fresh connection), sending the
/// app's bytes from `app` as frames until the relay answers. The early bytes are kept in
/// `sent` (first replayed, if a previous try left some), so a warm connection that proves
/// dead, or a retry after a 503, loses none of them.
pub(crate) async fn connect(
    warm: Option<Stream>,
    url: &WsUrl,
    headers: &[(&str, &str)],
    app: &mut TcpStream,
    dialer: &Dialer,
    sent: &mut Vec<u8>,
) -> Result<ClientWs, ConnectError> {
    let fresh = || async {
        let relay = RelayEndpoint {
            tls: url.tls,
            host: url.host.clone(),
            port: url.port,
        };
        open(&relay, dialer).await
    };
    if let Some(stream) = warm {
        match attempt(stream, url, headers, app, sent).await {
            Err(Attempt::Dead) => {}
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(c) => return Ok(c),
        }
    }
    match attempt(fresh().await?, url, headers, app, sent).await {
        Ok(c) => Ok(c),
        Err(Attempt::Dead) => Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Err(Attempt::Failed(e)) => Err(e),
    }
}

enum Attempt {
    /// The connection ended before any answer byte: try another.
    Dead,
    Failed(ConnectError),
}

impl From<ConnectError> for Attempt {
    fn from(e: ConnectError) -> Self {
        Attempt::Failed(e)
    }
}

/// One try: the upgrade request, the early bytes already `sent` (replayed), then app
/// bytes as they come (recorded in `sent`) until the answer is complete.
async fn attempt(
    mut stream: Stream,
    url: &WsUrl,
    headers: &[(&str, &str)],
    app: &mut TcpStream,
    sent: &mut Vec<u8>,
) -> Result<ClientWs, Attempt> {
    let dead = |e: &ConnectError| matches!(e, ConnectError::Io(_));
    let key = ws::send_upgrade(&mut stream, url, headers)
        .await
        .map_err(|e| if dead(&e) { Attempt::Dead } else { Attempt::Failed(e) })?;
    if !sent.is_empty() {
        write_frame(&mut stream, sent).await.map_err(|_| Attempt::Dead)?;
    }
    let mut answer = BytesMut::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut app_open = true;
    loop {
        if let Some((head, used)) = ws::parse_answer(&answer)? {
            // 408: the relay's head timeout caught a warm connection after all.
            if head.status == 408 {
                return Err(Attempt::Dead);
            }
            return Ok(ws::finish_upgrade(stream, answer, head, used, &key)?);
        }
        let room = EARLY_LIMIT.saturating_sub(sent.len()).min(chunk.len());
        answer.reserve(4096);
        tokio::select! {
            // Cancel-safe: a read into `answer` keeps what it got.
            r = stream.read_buf(&mut answer) => match r {
                Ok(0) | Err(_) if answer.is_empty() => return Err(Attempt::Dead),
                Ok(0) => return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()).into()),
                Err(e) => return Err(ConnectError::Io(e).into()),
                Ok(_) => {}
            },
            // Cancel-safe: `read` on a TcpStream loses nothing when dropped.
            r = app.read(&mut chunk[..room]), if app_open && room > 0 => match r {
                Ok(0) | Err(_) => app_open = false,
                Ok(n) => {
                    write_frame(&mut stream, &chunk[..n]).await.map_err(|_| Attempt::Dead)?;
                    sent.extend_from_slice(&chunk[..n]);
                }
            },
        }
    }
}

/// One masked binary frame, flushed.
async fn write_frame(stream: &mut Stream, payload: &[u8]) -> std::io::Result<()> {
    let f = frame::encode_frame(true, OpCode::Binary, Some(rand::random()), payload);
    stream.write_all(&f).await?;
    stream.flush().await
}
