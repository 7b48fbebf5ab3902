//! The data plane: per-core workers, each a thread with its own single-threaded runtime,
//! and the accept loops that feed them.
//!
//! A worker runs until its [`Workers`] is shut down; tasks are spawned onto a specific
//! worker through its runtime handle. Listening sockets are one per worker with
//! `SO_REUSEPORT` on Linux, so the kernel spreads connections; elsewhere worker 0 accepts
//! and hands sockets round-robin to all workers.

pub mod splice;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A set of worker threads.
#[must_use = "dropping Workers stops them"]
pub struct Workers {
    handles: Vec<Handle>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
    next: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.handles.len()).finish()
    }
}

impl Workers {
    /// Starts `count` workers named `{name}-{i}`.
    pub fn start(name: &str, count: usize) -> std::io::Result<Arc<Self>> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let t = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tx.send(Err(e)).ok();
                        return;
                    }
                };
                tx.send(Ok(rt.handle().clone())).ok();
                rt.block_on(stop.cancelled());
                // Dropping the runtime drops every task still on this worker.
            })?;
            handles.push(rx.recv().map_err(|_| std::io::Error::other("worker thread died"))??);
            threads.push(t);
        }
        Ok(Arc::new(Self {
            handles,
            threads: std::sync::Mutex::new(threads),
            stop,
            next: AtomicUsize::new(0),
        }))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runtime handle of worker `i`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// The next worker in round-robin order.
    pub fn next(&self) -> &Handle {
        self.handle(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Spawns `fut` on the next worker.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.next().spawn(fut);
    }

    /// Stops every worker (dropping the tasks still on it) and waits for the threads to
    /// end. Called from a worker thread, it does not wait for that thread.
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                t.join().ok();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts on `listeners` (one per worker, or one shared) and runs `serve` for every
/// connection on a worker, until `stop` is cancelled.
pub fn serve<F, Fut>(
    workers: &Arc<Workers>,
    listeners: Vec<std::net::TcpListener>,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shared = listeners.len() == 1 && workers.len() > 1;
    for (i, l) in listeners.into_iter().enumerate() {
        let stop = stop.clone();
        let serve = serve.clone();
        let all = workers.clone();
        workers.handle(i).spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register listening socket");
                    return;
                }
            };
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((tcp, peer)) if shared => {
                        // Hand the socket to the next worker; re-register it there.
                        match tcp.into_std() {
                            Ok(std_tcp) => {
                                let serve = serve.clone();
                                all.next().spawn(async move {
                                    if let Ok(tcp) = tokio::net::TcpStream::from_std(std_tcp) {
                                        serve(tcp, peer).await;
                                    }
                                });
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot hand off accepted socket"),
                        }
                    }
                    Ok((tcp, peer)) => {
                        tokio::spawn(serve(tcp, peer));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
}
