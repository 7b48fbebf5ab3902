//! hyrelay: a self-hosted Azure Relay Hybrid Connections service — the relay, the
//! connection manager (hcm) and the bridge — in one crate and one binary.
//!
//! ```text
//!  app ──TCP──▶ bridge ──ws(s) connect──▶ relay ◀──ws(s) listen/accept── hcm ──TCP──▶ endpoint
//! ```
//!
//! # Planes
//!
//! Each role runs a *control plane* (one thread, one single-threaded tokio runtime:
//! listener control channels, registry, management API, admin HTTP, reloads, signals) and a
//! *data plane* ([`dataplane::Workers`]: one thread per core with its own runtime, listening
//! socket, buffer pool and counters) that moves tunnel bytes: WebSocket⇄TCP in the hcm and
//! the bridge ([`dataplane::splice`]), WebSocket⇄WebSocket in the relay
//! ([`dataplane::reframe`]). The planes share no mutable state on the copy path.
//!
//! # Layers, top to bottom (arrows point down only; a role never imports another role)
//!
//! | module | what lives there |
//! |---|---|
//! | [`cli`] | the `hyrelay` command: one subcommand per role, `hc` management, `doctor`, `up` |
//! | [`relay`], [`hcm`], [`bridge`] | the three roles: their config, startup, control channels, status |
//! | [`client`] | what the hcm, the bridge and the CLI need from a relay: tokens, URLs, the management API |
//! | [`dataplane`] | workers and accept loops, the buffer pool, the splice and re-frame engines (epoll, and io_uring/IOCP behind the `uring` feature), counters and their flush, drain |
//! | [`session`] | the data plane's and the sessions' rules as sans-IO state machines (the relay's forwarding, the splice, its close handshake, keep-alive, token renewal), driven by the data plane's engines and the control channels |
//! | [`transport`] | sockets, TLS (rustls' handshake, our record layer), HTTP CONNECT proxies, WebSocket client/server handshakes |
//! | [`proto`] | the wire protocol, sans-IO: WebSocket frames and masking, HTTP heads and the upgrade, SAS tokens, connection strings, `$hc` addresses, control JSON, metadata |
//! | [`config`] | parsing shared by the roles: TOML with field-named errors, durations, [`config::RuntimeSettings`] (workers, buffer budget, backend, admin, drain), secrets from files |
//! | [`telemetry`] | metric names and the recorder, the admin listener (`/metrics`, health, status); it reads counters and owns none |
//! | [`clock`], [`echo`] | RFC 3339 time; the echo endpoint of `hyrelay up` and the tests |
//!
//! # Where each rule lives
//!
//! - Frame limits, masking, close codes: [`proto::frame`]. Parsers return `Ok(None)` for
//!   "need more bytes" and never perform I/O; each has a fuzz target (`fuzz/`).
//! - How tunnel bytes are framed and how a tunnel ends (half-close, Close forwarding and
//!   echo, 1001/1009/1002 cuts, the dead-peer check, reset versus FIN): the sans-IO
//!   [`session`] machines — [`session::forward`] for the relay, `session::splice` and
//!   `session::close` for the bridge's and hcm's splice, [`session::keepalive`]. Each data
//!   plane engine only moves bytes and timers for them: epoll ([`dataplane::splice`],
//!   [`dataplane::reframe`]) and io_uring (`dataplane::uring`), around one shared future
//!   per tunnel (`dataplane::drive`). The machines are tested and fuzzed without sockets.
//! - Buffer memory: [`dataplane::pool`] (a budget per worker; a connection holds a buffer
//!   only while bytes in it are on their way).
//! - Authentication, limits, throttling: [`relay`] (`auth`, `limits`, `throttle`).
//!
//! The design notes behind this are in the team's architecture document; the README says
//! how to run and operate each role.
pub mod bridge;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod echo;
#[doc(hidden)]
pub mod fuzzing;
pub mod hcm;
pub mod proto;
pub mod relay;
pub mod session;
pub mod telemetry;
pub mod transport;

/// Helpers shared by the modules' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// An async fn of some arity, and the future it returns.
    pub(crate) trait AsyncFnOf<Args> {
        type Fut;
    }

    macro_rules! async_fn_of {
        ($($a:ident),*) => {
            impl<F, Fut, $($a),*> AsyncFnOf<($($a,)*)> for F
            where
                F: FnOnce($($a),*) -> Fut,
            {
                type Fut = Fut;
            }
        };
    }
    async_fn_of!(A, B);
    async_fn_of!(A, B, C);
    async_fn_of!(A, B, C, D);
    async_fn_of!(A, B, C, D, E, G);

    /// Asserts that the future `f` returns, measured without calling it, is at most `max`
    /// bytes: what a task running it holds, and copies as it is spawned and as its stage
    /// changes.
    #[track_caller]
    pub(crate) fn assert_future_at_most<Args, F: AsyncFnOf<Args>>(_f: &F, max: usize, what: &str) {
        let n = std::mem::size_of::<F::Fut>();
        assert!(n <= max, "{what}: the future is {n} bytes, more than {max}");
    }
}
