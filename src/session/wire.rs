//! What the sans-IO data-plane machines ([`super::forward`], `super::splice`) hand their
//! drivers to write, and where they put the payload runs they decode.

use std::ops::Range;

use crate::proto::frame::{self, Decoder, FrameError, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, SliceItem};
use crate::proto::mask::apply_mask;

/// Most payload runs one decode batch yields (one vectored write's worth).
pub const MAX_RUNS: usize = 64;

/// Where a machine's decode puts the runs of the input buffer to be written, in order.
/// The driver owns it: the epoll engines write runs with a vectored write and keep their
/// progress, the completion engines hand them to the kernel with the buffer.
pub trait RunSink {
    /// True if another run fits in this batch.
    fn has_room(&self) -> bool;
    fn push(&mut self, run: Range<usize>);
    fn is_empty(&self) -> bool;
    /// Empties the sink for a new batch.
    fn clear(&mut self);
}

impl RunSink for Vec<Range<usize>> {
    fn has_room(&self) -> bool {
        self.len() < MAX_RUNS
    }

    fn push(&mut self, run: Range<usize>) {
        Vec::push(self, run);
    }

    fn is_empty(&self) -> bool {
        Vec::is_empty(self)
    }

    fn clear(&mut self) {
        Vec::clear(self);
    }
}

/// The next item `dec` finds in `buf[*start..end]` and the offset it began at (its ranges
/// are relative to that), advancing `start` past it; `None` when more bytes are needed.
pub fn next_item(
    dec: &mut Decoder,
    buf: &mut [u8],
    start: &mut usize,
    end: usize,
) -> Result<Option<(SliceItem, usize)>, FrameError> {
    let base = *start;
    if base >= end {
        return Ok(None);
    }
    let Some((item, used)) = dec.decode_slice(&mut buf[base..end])? else {
        return Ok(None);
    };
    *start += used;
    Ok(Some((item, base)))
}

/// A whole control frame (at most 125 bytes of payload), ready to write.
#[derive(Clone)]
pub struct SmallFrame {
    bytes: [u8; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD],
    len: usize,
}

impl std::fmt::Debug for SmallFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmallFrame").field("bytes", &self.as_bytes()).finish()
    }
}

impl SmallFrame {
    /// A control frame with `payload` (cut to 125 bytes), masked with `key` if given.
    pub fn new(opcode: OpCode, payload: &[u8], key: Option<[u8; 4]>) -> Self {
        let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = frame::encode_header(true, opcode, key, payload.len() as u64, &mut hdr);
        let mut bytes = [0u8; MAX_HEADER_LEN + MAX_CONTROL_PAYLOAD];
        bytes[..h].copy_from_slice(&hdr[..h]);
        let len = h + payload.len();
        bytes[h..len].copy_from_slice(payload);
        if let Some(key) = key {
            apply_mask(&mut bytes[h..len], key, 0);
        }
        Self { bytes, len }
    }

    /// A Close with `code` and `reason` (cut at a character boundary to fit).
    pub fn close(code: u16, reason: &str, key: Option<[u8; 4]>) -> Self {
        Self::new(OpCode::Close, &frame::close_payload(code, reason), key)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A data frame's header, written by the driver in front of its payload.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl Header {
    /// A final Binary frame's header for `len` bytes of payload, masked with `key` if given.
    pub fn binary(len: usize, key: Option<[u8; 4]>) -> Self {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        let len = frame::encode_header(true, OpCode::Binary, key, len as u64, &mut bytes);
        Self { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{Decoder, Item, Role};

    #[test]
    fn small_frames_decode_as_written() {
        let long = "é".repeat(100);
        for key in [None, Some([1, 2, 3, 4])] {
            let f = SmallFrame::close(1001, &long, key);
            let role = if key.is_some() { Role::Server } else { Role::Client };
            let mut dec = Decoder::new(role, 1 << 20);
            let mut buf = bytes::BytesMut::from(f.as_bytes());
            let Some(Item::Control { opcode, payload }) = dec.decode(&mut buf).unwrap() else {
                panic!("one control frame");
            };
            assert_eq!(opcode, OpCode::Close);
            let close = frame::parse_close(&payload).unwrap();
            assert_eq!(close.code, Some(1001));
            assert!(close.reason.len() <= MAX_CONTROL_PAYLOAD - 2 && close.reason.starts_with('é'));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_vec_sink_holds_one_batch() {
        let mut v: Vec<Range<usize>> = Vec::new();
        for i in 0..MAX_RUNS {
            assert!(v.has_room());
            RunSink::push(&mut v, i..i + 1);
        }
        assert!(!v.has_room());
        RunSink::clear(&mut v);
        assert!(RunSink::is_empty(&v));
    }
}
