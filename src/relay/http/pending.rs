//! The relay's table of HTTP requests waiting for a listener (hc-protocol.md §6.3–§6.4).
//!
//! A request is registered under its id (a fresh GUID, the `request.id` and later the
//! `response.requestId`) with a single-use secret (the `sb-hc-rid` of its rendezvous
//! address) before it is sent to any listener. Two things can arrive for it, each at most
//! once: an inline `response` on the control channel of the listener it was sent to (any
//! other listener's is refused), or the listener's rendezvous connection (to fetch a
//! rendezvous-only request, or to upgrade a response). The [`Ticket`] that the sender's
//! task holds removes the entry when dropped, whatever the outcome, so a sender that goes
//! away leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::proto::control::Response;
use crate::transport::Stream;

/// A `response` that came on the control channel, with its body.
#[derive(Debug)]
pub struct Inline {
    pub response: Response,
    pub body: Bytes,
}

/// The listener's rendezvous connection: parked for the move to the sender's worker, or
/// live when the sender's request is served on the worker that accepted it.
#[derive(Debug)]
pub struct Leg {
    pub stream: Stream,
    pub leftover: BytesMut,
    /// The listener's `Sec-WebSocket-Key`, for its 101.
    pub key: String,
    /// The leg's connection count, kept while it lives.
    pub slot: crate::relay::limits::ConnSlot,
}

struct Entry {
    secret: String,
    /// Registration key of the listener the request went to; 0 until delivered.
    listener: u64,
    response: Option<oneshot::Sender<Inline>>,
    leg: Option<oneshot::Sender<Leg>>,
    /// The worker thread of the task waiting for the answer (`open` runs on it).
    worker: std::thread::ThreadId,
}

/// Requests in flight, shared by every worker (a short lock, never held across an await).
#[derive(Default)]
pub struct Table {
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("entries", &self.len()).finish()
    }
}

/// A registered request; what the sender's task waits on. Dropping it removes the entry.
#[derive(Debug)]
#[must_use = "dropping the ticket forgets the request"]
pub struct Ticket {
    pub id: String,
    pub secret: String,
    pub response: oneshot::Receiver<Inline>,
    pub leg: oneshot::Receiver<Leg>,
    table: Arc<Table>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new request with a fresh id and secret.
    pub fn open(self: &Arc<Self>) -> Ticket {
        let (rtx, response) = oneshot::channel();
        let (ltx, leg) = oneshot::channel();
        let id = crate::proto::ids::new_id();
        let secret = crate::proto::ids::new_secret();
        self.lock().insert(
            id.clone(),
            Entry {
                secret: secret.clone(),
                listener: 0,
                response: Some(rtx),
                leg: Some(ltx),
                worker: std::thread::current().id(),
            },
        );
        Ticket {
            id,
            secret,
            response,
            leg,
            table: self.clone(),
        }
    }

    /// Records which listener the request is being sent to (before it is sent).
    pub fn bind(&self, id: &str, listener: u64) {
        if let Some(e) = self.lock().get_mut(id) {
            e.listener = listener;
        }
    }

    /// Hands an inline `response` from listener `listener` to its request. False if the
    /// id is unknown, already answered, or belongs to another listener's request.
    pub fn respond(&self, listener: u64, inline: Inline) -> bool {
        let tx = {
            let mut map = self.lock();
            match map.get_mut(&inline.response.request_id) {
                Some(e) if e.listener == listener => e.response.take(),
                _ => None,
            }
        };
        tx.is_some_and(|tx| tx.send(inline).is_ok())
    }

    /// The rendezvous slot of request `id` if `secret` matches (single use), and the
    /// worker thread of the task waiting for it (see `Stream::park_for`).
    pub fn take_leg(&self, id: &str, secret: &str) -> Option<(oneshot::Sender<Leg>, std::thread::ThreadId)> {
        let mut map = self.lock();
        let e = map.get_mut(id)?;
        if !constant_time_eq(e.secret.as_bytes(), secret.as_bytes()) {
            return None;
        }
        e.leg.take().map(|tx| (tx, e.worker))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: &str) -> Inline {
        Inline {
            response: Response {
                request_id: id.into(),
                status_code: 200,
                status_description: None,
                response_headers: vec![],
                body: false,
            },
            body: Bytes::new(),
        }
    }

    #[test]
    fn only_the_chosen_listener_answers_and_only_once() {
        let t = Arc::new(Table::default());
        let mut ticket = t.open();
        t.bind(&ticket.id, 7);
        assert!(!t.respond(8, response(&ticket.id)), "another listener");
        assert!(t.respond(7, response(&ticket.id)));
        assert!(!t.respond(7, response(&ticket.id)), "twice");
        assert_eq!(ticket.response.try_recv().unwrap().response.status_code, 200);
    }

    #[test]
    fn rendezvous_needs_the_secret_once_and_tickets_clean_up() {
        let t = Arc::new(Table::default());
        let ticket = t.open();
        assert!(t.take_leg(&ticket.id, "wrong").is_none());
        let (_, waiter) = t.take_leg(&ticket.id, &ticket.secret.clone()).unwrap();
        assert_eq!(waiter, std::thread::current().id(), "the thread that opened it");
        assert!(t.take_leg(&ticket.id, &ticket.secret.clone()).is_none(), "single use");
        assert_eq!(t.len(), 1);
        drop(ticket);
        assert!(t.is_empty());
    }
}
