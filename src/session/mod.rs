//! Session rules as sans-IO state machines, in the style of quinn-proto: `handle_*` feeds
//! them what happened (bytes heard, a timer fired), `poll_*` says what to do (write a ping,
//! the next deadline, the end). No socket, runtime or clock inside: the data plane's
//! drivers (epoll and io_uring) move events between sockets, timers and these machines, so
//! each rule exists once and is tested without I/O.
//!
//! - [`keepalive`]: ping each period; the peer is dead after two silent periods.
//! - `close` (crate-internal): a splice's close handshake, half-close and abnormal ends.
//! - [`renewal`]: a listener's token is renewed at 80 % of its lifetime.

pub(crate) mod close;
pub mod keepalive;
pub mod renewal;

pub use keepalive::Keepalive;
pub use renewal::Renewal;
