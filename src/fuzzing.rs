//! Entry points shared by the fuzz targets in `fuzz/` and the corpus replay test.
//!
//! Every parser that sees bytes from a peer (or from a config file) has one
//! `pub fn <target>(data: &[u8])` here. A fuzz target is a one-liner calling it, and
//! `tests/fuzz_corpus.rs` replays the committed corpora through the same functions, so
//! stable CI exercises exactly what the fuzzer did.
//!
//! The functions never panic on any input unless a parser panics or an invariant checked
//! here is broken; that panic is the finding. Invariants are the cheap ones: limits hold,
//! what we encode decodes back to the same value, splitting the input anywhere changes
//! nothing. Inputs that are not UTF-8 are dropped by the text parsers (their callers only
//! ever hand them `&str`).
//!
//! The frame and mask targets read a few option bytes first; the layout is documented on
//! [`frame_server`] and [`mask`] and in `fuzz/README.md`.

use std::str::from_utf8;

use bytes::BytesMut;

use crate::proto::address::{self, AddressError, Target};
use crate::proto::connstr::{self, ConnectionString, Credential, RelayEndpoint};
use crate::proto::control::{self, Command, ControlError, MAX_CONTROL_MESSAGE};
use crate::proto::frame::{self, Decoder, FrameError, Item, OpCode, Role};
use crate::proto::handshake::{self, DEFAULT_MAX_HEAD};
use crate::proto::mask::{apply_mask, apply_mask_bytewise};
use crate::proto::metadata::{self, HostPort, RuntimeInfo};
use crate::proto::sas::{self, SasToken, Scope};

/// A fuzz entry point: takes any bytes, panics only on a finding.
pub type FuzzFn = fn(&[u8]);

/// Every target by name, for the corpus replay test. Names match `fuzz/fuzz_targets/*.rs`
/// and the directories under `fuzz/corpus/`.
pub const TARGETS: &[(&str, FuzzFn)] = &[
    ("frame_server", frame_server),
    ("frame_client", frame_client),
    ("mask", mask),
    ("http_request", http_request),
    ("http_response", http_response),
    ("sas_token", sas_token),
    ("connection_string", connection_string),
    ("control_json", control_json),
    ("hc_target", hc_target),
    ("http_mode", http_mode),
    ("metadata", metadata),
    ("config_relay", config_relay),
    ("config_hcm", config_hcm),
    ("config_bridge", config_bridge),
    ("proxy_reply", proxy_reply),
    ("extensions", extensions),
    ("keepalive", keepalive),
    ("relay_forward", relay_forward),
    ("splice", splice),
    ("tls_record", tls_record),
];

// ---------------------------------------------------------------------------------------
// WebSocket frames

/// Frame decoder on the relay's side (incoming frames must be masked).
///
/// Input: byte 0 picks the frame limit (`& 3`: 1 MiB, 16 bytes, 0, unlimited), byte 1 seeds
/// the split points (0: one piece; n: pieces of 1..=n bytes), the rest is the byte stream.
/// The stream is decoded whole and in pieces; both must give the same frames, and
/// re-encoding the frames must decode to the same frames again.
pub fn frame_server(data: &[u8]) {
    frame_stream(Role::Server, data);
}

/// Frame decoder on the client's side (incoming frames must not be masked). Input as for
/// [`frame_server`].
pub fn frame_client(data: &[u8]) {
    frame_stream(Role::Client, data);
}

/// One decoded frame (data frames with their chunks joined) or the error that ended the stream.
#[derive(Debug, PartialEq)]
enum Event {
    Control(OpCode, Vec<u8>),
    Data {
        opcode: OpCode,
        fin: bool,
        frame_len: u64,
        payload: Vec<u8>,
        complete: bool,
    },
    Error(FrameError),
}

fn frame_stream(role: Role, data: &[u8]) {
    let [opts, seed, stream @ ..] = data else {
        return;
    };
    let max_frame = match opts & 3 {
        0 => frame::DEFAULT_MAX_FRAME,
        1 => 16,
        2 => 0,
        _ => u64::MAX,
    };
    let whole = decode_events(role, max_frame, [stream]);
    let pieces = decode_events(role, max_frame, split(stream, *seed));
    assert_eq!(whole, pieces, "splitting the input changed the frames");
    let payload: usize = whole.iter().map(event_payload_len).sum();
    assert!(payload <= stream.len(), "more payload than input");
    check_reencode(role, max_frame, &whole, [*opts, *seed, 0x5a, 0xa5]);
}

/// Cuts `data` into pieces of 1..=`seed` bytes (a cheap xorshift picks the sizes).
fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![data];
    }
    let mut state = u32::from(seed) | 0x9e37_7900;
    let mut rest = data;
    let mut out = Vec::new();
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = 1 + (state % u32::from(seed)) as usize;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

fn event_payload_len(e: &Event) -> usize {
    match e {
        Event::Control(_, p) | Event::Data { payload: p, .. } => p.len(),
        Event::Error(_) => 0,
    }
}

/// Feeds `pieces` one after the other, decoding everything after each; checks every item.
fn decode_events<'a>(role: Role, max_frame: u64, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Event> {
    let mut dec = Decoder::new(role, max_frame);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(item)) => {
                    assert!(buf.len() < before, "an item must consume input");
                    push_item(&mut events, item, max_frame);
                }
                Ok(None) => break,
                Err(e) => {
                    events.push(Event::Error(e));
                    return events;
                }
            }
        }
    }
    events
}

