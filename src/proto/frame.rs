//! WebSocket frames (RFC 6455 §5), sans-IO.
//!
//! [`Decoder`] turns bytes from a read buffer into [`Item`]s without copying payloads:
//! control frames come out whole, data frames as a header followed by payload chunks that are
//! `split_to` slices of the read buffer, unmasked in place. A frame's payload is never
//! buffered whole, so a 16 MiB frame costs no more memory than a 1 KiB one.
//!
//! Every limit (reserved bits, opcode, control-frame size and fragmentation, masking rule,
//! maximum frame size, fragmentation sequence) is checked on the header, before any payload
//! byte is looked at or any memory reserved. Not enough bytes yet is `Ok(None)`.

use bytes::{Buf, BytesMut};

use super::mask::apply_mask;

/// Longest possible frame header: 2 bytes + 8 bytes of length + 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;
/// Largest payload of a control frame (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Default cap on a data frame's payload. Default: 1 MiB.
pub const DEFAULT_MAX_FRAME: u64 = 1 << 20;

/// The frame opcodes of RFC 6455 §5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Continuation,
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0,
            Self::Text => 1,
            Self::Binary => 2,
            Self::Close => 8,
            Self::Ping => 9,
            Self::Pong => 10,
        }
    }

    /// Close, Ping and Pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
}

/// One way a peer's frame can be wrong. Each maps to a close code via [`FrameError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1–3 set although no extension was negotiated.
    #[error("reserved bits set in frame header")]
    ReservedBits,
    /// Opcode 3–7 or 11–15.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// A Close, Ping or Pong frame with more than 125 bytes of payload.
    #[error("control frame of {0} bytes (limit 125)")]
    ControlTooLong(u64),
    /// A Close, Ping or Pong frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A 64-bit length with the most significant bit set.
    #[error("invalid 64-bit payload length")]
    InvalidLength,
    /// A data frame larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// An unmasked frame from a client, or a masked frame from a server.
    #[error("frame masking does not match the peer's role (masked: {masked})")]
    MaskMismatch { masked: bool },
    /// A continuation frame with no fragmented message open.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open.
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    /// A Close payload of one byte, a code that may not be sent, or a reason that is not UTF-8.
    #[error("invalid close frame payload")]
    InvalidClosePayload,
}

impl FrameError {
    /// The close code to answer this error with (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => close_code::TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Close codes used by hyrelay (RFC 6455 §7.4.1, hc-protocol.md §7).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// Parses a frame header from the start of `buf`.
///
/// Checks what the header alone can tell: reserved bits, opcode, control-frame rules and
/// the 64-bit length rule. Returns the header and its length in bytes.
pub fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(FrameError::UnknownOpcode(b0 & 0x0f))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(FrameError::InvalidLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() {
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::ControlTooLong(len));
        }
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let key = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some((FrameHeader { fin, opcode, mask, len }, pos)))
}

/// Writes a frame header into `out` and returns its length.
pub fn encode_header(
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    len: u64,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    out[0] = (u8::from(fin) << 7) | opcode.as_u8();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if len < 126 {
        out[1] = mask_bit | len as u8;
        2
    } else if len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Length of the header [`encode_header`] writes for these parameters.
pub fn header_len(masked: bool, len: u64) -> usize {
    let base = if len < 126 {
        2
    } else if len <= u64::from(u16::MAX) {
        4
    } else {
        10
    };
    base + if masked { 4 } else { 0 }
}

/// Which side of the connection the decoder is on; decides the masking rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We accepted the connection: every incoming frame must be masked.
    Server,
    /// We opened the connection: no incoming frame may be masked.
    Client,
}

/// A decoded piece of the incoming frame stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A whole control frame, payload unmasked.
    Control { opcode: OpCode, payload: BytesMut },
    /// A piece of a data frame's payload, unmasked.
    Data(DataChunk),
}

