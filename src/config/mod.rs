//! Configuration plumbing shared by the roles: TOML loading with errors that name the
//! field, duration fields, default directories and atomic file writes.
//!
//! Each role parses its raw serde structs (`deny_unknown_fields`, so a typo is an error)
//! and then validates them into types that cannot hold invalid values.

pub mod runtime;
pub mod secrets;

pub use runtime::{IoBackend, RuntimeArgs, RuntimeFields, RuntimeSettings};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Parses TOML text into `T`; the error names the file, the line and the field at fault.
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &str) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim_end()))
}

/// Reads and parses a TOML file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    parse_toml(&text, &path.display().to_string())
}

/// Default number of data-plane workers: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Deserializes a human duration such as `30s`, `5m`, `1h 30m`, `250ms`.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like \"30s\": {e}")))
}

/// Like [`duration`] for an optional field.
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Default data directory of a role: `$HYRELAY_DATA_DIR/<role>`, else
/// `/var/lib/hyrelay/<role>` for root, else `$XDG_DATA_HOME/hyrelay/<role>` or
/// `~/.local/share/hyrelay/<role>`.
pub fn default_data_dir(role: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("HYRELAY_DATA_DIR") {
        return PathBuf::from(d).join(role);
    }
    #[cfg(unix)]
    if is_root() {
        return PathBuf::from("/var/lib/hyrelay").join(role);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("hyrelay").join(role);
    }
    if let Some(h) = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")) {
        return PathBuf::from(h).join(".local/share/hyrelay").join(role);
    }
    PathBuf::from("hyrelay-data").join(role)
}

#[cfg(unix)]
fn is_root() -> bool {
    // The owner of /proc/self is our effective uid; no libc call needed.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A name for a temporary file that no other write of this process uses at the same time:
/// `.<name>.tmp<pid>-<n>`.
fn temp_name(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.tmp{}-{n}", std::process::id())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over the target, fsync of the directory. A crash leaves the old or the new file.
/// Concurrent writes (threads of one process included) each use a temporary of their own;
/// the last rename wins.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    write_atomic_owned(path, bytes, private, None)
}

/// [`write_atomic`], giving the file `owner` (uid, gid; Unix, needs root) before it replaces
/// the old one, so no reader ever sees it with another owner (`hyrelay hcm add` run as root
/// for an hcm that runs as another user).
pub fn write_atomic_owned(path: &Path, bytes: &[u8], private: bool, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(temp_name(path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    #[cfg(unix)]
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    #[cfg(not(unix))]
    let _ = owner;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// [`write_atomic`] with owner-only permissions, for keys.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, bytes, true)
}

/// Like [`write_private`], keeping the file's previous version as `<name>.bak` (replaced
/// atomically too): a bad write or a bad edit can be undone by hand.
pub fn write_private_with_backup(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let bak = path.with_file_name(format!("{name}.bak"));
        let tmp = path.with_file_name(temp_name(&format!("{name}.bak")));
        let _ = std::fs::remove_file(&tmp);
        // A hard link costs no copy; a file system without them gets a copy.
        if std::fs::hard_link(path, &tmp).is_err() {
            std::fs::copy(path, &tmp)?;
        }
        std::fs::rename(&tmp, &bak)?;
    }
    write_atomic(path, bytes, true)
}

/// Removes the temporary files [`write_atomic`] leaves when a process dies mid-write
/// (`.<name>.tmp<pid>-<n>`, and `.<name>.tmp<pid>` of older versions) from `dir`; returns
/// how many. Call it while
/// holding the directory's [`DirLock`], so no live writer's file is taken.
pub fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let leftover = name.starts_with('.')
            && name
                .rsplit_once(".tmp")
                .is_some_and(|(_, tag)| !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit() || b == b'-'));
        // A live writer's file is not a leftover: `hcm add` (no lock) may be writing
        // connections.json while the hcm starts.
        let writer = name
            .rsplit_once(".tmp")
            .and_then(|(_, tag)| tag.split('-').next()?.parse::<u32>().ok());
        if leftover && e.file_type().is_ok_and(|t| t.is_file()) && !writer.is_some_and(process_alive) {
            std::fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether process `pid` exists (a signal 0 reaches it, or exists but is not ours to
/// signal). Not through /proc, which `ProtectProc=invisible` hides from a unit.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
}

/// An exclusive lock on a role's data directory, held while the role runs: a second
/// process on the same directory refuses to start instead of overwriting its files
/// (issue 9 item 6). Released when dropped (or when the process dies).
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct DirLock {
    _file: std::fs::File,
}

/// Name of the lock file in a data directory.
pub const LOCK_FILE: &str = "lock";

/// Takes the exclusive lock of `dir` (created if missing), or says who holds it.
pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let who = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            anyhow::bail!(
                "data directory {} is in use by another hyrelay process{who}; stop it, or give this one its own --data-dir",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0).ok();
    write!(file, "{}", std::process::id()).ok();
    Ok(DirLock { _file: file })
}

/// This machine's host name, if it has one.
pub(crate) fn system_hostname() -> Option<String> {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname(2) writes at most `buf.len()` bytes into `buf`, a live buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return None;
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        let name = std::str::from_utf8(&buf[..end]).ok()?.to_owned();
        crate::proto::host::validate(&name).ok().map(|_| name)
    }
    #[cfg(not(unix))]
    {
        std::env::var("COMPUTERNAME").ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[serde(deserialize_with = "duration")]
        wait: Duration,
    }

    #[test]
    fn errors_name_the_field() {
        let t: T = parse_toml("wait = \"1m 5s\"", "t.toml").unwrap();
        assert_eq!(t.wait, Duration::from_secs(65));
        let e = parse_toml::<T>("wait = \"soon\"", "t.toml").unwrap_err().to_string();
        assert!(e.contains("t.toml") && e.contains("wait") && e.contains("soon"), "{e}");
        let e = parse_toml::<T>("wait = \"1s\"\nwiat = 1", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wiat"), "{e}");
    }

    #[test]
    fn dir_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let e = lock_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("in use by another hyrelay process") && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(held);
        let _again = lock_dir(dir.path()).unwrap();
    }

    #[test]
    fn leftovers_go_and_backups_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_private_with_backup(&p, b"one").unwrap();
        write_private_with_backup(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read(dir.path().join("state.json.bak")).unwrap(), b"one");
        // Writers that are gone (pids above any this machine hands out), and a live one.
        std::fs::write(dir.path().join(".state.json.tmp4194401"), b"1,200 revoked keys").unwrap();
        std::fs::write(dir.path().join(".state.json.tmp4194402-7"), b"x").unwrap();
        std::fs::write(dir.path().join(".state.json.bak.tmp4194403"), b"x").unwrap();
        std::fs::write(dir.path().join(".keep.tmpx"), b"not ours").unwrap();
        let live = format!(".connections.json.tmp{}-0", std::process::id());
        std::fs::write(dir.path().join(&live), b"being written").unwrap();
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 3);
        std::fs::remove_file(dir.path().join(&live)).expect("a live writer's file stays");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".keep.tmpx", "state.json", "state.json.bak"]);
    }

    /// Two threads writing the same file at once used to share one temporary name: one
    /// rename then failed with "No such file or directory".
    #[test]
    fn concurrent_writes_in_one_process_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for j in 0..50 {
                        write_private(&p, format!("{i}-{j}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!("hyrelay-cfg-{}", std::process::id()));
        let p = dir.join("x.json");
        write_atomic(&p, b"one", false).unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
