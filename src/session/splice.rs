//! The rules of a splice (a client-side WebSocket spliced to a TCP connection: the hcm's
//! rendezvous, the bridge's sender connection), sans-IO.
//!
//! [`SpliceRules`] holds both directions, the close handshake ([`Ctrl`], see
//! [`super::close`]) and the keep-alive ([`super::Keepalive`]). Its driver owns the
//! sockets and buffers:
//! - TCP → WebSocket ([`UpRules`]): the driver asks [`UpRules::poll_step`] once its last
//!   write is out (and flushed): write a control frame, read TCP, wait, or stop. What TCP
//!   gave is reported with [`UpRules::handle_tcp_read`]; data is framed where it lies with
//!   [`UpRules::frame`] (masked in place; the header goes in front). Every finished
//!   write is reported with [`UpRules::handle_written`].
//! - WebSocket → TCP ([`DownRules`]): [`DownRules::poll_step`] says decode, read, or finish
//!   (shut TCP's output first if the peer's Close was clean). [`DownRules::decode`] unmasks
//!   nothing (frames from the relay are unmasked) and pushes payload runs to write; pings
//!   are answered through `Ctrl`, a Close ends reading.
//! - The splice: [`SpliceRules::handle_down_end`] and [`SpliceRules::handle_up_end`] take a
//!   direction's end, [`SpliceRules::poll_end`] says when the whole splice is over and why
//!   ([`CLEAN_END`] only for the clean sequence; any other end resets TCP).

use std::io;
use std::time::{Duration, Instant};

use super::close::{CLEAN_END, CloseState, Ctrl, DownEnd};
use super::keepalive::Keepalive;
use super::wire::{Header, RunSink, SmallFrame, next_item};
use crate::proto::frame::{self, Decoder, OpCode, Role, SliceItem, close_code};
use crate::proto::mask::apply_mask;

/// What the TCP → WebSocket driver does next.
#[derive(Debug)]
pub(crate) enum UpStep {
    /// Write this masked control frame, then report it with [`UpRules::handle_written`].
    Write(SmallFrame),
    /// Our Close is out and the splice may end: this direction is over.
    Done,
    /// Nothing to do until the other direction or a timer has news.
    Idle,
    /// Read TCP ([`UpRules::handle_tcp_read`]).
    ReadTcp,
}

/// Why the writing side stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpEnd {
    /// Our Close is out (and, unless aborting, the peer's has arrived).
    Done,
    WsWriteFailed,
}

/// TCP → WebSocket.
#[derive(Debug, Default)]
pub(crate) struct UpRules {
    /// The frame being written is our Close.
    writing_close: bool,
    /// Payload bytes TCP → WebSocket.
    pub bytes: u64,
}

impl UpRules {
    /// What to do next, once the last write is out.
    pub fn poll_step(&mut self, ctrl: &mut Ctrl) -> UpStep {
        if ctrl.close == CloseState::Sent && (ctrl.abort || ctrl.peer_closed.is_some()) {
            return UpStep::Done;
        }
        // Control frames go out between data frames, which is always here.
        if let Some(p) = ctrl.take_pong() {
            return UpStep::Write(SmallFrame::new(OpCode::Pong, &p, Some(rand::random())));
        }
        if ctrl.take_ping() {
            return UpStep::Write(SmallFrame::new(OpCode::Ping, b"", Some(rand::random())));
        }
        if let CloseState::Queued(code, reason) = ctrl.close {
            self.writing_close = true;
            return UpStep::Write(SmallFrame::close(code, reason, Some(rand::random())));
        }
        if ctrl.tcp_done || ctrl.close == CloseState::Sent {
            return UpStep::Idle;
        }
        UpStep::ReadTcp
    }

    /// A write the driver was given is out.
    pub fn handle_written(&mut self, ctrl: &mut Ctrl) {
        if std::mem::take(&mut self.writing_close) {
            ctrl.close = CloseState::Sent;
        }
    }