/// A piece of a data frame. A frame of length 0 yields one chunk with `first` and `last` set.
#[derive(Debug, PartialEq, Eq)]
pub struct DataChunk {
    /// The frame's opcode: Text, Binary or Continuation.
    pub opcode: OpCode,
    /// The frame's FIN bit.
    pub fin: bool,
    /// The frame's whole payload length.
    pub frame_len: u64,
    /// Set on the frame's first chunk.
    pub first: bool,
    /// Set on the frame's last chunk.
    pub last: bool,
    pub payload: BytesMut,
}

/// A decoded item as positions in the caller's buffer ([`Decoder::decode_slice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceItem {
    /// A whole control frame; its payload (unmasked) is `buf[payload]`.
    Control {
        opcode: OpCode,
        payload: std::ops::Range<usize>,
    },
    Data(SliceChunk),
}

/// A piece of a data frame's payload, unmasked, at `buf[payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceChunk {
    pub opcode: OpCode,
    pub fin: bool,
    pub frame_len: u64,
    pub first: bool,
    pub last: bool,
    pub payload: std::ops::Range<usize>,
}

#[derive(Debug)]
enum State {
    Header,
    Payload {
        opcode: OpCode,
        fin: bool,
        mask: Option<[u8; 4]>,
        frame_len: u64,
        offset: u64,
        first: bool,
    },
}

/// Streaming frame decoder. See the module docs.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    max_frame: u64,
    state: State,
    /// Opcode of the fragmented message in progress, if any.
    open_message: Option<OpCode>,
}

impl Decoder {
    /// A decoder for the given side, rejecting data frames above `max_frame` bytes.
    pub fn new(role: Role, max_frame: u64) -> Self {
        Self {
            role,
            max_frame,
            state: State::Header,
            open_message: None,
        }
    }

    /// True between frames (no frame payload pending).
    pub fn at_frame_boundary(&self) -> bool {
        matches!(self.state, State::Header)
    }

    /// Decodes the next item at the start of `buf`, unmasking its payload in place.
    ///
    /// Returns the item, with payload positions as ranges into `buf`, and how many bytes
    /// of `buf` it consumed; `Ok(None)` if more bytes are needed. For the first chunk of a
    /// data frame, `buf[..payload.start]` is the frame's header, which the relay overwrites
    /// with the outgoing header. A data frame whose header has arrived yields a first chunk
    /// at once, possibly with an empty payload. After an error the stream is unusable.
    pub fn decode_slice(&mut self, buf: &mut [u8]) -> Result<Option<(SliceItem, usize)>, FrameError> {
        let mut pos = 0;
        if let State::Header = self.state {
            let Some((header, header_len)) = parse_header(buf)? else {
                return Ok(None);
            };
            self.check(&header)?;
            if header.opcode.is_control() {
                let total = header_len + header.len as usize;
                if buf.len() < total {
                    return Ok(None);
                }
                if let Some(key) = header.mask {
                    apply_mask(&mut buf[header_len..total], key, 0);
                }
                let item = SliceItem::Control {
                    opcode: header.opcode,
                    payload: header_len..total,
                };
                return Ok(Some((item, total)));
            }
            self.open_message = match (header.opcode, header.fin) {
                (_, true) => None,
                (OpCode::Continuation, false) => self.open_message,
                (op, false) => Some(op),
            };
            if header.len == 0 {
                let chunk = SliceChunk {
                    opcode: header.opcode,
                    fin: header.fin,
                    frame_len: 0,
                    first: true,
                    last: true,
                    payload: header_len..header_len,
                };
                return Ok(Some((SliceItem::Data(chunk), header_len)));
            }
            self.state = State::Payload {
                opcode: header.opcode,
                fin: header.fin,
                mask: header.mask,
                frame_len: header.len,
                offset: 0,
                first: true,
            };
            pos = header_len;
        }
        let State::Payload {
            opcode,
            fin,
            mask,
            frame_len,
            offset,
            first,
        } = &mut self.state
        else {
            return Ok(None);
        };
        let avail = buf.len() - pos;
        if avail == 0 && !*first {
            return Ok(None);
        }
        let remaining = *frame_len - *offset;
        let take = remaining.min(avail as u64) as usize;
        let payload = pos..pos + take;
        if let Some(key) = mask {
            apply_mask(&mut buf[payload.clone()], *key, *offset as usize);
        }
        let chunk = SliceChunk {
            opcode: *opcode,
            fin: *fin,
            frame_len: *frame_len,
            first: *first,
            last: take as u64 == remaining,
            payload,
        };
        *offset += take as u64;
        *first = false;
        if chunk.last {
            self.state = State::Header;
        }
        Ok(Some((SliceItem::Data(chunk), pos + take)))
    }

