//! TCP sockets: listener set-up (one `SO_REUSEPORT` socket per worker on Linux) and
//! [`Sock`], a stream that can be parked and moved to another worker's runtime.
//!
//! A tokio `TcpStream` is registered with the reactor of the runtime it was created on.
//! To join the two legs of a tunnel on one worker, the relay parks the later leg
//! (deregisters it, keeping the file descriptor and any TLS state around it), sends it to
//! the earlier leg's worker and unparks it there; when both legs are already on one
//! worker it is handed over as it is.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Listen backlog for every listener. Default: 1024.
pub const BACKLOG: i32 = 1024;

/// Binds a listening socket. With `reuse_port` (Linux), several sockets may share the
/// address and the kernel spreads connections over them.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    #[cfg(all(unix, not(target_os = "solaris"), not(target_os = "illumos")))]
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    sock.set_nonblocking(true)?;
    // Linux copies these to every socket the listener accepts (see `tune_accepted`).
    set_options(&sock);
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock.into())
}

/// Binds `count` listeners on `addr` (port 0 picks one port for all of them). On Linux these
/// are `SO_REUSEPORT` siblings; elsewhere there is one listener and the caller hands
/// accepted sockets to workers.
///
/// `SO_REUSEPORT` would also let this process join another process's sockets on the same
/// port, splitting the traffic between two daemons (issue 9 item 6). So a fixed port is
/// first bound once without it: if anyone holds the port, that fails with `AddrInUse`
/// and a message that says so.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let reuse = cfg!(target_os = "linux") && count > 1;
    if reuse && addr.port() != 0 {
        ensure_free(addr)?;
    }
    let first = bind_listener(addr, reuse).map_err(|e| in_use(addr, e))?;
    let actual = first.local_addr()?;
    let mut out = vec![first];
    if reuse {
        for _ in 1..count {
            out.push(bind_listener(actual, true)?);
        }
    }
    Ok(out)
}

/// Fails if some socket already listens on `addr` (with or without `SO_REUSEPORT`).
fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    bind_listener(addr, false).map(drop).map_err(|e| in_use(addr, e))
}

/// `AddrInUse` said plainly.
fn in_use(addr: SocketAddr, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{addr} is already in use by another process (another hyrelay, or another service on that port)"),
        )
    } else {
        e
    }
}

/// Idle time before the first keepalive probe.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Time between unanswered keepalive probes, and how many end the connection: a peer
/// whose host vanished is found within `60 + 4 × 15` s = 2 min of silence (the kernel's
/// defaults, 75 s × 9, would take 12 min). This is what ends a half-closed tunnel whose
/// relay vanished while the far side, which never pings (Microsoft's clients), had nothing
/// to send (`session::keepalive`), and an endpoint that vanished under an idle tunnel.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
const KEEPALIVE_PROBES: u32 = 4;

/// Options every relayed TCP connection gets: no Nagle delay, keepalive probes.
pub fn tune(stream: &TcpStream) {
    set_options(&socket2::SockRef::from(stream));
}

/// [`tune`] for a socket accepted from a listener made by [`bind_listener`]. On Linux the
/// kernel copies the listener's `TCP_NODELAY` and keepalive settings to every socket it
/// accepts, which saves five system calls per accepted connection; elsewhere the options
/// are set here.
pub fn tune_accepted(stream: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(stream);
    }
}

fn set_options(sock: &Socket) {
    sock.set_tcp_nodelay(true).ok();
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
    let keepalive = keepalive.with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
    let keepalive = keepalive.with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&keepalive).ok();
}

/// A TCP stream that is either registered with the current runtime or parked.
#[derive(Debug)]
pub enum Sock {
    Live(TcpStream),
    Parked(std::net::TcpStream),
    /// Transient state while switching; never observable outside this module.
    Gone,
}

impl Sock {
    /// Deregisters from the current runtime; the socket stays open.
    pub fn park(&mut self) -> io::Result<()> {
        if let Sock::Live(_) = self {
            let Sock::Live(t) = std::mem::replace(self, Sock::Gone) else {
                unreachable!()
            };
            *self = Sock::Parked(t.into_std()?);
        }
        Ok(())
    }

