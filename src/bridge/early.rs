//! The bridge's side of the hyrelay extensions (`proto::extensions`): warm connections to
//! the relay and early data.
//!
//! Until a relay has advertised `early-data` on a 101, a forward uses the standard
//! protocol alone. From then on ([`Warm::learn`]):
//! - a few connections to the relay are kept open with TCP (and TLS) done but nothing sent
//!   ([`Warm::maintain`]): parked, so any worker can take one, and replaced before the
//!   relay's advertised head timeout (at 70 % of it) so the relay never sees them idle out,
//!   and dropped once the relay closed them (a restart), found without writing to them;
//! - a new app connection takes one, sends its upgrade request with `X-Hyrelay-Early: 1`
//!   and, without waiting for the answer, the app's bytes as WebSocket frames
//!   ([`connect`]), at most [`EARLY_LIMIT`] of them; the relay holds them until the tunnel
//!   is joined. If the warm connection turns out dead before any answer, the same bytes go
//!   out again on a fresh one, so nothing the app sent is lost.
//!
//! - once the relay also offers `reuse`, the upgrade opts in (`X-Hyrelay-Reuse: 1`); a
//!   connection whose 101 promised it and whose tunnel ended cleanly comes back to the
//!   queue ([`Warm::back`]) instead of being closed, so a steady stream of app connections
//!   opens no new connection to the relay.
//!
//! Invariants: a warm connection carries one tunnel at a time (it leaves the queue under
//! the lock, and comes back only after its tunnel's close handshake is complete);
//! it carries no request until an app connection exists, so it never makes the relay send
//! an `accept`, and the endpoint never sees a connection no app opened.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// Connections in tunnels whose 101 promised reuse (they may come back).
    returning: AtomicUsize,
}

/// Counts a connection in a tunnel that may come back to the warm queue.
struct Returning(Arc<Warm>);

impl Returning {
    fn new(w: Arc<Warm>) -> Self {
        w.returning.fetch_add(1, Ordering::Relaxed);
        Self(w)
    }

    /// Parks `stream` in the queue if there is room (else it is closed).
    fn back(self, hc: String, relay: RelayEndpoint, mut stream: Stream) {
        if stream.park().is_err() {
            return;
        }
        let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_WARM {
            idle.push_back((relay, Instant::now(), stream));
            drop(idle);
            metrics::counter!(crate::telemetry::metrics::reused_connections("bridge"), "hc" => hc).increment(1);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        self.0.returning.fetch_sub(1, Ordering::Relaxed);
    }
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
        // Every tunnel's 101 says it again: the relay's name is copied only when it changed.
        if a.early_data && !matches!(&*offered, Some((r, was)) if r == relay && *was == a) {
            *offered = Some((relay.clone(), a));
        }
        first
    }