    /// Takes the next item out of `buf`, or `Ok(None)` if more bytes are needed.
    ///
    /// The `BytesMut` form of [`Decoder::decode_slice`]: payloads are split off `buf`
    /// without copying; `buf` keeps whatever was not consumed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, FrameError> {
        let Some((item, used)) = self.decode_slice(&mut buf[..])? else {
            return Ok(None);
        };
        let mut taken = buf.split_to(used);
        Ok(Some(match item {
            SliceItem::Control { opcode, payload } => {
                taken.advance(payload.start);
                Item::Control { opcode, payload: taken }
            }
            SliceItem::Data(c) => {
                taken.advance(c.payload.start);
                Item::Data(DataChunk {
                    opcode: c.opcode,
                    fin: c.fin,
                    frame_len: c.frame_len,
                    first: c.first,
                    last: c.last,
                    payload: taken,
                })
            }
        }))
    }

    fn check(&self, h: &FrameHeader) -> Result<(), FrameError> {
        let want_mask = self.role == Role::Server;
        if h.mask.is_some() != want_mask {
            return Err(FrameError::MaskMismatch {
                masked: h.mask.is_some(),
            });
        }
        match h.opcode {
            OpCode::Continuation if self.open_message.is_none() => Err(FrameError::UnexpectedContinuation),
            OpCode::Text | OpCode::Binary if self.open_message.is_some() => Err(FrameError::ExpectedContinuation),
            op if !op.is_control() && h.len > self.max_frame => Err(FrameError::TooLarge {
                len: h.len,
                max: self.max_frame,
            }),
            _ => Ok(()),
        }
    }
}

/// A parsed Close payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// `None` for an empty Close payload (which means 1005, "no status").
    pub code: Option<u16>,
    pub reason: String,
}

/// Parses and validates a Close payload (§5.5.1, §7.4).
pub fn parse_close(payload: &[u8]) -> Result<CloseFrame, FrameError> {
    match payload.len() {
        0 => Ok(CloseFrame {
            code: None,
            reason: String::new(),
        }),
        1 => Err(FrameError::InvalidClosePayload),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_is_sendable(code) {
                return Err(FrameError::InvalidClosePayload);
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| FrameError::InvalidClosePayload)?
                .to_owned();
            Ok(CloseFrame {
                code: Some(code),
                reason,
            })
        }
    }
}

