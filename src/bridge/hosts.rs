//! The bridge's hosts-file mode: a marked block mapping each endpoint's host name to a
//! loopback address of its own, so an app can use the endpoint's real name and port.
//!
//! The block is added, replaced and removed as a unit; no other line of the file changes.
//! Writes are atomic (temporary file and rename). The block names the process that wrote
//! it (`# owner pid N`): a second bridge in hosts-file mode refuses to take over a block
//! whose owner still runs, instead of silently dropping that bridge's names.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

pub const BEGIN: &str = "# BEGIN hyrelay bridge (managed by hyrelay; do not edit)";
pub const END: &str = "# END hyrelay bridge";

/// First loopback address handed out; the next host gets .2, and so on.
pub const FIRST: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);

/// Assigns one loopback address per distinct host name (sorted, case-insensitive).
pub fn allocate<'a>(hosts: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, IpAddr> {
    let mut names: Vec<String> = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
    names.sort();
    names.dedup();
    let base = u32::from(FIRST);
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, IpAddr::V4(Ipv4Addr::from(base + i as u32))))
        .collect()
}

/// The lowest address from [`FIRST`] on that `taken` does not use yet.
pub fn next_free(taken: &BTreeMap<String, IpAddr>) -> IpAddr {
    let base = u32::from(FIRST);
    (0u32..)
        .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
        .find(|ip| !taken.values().any(|t| t == ip))
        .expect("the loopback range has room")
}

/// `text` without the hyrelay block.
pub fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']);
        if l == BEGIN {
            inside = true;
            continue;
        }
        if inside {
            if l == END {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

/// Prefix of the block's line naming the process that wrote it.
const OWNER: &str = "# owner pid ";

/// The pid recorded in `text`'s hyrelay block, if it has one.
pub fn owner(text: &str) -> Option<u32> {
    let mut inside = false;
    for line in text.lines() {
        let l = line.trim_end_matches('\r');
        if l == BEGIN {
            inside = true;
        } else if l == END {
            inside = false;
        } else if inside && let Some(pid) = l.strip_prefix(OWNER) {
            return pid.trim().parse().ok();
        }
    }
    None
}

/// Whether process `pid` runs (on systems without `/proc`, assumed so only for ourselves).
fn alive(pid: u32) -> bool {
    pid == std::process::id() || (cfg!(target_os = "linux") && Path::new(&format!("/proc/{pid}")).exists())
}

/// `text` with the hyrelay block replaced by one for `entries` (removed if empty).
pub fn render(text: &str, entries: &BTreeMap<String, IpAddr>) -> String {
    let mut out = strip(text);
    if entries.is_empty() {
        return out;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push('\n');
    out.push_str(&format!("{OWNER}{}\n", std::process::id()));
    for (host, ip) in entries {
        out.push_str(&format!("{ip}\t{host}\n"));
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// Writes the block for `entries` into the hosts file at `path`. Every host must be a valid
/// host name ([`crate::proto::host::validate`]): a name with whitespace or a line break
/// would add lines the operator never chose, so the file is left untouched instead.
pub fn apply(path: &Path, entries: &BTreeMap<String, IpAddr>) -> std::io::Result<()> {
    for host in entries.keys() {
        crate::proto::host::validate(host).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "refusing to write \"{}\" into the hosts file: {e}",
                    crate::proto::host::escape(host)
                ),
            )
        })?;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if let Some(pid) = owner(&text).filter(|p| *p != std::process::id() && alive(*p)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "the hyrelay block in {} belongs to another running bridge (pid {pid}); one bridge per host may use hosts-file mode",
                path.display()
            ),
        ));
    }
    let next = render(&text, entries);
    if next == text {
        return Ok(());
    }
    match crate::config::write_atomic(path, next.as_bytes(), false) {
        // A sandbox may let us write the file but not create files beside it (systemd's
        // ReadWritePaths=/etc/hosts): then rewrite it in place.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            std::fs::write(path, next.as_bytes())
        }
        other => other,
    }
}

/// Removes the block from the hosts file at `path`.
pub fn remove(path: &Path) -> std::io::Result<()> {
    apply(path, &BTreeMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "127.0.0.1\tlocalhost\n# comment\n::1 localhost ip6-localhost\n10.0.0.5 db.corp";

    #[test]
    fn add_replace_remove_touch_nothing_else() {
        let e = allocate(["db.corp.local", "API.corp.local", "db.corp.local"]);
        assert_eq!(e.len(), 2);
        assert_eq!(e["api.corp.local"], IpAddr::V4(FIRST));
        let once = render(ORIGINAL, &e);
        assert!(once.starts_with("127.0.0.1\tlocalhost\n# comment\n::1 localhost ip6-localhost\n10.0.0.5 db.corp\n"));
        assert!(once.contains("127.77.0.2\tdb.corp.local\n"));
        assert_eq!(render(&once, &e), once, "idempotent");
        let fewer = allocate(["x.local"]);
        let replaced = render(&once, &fewer);
        assert_eq!(replaced.matches(BEGIN).count(), 1);
        assert!(!replaced.contains("db.corp.local"));
        let removed = strip(&replaced);
        assert_eq!(removed, format!("{ORIGINAL}\n"));
        assert_eq!(strip("a\nb\n"), "a\nb\n");
    }

    #[test]
    fn file_round_trip() {
        let p = std::env::temp_dir().join(format!("hyrelay-hosts-{}", std::process::id()));
        std::fs::write(&p, "127.0.0.1 localhost\n").unwrap();
        apply(&p, &allocate(["db.local"])).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("127.77.0.1\tdb.local"));
        remove(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "127.0.0.1 localhost\n");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_live_owner_keeps_its_block_and_a_dead_one_does_not() {
        let p = std::env::temp_dir().join(format!("hyrelay-hosts-owner-{}", std::process::id()));
        // pid 1 always runs; a pid far beyond pid_max never does.
        let foreign =
            |pid: u32| format!("127.0.0.1 localhost\n{BEGIN}\n{OWNER}{pid}\n127.77.0.1\tother.local\n{END}\n");
        std::fs::write(&p, foreign(1)).unwrap();
        assert_eq!(owner(&foreign(1)), Some(1));
        let e = apply(&p, &allocate(["db.local"])).unwrap_err();
        assert!(e.to_string().contains("another running bridge (pid 1)"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), foreign(1), "left alone");
        std::fs::write(&p, foreign(4_000_000_000)).unwrap();
        apply(&p, &allocate(["db.local"])).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("db.local") && !text.contains("other.local"), "{text}");
        assert_eq!(owner(&text), Some(std::process::id()));
        std::fs::remove_file(p).unwrap();
    }

    /// Issue 9 item 1: a host name carrying a line break or a tab never reaches the file.
    #[test]
    fn a_host_that_would_add_lines_is_refused_and_the_file_untouched() {
        let p = std::env::temp_dir().join(format!("hyrelay-hosts-inject-{}", std::process::id()));
        std::fs::write(&p, "127.0.0.1 localhost\n").unwrap();
        let evil = allocate(["db.local\n6.6.6.6\tbank.example.com"]);
        let e = apply(&p, &evil).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("db.local\\n6.6.6.6"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "127.0.0.1 localhost\n");
        std::fs::remove_file(p).unwrap();
    }
}