/// Appends an item to the event list, checking it against the frames seen so far.
fn push_item(events: &mut Vec<Event>, item: Item, max_frame: u64) {
    let open = open_data_frame(events);
    match item {
        Item::Control { opcode, payload } => {
            assert!(opcode.is_control() && payload.len() <= frame::MAX_CONTROL_PAYLOAD);
            assert!(open.is_none(), "control frame inside a data frame's payload");
            if opcode == OpCode::Close {
                check_close(&payload);
            }
            events.push(Event::Control(opcode, payload.to_vec()));
        }
        Item::Data(c) => {
            assert!(!c.opcode.is_control() && c.frame_len <= max_frame);
            if c.first {
                assert!(open.is_none(), "new frame before the last one ended");
                assert_eq!(
                    c.opcode == OpCode::Continuation,
                    message_open(events),
                    "fragmentation order"
                );
                events.push(Event::Data {
                    opcode: c.opcode,
                    fin: c.fin,
                    frame_len: c.frame_len,
                    payload: Vec::new(),
                    complete: false,
                });
            } else {
                assert!(open == Some((c.opcode, c.fin, c.frame_len)), "chunk of another frame");
            }
            let Some(Event::Data { payload, complete, .. }) = events.last_mut() else {
                unreachable!("a data event was just checked or pushed");
            };
            payload.extend_from_slice(&c.payload);
            assert!(payload.len() as u64 <= c.frame_len, "chunk beyond the frame's length");
            assert_eq!(c.last, payload.len() as u64 == c.frame_len, "last chunk flag");
            *complete = c.last;
        }
    }
}

/// Opcode, FIN and length of a data frame whose payload is still arriving.
fn open_data_frame(events: &[Event]) -> Option<(OpCode, bool, u64)> {
    match events.last() {
        Some(Event::Data {
            opcode,
            fin,
            frame_len,
            complete: false,
            ..
        }) => Some((*opcode, *fin, *frame_len)),
        _ => None,
    }
}

/// True if the last data frame left a fragmented message open.
fn message_open(events: &[Event]) -> bool {
    events.iter().rev().find_map(|e| match e {
        Event::Data { fin, .. } => Some(!fin),
        _ => None,
    }) == Some(true)
}

/// A valid Close payload re-encodes to the same bytes.
fn check_close(payload: &[u8]) {
    if let Ok(frame::CloseFrame {
        code: Some(code),
        reason,
    }) = frame::parse_close(payload)
    {
        assert!(frame::close_code_is_sendable(code));
        assert_eq!(frame::close_payload(code, &reason), payload, "close payload round trip");
    }
}

/// Encodes the complete frames again (minimal lengths, masked as the role requires) and
/// checks that a fresh decoder reads back the same frames.
fn check_reencode(role: Role, max_frame: u64, events: &[Event], key: [u8; 4]) {
    let mask = (role == Role::Server).then_some(key);
    let mut wire = BytesMut::new();
    let mut expect = Vec::new();
    for e in events {
        let bytes = match e {
            Event::Control(op, p) => frame::encode_frame(true, *op, mask, p),
            Event::Data {
                opcode,
                fin,
                payload,
                complete: true,
                ..
            } => frame::encode_frame(*fin, *opcode, mask, payload),
            _ => break,
        };
        wire.extend_from_slice(&bytes);
        expect.push(e);
    }
    let again = decode_events(role, max_frame, [&wire[..]]);
    let again: Vec<&Event> = again.iter().collect();
    assert_eq!(again, expect, "encode_frame round trip");
}

/// Fast masking against the byte loop.
///
/// Input: bytes 0..4 are the key, 4..6 the payload offset (little endian), byte 6 the
/// alignment of the buffer (`& 7`), byte 7 a split point; the rest is the payload.
pub fn mask(data: &[u8]) {
    let [k0, k1, k2, k3, o0, o1, align, cut, payload @ ..] = data else {
        return;
    };
    let key = [*k0, *k1, *k2, *k3];
    let offset = usize::from(u16::from_le_bytes([*o0, *o1]));
    let align = usize::from(align & 7);
    // Copy the payload to a chosen alignment so that the word loop's head varies.
    let mut storage = vec![0u8; payload.len() + 8];
    let fast = &mut storage[align..align + payload.len()];
    fast.copy_from_slice(payload);
    apply_mask(fast, key, offset);
    let mut slow = payload.to_vec();
    apply_mask_bytewise(&mut slow, key, offset);
    assert_eq!(fast, &slow[..], "apply_mask differs from the byte loop");
    // Masking in two chunks at any cut equals masking once.
    let cut = usize::from(*cut).min(payload.len());
    let mut chunked = payload.to_vec();
    let (a, b) = chunked.split_at_mut(cut);
    apply_mask(a, key, offset);
    apply_mask(b, key, offset + cut);
    assert_eq!(chunked, slow, "chunked masking differs");
    // Masking is an involution.
    apply_mask(fast, key, offset);
    assert_eq!(fast, payload, "masking twice must restore the payload");
}

// ---------------------------------------------------------------------------------------
// HTTP heads