/// Whether a peer may put `code` on the wire.
pub fn close_code_is_sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Builds a Close payload; the reason is cut at a character boundary to fit 125 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// Encodes a whole frame (header + payload, masked if `mask` is set) into a new buffer.
///
/// For control frames and small messages; the data path writes headers into headroom instead.
pub fn encode_frame(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload: &[u8]) -> BytesMut {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(fin, opcode, mask, payload.len() as u64, &mut header);
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.extend_from_slice(&header[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(dec: &mut Decoder, buf: &mut BytesMut) -> Result<Vec<Item>, FrameError> {
        let mut out = Vec::new();
        while let Some(item) = dec.decode(buf)? {
            out.push(item);
        }
        Ok(out)
    }

    #[test]
    fn header_round_trip_for_every_length_class() {
        for len in [0u64, 1, 125, 126, 65535, 65536, 1 << 40] {
            for mask in [None, Some([9, 8, 7, 6])] {
                let mut out = [0u8; MAX_HEADER_LEN];
                let n = encode_header(true, OpCode::Binary, mask, len, &mut out);
                assert_eq!(n, header_len(mask.is_some(), len));
                let (h, used) = parse_header(&out[..n]).unwrap().unwrap();
                assert_eq!(used, n);
                assert_eq!(
                    h,
                    FrameHeader {
                        fin: true,
                        opcode: OpCode::Binary,
                        mask,
                        len
                    }
                );
                assert_eq!(parse_header(&out[..n - 1]).unwrap(), None, "short header needs more");
            }
        }
    }

    #[test]
    fn decodes_masked_frame_split_at_every_point() {
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let wire = encode_frame(true, OpCode::Binary, Some([1, 2, 3, 4]), &payload);
        for split in 0..wire.len() {
            let mut dec = Decoder::new(Role::Server, DEFAULT_MAX_FRAME);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            for item in decode_all(&mut dec, &mut buf).unwrap() {
                let Item::Data(c) = item else { panic!() };
                got.extend_from_slice(&c.payload);
            }
            buf.extend_from_slice(&wire[split..]);
            let items = decode_all(&mut dec, &mut buf).unwrap();
            let last = items.iter().any(|i| matches!(i, Item::Data(c) if c.last));
            for item in items {
                let Item::Data(c) = item else { panic!() };
                got.extend_from_slice(&c.payload);
            }
            assert!(last, "split {split}: frame end reported");
            assert_eq!(got, payload, "split {split}");
            assert!(dec.at_frame_boundary());
        }
    }

    #[test]
    fn slice_decoding_lets_the_relay_reframe_in_place() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&encode_frame(true, OpCode::Binary, Some([9, 9, 9, 9]), &[7u8; 300]));
        wire.extend_from_slice(&encode_frame(true, OpCode::Ping, Some([1, 1, 1, 1]), b"hi"));
        let mut buf = wire.to_vec();
        let mut dec = Decoder::new(Role::Server, DEFAULT_MAX_FRAME);
        let (item, used) = dec.decode_slice(&mut buf).unwrap().unwrap();
        let SliceItem::Data(c) = item else { panic!() };
        assert_eq!((c.first, c.last, c.payload.clone(), used), (true, true, 8..308, 308));
        // Outgoing unmasked header fits in the incoming header's place.
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(true, OpCode::Binary, None, 300, &mut hdr);
        let start = c.payload.start - n;
        buf[start..c.payload.start].copy_from_slice(&hdr[..n]);
        let mut client = Decoder::new(Role::Client, DEFAULT_MAX_FRAME);
        let mut out = BytesMut::from(&buf[start..c.payload.end]);
        let Some(Item::Data(d)) = client.decode(&mut out).unwrap() else {
            panic!()
        };
        assert_eq!(&d.payload[..], &[7u8; 300][..]);
        let (item, used2) = dec.decode_slice(&mut buf[used..]).unwrap().unwrap();
        assert_eq!(
            item,
            SliceItem::Control {
                opcode: OpCode::Ping,
                payload: 6..8
            }
        );
        assert_eq!(&buf[used + 6..used + 8], b"hi");
        assert_eq!(used + used2, buf.len());
        // A header alone yields an empty first chunk; the payload follows later.
        let frame = encode_frame(true, OpCode::Text, Some([1, 2, 3, 4]), b"abc");
        let mut d2 = Decoder::new(Role::Server, DEFAULT_MAX_FRAME);
        let mut head = frame[..6].to_vec();
        let (item, used) = d2.decode_slice(&mut head).unwrap().unwrap();
        assert!(
            matches!(
                item,
                SliceItem::Data(SliceChunk {
                    first: true,
                    last: false,
                    ..
                })
            ) && used == 6
        );
        assert_eq!(d2.decode_slice(&mut []).unwrap(), None);
        let mut rest = frame[6..].to_vec();
        let (item, _) = d2.decode_slice(&mut rest).unwrap().unwrap();
        let SliceItem::Data(c) = item else { panic!() };
        assert!(c.last && !c.first);
        assert_eq!(&rest[c.payload], b"abc");
    }

    #[test]
    fn control_frames_between_fragments() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&encode_frame(false, OpCode::Text, Some([5; 4]), b"he"));
        wire.extend_from_slice(&encode_frame(true, OpCode::Ping, Some([6; 4]), b"p"));
        wire.extend_from_slice(&encode_frame(true, OpCode::Continuation, Some([7; 4]), b"llo"));
        let mut dec = Decoder::new(Role::Server, DEFAULT_MAX_FRAME);
        let items = decode_all(&mut dec, &mut wire).unwrap();
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[1], Item::Control { opcode: OpCode::Ping, payload } if &payload[..] == b"p"));
        let Item::Data(c) = &items[2] else { panic!() };
        assert_eq!(
            (&c.payload[..], c.opcode, c.fin),
            (&b"llo"[..], OpCode::Continuation, true)
        );
    }

    #[test]
    fn rejects_what_the_peer_gets_wrong() {
        let cases: Vec<(Vec<u8>, Role, FrameError)> = vec![
            (
                vec![0x82 | 0x40, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::ReservedBits,
            ),
            (vec![0x83, 0x80, 0, 0, 0, 0], Role::Server, FrameError::UnknownOpcode(3)),
            (vec![0x89, 0xfe, 0, 126], Role::Server, FrameError::ControlTooLong(126)),
            (
                vec![0x09, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::FragmentedControl,
            ),
            (
                vec![0x82, 0x00],
                Role::Server,
                FrameError::MaskMismatch { masked: false },
            ),
            (
                vec![0x82, 0x80, 0, 0, 0, 0],
                Role::Client,
                FrameError::MaskMismatch { masked: true },
            ),
            (
                vec![0x80, 0x80, 0, 0, 0, 0],
                Role::Server,
                FrameError::UnexpectedContinuation,
            ),
            (
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                Role::Server,
                FrameError::InvalidLength,
            ),
            (
                vec![0x82, 0xff, 0, 0, 0, 0, 0, 0x20, 0, 0, 1, 2, 3, 4],
                Role::Server,
                FrameError::TooLarge {
                    len: 0x20_0000,
                    max: DEFAULT_MAX_FRAME,
                },
            ),
        ];
        for (bytes, role, want) in cases {
            let mut dec = Decoder::new(role, DEFAULT_MAX_FRAME);
            let err = dec.decode(&mut BytesMut::from(&bytes[..])).unwrap_err();
            assert_eq!(err, want, "{bytes:?}");
        }
        let mut dec = Decoder::new(Role::Client, DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::from(&encode_frame(false, OpCode::Binary, None, b"a")[..]);
        buf.extend_from_slice(&encode_frame(true, OpCode::Text, None, b"b"));
        assert!(dec.decode(&mut buf).is_ok());
        assert_eq!(dec.decode(&mut buf).unwrap_err(), FrameError::ExpectedContinuation);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close(&[]).unwrap().code, None);
        assert!(parse_close(&[3]).is_err());
        assert!(parse_close(&1005u16.to_be_bytes()).is_err());
        assert!(parse_close(&[0x03, 0xe8, 0xff]).is_err(), "reason must be UTF-8");
        let p = close_payload(1008, &"é".repeat(100));
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        let c = parse_close(&p).unwrap();
        assert_eq!(c.code, Some(1008));
        assert_eq!(c.reason.chars().count(), 61);
    }
}
