//! [`RuntimeSettings`]: what every role's process runs with — data-plane workers, the
//! buffer budget, the I/O backend, the admin listener and the drain timeout — parsed once,
//! the same way, for the relay, the hcm and the bridge.
//!
//! A role's file has the five fields at its top level (`workers`, `buffer_budget_mib`,
//! `io_backend`, `admin`, `drain_timeout`); the role hands them over as [`RuntimeFields`]
//! and gets the validated settings or an error naming the field. Command-line flags
//! override them afterwards through the setters here, so a flag and a file field can never
//! disagree about, say, how the budget follows the worker count.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Size of one data-plane buffer, the unit of the buffer budget: 64 KiB (a full TLS record
/// plus WebSocket headers fits).
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Buffer budget per worker when none is set. Default: 64 MiB (1024 buffers).
pub const DEFAULT_BUDGET_PER_WORKER: usize = 64 << 20;

/// The `io_backend` setting / `--io-backend` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoBackend {
    /// The completion backend if it is built and the kernel allows it, else epoll.
    Auto,
    /// tokio's reactor (epoll on Linux, mio's IOCP polling on Windows). Default.
    #[default]
    Epoll,
    /// The completion backend (io_uring / IOCP), or an error if it cannot run.
    Uring,
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoBackend::Auto => "auto",
            IoBackend::Epoll => "epoll",
            IoBackend::Uring => "uring",
        })
    }
}

/// Settings of a role's process, shared by all three roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// Data-plane worker threads. Default: one per core.
    pub workers: NonZeroUsize,
    /// Memory the data plane may hold in pooled 64 KiB buffers, all workers together, if
    /// set; otherwise [`DEFAULT_BUDGET_PER_WORKER`] per worker, whatever their number.
    pub buffer_budget: Option<NonZeroUsize>,
    /// Data-plane I/O backend. Default: epoll.
    pub io_backend: IoBackend,
    /// Admin listener (metrics, health, status page). Default: none.
    pub admin: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, how long running work gets to finish. Default: 30 s.
    pub drain_timeout: Duration,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            workers: NonZeroUsize::new(super::default_workers()).unwrap_or(NonZeroUsize::MIN),
            buffer_budget: None,
            io_backend: IoBackend::default(),
            admin: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// [`RuntimeSettings::from_fields`] for a role's parsed file `$f`, whose raw struct has the
/// five fields under the same names (each role's does; `deny_unknown_fields` rules out a
/// flattened shared struct, so the names are matched here once).
macro_rules! settings_of_file {
    ($f:expr) => {
        $crate::config::RuntimeSettings::from_fields($crate::config::RuntimeFields {
            workers: $f.workers,
            buffer_budget_mib: $f.buffer_budget_mib,
            io_backend: $f.io_backend,
            admin: $f.admin.as_deref(),
            drain_timeout: $f.drain_timeout,
        })
    };
}
pub(crate) use settings_of_file;

/// The five fields as they come from a role's file, all optional.
#[derive(Debug, Clone, Default)]
pub struct RuntimeFields<'a> {
    pub workers: Option<usize>,
    pub buffer_budget_mib: Option<usize>,
    pub io_backend: Option<IoBackend>,
    pub admin: Option<&'a str>,
    pub drain_timeout: Option<Duration>,
}

impl RuntimeSettings {
    /// Validates a file's fields; errors name the field at fault.
    pub fn from_fields(f: RuntimeFields<'_>) -> anyhow::Result<Self> {
        let mut s = Self::default();
        if let Some(w) = f.workers {
            s.set_workers(w).context("field `workers`")?;
        }
        if let Some(m) = f.buffer_budget_mib {
            s.set_budget_mib(m).context("field `buffer_budget_mib`")?;
        }
        s.io_backend = f.io_backend.unwrap_or_default();
        if let Some(a) = f.admin {
            s.admin = Some(a.parse().context("field `admin`: expected IP:PORT")?);
        }
        if let Some(d) = f.drain_timeout {
            if d.is_zero() {
                bail!("field `drain_timeout`: must be longer than 0s");
            }
            s.drain_timeout = d;
        }
        Ok(s)
    }

    /// Sets the worker count (a flag or a test); an explicit budget must still give each
    /// worker a buffer.
    pub fn set_workers(&mut self, n: usize) -> anyhow::Result<()> {
        let Some(n) = NonZeroUsize::new(n) else {
            bail!("must be at least 1 (omit it for one per core)");
        };
        if let Some(b) = self.buffer_budget {
            check_budget(b.get(), n.get())?;
        }
        self.workers = n;
        Ok(())
    }

