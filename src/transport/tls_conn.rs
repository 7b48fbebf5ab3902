//! [`TlsConn`]: a TLS connection whose handshake rustls drives (its unbuffered API) and
//! whose records are then sealed and opened here ([`super::record`]), between the buffer
//! they are received into or sent from and the caller's.
//!
//! rustls' buffered connection (what tokio-rustls wraps) copies each received record's
//! plaintext into a fresh `Vec` and the reader copies it again; each written record is
//! encrypted into a fresh allocation. Here a received record is decrypted straight into
//! the reader's buffer when it has room for it (else where it landed, then copied once);
//! a written record is encrypted from the writer's buffer straight into its place in the
//! send queue (one made of several small slices is copied in first). After the handshake
//! rustls' `kernel` API keeps what only it can do: new secrets on a key update and the
//! client's session tickets.
//!
//! The record rules after the handshake (alerts, key updates, tickets, `close_notify`)
//! are [`TlsSession`]'s; this is its driver over a tokio socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::record;
use super::sock::Sock;
use super::tls_session::{Kernel, Record, TlsSession, tls_error};

/// Bytes asked of the socket per read: four whole records.
const READ_SIZE: usize = 4 * record::MAX_RECORD;
/// Sealed bytes queued before a write waits for the socket.
const SEND_QUEUE: usize = 4 * record::MAX_RECORD;
/// Steps of a handshake (a record processed, a flight encoded, a read) before it is
/// called stuck: a full TLS 1.2 handshake takes a few dozen.
const MAX_HANDSHAKE_STEPS: usize = 10_000;

/// A TLS connection over `IO` after its handshake. See the module docs.
pub struct TlsConn<IO> {
    io: IO,
    s: TlsSession,
    /// Bytes received and not yet consumed: whole records, then perhaps part of one.
    /// Allocated while bytes wait; given back when empty and the socket has no more.
    rx: BytesMut,
    /// Plaintext of the record at the front of `rx`, opened in place and not yet read;
    /// `rx_record` is that record's length, consumed once the plaintext is.
    plain: std::ops::Range<usize>,
    rx_record: usize,
    /// Application data rustls decrypted during the handshake (a client's first request
    /// sent with its Finished), read before any record.
    early: Vec<u8>,
    /// Of the session's sealed records, `s.tx[..tx_sent]` are written.
    tx_sent: usize,
}

impl<IO> std::fmt::Debug for TlsConn<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("session", &self.s)
            .field("sent", &self.tx_sent)
            .finish_non_exhaustive()
    }
}

/// The two kinds of unbuffered connection, as the handshake driver needs them.
trait Unbuffered {
    type Data;
    fn common(&self) -> &rustls::CommonState;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

/// The same four lines for both sides: rustls gives them no common trait.
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:path) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn common(&self) -> &rustls::CommonState {
                self
            }
            fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
                let (s, k) = self.dangerous_into_kernel_connection()?;
                Ok((s, $kernel(k)))
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData, Kernel::Client);
unbuffered!(UnbufferedServerConnection, ServerConnectionData, Kernel::Server);

/// What a handshake leaves behind besides the connection.
struct Handshaken {
    incoming: BytesMut,
    outgoing: Vec<u8>,
    early: Vec<u8>,
}

