//! [`TlsSession`]: a TLS connection after its handshake, without I/O — the two record
//! keys, what rustls keeps for later (key updates, a client's tickets), the read side's
//! state and the records sealed for the peer. [`super::tls_conn::TlsConn`] drives it over
//! a tokio socket; the completion backend drives it over io_uring, opening records in the
//! pooled buffer they were received into and sealing into a send buffer of its own
//! (`dataplane::uring`).
//!
//! What it handles itself: `close_notify` (the read side is closed) and other alerts
//! (errors), TLS 1.3 key updates both ways (answering a request, and renewing our key
//! before its suite's confidentiality limit), session tickets (client) and a TLS 1.2
//! server's HelloRequest (ignored: no renegotiation). A record that does not open is an
//! error, never data, and queues the fatal alert that tells the peer why.

use std::io;
use std::ops::Range;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{HandshakeKind, ProtocolVersion, SupportedCipherSuite};

use super::record::{self, MAX_PLAINTEXT, Opened, Opener, RecordError, Sealer};

/// Most bytes of one post-handshake message (a session ticket is a few hundred).
const MAX_HANDSHAKE_MESSAGE: usize = 1 << 16;

const HELLO_REQUEST: u8 = 0;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;
const WARNING: u8 = 1;
const FATAL: u8 = 2;

/// rustls' half after the handshake: new secrets on key updates, tickets for a client.
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_rx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
}

/// How the read side stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadSide {
    Open,
    /// The peer's `close_notify` arrived: reads return EOF.
    Closed,
    /// A fatal error: every further read returns it.
    Failed(io::ErrorKind, String),
}

/// What [`TlsSession::open_record`] found at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Not a whole record yet.
    Incomplete,
    /// Application data: its plaintext is `buf[plain]`, opened in place (or `out[plain]`,
    /// opened into `out`); the record is `buf[..len]`.
    Data { plain: Range<usize>, len: usize },
    /// A record with nothing for the reader (a handshake message, a tolerated alert, empty
    /// application data), already handled: `buf[..len]` may be dropped.
    Consumed(usize),
}

pub(super) fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// What [`TlsSession::params`] reads of the handshake's state.
pub(super) struct Params {
    version: ProtocolVersion,
    kind: Option<HandshakeKind>,
    limit: u64,
}

/// A TLS connection after its handshake, without I/O. See the module docs.
pub struct TlsSession {
    kernel: Kernel,
    version: ProtocolVersion,
    kind: Option<HandshakeKind>,
    opener: Opener,
    sealer: Sealer,
    /// A post-handshake message arriving over more than one record.
    handshake: Vec<u8>,
    read: ReadSide,
    /// Sealed records for the peer, in order, not yet handed to the socket. The driver
    /// writes them out (and may take the vector to do so, [`TlsSession::take_tx`]).
    pub(super) tx: Vec<u8>,
    /// Our `close_notify` (or a fatal alert) is queued: nothing more may be sealed.
    write_closed: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("version", &self.version)
            .field("read", &self.read)
            .field("queued", &self.tx.len())
            .finish_non_exhaustive()
    }
}

impl TlsSession {
    /// What the session needs of rustls' state before its `kernel` API consumes it.
    pub(super) fn params(common: &rustls::CommonState) -> io::Result<Params> {
        let version = common
            .protocol_version()
            .ok_or_else(|| tls_error("no TLS version after the handshake"))?;
        let suite = common
            .negotiated_cipher_suite()
            .ok_or_else(|| tls_error("no cipher suite after the handshake"))?;
        let limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(Params {
            version,
            kind: common.handshake_kind(),
            limit,
        })
    }