    /// Registers with the runtime this is called on. Must run inside a runtime context.
    pub fn unpark(&mut self) -> io::Result<()> {
        if let Sock::Parked(_) = self {
            let Sock::Parked(s) = std::mem::replace(self, Sock::Gone) else {
                unreachable!()
            };
            *self = Sock::Live(TcpStream::from_std(s)?);
        }
        Ok(())
    }

    /// The standard socket, deregistered from the runtime if it was registered.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self {
            Sock::Live(t) => t.into_std(),
            Sock::Parked(s) => Ok(s),
            Sock::Gone => Err(io::Error::new(io::ErrorKind::NotConnected, "socket is gone")),
        }
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match self {
            Sock::Live(t) => t.peer_addr().ok(),
            Sock::Parked(s) => s.peer_addr().ok(),
            Sock::Gone => None,
        }
    }

    /// For a parked socket whose peer has nothing to send yet (a warm connection): true
    /// while nothing (a byte, the end, an error) waits in it, so a dead one is found
    /// without writing to it. A registered socket is not looked at and counts as open.
    pub fn idle_and_open(&self) -> bool {
        match self {
            // A parked socket keeps the non-blocking mode the runtime gave it, so the peek
            // returns at once.
            Sock::Parked(s) => matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            Sock::Live(_) => true,
            Sock::Gone => false,
        }
    }

    /// The standard socket while parked (non-blocking, as the runtime left it).
    pub fn parked_mut(&mut self) -> Option<&mut std::net::TcpStream> {
        match self {
            Sock::Parked(s) => Some(s),
            _ => None,
        }
    }

    /// Ready when the socket has bytes (or EOF/error) to read.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Sock::Live(t) => t.poll_read_ready(cx),
            _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "socket is parked"))),
        }
    }

    fn live(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        match self.get_mut() {
            Sock::Live(t) => Ok(Pin::new(t)),
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, "socket is parked")),
        }
    }
}

impl AsyncRead for Sock {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.live() {
            Ok(t) => t.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.live() {
            Ok(t) => t.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.live() {
            Ok(t) => t.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.live() {
            Ok(t) => t.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.live() {
            Ok(t) => t.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 item 6: a second set of listeners on a port someone holds is refused, with
    /// or without `SO_REUSEPORT` on either side.
    #[test]
    fn a_held_port_is_refused() {
        let first = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = first[0].local_addr().unwrap();
        for count in [1, 2] {
            let e = bind_listeners(addr, count).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
            assert!(e.to_string().contains("already in use by another process"), "{e}");
        }
        drop(first);
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = bind_listeners(plain.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    /// An accepted socket has the options `tune` gives, after `tune_accepted` (which sets
    /// nothing on Linux, where they come from the listener), and a dialled one after `tune`.
    #[tokio::test]
    async fn accepted_and_dialled_sockets_get_nodelay_and_keepalive() {
        let listener = bind_listeners("127.0.0.1:0".parse().unwrap(), 1).unwrap().remove(0);
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (dialled, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (dialled, (accepted, _)) = (dialled.unwrap(), accepted.unwrap());
        tune(&dialled);
        tune_accepted(&accepted);
        for (name, s) in [("dialled", &dialled), ("accepted", &accepted)] {
            let sock = socket2::SockRef::from(s);
            assert!(s.nodelay().unwrap(), "{name}: TCP_NODELAY");
            assert!(sock.keepalive().unwrap(), "{name}: SO_KEEPALIVE");
            #[cfg(target_os = "linux")]
            assert_eq!(
                sock.tcp_keepalive_time().unwrap(),
                KEEPALIVE_IDLE,
                "{name}: TCP_KEEPIDLE"
            );
            #[cfg(target_os = "linux")]
            assert_eq!(
                (
                    sock.tcp_keepalive_interval().unwrap(),
                    sock.tcp_keepalive_retries().unwrap()
                ),
                (KEEPALIVE_INTERVAL, KEEPALIVE_PROBES),
                "{name}: TCP_KEEPINTVL, TCP_KEEPCNT"
            );
        }
    }
}