    /// What `relay` offered, when it offered early data (the extensions a forward uses
    /// are decided on this, read once per app connection).
    pub fn offer(&self, relay: &RelayEndpoint) -> Option<Advertised> {
        match &*self.offered.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((r, a)) if r == relay && a.early_data => Some(*a),
            _ => None,
        }
    }

    /// Where a connection to `relay` goes after a tunnel that ended cleanly, when its 101
    /// promised reuse: back to the warm queue, as the newest (the relay reads it for a new
    /// request head from the end of the tunnel, so its age starts again). While the tunnel
    /// runs it counts towards the queue's size ([`Warm::maintain`]).
    pub fn back(self: &Arc<Self>, hc: String, relay: RelayEndpoint) -> crate::dataplane::splice::Back {
        let returning = Returning::new(self.clone());
        // Nothing may follow the relay's Close on a sender's connection: one that sent
        // something is closed.
        Box::new(move |stream, rest: BytesMut| {
            if rest.is_empty() {
                returning.back(hc, relay, stream);
            }
        })
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
    ///
    /// Taking one wakes [`Warm::maintain`] to open a replacement; with `reuse` (the app
    /// connection opts in) only when fewer than two are left, since the one taken will
    /// likely come back after its tunnel (a replacement opened meanwhile would find the
    /// queue full then, and one of the two would be closed for nothing).
    pub fn take(&self, relay: &RelayEndpoint, reuse: bool) -> Option<Stream> {
        let max_age = self.max_age();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((r, at, mut s)) = idle.pop_front() {
            // A relay that restarted closed its warm connections: skip those rather than
            // spend the app's first try on one.
            if &r == relay && at.elapsed() < max_age && s.idle_and_open() && s.unpark().is_ok() {
                if !reuse || idle.len() < 2 {
                    self.taken.notify_one();
                }
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
        let mut window = crate::client::LastSecond::new(TICK);
        loop {
            let ticked = tokio::select! {
                _ = tick.tick() => true,
                _ = self.taken.notified() => false,
                _ = stop.cancelled() => break,
            };
            let max_age = self.max_age();
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain_mut(|(_, at, s)| at.elapsed() < max_age && s.idle_and_open());
            // App connections in the last second (sampled on the ticks only: a take wakes
            // this task too).
            let rate = window.rate(self.served.load(Ordering::Relaxed), ticked);
            let want = (rate as usize / 4 + 2).min(MAX_WARM);
            // Shrink back as the rate falls: the oldest go first.
            {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                while idle.len() > want {
                    idle.pop_front();
                }
            }
            // Connections that will likely come back after their tunnels count towards the
            // size, up to half of it (a long tunnel must not keep the queue empty).
            let coming = self.returning.load(Ordering::Relaxed).min(want / 2);
            let endpoint = relay();
            for _ in (self.len() + coming).min(want)..want {
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
    let a = exchange(&mut stream, url, headers, app, sent).await?;
    Ok(ws::finish_upgrade(stream, a.buf, a.head, a.used, &a.key)?)
}

/// The relay's answer to an upgrade request: `used` bytes of `buf` are its head.
struct Answer {
    buf: BytesMut,
    head: ResponseHead,
    used: usize,
    key: String,
}

/// [`attempt`] up to the answer, on any stream (unit tests use a scripted one).
async fn exchange<S, A>(
    stream: &mut S,
    url: &WsUrl,
    headers: &[(&str, &str)],
    app: &mut A,
    sent: &mut Vec<u8>,
) -> Result<Answer, Attempt>
where
    S: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + Unpin,
{
    let mut app_open = true;
    // App bytes already waiting (none are waited for) go out in the request's own write:
    // one write, and one wake-up of the relay, instead of two.
    if sent.is_empty() {
        tokio::select! {
            biased;
            // Cancel-safe: `read_buf` on the app's TcpStream loses nothing when dropped.
            r = read_more(app, sent) => app_open = matches!(r, Ok(n) if n > 0),
            () = std::future::ready(()) => {}
        }
    }
    let (key, mut request) = ws::upgrade_request(url, headers);
    if !sent.is_empty() {
        request.extend_from_slice(&frame::encode_frame(true, OpCode::Binary, Some(rand::random()), sent));
    }
    let wrote = async {
        stream.write_all(&request).await?;
        stream.flush().await
    };
    // A write that fails finds the connection dead: the bytes go again on another.
    wrote.await.map_err(|_| Attempt::Dead)?;
    drop(request);
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some((head, used)) = ws::parse_answer(&buf)? {
            // 408: the relay's head timeout caught a warm connection after all.
            if head.status == 408 {
                return Err(Attempt::Dead);
            }
            return Ok(Answer { buf, head, used, key });
        }
        let room = EARLY_LIMIT.saturating_sub(sent.len());
        buf.reserve(1024);
        let before = sent.len();
        tokio::select! {
            // Cancel-safe: a read into `buf` keeps what it got.
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) if buf.is_empty() => return Err(Attempt::Dead),
                Ok(0) => return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()).into()),
                Err(e) => return Err(ConnectError::Io(e).into()),
                Ok(_) => {}
            },
            // Cancel-safe: `read_buf` on the app's TcpStream loses nothing when dropped.
            r = read_more(app, sent), if app_open && room > 0 => match r {
                Ok(0) | Err(_) => app_open = false,
                // Recorded (in `sent`) before the write: a connection that dies under it
                // gets these bytes replayed on the next one, like the ones before.
                Ok(_) => write_frame(stream, &sent[before..]).await.map_err(|_| Attempt::Dead)?,
            },
        }
    }
}

/// Reads more of the app's bytes onto the end of `sent`, keeping it within
/// [`EARLY_LIMIT`]; how many came (0 at the app's EOF).
async fn read_more<A: AsyncRead + Unpin>(app: &mut A, sent: &mut Vec<u8>) -> std::io::Result<usize> {
    use bytes::BufMut;
    let room = EARLY_LIMIT.saturating_sub(sent.len()).min(4096);
    sent.reserve(room);
    app.read_buf(&mut sent.limit(room)).await
}

