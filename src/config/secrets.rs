//! Secrets from outside the command line: files, standard input and systemd credentials,
//! so keys never show in `/proc/PID/cmdline` (world-readable) or in shell history.
//!
//! Where a secret can come from, everywhere one is taken (connection strings of `bridge`,
//! `hcm add`, `hc`, `doctor`, and the config files):
//! - a file (`--connection-string-file PATH`, `connection_string_file = "PATH"`); `-` reads
//!   standard input;
//! - standard input directly (`--connection-string -`, `hcm add -`);
//! - an environment variable (`HYRELAY_CONNECTION_STRING`, `HYRELAY_CONNECTION_STRING_FILE`),
//!   handled by clap at the edge;
//! - a systemd credential (`LoadCredential=NAME:/etc/...` in the unit): the path
//!   `${CREDENTIALS_DIRECTORY}/NAME` (or `%d/NAME` in `ExecStart=`, which systemd expands).
//!
//! Invariants: a secret's text is never part of an error; a file's trailing newline and
//! surrounding white space are dropped; standard input is read at most once per process
//! (a second `-` is an error, not an empty secret); an empty secret is an error.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::proto::connstr::{ConnStrError, ConnectionString};
use crate::proto::secret::Secret;

/// The environment variable systemd sets to the directory of a unit's credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// One way reading a secret can fail. None of them carries the secret's text.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Standard input could not be read.
    #[error("reading standard input: {0}")]
    Stdin(#[source] std::io::Error),
    /// `-` was given twice: standard input holds one secret.
    #[error("standard input (-) was already read for another secret; give this one as a file")]
    StdinTwice,
    /// The file or standard input held only white space.
    #[error("{0} is empty")]
    Empty(String),
    /// The path names `$CREDENTIALS_DIRECTORY` but the variable is not set.
    #[error("{0} names $CREDENTIALS_DIRECTORY, which is not set (systemd sets it for a unit with LoadCredential=)")]
    NoCredentialsDirectory(String),
    /// The text is not valid UTF-8.
    #[error("{0} is not UTF-8 text")]
    NotText(String),
}

/// A connection-string field of a config file.
#[derive(Debug)]
pub enum CsField {
    Given(ConnectionString),
    /// Neither `{field}` nor `{field}_file`.
    Absent,
    /// A systemd credential that only the unit can read, while `check-config` runs.
    Deferred,
}

impl CsField {
    pub fn given(self) -> Option<ConnectionString> {
        match self {
            CsField::Given(cs) => Some(cs),
            _ => None,
        }
    }
}

/// A connection string from a config file, given inline (`{field}`) or as a file
/// (`{field}_file`, read now, so a reload re-reads it); both at once is an error, and so is
/// `-` (standard input is for the command line: a reload could not read it again).
pub fn connection_string_field(inline: Option<&str>, file: Option<&Path>, field: &str) -> anyhow::Result<CsField> {
    let text = match (inline, file) {
        (Some(_), Some(_)) => anyhow::bail!("fields `{field}` and `{field}_file`: give one of them, not both"),
        (None, Some(f)) if deferred() && names_credentials(f) => return Ok(CsField::Deferred),
        (Some(s), None) => Secret::new(s),
        (None, Some(f)) if f == Path::new("-") => {
            anyhow::bail!("field `{field}_file`: \"-\" (standard input) works on the command line only")
        }
        (None, Some(f)) => read_file(f).map_err(|e| anyhow::anyhow!("field `{field}_file`: {e}"))?,
        (None, None) => return Ok(CsField::Absent),
    };
    parse_connection_string(text.expose(), &format!("field `{field}`")).map(CsField::Given)
}

/// Parses without ever echoing a part of the string (a malformed segment may be a key);
/// errors start with `what`.
pub fn parse_connection_string(s: &str, what: &str) -> anyhow::Result<ConnectionString> {
    ConnectionString::parse(s).map_err(|e| match e {
        ConnStrError::BadSegment(_) => anyhow::anyhow!("{what}: a segment is not NAME=VALUE"),
        e => anyhow::anyhow!("{what}: {e}"),
    })
}

