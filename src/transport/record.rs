//! The TLS record layer after the handshake, sans-IO: [`Sealer`] encrypts plaintext into
//! records, [`Opener`] decrypts a received record in the buffer it arrived in or into
//! another (a reader's).
//!
//! rustls does the handshake and keeps the secrets (its `kernel` API hands us the traffic
//! keys, computes new ones on a key update and stores session tickets); this does the
//! per-record work rustls would otherwise do with a copy of each record into a fresh
//! allocation on the way in and another on the way out (benches/RESULTS.md, "In-place
//! TLS records"). AEAD suites of TLS 1.3 (RFC 8446 §5.2) and of TLS 1.2 (AES-GCM with its
//! explicit nonce, RFC 5288; ChaCha20-Poly1305, RFC 7905), which is all our configs offer.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// A record's header: type, legacy version (2), length (2).
pub const HEADER_LEN: usize = 5;
/// Most plaintext in one record (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext a record may carry (RFC 8446 §5.2; TLS 1.2 allows 2,048 more, which no
/// AEAD suite needs).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A whole record at its largest.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// An AEAD tag's length, in every suite we offer.
pub const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// TLS 1.2 AES-GCM's per-record explicit nonce.
const EXPLICIT_LEN: usize = 8;

pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Why a record could not be opened or sealed; each maps to the TLS alert a peer is owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Authentication failed: tampered, truncated or keyed differently (`bad_record_mac`).
    BadMac,
    /// Longer than the protocol allows (`record_overflow`).
    Overflow,
    /// A record type, version or inner content type that has no place here
    /// (`unexpected_message` / `decode_error`).
    Unexpected,
    /// 2^64 records in one direction: the sequence number would repeat a nonce.
    SequenceExhausted,
}

impl RecordError {
    /// The alert description owed to the peer (RFC 8446 §6.2).
    pub fn alert(self) -> u8 {
        match self {
            RecordError::BadMac => 20,
            RecordError::Overflow => 22,
            RecordError::Unexpected => 10,
            RecordError::SequenceExhausted => 80,
        }
    }
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordError::BadMac => "TLS record failed authentication (bad_record_mac)",
            RecordError::Overflow => "TLS record longer than the protocol allows (record_overflow)",
            RecordError::Unexpected => "TLS record of a type or form not allowed after the handshake",
            RecordError::SequenceExhausted => "TLS record sequence number exhausted",
        })
    }
}

impl std::error::Error for RecordError {}

/// The record protection in use: TLS 1.3, or one of TLS 1.2's two nonce constructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Tls13,
    /// 4-byte salt from the key block and an 8-byte explicit nonce in each record.
    Tls12Gcm,
    /// The IV XORed with the sequence number, as in TLS 1.3, and no explicit nonce.
    Tls12Chacha,
}

/// One direction's key, IV and next sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    scheme: Scheme,
}

impl Keys {
    fn new(version: ProtocolVersion, seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::Unexpected),
        };
        Self::raw(version, alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn raw(
        version: ProtocolVersion,
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Self, RecordError> {
        let scheme = match (version, alg == &aead::CHACHA20_POLY1305) {
            (ProtocolVersion::TLSv1_3, _) => Scheme::Tls13,
            (ProtocolVersion::TLSv1_2, false) => Scheme::Tls12Gcm,
            (ProtocolVersion::TLSv1_2, true) => Scheme::Tls12Chacha,
            _ => return Err(RecordError::Unexpected),
        };
        let key = UnboundKey::new(alg, key).map_err(|_| RecordError::Unexpected)?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| RecordError::Unexpected)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            scheme,
        })
    }

    /// The IV XORed with the sequence number (RFC 8446 §5.3); TLS 1.2 AES-GCM sends the
    /// last 8 bytes of it as its explicit nonce (as rustls and OpenSSL do).
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// TLS 1.2's additional data: sequence number, type, version, plaintext length.
    fn aad12(&self, typ: u8, plain_len: usize) -> [u8; 13] {
        let mut a = [0u8; 13];
        a[..8].copy_from_slice(&self.seq.to_be_bytes());
        a[8] = typ;
        a[9..11].copy_from_slice(&[3, 3]);
        a[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
        a
    }

    fn advance(&mut self) -> Result<(), RecordError> {
        self.seq = self.seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        Ok(())
    }
}