    /// The session the handshake left: `secrets` and `kernel` as rustls' `kernel` API
    /// handed them over, `outgoing` the last flight, not yet sent.
    pub(super) fn new(
        p: Params,
        secrets: rustls::ExtractedSecrets,
        kernel: Kernel,
        outgoing: Vec<u8>,
    ) -> io::Result<Self> {
        Ok(Self {
            kernel,
            version: p.version,
            kind: p.kind,
            opener: Opener::new(p.version, secrets.rx).map_err(tls_error)?,
            sealer: Sealer::new(p.version, secrets.tx, p.limit).map_err(tls_error)?,
            handshake: Vec::new(),
            read: ReadSide::Open,
            tx: outgoing,
            write_closed: false,
        })
    }

    pub fn protocol_version(&self) -> ProtocolVersion {
        self.version
    }

    /// Full or resumed.
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.kind
    }

    /// `Ok(true)` while records may be opened, `Ok(false)` once the peer's `close_notify`
    /// arrived (EOF), the error again once one was found.
    pub fn readable(&self) -> io::Result<bool> {
        match &self.read {
            ReadSide::Open => Ok(true),
            ReadSide::Closed => Ok(false),
            ReadSide::Failed(kind, msg) => Err(io::Error::new(*kind, msg.clone())),
        }
    }

    /// True while records may be opened (neither `close_notify` nor an error yet).
    pub fn is_open(&self) -> bool {
        self.read == ReadSide::Open
    }

    /// Ends the read side with an error, which every later read returns.
    pub fn fail(&mut self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.read = ReadSide::Failed(kind, msg.clone());
        io::Error::new(kind, msg)
    }

    /// The read side's end at the transport's EOF: after `close_notify` that is EOF
    /// (`Ok`); without, an `UnexpectedEof` error (a cut connection is never mistaken for a
    /// finished one), `partial` saying whether part of a record was left.
    pub fn transport_eof(&mut self, partial: bool) -> io::Result<()> {
        if !self.readable()? {
            return Ok(());
        }
        let msg = if partial {
            "the connection closed in the middle of a TLS record"
        } else {
            "the peer closed the connection without sending TLS close_notify"
        };
        Err(self.fail(io::ErrorKind::UnexpectedEof, msg.into()))
    }

    /// Opens the record at the front of `buf` in place, if it is all there, and handles
    /// what is not application data. Call only while [`Self::readable`] says `Ok(true)`.
    pub fn open_record(&mut self, buf: &mut [u8]) -> io::Result<Record> {
        let opened = self.opener.open(buf);
        self.opened(opened, buf)
    }

    /// [`Self::open_record`] with the plaintext decrypted into `out` (a reader's buffer)
    /// rather than over the record: [`Record::Data`]'s `plain` is then a range of `out`.
    /// `out` needs room for the record's encrypted text: [`Self::room_to_open`].
    pub fn open_record_into(&mut self, buf: &[u8], out: &mut [u8]) -> io::Result<Record> {
        let opened = self.opener.open_into(buf, out);
        self.opened(opened, out)
    }

    /// Room enough for [`Self::open_record_into`] to open the record at the front of
    /// `buf`: `None` if its header is not all there or is not a record's.
    pub fn room_to_open(buf: &[u8]) -> Option<usize> {
        let len = Opener::record_len(buf).ok().flatten()?;
        Some(len.saturating_sub(record::HEADER_LEN + record::TAG_LEN))
    }

    /// Handles an opened record whose plaintext is `text[o.plain]`.
    fn opened(&mut self, o: Result<Option<Opened>, RecordError>, text: &[u8]) -> io::Result<Record> {
        let opened = match o {
            Ok(Some(o)) => o,
            Ok(None) => return Ok(Record::Incomplete),
            Err(e) => {
                self.queue_fatal_alert(e.alert());
                return Err(self.fail(io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        match opened.typ {
            record::APPLICATION_DATA if !opened.plain.is_empty() => {
                return Ok(Record::Data {
                    plain: opened.plain,
                    len: opened.len,
                });
            }
            record::APPLICATION_DATA => {}
            // `post_handshake` refuses a message over 64 KiB, so this holds at most that and
            // one record.
            record::HANDSHAKE => {
                self.handshake.extend_from_slice(&text[opened.plain]);
                self.post_handshake()?;
            }
            _ => self.alert(&text[opened.plain])?,
        }
        Ok(Record::Consumed(opened.len))
    }

    /// True if `buf` starts with a whole record (or with bytes that cannot start one,
    /// which the next open reports).
    pub fn whole_record(buf: &[u8]) -> bool {
        match Opener::record_len(buf) {
            Ok(Some(n)) => n <= buf.len(),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    fn alert(&mut self, alert: &[u8]) -> io::Result<()> {
        let &[level, desc] = alert else {
            return Err(self.fail(io::ErrorKind::InvalidData, "malformed TLS alert".into()));
        };
        if desc == CLOSE_NOTIFY {
            self.read = ReadSide::Closed;
            return Ok(());
        }
        // TLS 1.3: every alert but user_canceled is fatal; TLS 1.2: warnings are not.
        let tolerated = match self.version {
            ProtocolVersion::TLSv1_3 => desc == USER_CANCELED,
            _ => level == WARNING,
        };
        if tolerated {
            return Ok(());
        }
        let name = rustls::AlertDescription::from(desc);
        Err(self.fail(
            io::ErrorKind::ConnectionAborted,
            format!("the peer sent TLS alert {name:?}"),
        ))
    }

    /// Handles the whole messages in `handshake`: tickets, key updates, HelloRequest.
    fn post_handshake(&mut self) -> io::Result<()> {
        while self.handshake.len() >= 4 {
            let h = &self.handshake;
            let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(self.fail(io::ErrorKind::InvalidData, "TLS handshake message too long".into()));
            }
            if h.len() < 4 + len {
                return Ok(());
            }
            let typ = h[0];
            let body: Vec<u8> = h[4..4 + len].to_vec();
            self.handshake.drain(..4 + len);
            let tls13 = self.version == ProtocolVersion::TLSv1_3;
            let client = matches!(self.kernel, Kernel::Client(_));
            let result = match typ {
                NEW_SESSION_TICKET if tls13 && client => match &mut self.kernel {
                    Kernel::Client(k) => k.handle_new_session_ticket(&body).map_err(tls_error),
                    Kernel::Server(_) => unreachable!("checked: a client"),
                },
                KEY_UPDATE if tls13 && body.len() == 1 && body[0] <= 1 => self.key_update(body[0] == 1),
                // No renegotiation: a TLS 1.2 client may ignore the server's request.
                HELLO_REQUEST if !tls13 && client && body.is_empty() => Ok(()),
                _ => Err(tls_error(format_args!(
                    "unexpected TLS handshake message {typ} after the handshake"
                ))),
            };
            if let Err(e) = result {
                return Err(self.fail(e.kind(), e.to_string()));
            }
        }
        Ok(())
    }

    /// The peer's KeyUpdate: its next key for reading; if it asks, ours too (after our
    /// own KeyUpdate, which goes out with our next write: RFC 8446 asks for it before our
    /// next application data).
    fn key_update(&mut self, requested: bool) -> io::Result<()> {
        let next = self.kernel.update_rx().map_err(tls_error)?;
        self.opener.rekey(next).map_err(tls_error)?;
        if requested && !self.write_closed {
            self.send_key_update()?;
        }
        Ok(())
    }

    /// Queues a KeyUpdate (`update_not_requested`, sealed with the old key) and switches
    /// to the next key.
    fn send_key_update(&mut self) -> io::Result<()> {
        self.sealer
            .seal(record::HANDSHAKE, &[&[KEY_UPDATE, 0, 0, 1, 0]], &mut self.tx)
            .map_err(tls_error)?;
        let next = self.kernel.update_tx().map_err(tls_error)?;
        self.sealer.rekey(next).map_err(tls_error)
    }

    /// Tells the peer why we stop (sent with whatever is written next); no record follows
    /// it.
    fn queue_fatal_alert(&mut self, desc: u8) {
        if !self.write_closed && self.sealer.seal(record::ALERT, &[&[FATAL, desc]], &mut self.tx).is_ok() {
            self.write_closed = true;
        }
    }

    /// Queues `close_notify`, once: nothing is sealed after it.
    pub fn close(&mut self) -> io::Result<()> {
        if !self.write_closed {
            self.sealer
                .seal(record::ALERT, &[&[WARNING, CLOSE_NOTIFY]], &mut self.tx)
                .map_err(tls_error)?;
            self.write_closed = true;
        }
        Ok(())
    }

    /// Seals one application-data record from `parts` (at most [`MAX_PLAINTEXT`] in all),
    /// renewing a worn-out key first.
    fn seal_data(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.write_closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after TLS close_notify",
            ));
        }
        if self.sealer.worn_out() {
            if !self.sealer.is_tls13() {
                return Err(tls_error(
                    "the TLS 1.2 key has sealed as many records as its suite allows; reconnect",
                ));
            }
            self.send_key_update()?;
        }
        self.sealer
            .seal(record::APPLICATION_DATA, parts, &mut self.tx)
            .map_err(tls_error)
    }

    /// Seals `slices` as application data into records of up to 16 KiB (small slices share
    /// a record) while the send queue holds under `limit` bytes; returns the plaintext
    /// bytes taken. An error after something was taken is left for the next call (what
    /// was taken is queued and reported).
    pub fn seal_slices<'a>(&mut self, slices: impl Iterator<Item = &'a [u8]>, limit: usize) -> io::Result<usize> {
        const PARTS: usize = 64;
        let mut slices = slices.filter(|b| !b.is_empty());
        let mut carry: Option<&[u8]> = None;
        let mut taken = 0;
        while self.tx.len() < limit {
            let mut parts: [&[u8]; PARTS] = [&[]; PARTS];
            let (mut k, mut room) = (0, MAX_PLAINTEXT);
            while k < PARTS && room > 0 {
                let Some(s) = carry.take().or_else(|| slices.next()) else {
                    break;
                };
                let n = s.len().min(room);
                parts[k] = &s[..n];
                if n < s.len() {
                    carry = Some(&s[n..]);
                }
                k += 1;
                room -= n;
            }
            if k == 0 {
                break;
            }
            match self.seal_data(&parts[..k]) {
                Ok(()) => taken += MAX_PLAINTEXT - room,
                Err(_) if taken > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(taken)
    }

    /// Makes room in the send queue for sealing `plain` bytes in one go (so it is not
    /// reallocated record by record).
    pub fn reserve(&mut self, plain: usize) {
        let records = plain.div_ceil(MAX_PLAINTEXT);
        self.tx.reserve(plain + records * (record::MAX_RECORD - MAX_PLAINTEXT));
    }

    /// The sealed records not yet written, taken out (the session queues any later ones
    /// in a new vector).
    pub fn take_tx(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.tx)
    }

    /// Records sealed with our current key (tests: a key update starts it at 0 again).
    #[cfg(test)]
    pub(crate) fn sealer_mut(&mut self) -> &mut Sealer {
        &mut self.sealer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls_conn::tests::session_pair;

    /// Seals a record of type `typ` holding `body` with the writer's key, as a peer would.
    fn record(w: &mut TlsSession, typ: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        w.sealer_mut().seal(typ, &[body], &mut out).unwrap();
        out
    }

    /// Opens every whole record of `wire` in turn; the plaintext of the data records, or the
    /// first error.
    fn open_all(r: &mut TlsSession, mut wire: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut plain = Vec::new();
        for _ in 0..100 {
            if !r.readable()? {
                break;
            }
            match r.open_record(&mut wire)? {
                Record::Incomplete => break,
                Record::Data { plain: p, len } => {
                    plain.extend_from_slice(&wire[p]);
                    wire.drain(..len);
                }
                Record::Consumed(len) => {
                    wire.drain(..len);
                }
            }
        }
        Ok(plain)
    }

    /// A KeyUpdate asking for ours, cut over two records: nothing happens until it is
    /// whole; then the reader's key moves on and our own KeyUpdate is queued, sealed with
    /// the old key (the sequence starts again at 0 for the new one).
    #[test]
    fn a_key_update_split_over_two_records_is_answered_once_whole() {
        let (mut w, mut r) = session_pair();
        let mut wire = record(&mut w, record::HANDSHAKE, &[KEY_UPDATE, 0]);
        let first = wire.len();
        wire.extend(record(&mut w, record::HANDSHAKE, &[0, 1, 1]));
        r.seal_slices(std::iter::once(&b"before"[..]), usize::MAX).unwrap();
        let seq = r.sealer_mut().seq();
        assert!(seq > 0);
        let mut part = wire[..first].to_vec();
        assert!(matches!(r.open_record(&mut part).unwrap(), Record::Consumed(_)));
        assert_eq!(r.sealer_mut().seq(), seq, "no answer to half a message");
        let queued = r.tx.len();
        assert_eq!(open_all(&mut r, wire[first..].to_vec()).unwrap(), b"");
        assert_eq!(r.sealer_mut().seq(), 0, "our key renewed");
        assert!(r.tx.len() > queued, "our KeyUpdate queued");
        assert!(matches!(r.readable(), Ok(true)));
    }

    /// What a peer may not send after the handshake is an error that ends the read side
    /// for good: an oversized or unexpected handshake message, a ticket sent to a server,
    /// a malformed or fatal alert. A user_canceled alert and empty application data are
    /// tolerated; close_notify is the end, not an error.
    #[test]
    fn what_a_peer_may_not_send_after_the_handshake_ends_the_read_side() {
        let cases: [(u8, &[u8], Option<io::ErrorKind>); 8] = [
            (
                record::HANDSHAKE,
                &[KEY_UPDATE, 0x01, 0x00, 0x01],
                Some(io::ErrorKind::InvalidData),
            ),
            (record::HANDSHAKE, &[1, 0, 0, 1, 0], Some(io::ErrorKind::InvalidData)),
            (
                record::HANDSHAKE,
                &[NEW_SESSION_TICKET, 0, 0, 1, 0],
                Some(io::ErrorKind::InvalidData),
            ),
            (
                record::HANDSHAKE,
                &[KEY_UPDATE, 0, 0, 1, 7],
                Some(io::ErrorKind::InvalidData),
            ),
            (record::ALERT, &[FATAL, 40, 0], Some(io::ErrorKind::InvalidData)),
            (record::ALERT, &[WARNING, 40], Some(io::ErrorKind::ConnectionAborted)),
            (record::ALERT, &[WARNING, USER_CANCELED], None),
            (record::APPLICATION_DATA, &[], None),
        ];
        for (typ, body, want) in cases {
            let (mut w, mut r) = session_pair();
            let mut wire = record(&mut w, typ, body);
            wire.extend(record(&mut w, record::APPLICATION_DATA, b"after"));
            match (open_all(&mut r, wire), want) {
                (Ok(p), None) => assert_eq!(p, b"after", "{typ} {body:?}"),
                (Err(e), Some(kind)) => {
                    assert_eq!(e.kind(), kind, "{typ} {body:?}: {e}");
                    assert_eq!(r.readable().unwrap_err().kind(), kind, "sticky");
                }
                (got, want) => panic!("{typ} {body:?}: {got:?}, wanted {want:?}"),
            }
        }
        let (mut w, mut r) = session_pair();
        let mut wire = record(&mut w, record::ALERT, &[WARNING, CLOSE_NOTIFY]);
        wire.extend(record(&mut w, record::APPLICATION_DATA, b"ignored"));
        assert_eq!(open_all(&mut r, wire).unwrap(), b"");
        assert!(matches!(r.readable(), Ok(false)), "close_notify is EOF");
        assert!(r.transport_eof(false).is_ok(), "a TCP EOF after it is the clean end");
    }
}