/// Request head parser, then what the relay does with a head: upgrade validation, the
/// 101 answer (which our own client must accept) and the request target.
pub fn http_request(data: &[u8]) {
    let Ok(Some((head, used))) = handshake::parse_request(data, DEFAULT_MAX_HEAD) else {
        return;
    };
    assert!(used <= data.len() && used <= DEFAULT_MAX_HEAD);
    let again = handshake::parse_request(&data[..used], DEFAULT_MAX_HEAD);
    assert_eq!(again, Ok(Some((head.clone(), used))), "the head alone parses the same");
    let _ = handshake::wants_websocket(&head);
    // Leaving headers out while merging is merging what is left.
    let leave_out = ["ServiceBusAuthorization", "host"];
    let rest = handshake::Headers(
        head.headers
            .0
            .iter()
            .filter(|(n, _)| !leave_out.iter().any(|l| n.eq_ignore_ascii_case(l)))
            .cloned()
            .collect(),
    );
    assert_eq!(head.headers.merged_without(&leave_out), rest.merged());
    if let Ok(up) = handshake::validate_upgrade(&head) {
        check_switching_protocols(&up);
    }
    if let Err(e) = address::parse_target(&head.target) {
        // The relay answers with the error text as the reason phrase.
        check_response_writer(400, &e.to_string());
    }
}

/// Our 101 answer to a valid upgrade parses back with the right accept key.
fn check_switching_protocols(up: &handshake::Upgrade) {
    let accept = handshake::accept_key(&up.key);
    assert_eq!(accept.len(), 28, "base64 of a SHA-1");
    let protocol = up.protocols.first().map(String::as_str);
    let bytes = handshake::switching_protocols(&up.key, protocol);
    let (resp, used) = handshake::parse_response(&bytes, DEFAULT_MAX_HEAD)
        .expect("our 101 parses")
        .expect("our 101 is complete");
    assert_eq!((resp.status, used), (101, bytes.len()));
    assert_eq!(resp.headers.get("Sec-WebSocket-Accept"), Some(accept.as_str()));
    if let Some(p) = protocol {
        let want = handshake::sanitize_header_value(p);
        // httparse drops the spaces and tabs around a value.
        let want = want.trim_start_matches([' ', '\t']);
        assert_eq!(resp.headers.get("Sec-WebSocket-Protocol").unwrap_or(""), want);
    }
}

/// A response we write with a peer-supplied reason phrase parses back whole.
fn check_response_writer(status: u16, reason: &str) {
    let body = reason.as_bytes();
    let bytes = handshake::response(status, reason, "text/plain; charset=utf-8", body);
    let max = bytes.len().max(DEFAULT_MAX_HEAD);
    let (resp, used) = handshake::parse_response(&bytes, max)
        .expect("our response parses")
        .expect("our response is complete");
    assert_eq!(resp.status, status);
    assert_eq!(&bytes[used..], body, "head ends where the body starts");
    assert_eq!(
        resp.headers.get("Content-Length"),
        Some(body.len().to_string().as_str())
    );
}

/// Response head parser (what the hcm, bridge and client read from the relay), plus the
/// response writer fed with the input as reason phrase.
pub fn http_response(data: &[u8]) {
    if let Ok(Some((head, used))) = handshake::parse_response(data, DEFAULT_MAX_HEAD) {
        assert!(used <= data.len() && used <= DEFAULT_MAX_HEAD);
        let again = handshake::parse_response(&data[..used], DEFAULT_MAX_HEAD);
        assert_eq!(again, Ok(Some((head.clone(), used))), "the head alone parses the same");
        let _ = head.headers.has_token("Connection", "upgrade");
        let _ = head.headers.merged();
    }
    check_response_writer(400, &String::from_utf8_lossy(data));
}

/// A proxy's answer to `CONNECT` ([`crate::transport::proxy::connect::parse_reply`]).
///
/// Invariants: the count stays within the input and [`MAX_REPLY_HEAD`]; the consumed bytes
/// alone parse to the same reply; every shorter prefix of them is "need more bytes" or the
/// same error the whole gives (checked at a cut picked by the first byte); a 2xx is
/// exactly what `established()` says.
///
/// [`MAX_REPLY_HEAD`]: crate::transport::proxy::connect::MAX_REPLY_HEAD
pub fn proxy_reply(data: &[u8]) {
    use crate::transport::proxy::connect::{MAX_REPLY_HEAD, parse_reply};
    let whole = parse_reply(data);
    if let Ok(Some((reply, used))) = &whole {
        assert!(*used <= data.len() && *used <= MAX_REPLY_HEAD);
        assert_eq!(parse_reply(&data[..*used]), Ok(Some((reply.clone(), *used))));
        assert_eq!(reply.established(), (200..300).contains(&reply.status));
        assert!(!(100..200).contains(&reply.status), "interim heads are skipped");
        let cut = data.first().map(|b| usize::from(*b) % *used).unwrap_or(0);
        assert_eq!(
            parse_reply(&data[..cut]),
            Ok(None),
            "a prefix of a complete answer needs more bytes"
        );
    }
    if let Err(e) = &whole {
        let _ = e.to_string();
    }
}

/// The relay's extension advertisement ([`crate::proto::extensions::Advertised::parse`]).
///
/// Invariant: what we would advertise for the parsed offer parses back to it (head-timeout
/// travels only with an extension, as the relay sends it).
pub fn extensions(data: &[u8]) {
    use crate::proto::extensions::Advertised;
    let Ok(text) = from_utf8(data) else {
        return;
    };
    let a = Advertised::parse(Some(text));
    match a.header_value() {
        Some(v) => assert_eq!(Advertised::parse(Some(&v)), a),
        None => assert!(!a.rendezvous_pool && !a.early_data && !a.reuse),
    }
}

// ---------------------------------------------------------------------------------------
// Session rules (sans-IO)