    /// Sets the budget for all workers together, in MiB.
    pub fn set_budget_mib(&mut self, mib: usize) -> anyhow::Result<()> {
        let bytes = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| anyhow::anyhow!("{mib} MiB is too large"))?;
        self.set_budget_bytes(bytes)
    }

    /// Sets the budget for all workers together, in bytes (at least one buffer per worker).
    pub fn set_budget_bytes(&mut self, bytes: usize) -> anyhow::Result<()> {
        check_budget(bytes, self.workers.get())?;
        self.buffer_budget = NonZeroUsize::new(bytes);
        Ok(())
    }

    /// Worker threads as a count.
    pub fn worker_count(&self) -> usize {
        self.workers.get()
    }

    /// The buffer budget of all workers together, in bytes.
    pub fn buffer_budget_bytes(&self) -> usize {
        match self.buffer_budget {
            Some(b) => b.get(),
            None => self.workers.get() * DEFAULT_BUDGET_PER_WORKER,
        }
    }
}

/// The flags every role's command takes for its runtime settings; they override the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// Data-plane workers (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Data-plane I/O backend: epoll (default), uring (io_uring/IOCP; built with the `uring`
    /// feature), or auto (uring if the kernel allows it, else epoll).
    #[arg(long, value_name = "BACKEND", env = "HYRELAY_IO_BACKEND")]
    pub io_backend: Option<IoBackend>,
    /// Admin listener: /metrics, /healthz, /readyz, /status and a status page at /.
    #[arg(long, value_name = "IP:PORT")]
    pub admin: Option<SocketAddr>,
}

impl RuntimeArgs {
    /// Applies the flags that were given to `s`.
    pub fn apply(&self, s: &mut RuntimeSettings) -> anyhow::Result<()> {
        if let Some(w) = self.workers {
            s.set_workers(w).context("--workers")?;
        }
        if let Some(b) = self.io_backend {
            s.io_backend = b;
        }
        if self.admin.is_some() {
            s.admin = self.admin;
        }
        Ok(())
    }
}

fn check_budget(bytes: usize, workers: usize) -> anyhow::Result<()> {
    if bytes < workers * BUFFER_SIZE {
        bail!(
            "{} MiB leaves less than one 64 KiB buffer per worker ({workers} workers)",
            bytes >> 20
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_the_budget_follow_the_workers() {
        let mut s = RuntimeSettings::default();
        assert_eq!(s.io_backend, IoBackend::Epoll);
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        s.set_workers(3).unwrap();
        assert_eq!(s.buffer_budget_bytes(), 3 * DEFAULT_BUDGET_PER_WORKER);
        s.set_budget_mib(1).unwrap();
        assert_eq!(s.buffer_budget_bytes(), 1 << 20);
        s.set_workers(16).unwrap();
        assert!(s.set_workers(17).is_err(), "1 MiB is 16 buffers");
        assert!(s.set_workers(0).is_err());
    }

    #[test]
    fn fields_are_validated_with_their_names() {
        let s = RuntimeSettings::from_fields(RuntimeFields {
            workers: Some(2),
            buffer_budget_mib: Some(8),
            io_backend: Some(IoBackend::Auto),
            admin: Some("127.0.0.1:9100"),
            drain_timeout: Some(Duration::from_secs(5)),
        })
        .unwrap();
        assert_eq!(s.worker_count(), 2);
        assert_eq!(s.buffer_budget_bytes(), 8 << 20);
        assert_eq!(s.io_backend, IoBackend::Auto);
        assert_eq!(s.admin, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
        for (fields, name) in [
            (
                RuntimeFields {
                    workers: Some(0),
                    ..Default::default()
                },
                "workers",
            ),
            (
                RuntimeFields {
                    workers: Some(64),
                    buffer_budget_mib: Some(1),
                    ..Default::default()
                },
                "buffer_budget_mib",
            ),
            (
                RuntimeFields {
                    admin: Some("localhost"),
                    ..Default::default()
                },
                "admin",
            ),
        ] {
            let e = format!("{:#}", RuntimeSettings::from_fields(fields).unwrap_err());
            assert!(e.contains(name), "{e}");
        }
    }
}
