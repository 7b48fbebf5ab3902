//! [`Stream`]: a connection that is plain TCP or TLS (server or client side), movable
//! between workers with [`Stream::park`] / [`Stream::unpark`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::sock::Sock;
use super::tls_conn::TlsConn;
use super::tls_session::TlsSession;
use bytes::BytesMut;

/// A stream taken apart to leave its runtime ([`Stream::detach`]).
#[derive(Debug)]
pub struct Detached {
    pub sock: std::net::TcpStream,
    /// The TLS session, for a TLS stream.
    pub tls: Option<Box<TlsSession>>,
    /// Plaintext received and not yet used (read past the handshakes).
    pub plain: BytesMut,
    /// TLS: bytes received after that and not yet opened.
    pub cipher: BytesMut,
}

/// A byte stream to a peer.
#[derive(Debug)]
pub enum Stream {
    Plain(Sock),
    /// TLS, either side (records sealed and opened by our own record layer: [`TlsConn`]).
    Tls(Box<TlsConn<Sock>>),
}

impl Stream {
    fn sock_mut(&mut self) -> &mut Sock {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.get_mut(),
        }
    }

    fn sock(&self) -> &Sock {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.get_ref(),
        }
    }

    /// Deregisters the socket from this runtime so the stream can move to another worker.
    pub fn park(&mut self) -> io::Result<()> {
        self.sock_mut().park()
    }

    /// Registers the socket with the runtime this runs on.
    pub fn unpark(&mut self) -> io::Result<()> {
        self.sock_mut().unpark()
    }

    /// Readies the stream to be sent to a task on worker thread `worker` (a task never
    /// leaves its worker): parked, unless that is this thread, where it can stay registered
    /// (no deregistration, no registration again, which [`Stream::unpark`] then skips).
    pub fn park_for(&mut self, worker: std::thread::ThreadId) -> io::Result<()> {
        if worker == std::thread::current().id() {
            return Ok(());
        }
        self.park()
    }

    /// True while the socket is parked (deregistered from every runtime).
    #[cfg(test)]
    pub fn is_parked(&self) -> bool {
        matches!(self.sock(), Sock::Parked(_))
    }

    /// For a parked stream whose peer has nothing to send yet (a warm connection to the
    /// relay): false once the peer closed, reset or sent data, found without writing to it.
    /// Over TLS the records waiting in the socket are first taken into the session: a
    /// server sends its session tickets after the handshake, which is no sign of death,
    /// while a `close_notify`, an error or application data is.
    pub fn idle_and_open(&mut self) -> bool {
        match self {
            Stream::Plain(s) => s.idle_and_open(),
            Stream::Tls(t) => t.idle_and_open(),
        }
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.sock().peer_addr()
    }

    /// True if the stream can leave its runtime ([`Stream::detach`]): plain, or TLS with
    /// every record it sealed written out.
    pub fn detachable(&self) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Tls(t) => t.is_flushed(),
        }
    }

    /// The stream taken apart to leave this runtime (for the completion backend), with
    /// `leftover`, the plaintext already read from it past its handshakes.
    pub fn detach(self, mut leftover: BytesMut) -> io::Result<Detached> {
        match self {
            Stream::Plain(s) => Ok(Detached {
                sock: s.into_std()?,
                tls: None,
                plain: leftover,
                cipher: BytesMut::new(),
            }),
            Stream::Tls(t) => {
                let (sock, session, plain, cipher) = t.into_parts();
                leftover.extend_from_slice(&plain);
                Ok(Detached {
                    sock: sock.into_std()?,
                    tls: Some(Box::new(session)),
                    plain: leftover,
                    cipher,
                })
            }
        }
    }

    /// Ready when a read would make progress without blocking: bytes in the socket, or
    /// plaintext, a close or an error already buffered inside TLS. Lets the data plane wait
    /// for input without holding a buffer.
    pub fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(t) if t.has_input() => Poll::Ready(Ok(())),
            Stream::Tls(t) => t.get_ref().poll_read_ready(cx),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// The read size of [`linger_close`].
const LINGER_SINK: usize = 4096;

/// Shuts our side down (TLS close_notify, FIN), then reads and discards what the peer
/// still sends until its EOF, at most `max` bytes and `limit` in all: a lingering close.
///
/// Closing a socket that has unread input makes the kernel reset the connection, and the
/// reset throws away whatever of our output is still in flight or unread at the peer, so
/// the tail of a response or of a tunnel's data would be lost. Reading to the peer's EOF
/// (or for a bounded while) before the socket is dropped avoids that.
///
/// The sink buffer is allocated here, when the close happens: as an array it would sit in
/// the state of every future that may close a connection (4 KiB in each tunnel task and
/// connection handler, copied when they are spawned and kept for their whole life).
pub async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, limit: std::time::Duration, max: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(limit, async {
        s.shutdown().await?;
        let mut sink = vec![0u8; LINGER_SINK];
        let mut left = max;
        while left > 0 {
            match s.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream readied for a task on this worker stays registered; for another worker's
    /// it is parked.
    #[tokio::test]
    async fn a_stream_is_parked_only_for_another_worker() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let other = std::thread::spawn(|| std::thread::current().id()).join().unwrap();
        for (worker, parked) in [(std::thread::current().id(), false), (other, true)] {
            let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let mut stream = Stream::Plain(Sock::Live(accepted.unwrap().0));
            stream.park_for(worker).unwrap();
            assert_eq!(stream.is_parked(), parked, "worker {worker:?}");
        }
    }

    /// The lingering close is awaited inside every tunnel task and connection handler, so
    /// its state is part of theirs for their whole life: it must stay small (a 4 KiB
    /// array in it once made the relay's idle tunnels cost 15 KiB each instead of 3).
    #[test]
    fn a_lingering_close_keeps_its_buffer_off_the_future() {
        let (mut a, _b) = tokio::io::duplex(64);
        let f = linger_close(&mut a, std::time::Duration::from_secs(1), 1 << 20);
        assert!(std::mem::size_of_val(&f) < 512, "{} bytes", std::mem::size_of_val(&f));
    }
}
