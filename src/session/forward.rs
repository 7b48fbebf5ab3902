//! The relay's tunnel rules, sans-IO: each direction re-sends the frames of one leg to the
//! other, unmasked, and the two directions end together.
//!
//! [`Forward`] is one direction. Its driver owns the input buffer and the sockets; it asks
//! [`Forward::poll_step`] what to do next and reports back:
//! - [`Step::Decode`]: decode the buffered input with [`Forward::decode`], which unmasks
//!   payloads where they lie, overwrites each frame's masked header with the shorter
//!   unmasked one right in front of its payload, and pushes the runs to write;
//! - [`Step::Read`]: read more input and report it with [`Forward::handle_read`];
//! - [`Step::Final`]: write this Close (the direction ends after it);
//! - [`Step::End`]: the direction is over (after its output is written and flushed).
//!
//! Before each `poll_step` the driver writes (and flushes) whatever the last decode or
//! `Final` gave it; a failed write ends the direction with [`DirEnd::WriteFailed`].
//!
//! The rules: a Close is forwarded, not answered (the far end answers it: half-close), and
//! nothing after it is read (what came with it stays unconsumed in the input). A source that vanishes or breaks the protocol gets Close(1001)
//! sent on in its place (if the destination is at a frame boundary); one that breaks the
//! protocol (a frame over `max_frame`, a control frame over 125 bytes, bad masking, …) is
//! also cut: the opposite direction ends at its next frame boundary with Close(1009 or
//! 1002) to the offender. [`TunnelRules`] joins two directions: after an abnormal end or a
//! stop, the survivor has [`ABANDON_GRACE`] to finish.

use std::io;
use std::time::{Duration, Instant};

use super::wire::{RunSink, SmallFrame, next_item};
use crate::proto::frame::{self, Decoder, FrameError, MAX_HEADER_LEN, OpCode, Role, SliceItem, close_code};

/// How long the surviving direction gets after the other ended abnormally or the tunnel
/// was stopped. Default: 5 s.
pub const ABANDON_GRACE: Duration = Duration::from_secs(5);

/// How one direction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEnd {
    /// A Close was forwarded.
    Closed,
    /// The source ended without Close; 1001 was sent on.
    Vanished,
    /// The source broke the protocol; 1001 was sent on. Carries the close code the
    /// offender is owed (1009 for a frame over the limit, else 1002).
    ProtocolError(u16, String),
    /// The destination broke the protocol (on the other direction); this direction sent it
    /// Close with the given code and ended.
    Cut(u16),
    /// Writing to the destination failed.
    WriteFailed,
    /// Stopped by entity deletion or shutdown; 1001 was sent on where possible.
    Stopped,
}

impl DirEnd {
    /// True for every end but a forwarded Close.
    pub fn abnormal(&self) -> bool {
        *self != DirEnd::Closed
    }

    /// The Close a direction that ends this way sends on to its destination (if it is at a
    /// frame boundary there).
    pub fn close_to_send(&self) -> (u16, &'static str) {
        match self {
            DirEnd::Stopped => (
                close_code::GOING_AWAY,
                "The hybrid connection was deleted or the relay is shutting down.",
            ),
            DirEnd::ProtocolError(..) => (close_code::GOING_AWAY, "The peer broke the WebSocket protocol."),
            DirEnd::Cut(close_code::TOO_BIG) => (close_code::TOO_BIG, "Frame larger than the relay's limit."),
            DirEnd::Cut(code) => (*code, "WebSocket protocol error."),
            _ => (close_code::GOING_AWAY, "The peer went away."),
        }
    }
}

/// What a direction's driver does next.
#[derive(Debug)]
pub enum Step {
    /// Write this (unmasked) Close; the direction ends after it.
    Final(SmallFrame),
    /// The direction is over.
    End(DirEnd),
    /// Decode the buffered input ([`Forward::decode`]).
    Decode,
    /// Read more input ([`Forward::handle_read`]).
    Read,
}

