//! Drivers without sockets for the data-plane machines: bytes in from vectors, bytes out
//! into vectors, reads of a chosen size. The unit tests of [`super::forward`] and
//! [`super::splice`] and the fuzz targets (`crate::fuzzing`) drive the rules through them,
//! so what is tested is the rules, with the same step protocol the real drivers follow.

use std::io;
use std::ops::Range;

use super::close::DownEnd;
use super::forward::{DirEnd, Forward, Step};
use super::splice::{DownStep, SpliceRules, UpEnd, UpStep};
use crate::proto::frame::{self, Decoder, Item, OpCode, Role};

/// An input stream read `chunk` bytes at a time into a buffer that keeps undecoded bytes
/// (compacted before each read, as the engines do).
pub(crate) struct Input {
    pub data: Vec<u8>,
    fed: usize,
    /// The source ends (EOF) once `data` is all read; else it only has nothing yet.
    pub eof: bool,
    pub chunk: usize,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    pub fn new(data: Vec<u8>, chunk: usize, eof: bool) -> Self {
        Self {
            data,
            fed: 0,
            eof,
            chunk: chunk.max(1),
            buf: vec![0; 1 << 16],
            start: 0,
            end: 0,
        }
    }

    fn has_bytes(&self) -> bool {
        self.start < self.end
    }

    /// `None` if the source has nothing yet; else what a read gives (`Ok(false)`: EOF).
    fn read(&mut self) -> Option<io::Result<bool>> {
        if self.fed == self.data.len() && !self.eof {
            return None;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        let n = self
            .chunk
            .min(self.data.len() - self.fed)
            .min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&self.data[self.fed..self.fed + n]);
        self.fed += n;
        self.end += n;
        Some(Ok(n > 0))
    }

    /// What the source sent that was not consumed: the buffered rest and what was not
    /// read yet.
    pub fn unconsumed(&self) -> Vec<u8> {
        let mut v = self.buf[self.start..self.end].to_vec();
        v.extend_from_slice(&self.data[self.fed..]);
        v
    }

    /// The bound on steps for draining this input: each byte costs at most a read and a
    /// decode.
    fn step_bound(&self) -> usize {
        4 * (self.data.len() - self.fed) + 100
    }
}

/// Drives one relay direction: `input` is what the source sent, `written` what went to the
/// destination.
pub(crate) struct ForwardSim {
    pub input: Input,
    pub written: Vec<u8>,
}

impl ForwardSim {
    pub fn new(data: Vec<u8>, chunk: usize, eof: bool) -> Self {
        Self {
            input: Input::new(data, chunk, eof),
            written: Vec::new(),
        }
    }

    /// Runs `f` until it ends (`Some`) or wants input the source does not have yet.
    pub fn run(&mut self, f: &mut Forward) -> Option<DirEnd> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for _ in 0..self.input.step_bound() {
            for r in runs.drain(..) {
                self.written.extend_from_slice(&self.input.buf[r]);
            }
            match f.poll_step(self.input.has_bytes()) {
                Step::Final(fr) => self.written.extend_from_slice(fr.as_bytes()),
                Step::End(e) => return Some(e),
                Step::Decode => {
                    let i = &mut self.input;
                    f.decode(&mut i.buf, &mut i.start, i.end, &mut runs);
                }
                Step::Read => match self.input.read() {
                    Some(r) => f.handle_read(r),
                    None => return None,
                },
            }
        }
        panic!("a direction did not settle within its step bound");
    }
}

/// What the local TCP side of a splice does on its next read.
#[derive(Debug, Clone)]
pub(crate) enum TcpRead {
    Data(Vec<u8>),
    Eof,
    Error,
}

/// Drives a splice: `ws` is what the relay sent (unmasked frames), `tcp` the local TCP
/// side's reads in order.
pub(crate) struct SpliceSim {
    pub rules: SpliceRules,
    pub ws: Input,
    pub tcp: Vec<TcpRead>,
    /// What went to the WebSocket (masked frames) and to TCP.
    pub to_ws: Vec<u8>,
    pub to_tcp: Vec<u8>,
    /// TCP's output was shut (a FIN).
    pub tcp_fin: bool,
    /// A WebSocket write fails from now on.
    pub ws_broken: bool,
    /// A TCP write fails from now on.
    pub tcp_broken: bool,
}

impl SpliceSim {
    pub fn new(rules: SpliceRules, ws: Input, tcp: Vec<TcpRead>) -> Self {
        Self {
            rules,
            ws,
            tcp,
            to_ws: Vec::new(),
            to_tcp: Vec::new(),
            tcp_fin: false,
            ws_broken: false,
            tcp_broken: false,
        }
    }