/// Drives rustls' handshake on `io` until application data may flow both ways. Flights
/// are written only when the handshake must wait for the peer, so what is produced last
/// (a client's Finished; a server's ticket) is handed back unsent: the client sends it
/// with its first request, the server at once ([`TlsConn::accept`]).
async fn handshake<C: Unbuffered, IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut C,
    io: &mut IO,
) -> io::Result<Handshaken> {
    let mut incoming = BytesMut::new();
    let mut outgoing = Vec::new();
    let mut early = Vec::new();
    for _ in 0..MAX_HANDSHAKE_STEPS {
        enum Next {
            Again,
            Read,
            MaybeDone,
        }
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                incoming.advance(discard);
                send_alert(conn, io, &mut incoming, outgoing).await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        let next = match state {
            ConnectionState::EncodeTlsData(e) => {
                encode(e, &mut outgoing).map_err(tls_error)?;
                Next::Again
            }
            ConnectionState::TransmitTlsData(t) => {
                t.done();
                Next::Again
            }
            ConnectionState::BlockedHandshake => Next::Read,
            ConnectionState::WriteTraffic(_) => Next::MaybeDone,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_error)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
                }
                Next::Again
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed TLS during the handshake",
                ));
            }
            other => return Err(tls_error(format_args!("unexpected TLS handshake state {other:?}"))),
        };
        incoming.advance(discard);
        match next {
            Next::Again => {}
            // A TLS 1.3 server may send before the client's Finished; we wait for it.
            Next::MaybeDone if !conn.common().is_handshaking() => {
                return Ok(Handshaken {
                    incoming,
                    outgoing,
                    early,
                });
            }
            Next::Read | Next::MaybeDone => {
                if !outgoing.is_empty() {
                    io.write_all(&outgoing).await?;
                    outgoing.clear();
                }
                incoming.reserve(record::MAX_RECORD);
                if io.read_buf(&mut incoming).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
                }
            }
        }
    }
    Err(tls_error("the TLS handshake did not finish in its step limit"))
}

/// Appends the flight rustls has ready to `outgoing`.
fn encode<Data>(mut e: EncodeTlsData<'_, Data>, outgoing: &mut Vec<u8>) -> Result<(), EncodeError> {
    let at = outgoing.len();
    outgoing.resize(at + 4096, 0);
    let n = match e.encode(&mut outgoing[at..]) {
        Err(EncodeError::InsufficientSize(s)) => {
            outgoing.resize(at + s.required_size, 0);
            e.encode(&mut outgoing[at..])
        }
        r => r,
    };
    outgoing.truncate(at + *n.as_ref().unwrap_or(&0));
    n.map(drop)
}