/// The keep-alive machine ([`crate::session::Keepalive`]) driven by a made-up event stream.
///
/// Input: byte 0 sets the period (`b + 1` ms), then 3-byte records: an event (`& 7`:
/// heard, timer, stop, nothing, the peer's Close (`ping_only`), our Close
/// (`after_our_close`), a ping heard) and how many ms pass before it (`u16`,
/// little-endian). Invariants: after a timer the next deadline lies ahead (a driver never
/// spins); the peer is dead exactly when a timer finds two silent periods while silence
/// counts (not after the peer's Close; after ours only once it pinged), and stays dead; at
/// most one ping per period; no ping after stop, death or our Close.
pub fn keepalive(data: &[u8]) {
    use std::time::{Duration, Instant};

    use crate::session::Keepalive;
    let Some((&p, events)) = data.split_first() else {
        return;
    };
    let period = Duration::from_millis(u64::from(p) + 1);
    let t0 = Instant::now();
    let mut now = t0;
    let mut k = Keepalive::new(t0, period);
    let (mut heard, mut pings, mut dead, mut stopped) = (t0, 0u128, false, false);
    let (mut deaf, mut our_close, mut peer_pings) = (false, false, false);
    for e in events.chunks_exact(3) {
        now += Duration::from_millis(u64::from(u16::from_le_bytes([e[1], e[2]])));
        let counts = !deaf && (!our_close || peer_pings);
        match e[0] & 7 {
            0 => {
                k.handle_heard(now);
                heard = now;
            }
            1 => {
                k.handle_timeout(now);
                let silent = counts && now - heard >= period * 2;
                if !stopped && !dead {
                    assert_eq!(k.is_dead(), silent, "dead exactly after two silent periods that count");
                    dead = silent;
                }
                if !stopped && !dead && !our_close {
                    let next = k.poll_timeout().expect("a machine that pings has a deadline");
                    assert!(next > now, "the next deadline lies ahead");
                    assert!(next <= now + period, "and within a period");
                }
                if !stopped && !dead && our_close {
                    let next = k.poll_timeout();
                    assert_eq!(next.is_some(), counts, "after our Close only a death is timed");
                    assert!(next.is_none_or(|n| n > now), "the next deadline lies ahead");
                }
            }
            2 => {
                k.stop();
                stopped = true;
            }
            4 => {
                k.ping_only();
                deaf = true;
            }
            5 => {
                k.after_our_close();
                our_close = true;
            }
            6 => {
                k.handle_pinged(now);
                heard = now;
                peer_pings |= our_close;
            }
            _ => {}
        }
        assert_eq!(k.is_dead(), dead, "dead is sticky, and only from a timer");
        if k.poll_ping() {
            assert!(
                !stopped && !dead && !our_close,
                "no ping after stop, death or our Close"
            );
            pings += 1;
        }
        assert!(
            pings <= (now - t0).as_nanos() / period.as_nanos(),
            "at most one ping per period"
        );
        if stopped || dead {
            assert_eq!(k.poll_timeout(), None);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The data plane's sans-IO machines

/// The frame limit a data-plane target runs with, from an option byte.
fn fuzz_max_frame(b: u8) -> u64 {
    [frame::DEFAULT_MAX_FRAME, 16, 0, 300][usize::from(b & 3)]
}

/// Data payloads and the end a reference decoder finds in `stream` (the whole of it at
/// once): `Ok(true)` a valid Close, `Ok(false)` no Close, `Err(code)` the close code a
/// protocol error is owed.
fn reference_decode(role: Role, max_frame: u64, stream: &[u8]) -> (Vec<u8>, Result<bool, u16>) {
    let (data, end, _) = reference_decode_rest(role, max_frame, stream);
    (data, end)
}

/// [`reference_decode`], and how many bytes of the stream follow its valid Close (0 when
/// it ends otherwise).
fn reference_decode_rest(role: Role, max_frame: u64, stream: &[u8]) -> (Vec<u8>, Result<bool, u16>, usize) {
    let mut dec = Decoder::new(role, max_frame);
    let mut buf = BytesMut::from(stream);
    let mut data = Vec::new();
    loop {
        let r = match dec.decode(&mut buf) {
            Ok(Some(Item::Data(c))) => {
                data.extend_from_slice(&c.payload);
                continue;
            }
            Ok(Some(Item::Control {
                opcode: OpCode::Close,
                payload,
            })) => {
                return match frame::parse_close(&payload) {
                    Ok(_) => (data, Ok(true), buf.len()),
                    Err(e) => (data, Err(e.close_code()), 0),
                };
            }
            Ok(Some(Item::Control { .. })) => continue,
            Ok(None) => Ok(false),
            Err(e) => Err(e.close_code()),
        };
        return (data, r, 0);
    }
}

/// The relay's direction rules ([`crate::session::forward`]) over a stream of frames.
///
/// Input: byte 0 picks the frame limit (`& 3`: 1 MiB, 16, 0, 300 bytes), byte 1 the read
/// size (1..=256), byte 2 bit 0 whether the rest is the raw stream from the sender (else
/// it describes masked frames, 3 bytes each: opcode/FIN bits, length, fill byte). The
/// direction must forward exactly the data a reference decoder finds, unmasked, end the
/// way it says, and write at most one Close, last; after a Close nothing more is consumed
/// (a kept connection reads it as its next request).
pub fn relay_forward(data: &[u8]) {
    use crate::session::forward::{DirEnd, Forward};
    use crate::session::sim::{ForwardSim, written};
    let [opts, chunk, mode, rest @ ..] = data else {
        return;
    };
    let max_frame = fuzz_max_frame(*opts);
    let stream = if mode & 1 == 1 {
        rest.to_vec()
    } else {
        let ops = [
            OpCode::Binary,
            OpCode::Text,
            OpCode::Continuation,
            OpCode::Ping,
            OpCode::Pong,
            OpCode::Close,
        ];
        let mut s = Vec::new();
        for g in rest.chunks_exact(3) {
            let op = ops[usize::from(g[0] & 7) % ops.len()];
            let payload = vec![g[2]; usize::from(g[1])];
            s.extend_from_slice(&frame::encode_frame(
                g[0] & 8 == 0,
                op,
                Some([g[2], 1, g[1], 7]),
                &payload,
            ));
        }
        s
    };
    let (want, want_end, rest) = reference_decode_rest(Role::Server, max_frame, &stream);
    let tail = stream[stream.len() - rest..].to_vec();
    let mut sim = ForwardSim::new(stream, usize::from(*chunk) + 1, true);
    let mut f = Forward::new(max_frame);
    let end = sim.run(&mut f).expect("a source that ends ends its direction");
    match (&end, want_end) {
        (DirEnd::Closed, Ok(true)) | (DirEnd::Vanished, Ok(false)) => {}
        (DirEnd::ProtocolError(code, _), Err(want)) => assert_eq!(*code, want),
        (got, want) => panic!("ended {got:?}, the reference says {want:?}"),
    }
    // A direction cut in the middle of a frame leaves that frame short; its part decodes.
    let out = written(Role::Client, &sim.written);
    assert_eq!(out.data, want, "forwarded data differs from the stream's");
    assert_eq!(f.bytes, want.len() as u64);
    assert!(out.closes.len() <= 1, "one Close at most");
    assert!(out.closes.is_empty() || out.ends_with_close(), "the Close is last");
    if end == DirEnd::Closed {
        assert_eq!(
            sim.input.unconsumed(),
            tail,
            "what follows the Close is left unconsumed"
        );
    }
}

/// A splice's rules (`crate::session::splice`) under a script of events.
///
/// Input: byte 0 picks the frame limit (as [`relay_forward`]), byte 1 the WebSocket read
/// size (1..=256); then events of 2 bytes `[kind, arg]`: a raw byte from the relay, a
/// well-formed frame from the relay (opcode `arg & 3`: Binary, Ping, Pong, Close 1000;
/// `arg >> 2` bytes), TCP data (`arg % 64 + 1` bytes), TCP EOF, a TCP error, the relay's
/// EOF, a stop, a poll after `arg` sixteenths of a ping period, a failing WebSocket or TCP
/// write. Afterwards both sources end and the splice must end. Checked: what goes to the
/// WebSocket is masked, well-formed frames with one Close at most and nothing after it;
/// TCP gets exactly the data the relay sent (up to its Close or an error); the WebSocket
/// gets exactly TCP's data; the clean end only after both Closes 1000 and with a FIN.
pub fn splice(data: &[u8]) {
    use std::time::{Duration, Instant};

    use crate::session::close::CLEAN_END;
    use crate::session::sim::{Input, SpliceSim, TcpRead, written};
    use crate::session::splice::SpliceRules;
    let [opts, chunk, events @ ..] = data else {
        return;
    };
    let max_frame = fuzz_max_frame(*opts);
    let period = Duration::from_secs(16);
    let t0 = Instant::now();
    let mut now = t0;
    let rules = SpliceRules::new(t0, period, max_frame);
    let mut s = SpliceSim::new(
        rules,
        Input::new(Vec::new(), usize::from(*chunk) + 1, false),
        Vec::new(),
    );
    let mut tcp_sent = Vec::new();
    let mut tcp_ended = false;
    let mut ended = None;
    for e in events.chunks_exact(2) {
        let arg = e[1];
        match e[0] % 10 {
            0 => s.ws.data.push(arg),
            1 => {
                let ops = [OpCode::Binary, OpCode::Ping, OpCode::Pong, OpCode::Close];
                let op = ops[usize::from(arg & 3)];
                let payload = if op == OpCode::Close {
                    1000u16.to_be_bytes().to_vec()
                } else {
                    vec![arg; usize::from(arg >> 2)]
                };
                s.ws.data
                    .extend_from_slice(&frame::encode_frame(true, op, None, &payload));
            }
            2 if !tcp_ended => {
                let d = vec![arg; usize::from(arg % 64) + 1];
                tcp_sent.extend_from_slice(&d);
                s.tcp.push(TcpRead::Data(d));
            }
            3 if !tcp_ended => {
                tcp_ended = true;
                s.tcp.push(TcpRead::Eof);
            }
            4 if !tcp_ended => {
                tcp_ended = true;
                s.tcp.push(TcpRead::Error);
            }
            5 => s.ws.eof = true,
            6 => s.rules.handle_stop(),
            7 => {
                now += period * u32::from(arg) / 16;
                s.rules.handle_heard(|| now);
                while let Some(at) = s.rules.poll_timeout().filter(|at| *at <= now) {
                    s.rules.handle_timeout(at.max(now));
                }
                if let Some(why) = s.poll() {
                    ended = Some(why);
                    break;
                }
            }
            8 => s.ws_broken = true,
            9 => s.tcp_broken = true,
            _ => {}
        }
    }
    let why = ended.unwrap_or_else(|| {
        s.ws.eof = true;
        if !tcp_ended {
            s.tcp.push(TcpRead::Eof);
        }
        s.run().expect("a splice whose sources both ended ends")
    });
    let out = written(Role::Server, &s.to_ws);
    let (to_ws_data, closes) = (out.data.as_slice(), out.closes.as_slice());
    assert!(closes.len() <= 1, "our Close goes out once: {closes:?}");
    assert!(closes.is_empty() || out.ends_with_close(), "nothing after our Close");
    assert!(
        tcp_sent.starts_with(to_ws_data),
        "the WebSocket got other bytes than TCP sent"
    );
    let (relay_data, relay_end) = reference_decode(Role::Client, max_frame, &s.ws.data);
    if !s.tcp_broken {
        assert!(
            relay_data.starts_with(&s.to_tcp),
            "TCP got other bytes than the relay sent"
        );
    }
    if why == CLEAN_END {
        assert_eq!(relay_end, Ok(true), "clean only after the relay's Close");
        assert_eq!(closes, [Some(frame::close_code::NORMAL)], "and our Close 1000");
        assert!(s.tcp_fin, "a clean end shuts TCP's output");
        assert_eq!(to_ws_data, tcp_sent, "every byte TCP sent went out");
        assert_eq!(s.to_tcp, relay_data, "every byte the relay sent reached TCP");
    }
}

// ---------------------------------------------------------------------------------------
// Tokens, connection strings, addresses

const FUZZ_KEY: &str = "J0J3GRnd0oq+HoKnOqLXm1jmjJM2Wov30j8nvRr2Jcg=";

/// SAS token parsing, verification and the scope rule; and a token minted for the input
/// (as resource and key name) verifies and parses back to them.
pub fn sas_token(data: &[u8]) {
    let Ok(text) = from_utf8(data) else {
        return;
    };
    if let Ok(t) = SasToken::parse(text) {
        let _ = t.signed_with(FUZZ_KEY);
        let _ = t.expired_at(sas::unix_now());
        check_scope(&t.resource, &t.key_name);
    }
    let (resource, key_name) = text.split_once('\n').unwrap_or((text, "defaultListener"));
    if resource.is_empty() || key_name.is_empty() {
        return; // a token's fields are never empty
    }
    let expiry = data.len() as u64 * 1_000_003;
    let minted = sas::create_token(resource, key_name, FUZZ_KEY, expiry);
    let t = SasToken::parse(&minted).expect("a minted token parses");
    assert_eq!(
        (t.resource.as_str(), t.key_name.as_str(), t.expiry),
        (resource, key_name, expiry)
    );
    assert!(t.signed_with(FUZZ_KEY), "a minted token verifies");
    assert!(!t.signed_with("not the key"), "and only with its key");
    check_scope(resource, key_name);
}

fn check_scope(resource: &str, target: &str) {
    let Some(s) = Scope::from_resource(resource) else {
        return;
    };
    assert!(!s.host.is_empty());
    assert!(s.path.starts_with('/') && s.path.ends_with('/'));
    assert!(s.covers(&s.path), "a scope covers its own path");
    let _ = s.covers(target);
    let _ = sas::strip_port(resource);
}

/// Connection strings: `expose()` re-parses to an equal value, `Display` hides secrets.
pub fn connection_string(data: &[u8]) {
    let Ok(text) = from_utf8(data) else {
        return;
    };
    let _ = connstr::split_host_port(text);
    if let Ok(e) = RelayEndpoint::parse(text) {
        let back = RelayEndpoint::parse(&e.to_connection_form()).expect("connection form re-parses");
        assert_eq!(back, e, "endpoint round trip");
        let _ = (e.ws_base(), e.authority());
    }
    let Ok(c) = ConnectionString::parse(text) else {
        return;
    };
    let exposed = c.expose();
    let again = ConnectionString::parse(&exposed).expect("expose() re-parses");
    assert_eq!(again, c, "expose() round trip");
    assert_eq!(again.expose(), exposed);
    let shown = c.to_string();
    match &c.credential {
        Credential::Key { .. } => assert!(shown.contains(";SharedAccessKey=***")),
        Credential::Token(_) => assert!(shown.contains(";SharedAccessSignature=***")),
    }
}

/// Control-channel JSON: whatever decodes re-encodes to the same command.
pub fn control_json(data: &[u8]) {
    let Ok(text) = from_utf8(data) else {
        return;
    };
    match control::decode(text) {
        Ok(Command::Accept(a)) => {
            let encoded = a.encode();
            let again = control::decode(&encoded);
            if encoded.len() <= MAX_CONTROL_MESSAGE {
                assert_eq!(again, Ok(Command::Accept(a)), "accept round trip");
            } else {
                assert_eq!(again, Err(ControlError::TooLarge(encoded.len())));
            }
        }
        Ok(Command::RenewToken { token }) => {
            let encoded = control::encode_renew_token(&token);
            if encoded.len() <= MAX_CONTROL_MESSAGE {
                assert_eq!(control::decode(&encoded), Ok(Command::RenewToken { token }));
            }
        }
        Ok(Command::Request(r)) => {
            let encoded = r.encode();
            if encoded.len() <= MAX_CONTROL_MESSAGE {
                assert_eq!(control::decode(&encoded), Ok(Command::Request(r)), "request round trip");
            }
        }
        Ok(Command::Response(r)) => {
            assert!((100..=999).contains(&r.status_code));
            let encoded = r.encode();
            if encoded.len() <= MAX_CONTROL_MESSAGE {
                assert_eq!(
                    control::decode(&encoded),
                    Ok(Command::Response(r)),
                    "response round trip"
                );
            }
        }
        Ok(Command::Unknown(name)) => assert!(name.chars().count() <= 64),
        Err(_) => {}
    }
}

/// Request targets (`/$hc/...?sb-hc-*`): no `sb-hc-*` pair ever reaches the listener.
pub fn hc_target(data: &[u8]) {
    let Ok(text) = from_utf8(data) else {
        return;
    };
    let _ = address::form_decode(text);
    match address::parse_target(text) {
        Ok(Target::Hc(r)) => {
            assert!(text.starts_with('/'));
            for p in [&r.path, &r.raw_path] {
                assert!(!p.starts_with('/') && !p.ends_with('/'), "path {p:?} is trimmed");
            }
            for q in &r.app_query {
                assert!(!q.is_empty());
                assert!(
                    !q.to_ascii_lowercase().starts_with("sb-hc-"),
                    "{q:?} must not be forwarded"
                );
            }
            let _ = address::validate_entity_name(&r.path);
        }
        Ok(Target::Plain(p)) => assert!(p.raw_path.starts_with('/') && p.path.starts_with('/')),
        Err(AddressError::NotOriginForm) => assert!(!text.starts_with('/')),
        Err(_) => {}
    }
}

/// HTTP mode: what of a sender's request target reaches a listener (relay), what of it
/// reaches the endpoint (hcm), reason phrases, and a listener's response headers as the
/// sender gets them. Input: the first line is a hybrid connection name, the rest a request
/// target or a control message.
pub fn http_mode(data: &[u8]) {
    use crate::relay::http::wire;
    let Ok(text) = from_utf8(data) else {
        return;
    };
    let (entity, rest) = text.split_once('\n').unwrap_or(("hc", text));
    if let Some(t) = wire::split_target(rest) {
        assert!(t.request_target.starts_with('/'));
        let query = t.request_target.split_once('?').map_or("", |(_, q)| q);
        for pair in query.split('&') {
            assert!(
                !pair.to_ascii_lowercase().starts_with("sb-hc-"),
                "{pair:?} reached the listener"
            );
        }
        let stripped = crate::hcm::http::strip_entity(&t.request_target, entity);
        assert!(stripped.starts_with('/'), "{stripped:?}");
    }
    let reason = wire::reason_phrase(rest);
    assert!(reason.len() <= 256 && reason.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let _ = wire::code_label(rest.len() as u16);
    if let Ok(Command::Response(r)) = control::decode(rest) {
        for no_body in [false, true] {
            let out = wire::sender_headers(&r.response_headers, no_body, entity);
            assert_eq!(out.iter().filter(|(n, _)| n == "via").count(), 1);
            for (n, _) in &out[..out.len() - 1] {
                let length_kept = no_body && n.eq_ignore_ascii_case("content-length");
                assert!(!wire::is_stripped(n, &[]) || length_kept, "{n} crossed the relay");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Metadata

/// The runtime-information Atom entry, `userMetadata`, XML escapes and `host:port`.
pub fn metadata(data: &[u8]) {
    // The client reads the response body lossily, so every input is a valid body.
    let text = String::from_utf8_lossy(data);
    if let Ok(info) = RuntimeInfo::from_atom(&text) {
        let _ = metadata::endpoint_from_user_metadata(&info.user_metadata);
        let xml = info.to_atom("https://ns.example", "hc1");
        assert_eq!(RuntimeInfo::from_atom(&xml).as_ref(), Ok(&info), "Atom round trip");
    }
    let _ = metadata::endpoint_from_user_metadata(&text);
    let _ = metadata::xml_unescape(&text);
    let escaped = metadata::xml_escape(&text);
    assert_eq!(
        metadata::xml_unescape(&escaped).as_deref(),
        Some(&*text),
        "XML escape round trip"
    );
    if let Ok(hp) = text.parse::<HostPort>() {
        assert_ne!(hp.port, 0);
        assert_eq!(
            hp.to_string().parse::<HostPort>().as_ref(),
            Ok(&hp),
            "HostPort round trip"
        );
        let meta = metadata::user_metadata_for(&hp);
        assert_eq!(metadata::endpoint_from_user_metadata(&meta), Ok(Some(hp.clone())));
        let _ = hp.bare_host();
    }
}

// ---------------------------------------------------------------------------------------
// Config files

/// The relay's TOML config through parsing and validation.
pub fn config_relay(data: &[u8]) {
    use crate::relay::config::{RelayConfig, RelayFile};
    let Some(file) = parse_config::<RelayFile>(data, "relay.toml") else {
        return;
    };
    match RelayConfig::from_file(file) {
        Ok(c) => {
            assert!(c.runtime.worker_count() >= 1 && c.max_listeners >= 1);
            assert!(!c.ping_interval.is_zero() && !c.accept_timeout.is_zero());
            assert!((1024..=1 << 20).contains(&c.max_head) && c.max_frame >= 1024);
        }
        Err(e) => render(&e),
    }
}

/// The hcm's TOML config through parsing and validation.
pub fn config_hcm(data: &[u8]) {
    use crate::hcm::config::{HcmConfig, HcmFile};
    let Some(file) = parse_config::<HcmFile>(data, "hcm.toml") else {
        return;
    };
    match HcmConfig::from_file(file) {
        Ok(c) => {
            assert!(c.runtime.worker_count() >= 1 && c.token_ttl.as_secs() >= 60);
            for hc in &c.hybrid_connections {
                assert!(!hc.name().is_empty());
            }
        }
        Err(e) => render(&e),
    }
}

/// The bridge's TOML config through parsing and validation.
pub fn config_bridge(data: &[u8]) {
    use crate::bridge::config::{BridgeConfig, BridgeFile};
    let Some(file) = parse_config::<BridgeFile>(data, "bridge.toml") else {
        return;
    };
    match BridgeConfig::from_file(file) {
        Ok(c) => {
            assert!(c.runtime.worker_count() >= 1 && !c.forwards.is_empty());
            for f in &c.forwards {
                if let Some(e) = &f.connection_string.entity_path {
                    assert!(e.eq_ignore_ascii_case(&f.hybrid_connection));
                }
            }
        }
        Err(e) => render(&e),
    }
}

/// Parses TOML; error messages (which quote the input) are rendered too.
fn parse_config<T: serde::de::DeserializeOwned>(data: &[u8], origin: &str) -> Option<T> {
    let text = from_utf8(data).ok()?;
    match crate::config::parse_toml::<T>(text, origin) {
        Ok(f) => Some(f),
        Err(e) => {
            render(&e);
            None
        }
    }
}

/// Formats an error chain, as the binaries do when they report it.
fn render(e: &anyhow::Error) {
    std::hint::black_box(format!("{e:#}"));
}

// ---------------------------------------------------------------------------------------
// TLS records

/// The TLS record layer after the handshake ([`crate::transport::record`]).
///
/// Input: byte 0 picks the protection (`% 4`: TLS 1.3 AES-256-GCM, TLS 1.3 ChaCha20,
/// TLS 1.2 AES-256-GCM, TLS 1.2 ChaCha20), byte 1 the byte of the sealed stream (one of
/// its first 256) whose lowest bit is flipped; the rest is both a
/// stream of received bytes and a plaintext. The stream is opened as records (it never
/// authenticates, so this exercises the header and length checks: no panic, every range
/// inside the buffer). The plaintext is sealed in records of up to 255 bytes whose types
/// and sizes come from its own bytes, and opened again: same types and bytes in order; with
/// one bit flipped anywhere in a record, that record fails and yields nothing.
pub fn tls_record(data: &[u8]) {
    use crate::transport::record::{self, Opener, Sealer};
    use rustls::crypto::cipher::{AeadKey, Iv};
    use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

    let [scheme, flip, rest @ ..] = data else {
        return;
    };
    let version = if scheme % 4 < 2 {
        ProtocolVersion::TLSv1_3
    } else {
        ProtocolVersion::TLSv1_2
    };
    let secrets = || {
        let (key, iv) = (AeadKey::from([7u8; 32]), Iv::new([9u8; 12]));
        if scheme % 2 == 0 {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    };
    let opener = || Opener::new(version, (3, secrets())).expect("keys of a supported suite");

    // Received bytes: open what parses, in place or into a buffer of `flip`'s choosing,
    // never past either buffer.
    let mut buf = rest.to_vec();
    let mut out = vec![0u8; usize::from(*flip) * 67];
    let mut o = opener();
    let mut at = 0;
    for i in 0..buf.len() {
        let into = i % 2 == 1;
        let r = if into {
            o.open_into(&buf[at..], &mut out)
        } else {
            o.open(&mut buf[at..])
        };
        match r {
            Ok(Some(r)) => {
                let room = if into { out.len() } else { r.len };
                assert!(
                    r.len <= buf.len() - at && r.plain.end <= room,
                    "record outside its buffer"
                );
                at += r.len;
            }
            Ok(None) | Err(_) => break,
        }
    }

    // Sealed and opened back.
    let mut s = Sealer::new(version, (3, secrets()), u64::MAX).expect("keys of a supported suite");
    let types = [record::APPLICATION_DATA, record::HANDSHAKE, record::ALERT];
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    let mut plain = rest;
    while let [head, tail @ ..] = plain {
        let n = usize::from(*head).min(tail.len());
        let typ = types[usize::from(*head) % 3];
        // One part (sealed where it lies) or two (copied into the record first).
        let (a, b) = tail[..n].split_at(if head % 2 == 1 { n / 2 } else { n });
        let parts: &[&[u8]] = if b.is_empty() { &[a] } else { &[a, b] };
        s.seal(typ, parts, &mut wire).expect("a record within the limit");
        sent.push((typ, tail[..n].to_vec(), wire.len()));
        plain = &tail[n..];
    }
    let mut tampered = wire.clone();
    // An odd step, so `flip` picks a byte within the first ~1,200 and a bit within it.
    let bit = usize::from(*flip) * 37 % (tampered.len() * 8).max(1);
    if let Some(b) = tampered.get_mut(bit / 8) {
        *b ^= 1 << (bit % 8);
    }
    let mut o = opener();
    let (mut at, mut t_at, mut t_ok) = (0, 0, true);
    let mut t = opener();
    for (typ, bytes, end) in &sent {
        let r = o
            .open(&mut wire[at..])
            .expect("our own record")
            .expect("a whole record");
        assert_eq!((r.typ, &wire[at + r.plain.start..at + r.plain.end]), (*typ, &bytes[..]));
        assert_eq!(at + r.len, *end, "record length");
        at = *end;
        // The tampered copy, opened into a buffer of its own: records before the flipped
        // bit open as sent; the one holding it fails and leaves no plaintext there.
        if t_ok {
            let mut out = vec![0u8; *end - t_at];
            match t.open_into(&tampered[t_at..], &mut out) {
                Ok(Some(r)) => {
                    assert!(bit / 8 >= *end || bit / 8 < t_at, "a flipped bit went unnoticed");
                    assert_eq!(&out[r.plain], &bytes[..]);
                    t_at = *end;
                }
                Ok(None) | Err(_) => {
                    assert!((t_at..*end).contains(&(bit / 8)), "an untouched record failed");
                    assert!(out.iter().all(|&b| b == 0), "plaintext of a record that failed");
                    t_ok = false;
                }
            }
        }
    }
    assert_eq!(at, wire.len());
}
