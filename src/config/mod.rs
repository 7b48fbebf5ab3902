//! Configuration plumbing shared by the roles: TOML loading with errors that name the
//! field, duration fields, default directories and atomic file writes.
//!
//! Each role parses its raw serde structs (`deny_unknown_fields`, so a typo is an error)
//! and then validates them into types that cannot hold invalid values.

pub mod secrets;

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

/// A buffer budget given in MiB, checked to allow at least one 64 KiB buffer per worker.
pub fn budget_from_mib(mib: usize, workers: usize) -> anyhow::Result<usize> {
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or_else(|| anyhow::anyhow!("{mib} MiB is too large"))?;
    if bytes < workers * crate::dataplane::pool::BUF_SIZE {
        anyhow::bail!("{mib} MiB leaves less than one 64 KiB buffer per worker ({workers} workers)");
    }
    Ok(bytes)
}

/// The `admin` field of a role's file: the admin listener's `IP:PORT`, if any.
pub fn admin_addr(field: Option<&str>) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use anyhow::Context;
    field
        .map(str::parse)
        .transpose()
        .context("field `admin`: expected IP:PORT")
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

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over the target, fsync of the directory. A crash leaves the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
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
