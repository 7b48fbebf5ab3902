//! The connection-string options shared by every command that takes one (`bridge`,
//! `hcm add`, `hc`, `doctor`), and reading them without echoing a key.
//!
//! A connection string may be given inline (`--connection-string`, which shows in the
//! process list: fine for a try-out), as `-` (standard input), from a file
//! (`--connection-string-file`, `-` = standard input, `${CREDENTIALS_DIRECTORY}/NAME` for a
//! systemd credential) or from the environment (`HYRELAY_CONNECTION_STRING`,
//! `HYRELAY_CONNECTION_STRING_FILE`). A file given on the command line wins over a string
//! from the environment, and a flag over its environment variable.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::config::secrets;
use crate::proto::connstr::ConnectionString;

/// One connection string.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnStrArg {
    /// Connection string (`Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...`);
    /// `-` reads it from standard input. A value here shows in the process list: prefer
    /// --connection-string-file or the environment.
    #[arg(
        long,
        global = true,
        value_name = "STRING",
        env = "HYRELAY_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub connection_string: Option<String>,
    /// File holding the connection string (`-` = standard input;
    /// `${CREDENTIALS_DIRECTORY}/NAME` reads a systemd credential).
    #[arg(long, global = true, value_name = "FILE", env = "HYRELAY_CONNECTION_STRING_FILE")]
    pub connection_string_file: Option<PathBuf>,
}

impl ConnStrArg {
    /// The connection string, if one was given in any way.
    pub fn read(&self) -> anyhow::Result<Option<ConnectionString>> {
        if let Some(f) = &self.connection_string_file {
            return from_file(f).map(Some);
        }
        self.connection_string.as_deref().map(from_inline).transpose()
    }
}

/// Reads and parses a connection string from a file (`-` = standard input).
pub fn from_file(path: &Path) -> anyhow::Result<ConnectionString> {
    let s = secrets::read_file(path).map_err(|e| anyhow::anyhow!("--connection-string-file: {e}"))?;
    parse(s.expose(), &format!("connection string in {}", path.display()))
}

/// Parses an inline connection string (`-` = standard input).
pub fn from_inline(value: &str) -> anyhow::Result<ConnectionString> {
    let s = secrets::inline_or_stdin(value).map_err(|e| anyhow::anyhow!("--connection-string: {e}"))?;
    parse(s.expose(), "--connection-string")
}

pub use crate::config::secrets::parse_connection_string as parse;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_wins_and_bad_strings_are_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("send.cs");
        std::fs::write(
            &f,
            "Endpoint=sb://r/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=db\n",
        )
        .unwrap();
        let a = ConnStrArg {
            connection_string: Some("Endpoint=sb://other/;SharedAccessKeyName=s;SharedAccessKey=k".into()),
            connection_string_file: Some(f.clone()),
        };
        assert_eq!(a.read().unwrap().unwrap().entity_path.as_deref(), Some("db"));
        assert!(ConnStrArg::default().read().unwrap().is_none());
        std::fs::write(&f, "c2VjcmV0a2V5MTIzNDU2Nzg5MAxx").unwrap();
        let e = format!("{:#}", from_file(&f).unwrap_err());
        assert!(!e.contains("c2VjcmV0") && e.contains("send.cs"), "{e}");
    }
}