/// After a handshake error: sends what rustls queued for the peer (the alert saying why:
/// `protocol_version` to a TLS 1.1 client, `bad_certificate`...), best effort.
/// rustls must be handed the same receive buffer as before (it keeps ranges into it).
async fn send_alert<C: Unbuffered, IO: AsyncWrite + Unpin>(
    conn: &mut C,
    io: &mut IO,
    incoming: &mut BytesMut,
    mut outgoing: Vec<u8>,
) {
    for _ in 0..4 {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..]);
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(e)) => encode(e, &mut outgoing).is_ok(),
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                true
            }
            _ => false,
        };
        incoming.advance(discard);
        if !more {
            break;
        }
    }
    if !outgoing.is_empty() {
        let _ = io.write_all(&outgoing).await;
        let _ = io.flush().await;
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsConn<IO> {
    /// The client handshake with `name` on `io`; `first` (a request) is sent with the
    /// client's Finished when TLS 1.3 allows, in the same write.
    pub async fn connect(
        cfg: Arc<ClientConfig>,
        name: ServerName<'static>,
        mut io: IO,
        first: &[u8],
    ) -> io::Result<Self> {
        let mut conn = UnbufferedClientConnection::new(cfg, name).map_err(tls_error)?;
        let hs = handshake(&mut conn, &mut io).await?;
        let mut s = Self::new(conn, io, hs)?;
        s.queue(first)?;
        s.flush().await?;
        Ok(s)
    }

    /// The server handshake on `io`. Its last flight (a TLS 1.3 session ticket) is sent
    /// at once, not with the first response: a client holding a warm connection that has
    /// not been used yet needs the ticket for its next handshake.
    pub async fn accept(cfg: Arc<ServerConfig>, mut io: IO) -> io::Result<Self> {
        let mut conn = UnbufferedServerConnection::new(cfg).map_err(tls_error)?;
        let hs = handshake(&mut conn, &mut io).await?;
        let mut s = Self::new(conn, io, hs)?;
        s.flush().await?;
        Ok(s)
    }

    fn new<C: Unbuffered>(conn: C, io: IO, hs: Handshaken) -> io::Result<Self> {
        let params = TlsSession::params(conn.common())?;
        let (secrets, kernel) = conn.into_kernel().map_err(tls_error)?;
        Ok(Self {
            io,
            s: TlsSession::new(params, secrets, kernel, hs.outgoing)?,
            rx: hs.incoming,
            plain: 0..0,
            rx_record: 0,
            early: hs.early,
            tx_sent: 0,
        })
    }
}

impl<IO> TlsConn<IO> {
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    pub fn protocol_version(&self) -> ProtocolVersion {
        self.s.protocol_version()
    }

    /// Full or resumed.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.s.handshake_kind()
    }

    /// True when a read can make progress without the socket: plaintext, a whole record,
    /// or the end (close or error) already here.
    pub fn has_input(&self) -> bool {
        !self.plain.is_empty() || !self.early.is_empty() || !self.s.is_open() || TlsSession::whole_record(&self.rx)
    }

    /// True when every sealed record has been written to the socket.
    pub fn is_flushed(&self) -> bool {
        self.tx_sent == self.s.tx.len()
    }

    /// The connection taken apart, for a driver of its own (the completion backend):
    /// the transport, the session, the plaintext received and not yet read, then the
    /// received bytes not yet opened (whole records and perhaps part of one). Records
    /// sealed and not yet written stay queued in the session.
    pub fn into_parts(mut self) -> (IO, TlsSession, Vec<u8>, BytesMut) {
        let mut plain = std::mem::take(&mut self.early);
        if !self.plain.is_empty() {
            plain.extend_from_slice(&self.rx[self.plain.clone()]);
            self.rx.advance(self.rx_record);
        }
        self.s.tx.drain(..self.tx_sent);
        (self.io, self.s, plain, self.rx)
    }

    /// Opens the record at the front of `rx` if it is all there. `Ok(true)`: something
    /// changed (plaintext, a handshake message, an alert).
    fn open_one(&mut self) -> io::Result<bool> {
        match self.s.open_record(&mut self.rx)? {
            Record::Incomplete => Ok(false),
            Record::Data { plain, len } => {
                self.plain = plain;
                self.rx_record = len;
                Ok(true)
            }
            Record::Consumed(len) => {
                self.rx.advance(len);
                Ok(true)
            }
        }
    }

    /// Opens the record at the front of `rx` into `out` when `out` has room for it (its
    /// plaintext then needs no copy), else in place as [`Self::open_one`] does.
    /// `Ok(true)`: something changed.
    fn open_next(&mut self, out: &mut ReadBuf<'_>) -> io::Result<bool> {
        let room = match TlsSession::room_to_open(&self.rx) {
            Some(room) if room <= out.remaining() => room,
            _ => return self.open_one(),
        };
        let len = match self.s.open_record_into(&self.rx, out.initialize_unfilled_to(room))? {
            Record::Incomplete => return Ok(false),
            Record::Data { plain, len } => {
                out.advance(plain.len());
                len
            }
            Record::Consumed(len) => len,
        };
        self.rx.advance(len);
        if self.rx.is_empty() {
            // Every byte used: give the buffer back now (see `copy_plain`).
            self.rx = BytesMut::new();
        }
        Ok(true)
    }

    /// Seals `plain` as application data into the send queue.
    fn queue(&mut self, plain: &[u8]) -> io::Result<()> {
        self.s.seal_slices(std::iter::once(plain), usize::MAX).map(drop)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsConn<IO> {
    /// Writes the send queue out.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_sent < self.s.tx.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.s.tx[self.tx_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_sent += n;
        }
        // Hold no send buffer between writes: an idle tunnel keeps nothing (a new one
        // costs a malloc per write, against the sealing of up to 64 KiB).
        self.s.tx = Vec::new();
        self.tx_sent = 0;
        Poll::Ready(Ok(()))
    }

    async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx)).await?;
        self.io.flush().await
    }

    /// Reads from the socket behind what `rx` holds (no zeroing of the new space); 0 at
    /// the peer's EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Room for at least a whole record. Asked as the whole buffer's size, so that the
        // reserve moves a partial record (under 16 KiB) into the consumed space rather
        // than doubling the allocation.
        if self.rx.capacity() - self.rx.len() < record::MAX_RECORD {
            self.rx.reserve(READ_SIZE.saturating_sub(self.rx.len()));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rx)
    }
}