    /// Runs the WebSocket → TCP side until it needs input it does not have; `Some` if it
    /// ended.
    fn down(&mut self) -> Option<DownEnd> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for _ in 0..self.ws.step_bound() {
            for r in runs.drain(..) {
                if self.tcp_broken {
                    return Some(DownEnd::TcpWriteFailed);
                }
                self.to_tcp.extend_from_slice(&self.ws.buf[r]);
            }
            let r = &mut self.rules;
            match r.down.poll_step(&r.ctrl, self.ws.has_bytes()) {
                DownStep::Finish { fin } => {
                    self.tcp_fin = fin;
                    return Some(DownEnd::PeerClosed);
                }
                DownStep::Decode => {
                    let i = &mut self.ws;
                    if let Err(e) = r.down.decode(&mut r.ctrl, &mut i.buf, &mut i.start, i.end, &mut runs) {
                        return Some(e);
                    }
                }
                DownStep::Read => match self.ws.read() {
                    Some(res) => {
                        if let Err(e) = r.down.handle_read(res) {
                            return Some(e);
                        }
                    }
                    None => return None,
                },
            }
        }
        panic!("the WebSocket side did not settle within its step bound");
    }

    /// Runs the TCP → WebSocket side until it idles, ends or has no TCP input.
    fn up(&mut self) -> Option<UpEnd> {
        for _ in 0..self.tcp.len() * 4 + 100 {
            let r = &mut self.rules;
            match r.up.poll_step(&mut r.ctrl) {
                UpStep::Write(f) => {
                    if self.ws_broken {
                        return Some(UpEnd::WsWriteFailed);
                    }
                    self.to_ws.extend_from_slice(f.as_bytes());
                    r.up.handle_written(&mut r.ctrl);
                }
                UpStep::Done => return Some(UpEnd::Done),
                UpStep::Idle => return None,
                UpStep::ReadTcp => {
                    if self.tcp.is_empty() {
                        return None;
                    }
                    let (res, mut data) = match self.tcp.remove(0) {
                        TcpRead::Data(d) if d.is_empty() => (Ok(0), d),
                        TcpRead::Data(d) => (Ok(d.len()), d),
                        TcpRead::Eof => (Ok(0), Vec::new()),
                        TcpRead::Error => (Err(io::ErrorKind::ConnectionReset.into()), Vec::new()),
                    };
                    if r.up.handle_tcp_read(&mut r.ctrl, res).is_some() {
                        if self.ws_broken {
                            return Some(UpEnd::WsWriteFailed);
                        }
                        let h = r.up.frame(&mut data);
                        self.to_ws.extend_from_slice(h.as_bytes());
                        self.to_ws.extend_from_slice(&data);
                    }
                }
            }
        }
        panic!("the TCP side did not settle within its step bound");
    }

    /// One poll of the splice, in the engines' order (down, then up); the end, if any.
    pub fn poll(&mut self) -> Option<String> {
        if self.rules.down_running()
            && let Some(e) = self.down()
            && let Some(fatal) = self.rules.handle_down_end(e)
        {
            return Some(fatal);
        }
        if let Some(dead) = self.rules.poll_keepalive() {
            return Some(dead);
        }
        if self.rules.up_running()
            && let Some(e) = self.up()
            && let Some(fatal) = self.rules.handle_up_end(e)
        {
            return Some(fatal);
        }
        self.rules.poll_end()
    }

    /// Polls until the splice ends; `None` if it is still waiting after a few rounds.
    pub fn run(&mut self) -> Option<String> {
        for _ in 0..8 {
            if let Some(why) = self.poll() {
                return Some(why);
            }
        }
        None
    }
}

/// What a machine wrote, decoded.
pub(crate) struct Written {
    /// The frames; the last may be cut short (a direction that ended mid-frame).
    pub items: Vec<Item>,
    /// Their data payload.
    pub data: Vec<u8>,
    /// The codes of the Closes among them.
    pub closes: Vec<Option<u16>>,
}

impl Written {
    /// True if there is a Close and nothing follows it.
    pub fn ends_with_close(&self) -> bool {
        matches!(
            self.items.last(),
            Some(Item::Control {
                opcode: OpCode::Close,
                ..
            })
        )
    }

    /// The payloads of the control frames with `opcode`.
    #[cfg(test)]
    pub fn control(&self, opcode: OpCode) -> Vec<Vec<u8>> {
        let of = |i: &Item| match i {
            Item::Control { opcode: o, payload } if *o == opcode => Some(payload.to_vec()),
            _ => None,
        };
        self.items.iter().filter_map(of).collect()
    }
}

/// Decodes what a machine wrote to a peer in `role` (a server reads masked frames);
/// panics if it breaks the protocol.
pub(crate) fn written(role: Role, bytes: &[u8]) -> Written {
    let mut dec = Decoder::new(role, u64::MAX);
    let mut buf = bytes::BytesMut::from(bytes);
    let mut w = Written {
        items: Vec::new(),
        data: Vec::new(),
        closes: Vec::new(),
    };
    while let Some(i) = dec
        .decode(&mut buf)
        .expect("what a machine writes follows the protocol")
    {
        match &i {
            Item::Data(c) => w.data.extend_from_slice(&c.payload),
            Item::Control {
                opcode: OpCode::Close,
                payload,
            } => w.closes.push(frame::parse_close(payload).expect("a valid Close").code),
            Item::Control { .. } => {}
        }
        w.items.push(i);
    }
    w
}