thread_local! {
    /// Set while `check-config` validates a file outside the unit that would run it.
    static CHECKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (the validation of a config file by `check-config`) with systemd credentials
/// deferred: a `*_file` naming `$CREDENTIALS_DIRECTORY` while the variable is unset is
/// [`CsField::Deferred`] instead of an error, since only the unit that loads the credential
/// can read it; callers skip what depends on it.
pub fn checking<T>(f: impl FnOnce() -> T) -> T {
    CHECKING.set(true);
    let out = f();
    CHECKING.set(false);
    out
}

/// True inside [`checking`] when credentials cannot be read here.
fn deferred() -> bool {
    CHECKING.get() && std::env::var_os(CREDENTIALS_DIRECTORY).is_none()
}

fn names_credentials(path: &Path) -> bool {
    let t = path.to_string_lossy();
    t.starts_with("${CREDENTIALS_DIRECTORY}") || t.starts_with("$CREDENTIALS_DIRECTORY")
}

static STDIN_TAKEN: AtomicBool = AtomicBool::new(false);

/// Expands a leading `${CREDENTIALS_DIRECTORY}` or `$CREDENTIALS_DIRECTORY` in `path`.
pub fn expand_path(path: &Path) -> Result<PathBuf, SecretError> {
    expand_with(path, std::env::var_os(CREDENTIALS_DIRECTORY))
}

/// [`expand_path`] with the variable's value given.
fn expand_with(path: &Path, credentials: Option<std::ffi::OsString>) -> Result<PathBuf, SecretError> {
    let text = path.to_string_lossy();
    for prefix in ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            let dir = credentials
                .filter(|d| !d.is_empty())
                .ok_or_else(|| SecretError::NoCredentialsDirectory(text.to_string()))?;
            return Ok(PathBuf::from(dir).join(rest.trim_start_matches('/')));
        }
    }
    Ok(path.to_path_buf())
}

/// Reads a secret from `path` (`-` = standard input), trimmed.
pub fn read_file(path: &Path) -> Result<Secret, SecretError> {
    if path == Path::new("-") {
        return read_stdin();
    }
    let path = expand_path(path)?;
    let bytes = std::fs::read(&path).map_err(|source| SecretError::Read {
        path: path.clone(),
        source,
    })?;
    warn_if_shared(&path);
    from_bytes(bytes, &path.display().to_string())
}

/// `-` reads standard input; anything else is the secret itself.
pub fn inline_or_stdin(value: &str) -> Result<Secret, SecretError> {
    if value == "-" {
        read_stdin()
    } else {
        Ok(Secret::new(value.trim()))
    }
}

fn read_stdin() -> Result<Secret, SecretError> {
    if STDIN_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SecretError::StdinTwice);
    }
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes).map_err(SecretError::Stdin)?;
    from_bytes(bytes, "standard input")
}

fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<Secret, SecretError> {
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotText(origin.to_owned()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SecretError::Empty(origin.to_owned()));
    }
    Ok(Secret::new(trimmed))
}

/// Logs a warning when a secret file is readable by group or others.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "a file holding a secret is readable by other users; chmod 600 it");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_trimmed_and_errors_never_carry_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cs");
        std::fs::write(&p, "Endpoint=sb://r/;SharedAccessKey=s3cret\n").unwrap();
        assert_eq!(
            read_file(&p).unwrap().expose(),
            "Endpoint=sb://r/;SharedAccessKey=s3cret"
        );
        std::fs::write(&p, " \n").unwrap();
        assert!(matches!(read_file(&p), Err(SecretError::Empty(_))));
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_file(&p), Err(SecretError::NotText(_))));
        let e = read_file(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        assert_eq!(inline_or_stdin(" x ").unwrap().expose(), "x");
    }

    #[test]
    fn credentials_directory_is_expanded() {
        let e = expand_with(Path::new("${CREDENTIALS_DIRECTORY}/send"), None).unwrap_err();
        assert!(matches!(e, SecretError::NoCredentialsDirectory(_)), "{e}");
        let dir = std::ffi::OsString::from("/run/credentials/x.service");
        for p in ["${CREDENTIALS_DIRECTORY}/send", "$CREDENTIALS_DIRECTORY/send"] {
            assert_eq!(
                expand_with(Path::new(p), Some(dir.clone())).unwrap(),
                PathBuf::from("/run/credentials/x.service/send")
            );
        }
        assert_eq!(expand_with(Path::new("/etc/x"), None).unwrap(), PathBuf::from("/etc/x"));
    }
}
