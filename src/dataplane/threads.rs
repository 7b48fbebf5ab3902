//! A set of threads that each run the jobs sent to them: the tokio data-plane workers
//! ([`super::Workers`]) and the completion workers (`uring::Completion`) are both one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Work sent to a thread: builds its (possibly `!Send`) future on that thread.
pub(crate) type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// What a thread's body gets: its jobs, the stop signal, and where to say it is ready (or
/// why it could not start) before it runs jobs.
pub(crate) struct ThreadStart {
    pub jobs: mpsc::UnboundedReceiver<Job>,
    pub stop: CancellationToken,
    pub ready: std::sync::mpsc::Sender<std::io::Result<()>>,
}

/// Threads running jobs until stopped.
pub(crate) struct Threads {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
    next: AtomicUsize,
}

impl Threads {
    /// Starts `count` (at least one) threads, thread `i` named `name(i)` and running
    /// `body(i, start)`; returns once each has said it is ready, or the first error.
    pub fn start<B>(count: usize, name: impl Fn(usize) -> String, body: B) -> std::io::Result<Self>
    where
        B: Fn(usize, ThreadStart) + Clone + Send + 'static,
    {
        let stop = CancellationToken::new();
        let (mut jobs, mut handles) = (Vec::new(), Vec::new());
        for i in 0..count.max(1) {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let start = ThreadStart {
                jobs: rx,
                stop: stop.clone(),
                ready: ready_tx,
            };
            let body = body.clone();
            let t = std::thread::Builder::new()
                .name(name(i))
                .spawn(move || body(i, start))?;
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other(format!("thread {} died", name(i))))??;
            jobs.push(tx);
            handles.push(t);
        }
        Ok(Self {
            jobs,
            handles: Mutex::new(handles),
            stop,
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Runs `make()` on thread `i` and spawns the future it returns there.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        // A send error means the thread is stopping; the job is dropped with it.
        let _ = self.jobs[i % self.jobs.len()].send(job);
    }

    /// Like [`Threads::spawn_on`] on the next thread in round-robin order.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.spawn_on(self.next.fetch_add(1, Ordering::Relaxed), make);
    }

    /// Signals every thread to stop (dropping the tasks still on it).
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Stops every thread and waits for them to end. Called from one of them, it does not
    /// wait for that one.
    pub fn stop(&self) {
        self.cancel();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in handles {
            if t.thread().id() != me {
                t.join().ok();
            }
        }
    }
}
