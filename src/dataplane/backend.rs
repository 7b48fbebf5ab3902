//! Choosing the data plane's I/O backend: `epoll` (tokio's reactor, always built) or
//! `uring` (a completion backend: io_uring on Linux, IOCP on Windows; cargo feature
//! `uring`), or `auto`, which probes and falls back to `epoll`.
//!
//! io_uring is often blocked where hyrelay runs: Docker's default seccomp profile refuses
//! `io_uring_setup`, and Linux 6.6+ has the `kernel.io_uring_disabled` sysctl. The probe
//! asks both: the sysctl must be 0 and a two-entry ring must be created (and is closed at
//! once). `uring` when the feature is not built or the probe fails is an error; `auto`
//! then logs why and uses `epoll`.

use std::path::Path;

pub use crate::config::IoBackend;

/// What a setting resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Epoll,
    Uring,
}

/// True if this binary has the completion backend (feature `uring`, Linux or Windows).
pub const fn built() -> bool {
    cfg!(all(feature = "uring", any(target_os = "linux", windows)))
}

/// Where Linux keeps the io_uring switch (0 on, 1 only for `io_uring_group`, 2 off).
pub const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Checks that the completion backend can run here; `Err` says why not.
pub fn probe() -> Result<(), String> {
    probe_with(Path::new(SYSCTL))
}

/// [`probe`] with the sysctl read from `sysctl` (tests point it at a file of their own).
pub fn probe_with(sysctl: &Path) -> Result<(), String> {
    if !built() {
        return Err("this hyrelay was built without the `uring` feature (cargo build --features uring)".into());
    }
    os_probe(sysctl)
}

#[cfg(target_os = "linux")]
fn os_probe(sysctl: &Path) -> Result<(), String> {
    // A kernel without the sysctl (before 6.6) has no such switch.
    if let Ok(text) = std::fs::read_to_string(sysctl) {
        let v = text.trim();
        if v != "0" {
            return Err(format!(
                "kernel.io_uring_disabled = {v} (io_uring is disabled or restricted to a group)"
            ));
        }
    }
    ring_setup()
}

/// Creates and closes a two-entry ring: the call seccomp filters refuse.
#[cfg(target_os = "linux")]
fn ring_setup() -> Result<(), String> {
    // `struct io_uring_params` is 120 bytes; the kernel fills it in.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes `params`, a live buffer of the size the
    // kernel expects, and returns a new file descriptor or -1; it touches nothing else.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2u32, params.as_mut_ptr()) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::ENOSYS) => " (kernel without io_uring, or blocked by a seccomp profile)",
            Some(libc::EPERM) => " (blocked by a seccomp profile or kernel.io_uring_disabled)",
            _ => "",
        };
        return Err(format!("io_uring_setup failed: {e}{hint}"));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(windows)]
fn os_probe(_: &Path) -> Result<(), String> {
    // IOCP is always there.
    Ok(())
}

#[cfg(not(any(target_os = "linux", windows)))]
fn os_probe(_: &Path) -> Result<(), String> {
    Err("no completion backend on this operating system".into())
}

/// Resolves a setting for `role`, logging the choice. `uring` that cannot run is an error.
pub fn resolve(requested: IoBackend, role: &str) -> anyhow::Result<Resolved> {
    resolve_with(requested, role, probe)
}

/// [`resolve`] with the probe given (tests pass a failing one to exercise the fallback).
pub fn resolve_with(
    requested: IoBackend,
    role: &str,
    probe: impl FnOnce() -> Result<(), String>,
) -> anyhow::Result<Resolved> {
    match requested {
        IoBackend::Epoll => Ok(Resolved::Epoll),
        IoBackend::Uring => match probe() {
            Ok(()) => {
                tracing::info!(
                    role,
                    io_backend = "uring",
                    "data plane: completion backend (io_uring/IOCP) for established tunnels"
                );
                Ok(Resolved::Uring)
            }
            Err(why) => anyhow::bail!("io_backend = \"uring\" cannot be used: {why}; use \"auto\" or \"epoll\""),
        },
        IoBackend::Auto => match probe() {
            Ok(()) => {
                tracing::info!(
                    role,
                    io_backend = "uring",
                    requested = "auto",
                    "data plane: completion backend (io_uring/IOCP) for established tunnels"
                );
                Ok(Resolved::Uring)
            }
            Err(why) => {
                tracing::info!(role, io_backend = "epoll", requested = "auto", reason = %why, "data plane: falling back to epoll");
                Ok(Resolved::Epoll)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        #[derive(serde::Deserialize)]
        struct T {
            b: IoBackend,
        }
        for (text, want) in [
            ("auto", IoBackend::Auto),
            ("epoll", IoBackend::Epoll),
            ("uring", IoBackend::Uring),
        ] {
            let t: T = toml::from_str(&format!("b = {text:?}")).unwrap();
            assert_eq!(t.b, want);
            assert_eq!(want.to_string(), text);
        }
        assert!(toml::from_str::<T>("b = \"iouring\"").is_err());
        assert_eq!(IoBackend::default(), IoBackend::Epoll);
    }

    #[test]
    fn epoll_never_probes() {
        let r = resolve_with(IoBackend::Epoll, "test", || panic!("probed")).unwrap();
        assert_eq!(r, Resolved::Epoll);
    }

    #[test]
    fn auto_falls_back_and_uring_refuses_when_the_probe_fails() {
        let fail = || Err("kernel.io_uring_disabled = 2".to_string());
        assert_eq!(resolve_with(IoBackend::Auto, "test", fail).unwrap(), Resolved::Epoll);
        let e = resolve_with(IoBackend::Uring, "test", fail).unwrap_err().to_string();
        assert!(
            e.contains("cannot be used") && e.contains("io_uring_disabled = 2"),
            "{e}"
        );
        assert_eq!(
            resolve_with(IoBackend::Auto, "test", || Ok(())).unwrap(),
            Resolved::Uring
        );
        assert_eq!(
            resolve_with(IoBackend::Uring, "test", || Ok(())).unwrap(),
            Resolved::Uring
        );
    }

    #[test]
    fn probe_reads_the_sysctl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("io_uring_disabled");
        std::fs::write(&p, "2\n").unwrap();
        let e = probe_with(&p).unwrap_err();
        if built() && cfg!(target_os = "linux") {
            assert!(e.contains("io_uring_disabled = 2"), "{e}");
        } else if !built() {
            assert!(e.contains("without the `uring` feature"), "{e}");
        }
    }

    #[test]
    fn probe_of_this_machine_is_consistent() {
        // Whatever the machine allows, the probe answers without panicking, and `auto`
        // agrees with it.
        let p = probe();
        let r = resolve(IoBackend::Auto, "test").unwrap();
        assert_eq!(r == Resolved::Uring, p.is_ok(), "{p:?}");
        if !built() {
            assert!(p.is_err());
        }
    }
}
