//! The endpoint every target tunnels to: a TCP server inside the harness.
//!
//! The first byte a client sends picks the mode, so one address serves every workload through
//! any transparent tunnel:
//! - `U` sink: read and discard until EOF; bytes are added to [`Endpoint::sunk`].
//! - `D` source: write until the peer goes away.
//! - `E` echo: write back everything after the mode byte, until EOF.
//! - `I` idle: echo one byte, then hold the connection (no thread) until [`Endpoint::release_idle`].
//! - `R` request/response: answer every [`REQUEST`] bytes read with [`RESPONSE`] bytes, until
//!   EOF (the busy-gateway workload).
//!
//! A fixed pool of blocking threads waits in `accept` (no thread spawn per connection, which
//! would cap the direct-TCP connection rate); a connection keeps its thread only while it is
//! in one of the modes `U`, `D` and `E`. Mode `R` connections go to a tokio runtime the
//! endpoint owns, so thousands of them can be busy at once without a thread each.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Threads waiting in `accept`. Bounds the connections in modes U, D and E at once.
const POOL: usize = 64;
/// Read and write size of the sink and the source.
pub const IO_BUF: usize = 128 * 1024;
/// Mode `R`: the request size ...
pub const REQUEST: usize = 1024;
/// ... and the response to each request.
pub const RESPONSE: usize = 16 * 1024;
/// Mode `R`: a connection without a request for this long is closed.
const REQUEST_IDLE: Duration = Duration::from_secs(60);

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Bytes read by sinks, over all connections.
    pub sunk: AtomicU64,
    held: Mutex<Vec<TcpStream>>,
    /// Serves the mode `R` connections (one worker per core).
    rt: tokio::runtime::Runtime,
}

impl Endpoint {
    /// Binds 127.0.0.1:0 with a deep backlog and starts the accept pool.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        sock.listen(4096)?;
        let listener: TcpListener = sock.into();
        let ep = Arc::new(Self {
            addr: listener.local_addr()?,
            sunk: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            rt: tokio::runtime::Builder::new_multi_thread()
                .thread_name("endpoint-rr")
                .enable_all()
                .build()?,
        });
        for i in 0..POOL {
            let l = listener.try_clone()?;
            let ep = ep.clone();
            std::thread::Builder::new()
                .name(format!("endpoint-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    while let Ok((s, _)) = l.accept() {
                        let _ = ep.serve(s);
                    }
                })?;
        }
        Ok(ep)
    }

    /// Connections held in mode `I`.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Closes every connection held in mode `I`.
    pub fn release_idle(&self) {
        self.held.lock().unwrap().clear();
    }

    fn serve(&self, mut s: TcpStream) -> std::io::Result<()> {
        s.set_nodelay(true)?;
        // A tunnel that connects and never sends must not pin a pool thread for ever.
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut mode = [0u8; 1];
        s.read_exact(&mut mode)?;
        // Bounds every loop below in time too: a tunnel that stops passing data or never
        // passes on a close frees its thread within a minute.
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        match mode[0] {
            b'U' => {
                let mut buf = vec![0u8; IO_BUF];
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.sunk.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            b'D' => {
                let buf = vec![0x5au8; IO_BUF];
                loop {
                    s.write_all(&buf)?;
                }
            }
            b'E' => {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    s.write_all(&buf[..n])?;
                }
            }
            b'I' => {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
                self.held.lock().unwrap().push(s);
                Ok(())
            }
            b'R' => {
                s.set_nonblocking(true)?;
                self.rt.spawn(async move {
                    let _ = serve_requests(s).await;
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Mode `R` after the mode byte: a response per request until EOF, an error or
/// [`REQUEST_IDLE`] without a request; every write bounded by 30 s.
async fn serve_requests(s: TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;
    static BODY: [u8; RESPONSE] = [0x5a; RESPONSE];
    // Inside the task: `from_std` needs the runtime's reactor.
    let mut s = tokio::net::TcpStream::from_std(s)?;
    let mut req = vec![0u8; REQUEST];
    while let Ok(read) = timeout(REQUEST_IDLE, s.read_exact(&mut req)).await {
        read?;
        timeout(Duration::from_secs(30), s.write_all(&BODY)).await??;
    }
    Ok(())
}
