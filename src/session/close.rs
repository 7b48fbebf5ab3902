//! How a splice (a WebSocket spliced to a TCP connection: the bridge's and the hcm's
//! tunnels) closes, sans-IO: the close handshake with half-close, the echo of an abnormal
//! Close, and which control frames may still go out. Both data-plane drivers (epoll and
//! io_uring) feed it what happened ([`Ctrl::on_down_end`], [`Ctrl::queue_close`], the
//! peer's Close) and ask it what to write next ([`Ctrl::take_pong`], [`Ctrl::take_ping`],
//! the queued Close) and whether the end is clean ([`CLEAN_END`]).
//!
//! The rules: the peer's Close 1000 (or without a code) is a half-close — TCP's output is
//! shut and our own direction runs on until TCP's EOF, when our Close 1000 goes out. Any
//! other end (another code, the WebSocket vanishing, a protocol error, a failed TCP write)
//! is abnormal: our Close goes out with the matching code at once and the splice ends,
//! resetting TCP. Nothing follows our Close.

use crate::proto::frame::{self, close_code};

/// The close and control-frame state of one splice: what the reading side owes the
/// writing side (a pong, a ping, our Close) and how far the close handshake is.
#[derive(Debug, Default)]
pub(crate) struct Ctrl {
    /// The payload of the pong owed (the last Ping's). Boxed, and only while owed: inline,
    /// its 125 bytes were part of every idle splice; a Ping without payload allocates
    /// nothing.
    pub pong: Option<Box<[u8]>>,
    /// A Ping came from the peer since the keep-alive last looked (its pong may be
    /// withheld; the ping still shows the peer is there).
    pub peer_pinged: bool,
    pub ping_due: bool,
    pub close: CloseState,
    /// End as soon as our Close is out (errors, stop), without waiting for the peer's.
    pub abort: bool,
    /// The peer's Close arrived (its code, if any).
    pub peer_closed: Option<Option<u16>>,
    /// No more reading from TCP (EOF, error or stopping).
    pub tcp_done: bool,
    /// Our own side failed (a TCP read): why, for the splice's end.
    pub failure: Option<&'static str>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) enum CloseState {
    #[default]
    None,
    Queued(u16, &'static str),
    Sent,
}

impl Ctrl {
    /// The pong owed, if any. None once our Close is out: nothing follows a Close
    /// (RFC 6455 §5.5.1), and the relay stops reading a direction once it has forwarded that
    /// direction's Close, so a frame sent after it would lie unread there — and a socket
    /// closed with unread input is reset, which can destroy the tail of the other
    /// direction's data on its way to us.
    pub fn take_pong(&mut self) -> Option<Box<[u8]>> {
        let p = self.pong.take();
        p.filter(|_| self.close != CloseState::Sent)
    }

    /// True if a ping is due now; never once our Close is out (see [`Ctrl::take_pong`]).
    pub fn take_ping(&mut self) -> bool {
        std::mem::take(&mut self.ping_due) && self.close != CloseState::Sent
    }

    pub fn queue_close(&mut self, code: u16, reason: &'static str) {
        if self.close == CloseState::None {
            self.close = CloseState::Queued(code, reason);
        }
    }

    /// What the splice does when its WebSocket → TCP side stops: `Err(why)` ends it now
    /// (the WebSocket is gone); `Ok(Some(why))` stops reading TCP and closes the WebSocket
    /// with the code for `e` (the echo of an abnormal Close), ending with `why` once that
    /// Close is out; `Ok(None)` carries on (the peer's clean Close: TCP's output is shut,
    /// the other direction runs on).
    pub fn on_down_end(&mut self, e: &DownEnd) -> Result<Option<String>, String> {
        let (code, reason, why) = match e {
            DownEnd::PeerClosed if self.peer_closed_cleanly() => return Ok(None),
            DownEnd::PeerClosed => {
                let code = self.peer_closed.flatten().unwrap_or(close_code::NORMAL);
                let echo = if frame::close_code_is_sendable(code) {
                    code
                } else {
                    close_code::NORMAL
                };
                (echo, "", format!("the peer closed with {code}"))
            }
            DownEnd::Vanished => return Err("WebSocket connection lost".into()),
            DownEnd::ProtocolError(code, msg) => (*code, "protocol error", format!("WebSocket protocol error: {msg}")),
            DownEnd::TcpWriteFailed => (
                close_code::GOING_AWAY,
                "The endpoint connection failed.",
                "TCP write failed".into(),
            ),
        };
        self.abort = true;
        self.tcp_done = true;
        self.queue_close(code, reason);
        Ok(Some(why))
    }

