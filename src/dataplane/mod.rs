//! The data plane: per-core workers, each a thread with its own single-threaded runtime,
//! and the accept loops that feed them.
//!
//! A worker runs until its [`Workers`] is shut down; tasks are spawned onto a specific
//! worker through its runtime handle. Listening sockets are one per worker with
//! `SO_REUSEPORT` on Linux, so the kernel spreads connections; elsewhere worker 0 accepts
//! and hands sockets round-robin to all workers.

pub mod backend;
pub mod drain;
pub(crate) mod drive;
pub mod flush;
pub mod io;
pub mod offload;
pub mod pool;
pub mod reframe;
pub mod splice;
pub mod stats;
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
pub mod uring;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Work sent to a worker: builds its (possibly `!Send`) future on the worker's thread.
type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A set of worker threads, each a single-threaded runtime with a `LocalSet`, so tasks
/// on a worker may own thread-local state (buffer pool, counters) without locks.
#[must_use = "dropping Workers stops them"]
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
    next: AtomicUsize,
    /// The completion backend plain tunnels are handed to, if it was chosen.
    completion: Option<Arc<offload::Completion>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.jobs.len()).finish()
    }
}

impl Workers {
    /// Starts `count` workers named `{name}-{i}`, sharing a buffer budget of
    /// `buffer_budget` bytes (split evenly).
    pub fn start(name: &str, count: usize, buffer_budget: usize) -> std::io::Result<Arc<Self>> {
        Self::start_threads(name, count, buffer_budget, None)
    }

    /// Starts a role's workers as `rt` says: their count, buffer budget and I/O backend
    /// (resolved here). With the completion backend, as many completion workers run the
    /// plain-TCP tunnels and the budget is split half and half between them and the tokio
    /// workers.
    pub fn start_with(name: &str, rt: &crate::config::RuntimeSettings) -> anyhow::Result<Arc<Self>> {
        let (count, buffer_budget) = (rt.worker_count(), rt.buffer_budget_bytes());
        if backend::resolve(rt.io_backend, name)? == backend::Resolved::Epoll {
            return Ok(Self::start(name, count, buffer_budget)?);
        }
        let per_worker = buffer_budget / count.max(1) / 2;
        let completion = offload::Completion::start(name, count, per_worker)?;
        Ok(Self::start_threads(name, count, buffer_budget / 2, Some(completion))?)
    }

    fn start_threads(
        name: &str,
        count: usize,
        buffer_budget: usize,
        completion: Option<Arc<offload::Completion>>,
    ) -> std::io::Result<Arc<Self>> {
        let count = count.max(1);
        let stop = CancellationToken::new();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let budget = buffer_budget / count;
            let completion_here = completion.clone();
            let t = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        ready_tx.send(Err(e)).ok();
                        return;
                    }
                };
                pool::set_budget(budget);
                offload::install(completion_here);
                ready_tx.send(Ok(())).ok();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            job = rx.recv() => match job {
                                Some(job) => {
                                    tokio::task::spawn_local(job());
                                }
                                None => break,
                            },
                        }
                    }
                });
                // Dropping the LocalSet and the runtime drops every task still on this worker.
            })?;
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("worker thread died"))??;
            jobs.push(tx);
            threads.push(t);
        }
        Ok(Arc::new(Self {
            jobs,
            threads: std::sync::Mutex::new(threads),
            stop,
            next: AtomicUsize::new(0),
            completion,
        }))
    }

    /// The completion backend's workers, if this set uses them.
    pub fn completion(&self) -> Option<&Arc<offload::Completion>> {
        self.completion.as_ref()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Runs `make()` on worker `i` and spawns the future it returns there.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        // A send error means the worker is stopping; the job is dropped with it.
        let _ = self.jobs[i % self.jobs.len()].send(job);
    }

    /// Like [`Workers::spawn_on`] on the next worker in round-robin order.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.spawn_on(self.next.fetch_add(1, Ordering::Relaxed), make);
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
        if let Some(c) = &self.completion {
            c.stop();
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
pub fn serve<F, Fut>(workers: &Arc<Workers>, listeners: Vec<std::net::TcpListener>, stop: CancellationToken, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let shared = listeners.len() == 1 && workers.len() > 1;
    for (i, l) in listeners.into_iter().enumerate() {
        let stop = stop.clone();
        let serve = serve.clone();
        let all = workers.clone();
        workers.spawn_on(i, move || accept_loop(l, stop, serve, shared.then_some(all)));
    }
}

async fn accept_loop<F, Fut>(
    l: std::net::TcpListener,
    stop: CancellationToken,
    serve: F,
    hand_off: Option<Arc<Workers>>,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
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
            Ok((tcp, peer)) => match &hand_off {
                // One shared listener (not Linux): hand the socket to the next worker and
                // register it with that worker's reactor.
                Some(all) => match tcp.into_std() {
                    Ok(std_tcp) => {
                        let serve = serve.clone();
                        all.spawn(move || async move {
                            if let Ok(tcp) = tokio::net::TcpStream::from_std(std_tcp) {
                                serve(tcp, peer).await;
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot hand off accepted socket"),
                },
                None => {
                    tokio::task::spawn_local(serve(tcp, peer));
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