/// One masked binary frame, flushed.
async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, payload: &[u8]) -> std::io::Result<()> {
    let f = frame::encode_frame(true, OpCode::Binary, Some(rand::random()), payload);
    stream.write_all(&f).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// A relay connection that takes the upgrade request, then fails every write, and
    /// never answers: a warm connection whose relay went away under it.
    struct DiesAfterRequest {
        writes: usize,
    }

    impl AsyncRead for DiesAfterRequest {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for DiesAfterRequest {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            if self.writes == 1 {
                Poll::Ready(Ok(buf.len()))
            } else {
                Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An app that has nothing at first, then `bytes`, then EOF.
    struct Later {
        bytes: &'static [u8],
        polled: bool,
    }

    impl AsyncRead for Later {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if !std::mem::replace(&mut self.polled, true) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.bytes.len().min(buf.remaining());
            buf.put_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Poll::Ready(Ok(()))
        }
    }

    /// The CI failure of `lifecycle.rs relay_restart_hcm_reconnects_and_state_survives`:
    /// the app's bytes read while the warm connection died under their write were not
    /// kept for the retry, so the app got its answer empty.
    #[tokio::test]
    async fn bytes_whose_write_failed_are_kept_for_the_retry() {
        let url = WsUrl::parse("wss://relay.example:443/$hc/x?sb-hc-action=connect").unwrap();
        let mut relay = DiesAfterRequest { writes: 0 };
        let mut app = Later {
            bytes: b"after",
            polled: false,
        };
        let mut sent = Vec::new();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(&mut relay, &url, &[], &mut app, &mut sent),
        )
        .await
        .expect("a dead connection ends the try at once");
        assert!(matches!(r, Err(Attempt::Dead)), "a failed write is a dead connection");
        assert_eq!(sent, b"after");
    }

    /// A relay connection that records each write and never answers.
    #[derive(Default)]
    struct Records {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncRead for Records {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Records {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// App bytes that are there when the upgrade goes out travel in the request's own
    /// write (one write and one wake-up of the relay, not two); later ones in a frame each.
    #[tokio::test]
    async fn bytes_ready_at_once_go_in_the_requests_write() {
        let url = WsUrl::parse("ws://relay.example:80/$hc/x?sb-hc-action=connect").unwrap();
        let mut relay = Records::default();
        let mut app: &[u8] = b"now";
        let mut sent = Vec::new();
        // Bounded: the scripted relay never answers.
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            exchange(&mut relay, &url, &[], &mut app, &mut sent),
        )
        .await;
        assert!(r.is_err(), "no answer, so the try is still waiting");
        assert_eq!(sent, b"now");
        assert_eq!(relay.writes.len(), 1, "one write: {:?}", relay.writes);
        let w = &relay.writes[0];
        let head_end = w.windows(4).position(|x| x == b"\r\n\r\n").expect("the request head") + 4;
        assert!(w.starts_with(b"GET /$hc/x?sb-hc-action=connect HTTP/1.1\r\n"));
        // A masked binary frame of 3 bytes: FIN|Binary, MASK|3, 4 mask bytes, payload.
        assert_eq!(w.len() - head_end, 2 + 4 + 3, "the frame follows the head");
        assert_eq!(&w[head_end..head_end + 2], &[0x82, 0x83]);
    }

    fn relay_at(addr: std::net::SocketAddr) -> RelayEndpoint {
        RelayEndpoint {
            tls: false,
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A parked plain connection to `listener`, and the relay's side of it.
    async fn parked(listener: &tokio::net::TcpListener) -> (Stream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut c = Stream::Plain(crate::transport::sock::Sock::Live(c.unwrap()));
        c.park().unwrap();
        (c, s.unwrap().0)
    }

    /// After a relay restart its warm connections are closed; `take` skips them (and a
    /// connection that sent something) instead of spending the app's first try on them.
    #[tokio::test]
    async fn take_skips_warm_connections_the_relay_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = relay_at(listener.local_addr().unwrap());
        let warm = Warm::default();
        let (closed, far) = parked(&listener).await;
        drop(far);
        let (talked, mut far2) = parked(&listener).await;
        far2.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        let (alive, mut far3) = parked(&listener).await;
        for s in [closed, talked, alive] {
            warm.idle.lock().unwrap().push_back((relay.clone(), Instant::now(), s));
        }
        // Bounded wait until the kernel has the FIN and the bytes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = warm.take(&relay, false).expect("the open one is taken");
        got.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), far3.read_exact(&mut one))
            .await
            .expect("the taken connection reaches the open one's peer")
            .unwrap();
        assert_eq!(&one, b"x", "the one taken is the open connection");
        assert!(warm.take(&relay, false).is_none(), "nothing else was usable");
    }
}