/// One direction of a relay tunnel: frames from a source re-sent unmasked to a destination.
#[derive(Debug)]
pub struct Forward {
    dec: Decoder,
    /// The last forwarded data chunk was not its frame's last: no Close may be injected.
    mid_frame: bool,
    /// Set once the direction has decided to end (after its output and final frame).
    ending: Option<DirEnd>,
    /// The Close (code, reason) to send before ending.
    final_close: Option<(u16, &'static str)>,
    /// Set by [`Forward::stop`] or [`Forward::cut`]: end at the next frame boundary.
    stop_requested: Option<DirEnd>,
    /// The last decode left only a partial frame: read before decoding again.
    starved: bool,
    /// The Close forwarded had code 1000 or none.
    normal_close: bool,
    /// Payload bytes forwarded.
    pub bytes: u64,
}

impl Forward {
    /// A direction that accepts frames up to `max_frame` bytes of payload.
    pub fn new(max_frame: u64) -> Self {
        Self {
            dec: Decoder::new(Role::Server, max_frame),
            mid_frame: false,
            ending: None,
            final_close: None,
            stop_requested: None,
            starved: false,
            normal_close: false,
            bytes: 0,
        }
    }

    /// Asks the direction to end at the next frame boundary with Close(1001).
    pub fn stop(&mut self) {
        self.stop_requested.get_or_insert(DirEnd::Stopped);
    }

    /// Asks the direction to end at the next frame boundary with Close(`code`): its
    /// destination broke the protocol on the other direction.
    pub fn cut(&mut self, code: u16) {
        self.stop_requested = Some(DirEnd::Cut(code));
    }

    /// What to do next, once the output of the last step is written; `has_input` says
    /// whether undecoded bytes are buffered.
    pub fn poll_step(&mut self, has_input: bool) -> Step {
        if let Some((code, reason)) = self.final_close.take() {
            return Step::Final(SmallFrame::close(code, reason, None));
        }
        if let Some(end) = self.ending.take() {
            return Step::End(end);
        }
        if let Some(end) = self.stop_requested.take() {
            self.abort(end);
            return self.poll_step(has_input);
        }
        if has_input && !self.starved {
            Step::Decode
        } else {
            Step::Read
        }
    }

    /// What a read brought: `Ok(true)` bytes, `Ok(false)` the source's EOF.
    pub fn handle_read(&mut self, r: io::Result<bool>) {
        match r {
            Ok(true) => self.starved = false,
            Ok(false) | Err(_) => self.abort(DirEnd::Vanished),
        }
    }

    /// Decodes the frames in `buf[*start..end]` into runs of `buf` to write, rewriting
    /// headers in place and advancing `start` past what was used; stops when `out` is full.
    pub fn decode(&mut self, buf: &mut [u8], start: &mut usize, end: usize, out: &mut impl RunSink) {
        out.clear();
        if let Err(e) = self.decode_batch(buf, start, end, out) {
            self.abort(DirEnd::ProtocolError(e.close_code(), e.to_string()));
        }
        self.starved = out.is_empty() && self.ending.is_none();
    }

    /// Ends the direction after its pending output: a Close to the destination if a
    /// frame may be injected there.
    fn abort(&mut self, end: DirEnd) {
        if self.ending.is_some() {
            return;
        }
        if !self.mid_frame {
            self.final_close = Some(end.close_to_send());
        }
        self.ending = Some(end);
    }

