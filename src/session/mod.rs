//! Session and data-plane rules as sans-IO state machines, in the style of quinn-proto:
//! `handle_*` feeds them what happened (bytes read, a write done, a timer fired), `poll_*`
//! says what to do (bytes to write, the next deadline, the end and its reason). No socket,
//! runtime or clock inside: the data plane's drivers (epoll and io_uring) move bytes and
//! timers between sockets and these machines, so each rule exists once and is tested
//! without I/O.
//!
//! - [`forward`]: the relay's tunnel — frames re-sent unmasked, Close forwarded, 1001 for a
//!   vanished or broken source, the 1009/1002 cut of an offender, the abandon grace.
//! - `splice` (crate-internal): a WebSocket spliced to TCP (hcm, bridge) — framing in
//!   place, pings answered, half-close, keep-alive; its close handshake is `close`.
//! - [`keepalive`]: ping each period; the peer is dead after two silent periods.
//! - [`renewal`]: a listener's token is renewed at 80 % of its lifetime.
//! - [`wire`]: what the machines hand their drivers (control frames, headers, payload runs).

pub(crate) mod close;
pub mod forward;
pub mod keepalive;
pub mod renewal;
pub(crate) mod sim;
pub(crate) mod splice;
pub mod wire;

pub use keepalive::Keepalive;
pub use renewal::Renewal;