/// Encrypts outgoing records.
pub struct Sealer {
    keys: Keys,
    /// Records after which this key must be replaced (TLS 1.3) or the connection end
    /// (TLS 1.2): the suite's confidentiality limit.
    limit: u64,
}

impl Sealer {
    pub fn new(
        version: ProtocolVersion,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Self {
            keys: Keys::new(version, seq, &secrets)?,
            limit,
        })
    }

    /// Replaces the key after a key update (TLS 1.3; the sequence starts again at `seq`).
    pub fn rekey(&mut self, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<(), RecordError> {
        self.keys = Keys::new(ProtocolVersion::TLSv1_3, seq, &secrets)?;
        Ok(())
    }

    /// True when the key has sealed as many records as its suite allows, less one for
    /// the key update that announces the next key.
    pub fn worn_out(&self) -> bool {
        self.keys.seq >= self.limit.saturating_sub(1)
    }

    /// Wears the key out after `limit` records (tests of key renewal).
    #[cfg(test)]
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = self.keys.seq + limit;
    }

    /// Records sealed with the current key (tests of key renewal).
    #[cfg(test)]
    pub fn seq(&self) -> u64 {
        self.keys.seq
    }

    /// True for TLS 1.3 (key updates possible).
    pub fn is_tls13(&self) -> bool {
        self.keys.scheme == Scheme::Tls13
    }

    /// Appends one record of type `typ` carrying `parts` one after another (at most
    /// [`MAX_PLAINTEXT`] in all) to `out`. A record of one part (each record of a bulk
    /// write) is encrypted from where the part lies straight into its place in `out`;
    /// several parts are copied there first and encrypted in place.
    pub fn seal(&mut self, typ: u8, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let plain_len: usize = parts.iter().map(|p| p.len()).sum();
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        let k = &self.keys;
        let (outer, explicit, inner) = match k.scheme {
            Scheme::Tls13 => (APPLICATION_DATA, 0, 1),
            Scheme::Tls12Gcm => (typ, EXPLICIT_LEN, 0),
            Scheme::Tls12Chacha => (typ, 0, 0),
        };
        let body = explicit + plain_len + inner + TAG_LEN;
        let at = out.len();
        out.reserve(HEADER_LEN + body);
        out.extend_from_slice(&[outer, 3, 3]);
        out.extend_from_slice(&(body as u16).to_be_bytes());
        let nonce = k.nonce();
        if explicit > 0 {
            out.extend_from_slice(&nonce[4..]);
        }
        let text = out.len();
        // The additional data: TLS 1.3's record header, TLS 1.2's sequence and type.
        let mut aad13 = [0u8; HEADER_LEN];
        aad13.copy_from_slice(&out[at..at + HEADER_LEN]);
        let aad: &[u8] = match k.scheme {
            Scheme::Tls13 => &aad13,
            _ => &k.aad12(typ, plain_len),
        };
        let nonce = Nonce::assume_unique_for_key(nonce);
        let sealed = match parts {
            [one] => {
                // Zeroing the room costs less than copying the plaintext into it: no
                // reads, and the cipher reads the plaintext where it is either way
                // (benches/RESULTS.md, "TLS records without the copy").
                out.resize(text + plain_len + inner + TAG_LEN, 0);
                let (cipher, typ_and_tag) = out[text..].split_at_mut(plain_len);
                let extra: &[u8] = if inner > 0 { &[typ] } else { &[] };
                k.key
                    .seal_out_of_place_scatter(nonce, Aad::from(aad), one, cipher, extra, typ_and_tag)
            }
            _ => {
                for p in parts {
                    out.extend_from_slice(p);
                }
                if inner > 0 {
                    out.push(typ);
                }
                k.key
                    .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[text..])
                    .map(|tag| out.extend_from_slice(tag.as_ref()))
            }
        };
        if sealed.is_err() {
            // Nothing half-made stays queued.
            out.truncate(at);
            return Err(RecordError::Unexpected);
        }
        self.keys.advance()
    }
}