    /// What a TCP read gave: `Some(n)` bytes to frame; EOF queues our Close 1000, an error
    /// a Close 1001 and the abnormal end.
    pub fn handle_tcp_read(&mut self, ctrl: &mut Ctrl, r: io::Result<usize>) -> Option<usize> {
        match r {
            Ok(0) => {
                ctrl.tcp_done = true;
                ctrl.queue_close(close_code::NORMAL, "");
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                ctrl.tcp_done = true;
                ctrl.abort = true;
                ctrl.failure = Some("TCP read failed");
                ctrl.queue_close(close_code::GOING_AWAY, "The local connection failed.");
                None
            }
        }
    }

    /// Makes `payload` (bytes just read from TCP) one masked Binary frame: masks it in place
    /// and returns the header to write right before it.
    pub fn frame(&mut self, payload: &mut [u8]) -> Header {
        let key = rand::random::<[u8; 4]>();
        apply_mask(payload, key, 0);
        self.bytes += payload.len() as u64;
        Header::binary(payload.len(), Some(key))
    }
}

/// What the WebSocket → TCP driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DownStep {
    /// The peer's Close arrived and its output is written: shut TCP's output first if
    /// `fin` (a clean Close), then this direction is over ([`DownEnd::PeerClosed`]).
    Finish { fin: bool },
    /// Decode the buffered input ([`DownRules::decode`]).
    Decode,
    /// Read the WebSocket ([`DownRules::handle_read`]).
    Read,
}

/// WebSocket → TCP.
#[derive(Debug)]
pub(crate) struct DownRules {
    dec: Decoder,
    /// The peer's Close was read.
    closing: bool,
    /// The last decode left only a partial frame: read before decoding again.
    starved: bool,
    /// Something was read since the keep-alive last looked.
    heard: bool,
    /// Payload bytes WebSocket → TCP.
    pub bytes: u64,
}

impl DownRules {
    fn new(max_frame: u64) -> Self {
        Self {
            dec: Decoder::new(Role::Client, max_frame),
            closing: false,
            starved: false,
            heard: false,
            bytes: 0,
        }
    }

    /// What to do next, once the last decode's runs are written.
    pub fn poll_step(&mut self, ctrl: &Ctrl, has_input: bool) -> DownStep {
        if self.closing {
            // A clean Close ends TCP's output with a FIN; any other is answered by a reset.
            return DownStep::Finish {
                fin: ctrl.peer_closed_cleanly(),
            };
        }
        if has_input && !self.starved {
            DownStep::Decode
        } else {
            DownStep::Read
        }
    }

    /// What a read brought: `Ok(true)` bytes; EOF or an error ends the direction.
    pub fn handle_read(&mut self, r: io::Result<bool>) -> Result<(), DownEnd> {
        match r {
            Ok(true) => {
                self.heard = true;
                self.starved = false;
                Ok(())
            }
            Ok(false) | Err(_) => Err(DownEnd::Vanished),
        }
    }

    /// Decodes the frames in `buf[*start..end]` into payload runs to write to TCP,
    /// advancing `start`; a ping queues its pong, a Close ends reading (what follows it is
    /// left unconsumed).
    pub fn decode(
        &mut self,
        ctrl: &mut Ctrl,
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
        out: &mut impl RunSink,
    ) -> Result<(), DownEnd> {
        out.clear();
        self.decode_batch(ctrl, buf, start, end, out)
            .map_err(|e| DownEnd::ProtocolError(e.close_code(), e.to_string()))?;
        self.starved = out.is_empty() && !self.closing;
        Ok(())
    }