    /// True if the peer's Close (if one came) says the stream is complete: code 1000 or
    /// none. Any other code means the far side ended abnormally.
    pub fn peer_closed_cleanly(&self) -> bool {
        matches!(self.peer_closed, Some(None | Some(close_code::NORMAL)))
    }
}

/// The `end` of a splice whose both sides closed cleanly; any other is abnormal.
pub const CLEAN_END: &str = "closed both ways";

/// Why the WebSocket → TCP side stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DownEnd {
    PeerClosed,
    /// The WebSocket ended without a Close.
    Vanished,
    /// The peer broke the protocol (close code to answer with).
    ProtocolError(u16, String),
    TcpWriteFailed,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Close a driver would write next, if any.
    fn queued(c: &Ctrl) -> Option<u16> {
        match c.close {
            CloseState::Queued(code, _) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn a_clean_close_from_the_peer_is_a_half_close() {
        for code in [None, Some(close_code::NORMAL)] {
            let mut c = Ctrl {
                peer_closed: Some(code),
                ..Ctrl::default()
            };
            assert!(c.peer_closed_cleanly());
            assert_eq!(c.on_down_end(&DownEnd::PeerClosed), Ok(None));
            assert!(!c.abort && !c.tcp_done && queued(&c).is_none(), "our direction runs on");
            // Our TCP's EOF later: our Close 1000.
            c.tcp_done = true;
            c.queue_close(close_code::NORMAL, "");
            assert_eq!(queued(&c), Some(close_code::NORMAL));
        }
    }

    #[test]
    fn every_other_close_code_is_echoed_and_ends_the_splice() {
        for code in [1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999] {
            let mut c = Ctrl {
                peer_closed: Some(Some(code)),
                ..Ctrl::default()
            };
            assert!(!c.peer_closed_cleanly());
            let why = c.on_down_end(&DownEnd::PeerClosed).unwrap().unwrap();
            assert!(why.contains(&code.to_string()), "{why}");
            assert!(c.abort && c.tcp_done);
            assert_eq!(queued(&c), Some(code), "the echo of {code}");
        }
        // Codes no endpoint may send (1005, 1006, 1015, unassigned) are echoed as 1000.
        for code in [1004, 1005, 1006, 1015, 2999, 5000] {
            let mut c = Ctrl {
                peer_closed: Some(Some(code)),
                ..Ctrl::default()
            };
            assert!(c.on_down_end(&DownEnd::PeerClosed).unwrap().is_some());
            assert_eq!(queued(&c), Some(close_code::NORMAL), "{code}");
        }
    }

    #[test]
    fn broken_peers_and_failed_writes_get_the_matching_close() {
        for (end, code) in [
            (
                DownEnd::ProtocolError(close_code::TOO_BIG, "too big".into()),
                close_code::TOO_BIG,
            ),
            (DownEnd::ProtocolError(1002, "bad mask".into()), 1002),
            (DownEnd::TcpWriteFailed, close_code::GOING_AWAY),
        ] {
            let mut c = Ctrl::default();
            assert!(c.on_down_end(&end).unwrap().is_some());
            assert!(c.abort && c.tcp_done);
            assert_eq!(queued(&c), Some(code), "{end:?}");
        }
        // A WebSocket that vanished gets nothing: there is nobody to tell.
        let mut c = Ctrl::default();
        assert!(c.on_down_end(&DownEnd::Vanished).is_err());
        assert!(queued(&c).is_none());
    }

    #[test]
    fn the_first_close_queued_wins() {
        let mut c = Ctrl::default();
        c.queue_close(close_code::GOING_AWAY, "Shutting down.");
        c.queue_close(close_code::NORMAL, "");
        assert_eq!(queued(&c), Some(close_code::GOING_AWAY));
        c.close = CloseState::Sent;
        c.queue_close(close_code::NORMAL, "");
        assert_eq!(c.close, CloseState::Sent, "a Close goes out once");
    }

    #[test]
    fn nothing_follows_our_close() {
        let mut c = Ctrl {
            pong: Some(Box::new([0; 4])),
            ping_due: true,
            ..Ctrl::default()
        };
        assert!(c.take_pong().is_some() && c.take_ping(), "before our Close");
        c.pong = Some(Box::new([0; 4]));
        c.ping_due = true;
        c.close = CloseState::Sent;
        assert!(c.take_pong().is_none() && !c.take_ping(), "after it");
        assert!(c.pong.is_none() && !c.ping_due, "and they are not kept for later");
    }
}