/// An opened record: its content type and where its plaintext now lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub typ: u8,
    /// The plaintext, as a range of the buffer it was opened into: the record's own
    /// ([`Opener::open`]) or the one given to [`Opener::open_into`].
    pub plain: std::ops::Range<usize>,
    /// The whole record's length (header included): what to consume.
    pub len: usize,
}

/// Decrypts incoming records.
pub struct Opener {
    keys: Keys,
}

impl Opener {
    pub fn new(version: ProtocolVersion, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, RecordError> {
        Ok(Self {
            keys: Keys::new(version, seq, &secrets)?,
        })
    }

    /// Replaces the key after the peer's key update (TLS 1.3).
    pub fn rekey(&mut self, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<(), RecordError> {
        self.keys = Keys::new(ProtocolVersion::TLSv1_3, seq, &secrets)?;
        Ok(())
    }

    /// The length of the record at the front of `buf` once its header is there.
    pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        // Every record after the handshake says 3.3 (TLS 1.2's additional data leaves the
        // header's version unauthenticated, so it is checked here).
        if buf[1..3] != [3, 3] {
            return Err(RecordError::Unexpected);
        }
        let body = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if body > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow);
        }
        Ok(Some(HEADER_LEN + body))
    }

    /// Opens the record at the front of `buf` in place. `Ok(None)`: not all of it is there
    /// yet. The plaintext is left where it was decrypted: [`Opened::plain`] is a range of
    /// `buf`.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        self.open_to(To::InPlace(buf))
    }

    /// Opens the record at the front of `buf` into `out`, which needs room for the
    /// record's encrypted text (its body less the tag and any explicit nonce;
    /// [`Self::record_len`] less [`HEADER_LEN`] and [`TAG_LEN`] is always enough; less room
    /// is an [`RecordError::Overflow`] with nothing opened): [`Opened::plain`] is then
    /// a range of `out`, and `buf` is left as it was. This saves the copy to a reader's
    /// buffer that opening in place is followed by. If authentication fails, what was
    /// written to `out` is zeroed: no unauthenticated plaintext is left behind.
    pub fn open_into(&mut self, buf: &[u8], out: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        self.open_to(To::Out(buf, out))
    }

    fn open_to(&mut self, to: To<'_>) -> Result<Option<Opened>, RecordError> {
        let buf: &[u8] = match &to {
            To::InPlace(buf) => buf,
            To::Out(buf, _) => buf,
        };
        let Some(len) = Self::record_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < len {
            return Ok(None);
        }
        let k = &self.keys;
        let outer = buf[0];
        let mut nonce = k.nonce();
        // The additional data (TLS 1.3: the record's header; TLS 1.2: sequence number,
        // type, version, plaintext length) and where the ciphertext starts.
        let mut aad = [0u8; 13];
        let (aad_len, start) = match k.scheme {
            Scheme::Tls13 => {
                if outer != APPLICATION_DATA || len < HEADER_LEN + TAG_LEN + 1 {
                    return Err(RecordError::Unexpected);
                }
                aad[..HEADER_LEN].copy_from_slice(&buf[..HEADER_LEN]);
                (HEADER_LEN, HEADER_LEN)
            }
            Scheme::Tls12Gcm | Scheme::Tls12Chacha => {
                let explicit = if k.scheme == Scheme::Tls12Gcm { EXPLICIT_LEN } else { 0 };
                if len < HEADER_LEN + explicit + TAG_LEN {
                    return Err(RecordError::BadMac);
                }
                let plain_len = len - HEADER_LEN - explicit - TAG_LEN;
                if plain_len > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
                if explicit > 0 {
                    nonce[4..].copy_from_slice(&buf[HEADER_LEN..HEADER_LEN + EXPLICIT_LEN]);
                }
                aad = k.aad12(outer, plain_len);
                (aad.len(), HEADER_LEN + explicit)
            }
        };
        let text_len = len - start - TAG_LEN;
        let nonce = Nonce::assume_unique_for_key(nonce);
        let aad = Aad::from(&aad[..aad_len]);
        // The decrypted text (TLS 1.3: with its inner type and padding), and where it
        // starts in the buffer it was decrypted into.
        let (text, base): (&[u8], usize) = match to {
            To::InPlace(buf) => {
                k.key
                    .open_in_place(nonce, aad, &mut buf[start..len])
                    .map_err(|_| RecordError::BadMac)?;
                (&buf[start..start + text_len], start)
            }
            To::Out(buf, out) => {
                let (cipher, tag) = buf[start..len].split_at(text_len);
                let dst = out.get_mut(..text_len).ok_or(RecordError::Overflow)?;
                if k.key.open_separate_gather(nonce, aad, cipher, tag, dst).is_err() {
                    dst.fill(0);
                    return Err(RecordError::BadMac);
                }
                (dst, 0)
            }
        };
        let (typ, plain_len) = match k.scheme {
            Scheme::Tls13 => {
                // The content type is the last non-zero byte; zeros after it are padding.
                let Some(at) = text.iter().rposition(|&b| b != 0) else {
                    return Err(RecordError::Unexpected);
                };
                if at > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow);
                }
                (text[at], at)
            }
            _ => (outer, text_len),
        };
        if !matches!(typ, ALERT | HANDSHAKE | APPLICATION_DATA) {
            return Err(RecordError::Unexpected);
        }
        self.keys.advance()?;
        Ok(Some(Opened {
            typ,
            plain: base..base + plain_len,
            len,
        }))
    }
}

