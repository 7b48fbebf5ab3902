//! Per-worker traffic counters: plain `Cell`s owned by the worker thread.
//!
//! Tunnels count into their own fields while they run and add those into the worker's
//! per-hybrid-connection [`Counters`] once per poll, so the hot path never touches an
//! atomic or a registry. Exporters read the counters on the worker itself (a periodic task
//! per worker, see [`for_each`]) and publish them; labels are hybrid connection names,
//! which come from configuration or the relay's state, never from peers.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Counters of one hybrid connection on one worker. Monotonic except `active`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Payload bytes towards the listener / endpoint.
    pub bytes_up: Cell<u64>,
    /// Payload bytes towards the sender / app.
    pub bytes_down: Cell<u64>,
    /// Tunnels opened.
    pub opened: Cell<u64>,
    /// Tunnels open now.
    pub active: Cell<i64>,
}

impl Counters {
    pub fn add_up(&self, n: u64) {
        self.bytes_up.set(self.bytes_up.get() + n);
    }

    pub fn add_down(&self, n: u64) {
        self.bytes_down.set(self.bytes_down.get() + n);
    }
}

thread_local! {
    static BY_HC: RefCell<HashMap<Arc<str>, Rc<Counters>>> = RefCell::new(HashMap::new());
}

/// This worker's counters for hybrid connection `hc`.
pub fn for_hc(hc: &str) -> Rc<Counters> {
    BY_HC.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(c) = m.get(hc) {
            return c.clone();
        }
        let c = Rc::new(Counters::default());
        m.insert(Arc::from(hc), c.clone());
        c
    })
}

/// Visits every hybrid connection's counters on this worker.
pub fn for_each(mut f: impl FnMut(&str, &Counters)) {
    BY_HC.with(|m| {
        for (k, v) in m.borrow().iter() {
            f(k, v);
        }
    });
}

/// Marks a tunnel open on `c` for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Rc<Counters>);

impl ActiveGuard {
    pub fn new(c: Rc<Counters>) -> Self {
        c.opened.set(c.opened.get() + 1);
        c.active.set(c.active.get() + 1);
        Self(c)
    }

    pub fn counters(&self) -> &Counters {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
    }
}
