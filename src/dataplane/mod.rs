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
mod threads;
#[cfg(all(feature = "uring", any(target_os = "linux", windows)))]
pub mod uring;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use self::threads::{ThreadStart, Threads};

/// A set of worker threads, each a single-threaded runtime with a `LocalSet`, so tasks
/// on a worker may own thread-local state (buffer pool, counters) without locks.
#[must_use = "dropping Workers stops them"]
pub struct Workers {
    threads: Threads,
    /// The completion backend plain tunnels are handed to, if it was chosen.
    completion: Option<Arc<offload::Completion>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").field("count", &self.threads.len()).finish()
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
    /// established tunnels and the budget is split half and half between them and the
    /// tokio workers.
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
        let budget = buffer_budget / count.max(1);
        let completion_here = completion.clone();
        let body = move |_, start: ThreadStart| {
            let ThreadStart { mut jobs, stop, ready } = start;
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    ready.send(Err(e)).ok();
                    return;
                }
            };
            pool::set_budget(budget);
            offload::install(completion_here.clone());
            ready.send(Ok(())).ok();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        job = jobs.recv() => match job {
                            Some(job) => {
                                tokio::task::spawn_local(job());
                            }
                            None => break,
                        },
                    }
                }
            });
            // Dropping the LocalSet and the runtime drops every task still on this worker.
        };
        let threads = Threads::start(count, |i| format!("{name}-{i}"), body)?;
        Ok(Arc::new(Self { threads, completion }))
    }

    /// The completion backend's workers, if this set uses them.
    pub fn completion(&self) -> Option<&Arc<offload::Completion>> {
        self.completion.as_ref()
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.len() == 0
    }

    /// Runs `make()` on worker `i` and spawns the future it returns there.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.threads.spawn_on(i, make);
    }

    /// Like [`Workers::spawn_on`] on the next worker in round-robin order.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.threads.spawn(make);
    }

    /// Stops every worker (dropping the tasks still on it) and waits for the threads to
    /// end. Called from a worker thread, it does not wait for that thread.
    pub fn stop(&self) {
        self.threads.stop();
        if let Some(c) = &self.completion {
            c.stop();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.threads.cancel();
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