/// Where [`Opener`] puts a record's plaintext.
enum To<'a> {
    /// Over its ciphertext.
    InPlace(&'a mut [u8]),
    /// Into the second buffer, leaving the first (the record) as it was.
    Out(&'a [u8], &'a mut [u8]),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of suite `kind` (0 AES-128-GCM, 1 AES-256-GCM, 2 ChaCha20-Poly1305) made of
    /// the byte `fill`.
    fn keys(version: ProtocolVersion, kind: u8, fill: u8, seq: u64) -> Keys {
        let (alg, len) = match kind {
            0 => (&aead::AES_128_GCM, 16),
            1 => (&aead::AES_256_GCM, 32),
            _ => (&aead::CHACHA20_POLY1305, 32),
        };
        Keys::raw(version, alg, &[fill; 32][..len], &[fill ^ 0x5a; 12], seq).unwrap()
    }

    fn sealer(version: ProtocolVersion, kind: u8, fill: u8, limit: u64) -> Sealer {
        Sealer {
            keys: keys(version, kind, fill, 7),
            limit,
        }
    }

    fn opener(version: ProtocolVersion, kind: u8, fill: u8) -> Opener {
        Opener {
            keys: keys(version, kind, fill, 7),
        }
    }

    fn pair(version: ProtocolVersion, kind: u8) -> (Sealer, Opener) {
        (sealer(version, kind, 1, u64::MAX), opener(version, kind, 1))
    }

    const SCHEMES: [(ProtocolVersion, u8); 6] = [
        (ProtocolVersion::TLSv1_3, 0),
        (ProtocolVersion::TLSv1_3, 1),
        (ProtocolVersion::TLSv1_3, 2),
        (ProtocolVersion::TLSv1_2, 0),
        (ProtocolVersion::TLSv1_2, 1),
        (ProtocolVersion::TLSv1_2, 2),
    ];

    #[test]
    fn sealed_records_open_in_place_with_their_type_and_plaintext() {
        for (v, kind) in SCHEMES {
            let (mut s, mut o) = pair(v, kind);
            let mut wire = Vec::new();
            let big = vec![0xabu8; MAX_PLAINTEXT];
            s.seal(APPLICATION_DATA, &[b"hello"], &mut wire).unwrap();
            s.seal(HANDSHAKE, &[&[24, 0, 0, 1, 0]], &mut wire).unwrap();
            s.seal(APPLICATION_DATA, &[&big], &mut wire).unwrap();
            s.seal(APPLICATION_DATA, &[b""], &mut wire).unwrap();
            let mut at = 0;
            let mut got = Vec::new();
            for _ in 0..4 {
                let r = o.open(&mut wire[at..]).unwrap().expect("a whole record");
                got.push((r.typ, wire[at + r.plain.start..at + r.plain.end].to_vec()));
                at += r.len;
            }
            assert_eq!(at, wire.len(), "{v:?} {kind}");
            assert_eq!(got[0], (APPLICATION_DATA, b"hello".to_vec()));
            assert_eq!(got[1], (HANDSHAKE, vec![24, 0, 0, 1, 0]));
            assert_eq!(got[2], (APPLICATION_DATA, big));
            assert_eq!(got[3], (APPLICATION_DATA, Vec::new()));
        }
    }

    #[test]
    fn a_partial_record_waits_for_the_rest() {
        let (mut s, mut o) = pair(ProtocolVersion::TLSv1_3, 0);
        let mut wire = Vec::new();
        s.seal(APPLICATION_DATA, &[b"whole"], &mut wire).unwrap();
        for cut in [0, 3, HEADER_LEN, wire.len() - 1] {
            assert_eq!(o.open(&mut wire[..cut].to_vec()), Ok(None), "cut at {cut}");
        }
        assert!(o.open(&mut wire).unwrap().is_some());
    }

    #[test]
    fn tampering_reordering_or_another_key_fails_authentication() {
        for (v, kind) in SCHEMES {
            let (mut s, _) = pair(v, kind);
            let mut wire = Vec::new();
            s.seal(APPLICATION_DATA, &[b"one"], &mut wire).unwrap();
            let first = wire.len();
            s.seal(APPLICATION_DATA, &[b"two"], &mut wire).unwrap();
            // A flipped bit anywhere past the header.
            for at in [HEADER_LEN, first - 1] {
                let mut w = wire.clone();
                w[at] ^= 1;
                assert_eq!(
                    pair(v, kind).1.open(&mut w),
                    Err(RecordError::BadMac),
                    "{v:?} {kind} byte {at}"
                );
            }
            // The second record first (sequence numbers differ).
            let mut second = wire[first..].to_vec();
            assert_eq!(pair(v, kind).1.open(&mut second), Err(RecordError::BadMac));
            // Another key.
            let mut o = opener(v, kind, 2);
            assert_eq!(o.open(&mut wire.clone()), Err(RecordError::BadMac));
        }
    }

    #[test]
    fn oversized_or_foreign_records_are_refused_before_decryption() {
        let (_, mut o) = pair(ProtocolVersion::TLSv1_3, 0);
        let too_long = (MAX_CIPHERTEXT + 1) as u16;
        let mut r = vec![APPLICATION_DATA, 3, 3];
        r.extend_from_slice(&too_long.to_be_bytes());
        assert_eq!(o.open(&mut r), Err(RecordError::Overflow));
        // An unencrypted alert or a change_cipher_spec after the TLS 1.3 handshake.
        for typ in [ALERT, CHANGE_CIPHER_SPEC] {
            let mut r = vec![typ, 3, 3, 0, 2, 1, 0];
            assert_eq!(o.open(&mut r), Err(RecordError::Unexpected));
        }
        // Not TLS at all (an HTTP request on a TLS port).
        assert_eq!(
            o.open(&mut b"GET / HTTP/1.1\r\n".to_vec()),
            Err(RecordError::Unexpected)
        );
    }

    #[test]
    fn a_record_of_another_version_is_refused() {
        // TLS 1.2's authentication would not notice it.
        for (v, kind) in SCHEMES {
            let (mut s, mut o) = pair(v, kind);
            let mut r = Vec::new();
            s.seal(APPLICATION_DATA, &[b"v"], &mut r).unwrap();
            r[2] = 1;
            assert_eq!(o.open(&mut r), Err(RecordError::Unexpected), "{v:?} {kind}");
        }
    }

    #[test]
    fn a_tls13_record_of_padding_only_or_an_unknown_inner_type_is_refused() {
        for inner in [&[0u8, 0, 0][..], &[99u8][..]] {
            // Seal by hand: the sealer writes only proper records.
            let k = keys(ProtocolVersion::TLSv1_3, 0, 1, 7);
            let mut rec = vec![APPLICATION_DATA, 3, 3, 0, (inner.len() + TAG_LEN) as u8];
            let header: [u8; 5] = rec[..5].try_into().unwrap();
            let mut body = inner.to_vec();
            let tag = k
                .key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(k.nonce()), Aad::from(header), &mut body)
                .unwrap();
            rec.extend_from_slice(&body);
            rec.extend_from_slice(tag.as_ref());
            let mut o = opener(ProtocolVersion::TLSv1_3, 0, 1);
            assert_eq!(o.open(&mut rec), Err(RecordError::Unexpected), "inner {inner:?}");
        }
    }

    #[test]
    fn a_key_wears_out_one_record_before_its_limit() {
        let mut s = sealer(ProtocolVersion::TLSv1_3, 0, 1, 9);
        let mut out = Vec::new();
        assert!(!s.worn_out());
        s.seal(APPLICATION_DATA, &[b"a"], &mut out).unwrap();
        assert!(s.worn_out(), "7 + 1 records sealed, limit 9");
        s.keys = keys(ProtocolVersion::TLSv1_3, 0, 3, 0);
        assert!(!s.worn_out());
    }

    #[test]
    fn one_part_sealed_where_it_lies_makes_the_record_several_parts_copied_make() {
        for (v, kind) in SCHEMES {
            let (mut one, mut o) = pair(v, kind);
            let (mut several, _) = pair(v, kind);
            for body in [pattern(MAX_PLAINTEXT), pattern(1), pattern(1000)] {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                one.seal(APPLICATION_DATA, &[&body], &mut a).unwrap();
                let (x, y) = body.split_at(body.len() / 2);
                several.seal(APPLICATION_DATA, &[x, y], &mut b).unwrap();
                assert!(a == b, "{v:?} {kind}: {} bytes", body.len());
                let r = o.open(&mut a).unwrap().expect("a whole record");
                assert!(a[r.plain] == body[..]);
            }
        }
    }

    /// The encrypted text of a record `len` bytes long: the body less the tag and, in TLS
    /// 1.2's AES-GCM, the explicit nonce.
    fn text_len(v: ProtocolVersion, kind: u8, len: usize) -> usize {
        let explicit = if v == ProtocolVersion::TLSv1_2 && kind < 2 {
            EXPLICIT_LEN
        } else {
            0
        };
        len - HEADER_LEN - TAG_LEN - explicit
    }

    /// `len` bytes that differ from one offset to the next.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn records_open_into_another_buffer_as_they_open_in_place() {
        for (v, kind) in SCHEMES {
            let (mut s, mut o) = pair(v, kind);
            let mut wire = Vec::new();
            let big = pattern(MAX_PLAINTEXT);
            s.seal(APPLICATION_DATA, &[&big], &mut wire).unwrap();
            let first = wire.len();
            s.seal(HANDSHAKE, &[&[24, 0, 0, 1, 0]], &mut wire).unwrap();
            let sent = wire.clone();
            let room = text_len(v, kind, first);
            // One byte short of the encrypted text: refused, nothing opened, the key unmoved.
            let mut out = vec![0xeeu8; room - 1];
            assert_eq!(o.open_into(&wire, &mut out), Err(RecordError::Overflow), "{v:?} {kind}");
            let mut out = vec![0xeeu8; room + 100];
            let r = o.open_into(&wire, &mut out).unwrap().expect("a whole record");
            assert_eq!((r.typ, r.plain.clone(), r.len), (APPLICATION_DATA, 0..big.len(), first));
            assert!(out[r.plain] == big[..], "{v:?} {kind}");
            assert!(wire == sent, "the record itself is left as it was");
            let r = o.open_into(&wire[first..], &mut out).unwrap().expect("a whole record");
            assert_eq!((r.typ, &out[r.plain]), (HANDSHAKE, &[24u8, 0, 0, 1, 0][..]));
        }
    }

    #[test]
    fn a_tampered_record_opened_into_a_buffer_leaves_no_plaintext_there() {
        for (v, kind) in SCHEMES {
            let (mut s, _) = pair(v, kind);
            let body = pattern(4000);
            let mut wire = Vec::new();
            s.seal(APPLICATION_DATA, &[&body], &mut wire).unwrap();
            let last = wire.len() - 1;
            wire[last] ^= 1; // the tag
            let mut out = vec![0xeeu8; wire.len()];
            assert_eq!(pair(v, kind).1.open_into(&wire, &mut out), Err(RecordError::BadMac));
            let text = text_len(v, kind, wire.len());
            assert!(
                out[..text].iter().all(|&b| b == 0),
                "{v:?} {kind}: decrypted bytes left"
            );
            assert!(
                out[text..].iter().all(|&b| b == 0xee),
                "{v:?} {kind}: written past the text"
            );
        }
    }
}