impl<IO> TlsConn<IO> {
    /// Copies what fits of the opened record's plaintext into `out`; once all of it is
    /// read, consumes the record.
    fn copy_plain(&mut self, out: &mut ReadBuf<'_>) {
        if self.plain.is_empty() {
            return;
        }
        let n = out.remaining().min(self.plain.len());
        out.put_slice(&self.rx[self.plain.start..self.plain.start + n]);
        self.plain.start += n;
        if self.plain.is_empty() {
            self.rx.advance(self.rx_record);
            // Every byte used: give the buffer back now, not at the next read (the data
            // plane waits for readiness without reading, so that read may not come while
            // the tunnel idles).
            if self.rx.is_empty() {
                self.rx = BytesMut::new();
            }
        }
    }
}

impl TlsConn<Sock> {
    /// [`super::Stream::idle_and_open`] over TLS: takes what waits in a parked socket
    /// (bounded: a peer with nothing to say has sent a few records at most) and opens it.
    /// A session ticket is no sign of death; plaintext, a close or an error is.
    pub fn idle_and_open(&mut self) -> bool {
        use std::io::Read;
        let mut chunk = Vec::new();
        for _ in 0..16 {
            loop {
                match self.open_one() {
                    Ok(true) if self.plain.is_empty() && self.s.is_open() => {}
                    Ok(true) | Err(_) => return false,
                    Ok(false) => break,
                }
            }
            if !self.early.is_empty() {
                return false;
            }
            let Some(sock) = self.io.parked_mut() else {
                return self.io.idle_and_open();
            };
            chunk.resize(4096, 0);
            match sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.rx.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = out.filled().len();
        // Each round returns or makes progress: a record consumed or bytes read.
        loop {
            if !this.early.is_empty() {
                let n = out.remaining().min(this.early.len());
                out.put_slice(&this.early[..n]);
                this.early.drain(..n);
                return Poll::Ready(Ok(()));
            }
            // Plaintext waits, or a record was opened straight into `out`.
            if !this.plain.is_empty() || out.filled().len() > before {
                this.copy_plain(out);
                // Fill the rest from whole records already here (no socket read): a read
                // hands over up to the caller's buffer, as over plain TCP, not one record
                // (16 KiB) at a time. An error found on the way is kept for the next read.
                while out.remaining() > 0 && this.plain.is_empty() && this.s.is_open() {
                    match this.open_next(out) {
                        Ok(true) => this.copy_plain(out),
                        Ok(false) | Err(_) => break,
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if !this.s.readable()? {
                return Poll::Ready(Ok(()));
            }
            if this.open_next(out)? {
                continue;
            }
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    let partial = !this.rx.is_empty();
                    return Poll::Ready(this.s.transport_eof(partial));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Hold no buffer while the peer is quiet.
                    if this.rx.is_empty() {
                        this.rx = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// Seals up to 64 KiB of `bufs` into records of up to 16 KiB each
    /// (small slices share a record) and writes what the socket takes; the rest goes out
    /// with the next write or flush.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // A full queue waits for the socket to take all of it; then there is room for
        // at least one record, so a non-empty write takes something.
        if this.s.tx.len() - this.tx_sent >= SEND_QUEUE {
            ready!(this.poll_send(cx))?;
        }
        // The queue's whole size at once: growing it record by record would reallocate
        // (and copy) it up to three times per write.
        if this.s.tx.capacity() == 0 {
            this.s.tx.reserve_exact(SEND_QUEUE + record::MAX_RECORD);
        }
        let slices = bufs.iter().map(|b| &b[..]);
        let taken = this.s.seal_slices(slices, this.tx_sent + SEND_QUEUE)?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends `close_notify` (once), what is queued, then shuts the socket's write side.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.s.close()?;
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use rustls::CipherSuite as S;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::transport::tls;

    static DIR: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);

    /// Our server config (development certificate) and the CA file that trusts it.
    fn server() -> (Arc<ServerConfig>, std::path::PathBuf) {
        let mut dir = DIR.lock().unwrap();
        let dir = dir.get_or_insert_with(|| tempfile::tempdir().unwrap());
        let (cfg, files) = tls::self_signed(dir.path(), &[]).unwrap();
        (cfg, files.ca)
    }

    /// Our client config, restricted to `version` and the suites in `suites`.
    fn client(ca: &std::path::Path, version: ProtocolVersion, suites: &[S]) -> Arc<ClientConfig> {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites.retain(|s| suites.contains(&s.suite()));
        let cfg = tls::client_config_with(Arc::new(p), &[ca.to_owned()]).unwrap();
        let mut cfg = Arc::unwrap_or_clone(cfg);
        let v: &'static rustls::SupportedProtocolVersion = match version {
            ProtocolVersion::TLSv1_2 => &rustls::version::TLS12,
            _ => &rustls::version::TLS13,
        };
        let mut only = ClientConfig::builder_with_provider(cfg.crypto_provider().clone())
            .with_protocol_versions(&[v])
            .unwrap()
            .with_root_certificates(tls_roots(ca))
            .with_no_client_auth();
        only.enable_secret_extraction = true;
        only.resumption = std::mem::take(&mut cfg.resumption);
        Arc::new(only)
    }

    fn tls_roots(ca: &std::path::Path) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in tls::read_certs(ca).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    /// A handshaken pair of TLS 1.3 sessions taken apart from their connections: the
    /// client's, to write with, and the server's, to read with (it has nothing unread; the
    /// client would have the server's ticket), for other drivers' tests.
    #[cfg_attr(not(feature = "uring"), allow(dead_code))]
    pub(crate) fn session_pair() -> (TlsSession, TlsSession) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (cfg, ca) = server();
            let ccfg = client(&ca, ProtocolVersion::TLSv1_3, &[S::TLS13_AES_128_GCM_SHA256]);
            let (a, b) = tokio::io::duplex(1 << 16);
            let (s, c) = tokio::join!(TlsConn::accept(cfg, a), TlsConn::connect(ccfg, name(), b, &[]));
            let (_, server, plain, cipher) = s.unwrap().into_parts();
            assert!(plain.is_empty() && cipher.is_empty(), "the server has nothing unread");
            (c.unwrap().into_parts().1, server)
        })
    }

    /// A connection taken apart (for the completion backend) hands over, in order, the
    /// plaintext it received and did not give out, then the records it did not open; the
    /// session opens those and the ones still in the socket. Cut inside a record, at a
    /// record's end (where the opened record's plaintext is all read) and after the last.
    #[tokio::test]
    async fn a_connection_taken_apart_keeps_what_it_received_and_did_not_hand_over() {
        // The last: everything read, so the connection holds nothing at all.
        for head in [
            10,
            5 + record::MAX_PLAINTEXT,
            5 + 2 * record::MAX_PLAINTEXT + 7,
            100_005,
        ] {
            let (cfg, ca) = server();
            let ccfg = client(&ca, ProtocolVersion::TLSv1_3, &[S::TLS13_AES_128_GCM_SHA256]);
            let (a, b) = tokio::io::duplex(1 << 20);
            let data = pattern(100_000, 3);
            let (s, c) = tokio::join!(TlsConn::accept(cfg, a), TlsConn::connect(ccfg, name(), b, b"first"));
            let (mut s, mut c) = (s.unwrap(), c.unwrap());
            c.write_all(&data).await.unwrap();
            c.flush().await.unwrap();
            let mut got = vec![0u8; head];
            s.read_exact(&mut got).await.unwrap();
            assert!(s.is_flushed());
            let (mut io, mut session, plain, mut cipher) = s.into_parts();
            got.extend_from_slice(&plain);
            for _ in 0..1000 {
                match session.open_record(&mut cipher).unwrap() {
                    Record::Data { plain, len } => {
                        got.extend_from_slice(&cipher[plain]);
                        cipher.advance(len);
                    }
                    Record::Consumed(len) => cipher.advance(len),
                    Record::Incomplete if got.len() < 5 + data.len() => {
                        cipher.reserve(record::MAX_RECORD);
                        assert!(
                            io.read_buf(&mut cipher).await.unwrap() > 0,
                            "more records in the socket"
                        );
                    }
                    Record::Incomplete => break,
                }
            }
            assert_eq!(got.len(), 5 + data.len(), "head {head}");
            assert!(
                got[..5] == *b"first" && got[5..] == data[..],
                "bytes differ, head {head}"
            );
        }
    }

    /// Every suite our configs offer, in both versions.
    const CASES: [(ProtocolVersion, &[S]); 6] = [
        (ProtocolVersion::TLSv1_3, &[S::TLS13_AES_128_GCM_SHA256]),
        (ProtocolVersion::TLSv1_3, &[S::TLS13_AES_256_GCM_SHA384]),
        (ProtocolVersion::TLSv1_3, &[S::TLS13_CHACHA20_POLY1305_SHA256]),
        (
            ProtocolVersion::TLSv1_2,
            &[
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
        ),
        (
            ProtocolVersion::TLSv1_2,
            &[
                S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ],
        ),
        (
            ProtocolVersion::TLSv1_2,
            &[
                S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
        ),
    ];

    /// A pattern that shows a lost, repeated or reordered byte.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    /// Writes `data` in uneven vectored pieces, then shuts down; reads the peer's bytes to
    /// its EOF at the same time and returns them.
    async fn exchange<T: AsyncRead + AsyncWrite + Unpin>(t: T, data: &[u8]) -> io::Result<Vec<u8>> {
        let (mut r, mut w) = tokio::io::split(t);
        let send = async {
            let mut at = 0;
            let sizes = [1usize, 7, 300, 16_384, 16_385, 40_000, 5];
            let mut i = 0;
            while at < data.len() {
                let a = (at + sizes[i % sizes.len()]).min(data.len());
                let b = (a + sizes[(i + 3) % sizes.len()]).min(data.len());
                let bufs = [io::IoSlice::new(&data[at..a]), io::IoSlice::new(&data[a..b])];
                at += w.write_vectored(&bufs).await?;
                i += 1;
            }
            w.shutdown().await
        };
        let recv = async {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await?;
            Ok(got)
        };
        let (sent, got) = tokio::join!(send, recv);
        sent?;
        got
    }

    fn wire() -> (DuplexStream, DuplexStream) {
        tokio::io::duplex(64 * 1024)
    }

    #[tokio::test]
    async fn our_records_interoperate_with_rustls_both_ways_in_every_suite() {
        let (server_cfg, ca) = server();
        let up = pattern(1 << 20, 1);
        let down = pattern((1 << 20) + 12_345, 2);
        for (version, suites) in CASES {
            let cfg = client(&ca, version, suites);
            // Our client, rustls' server.
            let (a, b) = wire();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let (ours, theirs) = tokio::join!(TlsConn::connect(cfg.clone(), name(), a, b""), acceptor.accept(b));
            let (ours, theirs) = (ours.unwrap(), theirs.unwrap());
            assert_eq!(ours.protocol_version(), version);
            assert!(suites.contains(&theirs.get_ref().1.negotiated_cipher_suite().unwrap().suite()));
            let (got_down, got_up) = tokio::join!(exchange(ours, &up), exchange(theirs, &down));
            assert!(got_down.unwrap() == down, "{version:?} {suites:?}: our client read");
            assert!(got_up.unwrap() == up, "{version:?} {suites:?}: rustls server read");
            // rustls' client, our server.
            let (a, b) = wire();
            let connector = tokio_rustls::TlsConnector::from(cfg.clone());
            let (theirs, ours) = tokio::join!(connector.connect(name(), a), TlsConn::accept(server_cfg.clone(), b));
            let (theirs, ours) = (theirs.unwrap(), ours.unwrap());
            assert_eq!(ours.protocol_version(), version);
            let (got_up, got_down) = tokio::join!(exchange(ours, &up), exchange(theirs, &down));
            assert!(got_up.unwrap() == down, "{version:?} {suites:?}: our server read");
            assert!(got_down.unwrap() == up, "{version:?} {suites:?}: rustls client read");
        }
    }

    #[tokio::test]
    /// (That it shares the Finished's write: `ws.rs the_request_leaves_with_the_clients_finished`.)
    async fn a_first_request_arrives_first_in_both_versions() {
        let (server_cfg, ca) = server();
        for (version, suites) in [CASES[0], CASES[3]] {
            let cfg = client(&ca, version, suites);
            let (a, b) = wire();
            let (c, s) = tokio::join!(
                TlsConn::connect(cfg, name(), a, b"GET / HTTP/1.1\r\n\r\n"),
                TlsConn::accept(server_cfg.clone(), b)
            );
            let (c, mut s) = (c.unwrap(), s.unwrap());
            let mut head = [0u8; 18];
            s.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"GET / HTTP/1.1\r\n\r\n", "{version:?}");
            drop(c);
        }
    }

    /// Our client and rustls' server (TLS 1.3, AES-128-GCM) over an in-memory pipe, the
    /// server's end wrapped by `wrap`.
    async fn ours_to_rustls<T: AsyncRead + AsyncWrite + Unpin>(
        wrap: impl FnOnce(DuplexStream) -> T,
    ) -> (TlsConn<DuplexStream>, tokio_rustls::server::TlsStream<T>) {
        let (server_cfg, ca) = server();
        let cfg = client(&ca, ProtocolVersion::TLSv1_3, &[S::TLS13_AES_128_GCM_SHA256]);
        let (a, b) = wire();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let (ours, theirs) = tokio::join!(TlsConn::connect(cfg, name(), a, b""), acceptor.accept(wrap(b)));
        (ours.unwrap(), theirs.unwrap())
    }

    #[tokio::test]
    async fn key_updates_either_way_keep_the_bytes_coming() {
        let (mut ours, mut theirs) = ours_to_rustls(|b| b).await;
        // Our key wears out every 4 records: we send key updates of our own.
        ours.s.sealer_mut().set_limit(4);
        let data = pattern(200_000, 3);
        let (w, r) = tokio::join!(
            async {
                ours.write_all(&data).await?;
                ours.flush().await
            },
            async {
                let mut got = vec![0u8; data.len()];
                theirs.read_exact(&mut got).await.map(|_| got)
            }
        );
        w.unwrap();
        assert!(r.unwrap() == data, "rustls read what we sealed across our key updates");
        // 13 records: without key updates the key would have sealed them all.
        assert!(
            ours.s.sealer_mut().seq() < 4,
            "no key update sent ({} records on one key)",
            ours.s.sealer_mut().seq()
        );
        // rustls asks for a key update (update_requested): we take its new key and answer
        // with ours before our next record.
        for round in 0..3u8 {
            theirs.get_mut().1.refresh_traffic_keys().unwrap();
            theirs.write_all(&[round; 1000]).await.unwrap();
            theirs.flush().await.unwrap();
            let mut got = [0u8; 1000];
            ours.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 1000]);
            // Answered: our KeyUpdate is queued and the new key has sealed nothing yet.
            assert_eq!(
                ours.s.sealer_mut().seq(),
                0,
                "update_requested not answered (round {round})"
            );
            ours.write_all(&[round + 10; 500]).await.unwrap();
            ours.flush().await.unwrap();
            let mut back = [0u8; 500];
            theirs.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round + 10; 500]);
        }
    }

    #[tokio::test]
    async fn our_client_stores_the_ticket_and_resumes_with_it() {
        let (server_cfg, ca) = server();
        for (version, suites) in [CASES[0], CASES[3]] {
            let cfg = client(&ca, version, suites);
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (a, b) = wire();
                let (c, s) = tokio::join!(
                    TlsConn::connect(cfg.clone(), name(), a, b""),
                    TlsConn::accept(server_cfg.clone(), b)
                );
                let (mut c, mut s) = (c.unwrap(), s.unwrap());
                // The ticket (TLS 1.3) comes before the server's first byte.
                s.write_all(b"x").await.unwrap();
                s.flush().await.unwrap();
                let mut one = [0u8; 1];
                c.read_exact(&mut one).await.unwrap();
                kinds.push(c.handshake_kind());
            }
            assert_eq!(
                kinds,
                [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)],
                "{version:?}"
            );
        }
    }

    /// Flips the last byte of the next write going through it.
    struct Corrupting {
        inner: DuplexStream,
        armed: bool,
    }

    impl AsyncRead for Corrupting {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, b)
        }
    }

    impl AsyncWrite for Corrupting {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            if self.armed && !b.is_empty() {
                let mut v = b.to_vec();
                *v.last_mut().unwrap() ^= 1;
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &v))?;
                assert_eq!(n, v.len(), "the duplex has room for the whole record");
                self.armed = false;
                return Poll::Ready(Ok(n));
            }
            Pin::new(&mut self.inner).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_tampered_record_is_an_error_and_never_data() {
        let (mut ours, mut theirs) = ours_to_rustls(|inner| Corrupting { inner, armed: false }).await;
        theirs.get_mut().0.armed = true;
        theirs.write_all(b"tampered").await.unwrap();
        theirs.flush().await.unwrap();
        let mut buf = [0u8; 64];
        let e = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("bad_record_mac"), "{e}");
        // And it stays failed.
        assert_eq!(
            ours.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // The peer is told why (a fatal bad_record_mac alert goes out with the shutdown),
        // and nothing more may be sent.
        assert_eq!(ours.write(b"more").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        ours.shutdown().await.unwrap();
        let e = theirs.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("BadRecordMac"), "{e}");
    }

    #[tokio::test]
    async fn a_close_notify_is_eof_and_a_bare_tcp_close_is_an_error() {
        for clean in [true, false] {
            let (mut ours, mut theirs) = ours_to_rustls(|b| b).await;
            theirs.write_all(b"last words").await.unwrap();
            if clean {
                theirs.shutdown().await.unwrap();
            } else {
                theirs.flush().await.unwrap();
                theirs.get_mut().0.shutdown().await.unwrap();
            }
            let mut got = Vec::new();
            let r = ours.read_to_end(&mut got).await;
            assert_eq!(got, b"last words");
            match r {
                Ok(n) => assert!(clean, "EOF without close_notify read as a clean end ({n} bytes)"),
                Err(e) => {
                    assert!(!clean, "{e}");
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                }
            }
        }
    }

    /// A read takes every whole record already received, up to the caller's buffer, not
    /// one record's 16 KiB.
    #[tokio::test]
    async fn one_read_takes_several_records_already_received() {
        let (mut ours, mut theirs) = ours_to_rustls(|b| b).await;
        let data = pattern(60_000, 5);
        theirs.write_all(&data).await.unwrap();
        theirs.flush().await.unwrap();
        // All four records are in the pipe before our first read.
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        let mut reads = 0;
        while got.len() < data.len() && reads < 10 {
            let n = ours.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            reads += 1;
        }
        assert!(got == data);
        assert_eq!(reads, 1, "records handed over one read each");
    }

    #[tokio::test]
    async fn reads_of_every_size_get_the_bytes_whether_records_open_into_them_or_in_place() {
        let (mut ours, mut theirs) = ours_to_rustls(|b| b).await;
        let data = pattern(200_000, 9);
        let send = async {
            theirs.write_all(&data).await.unwrap();
            theirs.flush().await.unwrap();
        };
        // Room for a whole record's encrypted text (16 KiB, its type byte) or one byte
        // short of it (opened in place and copied), a few bytes, a lot.
        let recv = async {
            let mut got = Vec::new();
            let sizes = [16_385usize, 16_384, 100, 64 * 1024, 1, 16_384 + 4_000];
            let mut buf = vec![0u8; 64 * 1024];
            for i in 0..10_000 {
                if got.len() == data.len() {
                    break;
                }
                let n = ours.read(&mut buf[..sizes[i % sizes.len()]]).await.unwrap();
                assert!(n > 0, "EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert!(got == data, "{} bytes of {}", got.len(), data.len());
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_receive_buffer() {
        let (server_cfg, ca) = server();
        let cfg = client(&ca, ProtocolVersion::TLSv1_3, &[S::TLS13_AES_128_GCM_SHA256]);
        let (a, b) = wire();
        let (c, s) = tokio::join!(TlsConn::connect(cfg, name(), a, b""), TlsConn::accept(server_cfg, b));
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let mut got = vec![0u8; 100_000];
        let (w, r) = tokio::join!(
            async {
                s.write_all(&pattern(100_000, 4)).await?;
                s.flush().await
            },
            c.read_exact(&mut got)
        );
        w.unwrap();
        r.unwrap();
        // Nothing more: the read waits, and gives its buffer back meanwhile.
        let mut more = [0u8; 16];
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), c.read(&mut more)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(c.rx.capacity(), 0);
        // Also when the last read used every byte and no read follows (the data plane
        // waits for readiness, not in a read).
        let (w, r) = tokio::join!(
            async {
                s.write_all(b"ping").await?;
                s.flush().await
            },
            c.read_exact(&mut more[..4])
        );
        w.unwrap();
        r.unwrap();
        assert_eq!(c.rx.capacity(), 0, "a buffer kept after its bytes were read");
    }
}