    fn decode_batch(
        &mut self,
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
        out: &mut impl RunSink,
    ) -> Result<(), FrameError> {
        let mut hdr = [0u8; MAX_HEADER_LEN];
        while out.has_room() {
            let Some((item, base)) = next_item(&mut self.dec, buf, start, end)? else {
                break;
            };
            match item {
                SliceItem::Data(c) => {
                    self.bytes += c.payload.len() as u64;
                    self.mid_frame = !c.last;
                    let (p0, p1) = (base + c.payload.start, base + c.payload.end);
                    if c.first {
                        let h = frame::encode_header(c.fin, c.opcode, None, c.frame_len, &mut hdr);
                        buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                        out.push(p0 - h..p1);
                    } else if p1 > p0 {
                        out.push(p0..p1);
                    }
                }
                SliceItem::Control { opcode, payload } => {
                    let (p0, p1) = (base + payload.start, base + payload.end);
                    if opcode == OpCode::Close {
                        let code = frame::parse_close(&buf[p0..p1])?.code;
                        self.normal_close = matches!(code, None | Some(close_code::NORMAL));
                    }
                    let h = frame::encode_header(true, opcode, None, (p1 - p0) as u64, &mut hdr);
                    buf[p0 - h..p0].copy_from_slice(&hdr[..h]);
                    out.push(p0 - h..p1);
                    if opcode == OpCode::Close {
                        // Nothing after a Close is decoded or forwarded. It stays
                        // unconsumed at `start..end`: a connection kept for another
                        // tunnel (the `reuse` extension) reads it as its next request;
                        // otherwise the driver drops it with its buffer.
                        self.ending = Some(DirEnd::Closed);
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Which direction of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Sender → listener.
    Up,
    /// Listener → sender.
    Down,
}

/// Both directions of a relay tunnel and how they end together.
#[derive(Debug)]
pub struct TunnelRules {
    pub up: Forward,
    pub down: Forward,
    up_end: Option<DirEnd>,
    down_end: Option<DirEnd>,
    /// When the survivor's grace ends, once armed.
    grace: Option<Instant>,
    stopped: bool,
}

impl TunnelRules {
    pub fn new(max_frame: u64) -> Self {
        Self {
            up: Forward::new(max_frame),
            down: Forward::new(max_frame),
            up_end: None,
            down_end: None,
            grace: None,
            stopped: false,
        }
    }

    /// The hybrid connection was deleted or the relay stops: both directions end at their
    /// next frame boundary with Close(1001), within the grace.
    pub fn handle_stop(&mut self, now: Instant) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        self.up.stop();
        self.down.stop();
        self.grace.get_or_insert(now + ABANDON_GRACE);
    }

    /// True once [`TunnelRules::handle_stop`] was called.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Direction `d`'s rules.
    pub fn forward(&mut self, d: Dir) -> &mut Forward {
        match d {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
        }
    }

    /// True while direction `d` has not ended.
    pub fn running(&self, d: Dir) -> bool {
        match d {
            Dir::Up => self.up_end.is_none(),
            Dir::Down => self.down_end.is_none(),
        }
    }

    /// Direction `d` ended with `e`. True if the other one was cut and must be driven again
    /// now to send its Close.
    pub fn handle_end(&mut self, now: Instant, d: Dir, e: DirEnd) -> bool {
        if e.abnormal() {
            self.grace.get_or_insert(now + ABANDON_GRACE);
        }
        let cut = if let DirEnd::ProtocolError(code, _) = &e {
            let other = match d {
                Dir::Up => &mut self.down,
                Dir::Down => &mut self.up,
            };
            other.cut(*code);
            true
        } else {
            false
        };
        match d {
            Dir::Up => self.up_end = Some(e),
            Dir::Down => self.down_end = Some(e),
        }
        cut && self.running(match d {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        })
    }

    /// When the driver's timer must fire: the end of the grace, once armed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.grace
    }

    /// True once both directions ended. The tunnel also ends when the grace
    /// ([`TunnelRules::poll_timeout`]) is over, whatever the survivor is doing.
    pub fn both_ended(&self) -> bool {
        self.up_end.is_some() && self.down_end.is_some()
    }

    /// True if both directions ended with a forwarded Close, unstopped: the close
    /// handshake is complete on both legs, and nothing after either Close was forwarded.
    pub fn closed_cleanly(&self) -> bool {
        !self.stopped && self.up_end == Some(DirEnd::Closed) && self.down_end == Some(DirEnd::Closed)
    }

    /// True if the tunnel [`closed_cleanly`](Self::closed_cleanly) and both Closes were
    /// normal (code 1000 or none): both ends finished as they meant to.
    pub fn closed_normally(&self) -> bool {
        self.closed_cleanly() && self.up.normal_close && self.down.normal_close
    }

    /// How the directions ended, for logs.
    pub fn end(&self) -> String {
        format!("up: {:?}, down: {:?}", self.up_end, self.down_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_frame;
    use crate::session::sim::{ForwardSim, Written, written};

    fn masked(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        encode_frame(fin, opcode, Some([9, 8, 7, 6]), payload).to_vec()
    }

    /// What a direction wrote (unmasked frames).
    fn out(sim: &ForwardSim) -> Written {
        written(Role::Client, &sim.written)
    }

    #[test]
    fn frames_are_forwarded_unmasked_and_byte_exact_at_any_read_size() {
        let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut input = masked(OpCode::Binary, false, b"first half ");
        input.extend(masked(OpCode::Ping, true, b"p"));
        input.extend(masked(OpCode::Continuation, true, b"second half"));
        input.extend(masked(OpCode::Binary, true, b""));
        input.extend(masked(OpCode::Binary, true, &big));
        input.extend(masked(OpCode::Close, true, &1000u16.to_be_bytes()));
        input.extend(masked(OpCode::Binary, true, b"after the close: dropped"));
        for chunk in [1, 2, 7, 13, 100, 4096, 1 << 16] {
            let mut sim = ForwardSim::new(input.clone(), chunk, true);
            let mut f = Forward::new(1 << 20);
            assert_eq!(sim.run(&mut f), Some(DirEnd::Closed), "chunk {chunk}");
            let out = out(&sim);
            let mut want = b"first half second half".to_vec();
            want.extend(&big);
            assert_eq!(out.data, want, "chunk {chunk}");
            assert_eq!(f.bytes, want.len() as u64);
            assert_eq!(out.control(OpCode::Ping), [b"p"], "ping forwarded");
            assert_eq!(out.closes, [Some(1000)], "the Close is forwarded, not answered");
            assert!(out.ends_with_close(), "nothing after it");
        }
    }

    /// What follows a Close is neither forwarded nor consumed: a connection kept for
    /// another tunnel (the `reuse` extension) reads it as its next request head.
    #[test]
    fn what_follows_a_close_stays_unconsumed() {
        let next = b"GET /$hc/x?sb-hc-action=connect HTTP/1.1\r\n".to_vec();
        let mut input = masked(OpCode::Binary, true, b"data");
        input.extend(masked(OpCode::Close, true, &1000u16.to_be_bytes()));
        let close_end = input.len();
        input.extend(&next);
        for chunk in [1, 3, 8, 50, 4096] {
            let mut sim = ForwardSim::new(input.clone(), chunk, false);
            let mut f = Forward::new(1 << 20);
            assert_eq!(sim.run(&mut f), Some(DirEnd::Closed), "chunk {chunk}");
            assert_eq!(out(&sim).data, b"data");
            assert!(out(&sim).ends_with_close());
            assert_eq!(sim.input.unconsumed(), &input[close_end..], "chunk {chunk}");
        }
    }

    #[test]
    fn a_source_that_vanishes_gets_1001_sent_on() {
        let mut sim = ForwardSim::new(masked(OpCode::Binary, true, b"hi"), 64, true);
        let mut f = Forward::new(1 << 20);
        assert_eq!(sim.run(&mut f), Some(DirEnd::Vanished));
        let out = out(&sim);
        assert_eq!(out.data, b"hi");
        assert_eq!(out.closes, [Some(close_code::GOING_AWAY)]);
    }

    #[test]
    fn no_close_is_injected_in_the_middle_of_a_frame() {
        // 10 bytes of a 100-byte frame, then EOF: a Close now would corrupt the frame.
        let frame = masked(OpCode::Binary, true, &[5; 100]);
        let mut sim = ForwardSim::new(frame[..16].to_vec(), 64, true);
        let mut f = Forward::new(1 << 20);
        assert_eq!(sim.run(&mut f), Some(DirEnd::Vanished));
        assert_eq!(sim.written.len(), 2 + 10, "the header and the payload so far, no Close");
    }

    #[test]
    fn breaking_the_protocol_ends_with_1001_on_and_the_offender_cut_with_1009_or_1002() {
        let cases = [
            (masked(OpCode::Binary, true, &[0; 200]), close_code::TOO_BIG),
            (masked(OpCode::Ping, true, &[0; 126]), close_code::PROTOCOL_ERROR),
            (
                encode_frame(true, OpCode::Binary, None, b"unmasked").to_vec(),
                close_code::PROTOCOL_ERROR,
            ),
            (masked(OpCode::Close, true, &[3]), close_code::PROTOCOL_ERROR),
        ];
        for (input, owed) in cases {
            let mut rules = TunnelRules::new(100);
            let now = Instant::now();
            let mut up = ForwardSim::new(input, 4096, true);
            let end = up.run(&mut rules.up).unwrap();
            assert!(matches!(end, DirEnd::ProtocolError(c, _) if c == owed), "{end:?}");
            assert_eq!(out(&up).closes, [Some(close_code::GOING_AWAY)]);
            assert!(rules.handle_end(now, Dir::Up, end), "the other direction is cut");
            // The other direction, idle at a frame boundary, sends the offender its Close.
            let mut down = ForwardSim::new(Vec::new(), 4096, false);
            assert_eq!(down.run(&mut rules.down), Some(DirEnd::Cut(owed)));
            assert_eq!(out(&down).closes, [Some(owed)]);
            assert!(!rules.both_ended());
            rules.handle_end(now, Dir::Down, DirEnd::Cut(owed));
            assert!(rules.both_ended());
        }
    }

    #[test]
    fn a_stop_ends_both_directions_with_1001_and_the_grace_bounds_a_stuck_one() {
        let mut rules = TunnelRules::new(1 << 20);
        let t0 = Instant::now();
        rules.handle_stop(t0);
        assert_eq!(rules.poll_timeout(), Some(t0 + ABANDON_GRACE));
        let mut up = ForwardSim::new(masked(OpCode::Binary, true, b"x"), 64, false);
        assert_eq!(up.run(&mut rules.up), Some(DirEnd::Stopped));
        assert_eq!(out(&up).closes, [Some(close_code::GOING_AWAY)]);
        assert!(!rules.handle_end(t0, Dir::Up, DirEnd::Stopped));
        // The other direction never gets to run (its destination is stuck): the grace ends it.
        assert!(!rules.both_ended());
        assert_eq!(
            rules.poll_timeout(),
            Some(t0 + ABANDON_GRACE),
            "what the driver's timer ends"
        );
        assert!(rules.end().contains("Stopped"));
    }

    #[test]
    fn a_clean_close_arms_no_grace() {
        let mut rules = TunnelRules::new(1 << 20);
        let now = Instant::now();
        assert!(!rules.handle_end(now, Dir::Down, DirEnd::Closed));
        assert_eq!(rules.poll_timeout(), None, "the half-closed other side may run on");
        assert!(rules.running(Dir::Up) && !rules.running(Dir::Down));
        rules.handle_end(now, Dir::Up, DirEnd::WriteFailed);
        assert!(rules.both_ended());
    }

    #[test]
    fn a_write_failure_is_reported_by_the_driver_and_ends_nothing_else() {
        // The rules never see the write; the driver reports WriteFailed as the end.
        let mut rules = TunnelRules::new(1 << 20);
        let now = Instant::now();
        assert!(!rules.handle_end(now, Dir::Up, DirEnd::WriteFailed));
        assert_eq!(rules.poll_timeout(), Some(now + ABANDON_GRACE));
        assert!(rules.running(Dir::Down));
    }
}