    fn decode_batch(
        &mut self,
        ctrl: &mut Ctrl,
        buf: &mut [u8],
        start: &mut usize,
        end: usize,
        out: &mut impl RunSink,
    ) -> Result<(), frame::FrameError> {
        while out.has_room() {
            let Some((item, base)) = next_item(&mut self.dec, buf, start, end)? else {
                break;
            };
            match item {
                SliceItem::Data(c) => {
                    if !c.payload.is_empty() {
                        self.bytes += c.payload.len() as u64;
                        out.push(base + c.payload.start..base + c.payload.end);
                    }
                }
                SliceItem::Control {
                    opcode: OpCode::Ping,
                    payload,
                } => {
                    ctrl.pong = Some(buf[base + payload.start..base + payload.end].into());
                    ctrl.peer_pinged = true;
                }
                SliceItem::Control {
                    opcode: OpCode::Pong, ..
                } => {}
                SliceItem::Control { payload, .. } => {
                    let close = frame::parse_close(&buf[base + payload.start..base + payload.end])?;
                    ctrl.peer_closed = Some(close.code);
                    self.closing = true;
                    // Nothing after a Close is decoded. It stays unconsumed at
                    // `start..end`: on a pooled connection kept for another tunnel (the
                    // `reuse` extension) it is the start of the next `accept`.
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Both directions of a splice, its close handshake and its keep-alive.
#[derive(Debug)]
pub(crate) struct SpliceRules {
    pub ctrl: Ctrl,
    pub up: UpRules,
    pub down: DownRules,
    keep: Keepalive,
    up_end: Option<UpEnd>,
    down_end: Option<DownEnd>,
    stopping: bool,
    /// Why the splice ends, once an abnormal end is known but our Close is still going out.
    end: Option<String>,
}

impl SpliceRules {
    /// A splice starting at `now` that pings every `ping_interval` and accepts frames up to
    /// `max_frame` bytes of payload.
    pub fn new(now: Instant, ping_interval: Duration, max_frame: u64) -> Self {
        Self {
            ctrl: Ctrl::default(),
            up: UpRules::default(),
            down: DownRules::new(max_frame),
            keep: Keepalive::new(now, ping_interval),
            up_end: None,
            down_end: None,
            stopping: false,
            end: None,
        }
    }

    /// The role stops: Close(1001) goes out at once and the splice ends after it.
    pub fn handle_stop(&mut self) {
        if std::mem::replace(&mut self.stopping, true) {
            return;
        }
        self.ctrl.abort = true;
        self.ctrl.tcp_done = true;
        self.ctrl.queue_close(close_code::GOING_AWAY, "Shutting down.");
        self.end.get_or_insert_with(|| "stopped".into());
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    pub fn up_running(&self) -> bool {
        self.up_end.is_none()
    }

    pub fn down_running(&self) -> bool {
        self.down_end.is_none()
    }

    /// The WebSocket → TCP side ended; `Some(why)` if the splice ends now.
    pub fn handle_down_end(&mut self, e: DownEnd) -> Option<String> {
        let r = self.ctrl.on_down_end(&e);
        self.down_end = Some(e);
        match r {
            Ok(end) => {
                self.end = end.or(self.end.take());
                None
            }
            Err(fatal) => Some(fatal),
        }
    }

    /// The TCP → WebSocket side ended; `Some(why)` if the splice ends now.
    pub fn handle_up_end(&mut self, e: UpEnd) -> Option<String> {
        let failed = e == UpEnd::WsWriteFailed;
        self.up_end = Some(e);
        failed.then(|| "WebSocket write failed".into())
    }

    /// Applies what the last read brought to the keep-alive, and the half-close to its
    /// rules; `now` is asked for only if something changed (this runs on every poll of the
    /// splice, before its timer is looked at).
    ///
    /// Half-closed, silence means something else ([`super::keepalive`]): once the peer's
    /// Close is in, we go on pinging but never call it dead (it cannot answer); once ours
    /// is out, we cannot ping and call the peer dead only if it pings on its own and then
    /// stops (data alone does not show that). Before, a half-closed tunnel whose open
    /// direction stayed quiet for two ping periods (an endpoint slow to answer a request
    /// whose sender had shut its output) was cut, and the answer lost.
    pub fn handle_heard(&mut self, now: impl FnOnce() -> Instant) {
        if self.ctrl.peer_closed.is_some() {
            self.keep.ping_only();
        }
        if self.ctrl.close == CloseState::Sent {
            self.keep.after_our_close();
        }
        let pinged = std::mem::take(&mut self.ctrl.peer_pinged);
        if std::mem::take(&mut self.down.heard) || pinged {
            let now = now();
            match pinged {
                true => self.keep.handle_pinged(now),
                false => self.keep.handle_heard(now),
            }
        }
    }

    /// When the keep-alive timer must fire next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keep.poll_timeout()
    }

    /// The keep-alive timer fired at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.keep.handle_timeout(now);
    }

    /// Hands a due ping to the writing side; `Some(why)` if the peer is dead (silent for
    /// two periods) and the splice ends now.
    pub fn poll_keepalive(&mut self) -> Option<String> {
        self.ctrl.ping_due |= self.keep.poll_ping();
        self.keep.is_dead().then(|| "peer silent for two ping periods".into())
    }

    /// `Some(why)` once the splice is over: both sides ended, or ours ended with our Close
    /// out while aborting.
    pub fn poll_end(&mut self) -> Option<String> {
        let done = match (&self.up_end, &self.down_end) {
            (Some(_), Some(_)) => true,
            (Some(UpEnd::Done), None) => self.ctrl.abort,
            _ => false,
        };
        if !done {
            return None;
        }
        let why = self.end.take().or_else(|| self.ctrl.failure.map(Into::into));
        Some(why.unwrap_or_else(|| CLEAN_END.into()))
    }

    /// The close code the peer sent, if it sent one with a code.
    pub fn peer_close(&self) -> Option<u16> {
        self.ctrl.peer_closed.flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::encode_frame;
    use crate::session::sim::{Input, SpliceSim, TcpRead, Written, written};

    /// A splice with the relay's `ws` bytes (read 5 at a time; more may come) and TCP's
    /// reads (`None`: EOF).
    fn sim(ws: Vec<u8>, tcp: Vec<Option<&[u8]>>) -> SpliceSim {
        let tcp = tcp
            .into_iter()
            .map(|r| r.map_or(TcpRead::Eof, |d| TcpRead::Data(d.to_vec())))
            .collect();
        let rules = SpliceRules::new(Instant::now(), Duration::from_secs(30), 1 << 20);
        SpliceSim::new(rules, Input::new(ws, 5, false), tcp)
    }

    fn from_relay(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        encode_frame(true, opcode, None, payload).to_vec()
    }

    fn close(code: u16) -> Vec<u8> {
        from_relay(OpCode::Close, &code.to_be_bytes())
    }

    /// What the splice sent to the WebSocket (masked frames).
    fn sent(s: &SpliceSim) -> Written {
        written(Role::Server, &s.to_ws)
    }

    #[test]
    fn the_clean_sequence_moves_every_byte_and_ends_with_a_fin() {
        // The relay sends data then Close 1000; TCP sends data then EOF.
        let mut ws = from_relay(OpCode::Binary, b"down ");
        ws.extend(from_relay(OpCode::Ping, b"pp"));
        ws.extend(from_relay(OpCode::Binary, b"stream"));
        ws.extend(close(1000));
        let mut s = sim(ws, vec![Some(b"up stream"), None]);
        assert_eq!(s.run().expect("the splice ends"), CLEAN_END);
        assert_eq!(s.to_tcp, b"down stream");
        assert!(s.tcp_fin, "a clean Close shuts TCP's output");
        let out = sent(&s);
        assert_eq!(out.data, b"up stream");
        assert_eq!(out.closes, [Some(1000)], "our Close once, after TCP's EOF");
        assert!(out.ends_with_close(), "nothing after it");
        assert_eq!(
            out.control(OpCode::Pong),
            [b"pp"],
            "the ping is answered with its payload"
        );
        assert_eq!((s.rules.up.bytes, s.rules.down.bytes), (9, 11));
    }

    #[test]
    fn half_close_runs_the_other_direction_on_both_ways() {
        // TCP's EOF first: our Close 1000 goes out, the WebSocket is still read.
        let mut s = sim(Vec::new(), vec![None]);
        assert_eq!(s.poll(), None);
        assert_eq!(sent(&s).closes, [Some(1000)]);
        s.ws.data.extend(from_relay(OpCode::Binary, b"late data"));
        assert_eq!(s.poll(), None);
        assert_eq!(s.to_tcp, b"late data", "still delivered after our Close");
        s.ws.data.extend(close(1000));
        assert_eq!(s.run().expect("the splice ends"), CLEAN_END);

        // The peer's Close first: TCP's output is shut, TCP is still read.
        let mut s = sim(close(1000), vec![Some(b"more")]);
        assert_eq!(s.poll(), None);
        assert!(s.tcp_fin);
        assert!(sent(&s).closes.is_empty(), "no Close before TCP's EOF");
        s.tcp.push(TcpRead::Eof);
        assert_eq!(s.run().expect("the splice ends"), CLEAN_END);
        let out = sent(&s);
        assert_eq!(out.data, b"more");
        assert_eq!(out.closes, [Some(1000)]);
    }

    #[test]
    fn every_abnormal_close_is_echoed_and_resets_tcp() {
        for code in [1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999] {
            let mut s = sim(close(code), Vec::new());
            let why = s.run().expect("the splice ends");
            assert_ne!(why, CLEAN_END, "{code}");
            assert!(why.contains(&code.to_string()));
            assert!(!s.tcp_fin, "no FIN after {code}: TCP is reset");
            assert_eq!(sent(&s).closes, [Some(code)], "the echo of {code}");
            assert_eq!(s.rules.peer_close(), Some(code));
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_cut_with_1009_and_a_bad_frame_with_1002() {
        let cases = [
            (from_relay(OpCode::Binary, &vec![0; (1 << 20) + 1]), close_code::TOO_BIG),
            (
                encode_frame(true, OpCode::Binary, Some([1, 2, 3, 4]), b"masked").to_vec(),
                1002,
            ),
            (from_relay(OpCode::Close, &[3]), 1002),
        ];
        for (ws, code) in cases {
            let mut s = sim(ws, Vec::new());
            let why = s.run().expect("the splice ends");
            assert!(why.contains("protocol error"), "{why}");
            assert_eq!(sent(&s).closes, [Some(code)]);
        }
    }

    #[test]
    fn a_vanished_websocket_ends_at_once_and_a_tcp_error_sends_1001() {
        let mut s = sim(from_relay(OpCode::Binary, b"x"), Vec::new());
        s.ws.eof = true;
        assert_eq!(s.run().expect("the splice ends"), "WebSocket connection lost");
        assert!(s.to_ws.is_empty(), "nobody to tell");

        let mut s = sim(Vec::new(), Vec::new());
        let r = &mut s.rules;
        assert_eq!(
            r.up.handle_tcp_read(&mut r.ctrl, Err(io::ErrorKind::ConnectionReset.into())),
            None
        );
        assert_eq!(
            s.run().expect("the splice ends"),
            "TCP read failed",
            "an abnormal end, not a clean one"
        );
        assert_eq!(sent(&s).closes, [Some(close_code::GOING_AWAY)]);
    }

    #[test]
    fn a_stop_sends_1001_and_ends_without_waiting_for_the_peer() {
        let mut s = sim(Vec::new(), Vec::new());
        s.rules.handle_stop();
        s.rules.handle_stop();
        assert_eq!(s.run().expect("the splice ends"), "stopped");
        assert_eq!(sent(&s).closes, [Some(close_code::GOING_AWAY)]);
    }

    #[test]
    fn the_keepalive_pings_each_period_and_ends_a_silent_peer() {
        let t0 = Instant::now();
        let p = Duration::from_secs(30);
        let mut r = SpliceRules::new(t0, p, 1 << 20);
        assert_eq!(r.poll_timeout(), Some(t0 + p));
        r.handle_timeout(t0 + p);
        assert_eq!(r.poll_keepalive(), None);
        assert!(
            matches!(r.up.poll_step(&mut r.ctrl), UpStep::Write(_)),
            "a ping is owed"
        );
        // Something heard resets the silence.
        r.down.handle_read(Ok(true)).unwrap();
        r.handle_heard(|| t0 + p);
        r.handle_timeout(t0 + p * 2 + Duration::from_secs(1));
        assert_eq!(r.poll_keepalive(), None);
        r.handle_timeout(t0 + p * 3);
        assert_eq!(r.poll_keepalive().as_deref(), Some("peer silent for two ping periods"));
    }

    #[test]
    fn after_the_peers_close_we_ping_on_and_silence_is_no_death() {
        let t0 = Instant::now();
        let p = Duration::from_secs(30);
        let mut s = sim(close(1000), vec![Some(b"x")]);
        s.rules = SpliceRules::new(t0, p, 1 << 20);
        assert_eq!(s.poll(), None);
        s.rules.handle_heard(|| t0);
        for i in 1..=5u32 {
            assert_eq!(s.rules.poll_timeout(), Some(t0 + p * i), "only pings are timed");
            s.rules.handle_timeout(t0 + p * i);
            assert_eq!(s.rules.poll_keepalive(), None, "silent for {i} periods, not dead");
            assert_eq!(s.poll(), None);
        }
        // The pings went out behind the data; TCP's EOF still ends it cleanly.
        assert_eq!(sent(&s).control(OpCode::Ping).len(), 5);
        s.tcp.push(TcpRead::Eof);
        assert_eq!(s.run().expect("the splice ends"), CLEAN_END);
    }

    #[test]
    fn after_our_close_a_quiet_peer_is_not_dead_and_its_late_answer_arrives() {
        // TCP's EOF first (a request sent and the app's output shut); the answer comes
        // ten ping periods later. Before, the splice ended after two silent periods.
        let t0 = Instant::now();
        let p = Duration::from_secs(30);
        let mut s = sim(Vec::new(), vec![None]);
        s.rules = SpliceRules::new(t0, p, 1 << 20);
        assert_eq!(s.poll(), None);
        assert_eq!(sent(&s).closes, [Some(1000)]);
        s.rules.handle_heard(|| t0);
        assert_eq!(
            s.rules.poll_timeout(),
            None,
            "no ping after our Close, no death to time"
        );
        s.rules.handle_timeout(t0 + p * 10);
        assert_eq!(s.rules.poll_keepalive(), None);
        s.ws.data.extend(from_relay(OpCode::Binary, b"late answer"));
        assert_eq!(s.poll(), None);
        s.rules.handle_heard(|| t0 + p * 10);
        s.rules.handle_timeout(t0 + p * 20);
        assert_eq!(s.rules.poll_keepalive(), None, "data after our Close does not arm it");
        s.ws.data.extend(close(1000));
        assert_eq!(s.run().expect("the splice ends"), CLEAN_END);
        assert_eq!(s.to_tcp, b"late answer");
        assert!(sent(&s).control(OpCode::Ping).is_empty(), "nothing after our Close");
    }

    #[test]
    fn after_our_close_a_peer_that_pings_is_dead_once_it_falls_silent() {
        let t0 = Instant::now();
        let p = Duration::from_secs(30);
        let mut s = sim(Vec::new(), vec![None]);
        s.rules = SpliceRules::new(t0, p, 1 << 20);
        assert_eq!(s.poll(), None);
        s.rules.handle_heard(|| t0);
        // One of ours on the other side goes on pinging after our Close.
        s.ws.data.extend(from_relay(OpCode::Ping, b""));
        assert_eq!(s.poll(), None);
        s.rules.handle_heard(|| t0 + p);
        assert!(sent(&s).control(OpCode::Pong).is_empty(), "no pong after our Close");
        assert_eq!(s.rules.poll_timeout(), Some(t0 + p * 3));
        s.rules.handle_timeout(t0 + p * 3 - Duration::from_millis(1));
        assert_eq!(s.rules.poll_keepalive(), None);
        s.rules.handle_timeout(t0 + p * 3);
        assert_eq!(
            s.rules.poll_keepalive().as_deref(),
            Some("peer silent for two ping periods")
        );
    }
}
