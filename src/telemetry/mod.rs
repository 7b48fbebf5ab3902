//! Logging set-up: tracing to stderr, human-readable by default or JSON lines.
//!
//! Lifecycle events carry a stable `event` field (`listener_registered`,
//! `listener_unregistered`, `sender_refused`, `sender_rejected`, `endpoint_dial_failed`,
//! `control_channel_up`, `control_channel_down`, `token_renewed`, `token_expired`, …).
//! Keys, tokens and signatures are never logged: they are [`crate::proto::Secret`]s or
//! stay inside the auth code.

pub mod admin;
pub mod history;
pub mod metrics;
pub mod process;
pub mod systemd;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines. Default.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter used when neither `--log-level` nor `HYRELAY_LOG` gives one.
pub const DEFAULT_LEVEL: &str = "info";

/// Installs the global subscriber. `level` (from `--log-level`) is a filter such as `info`
/// or `hyrelay=debug`; when it is `None`, `HYRELAY_LOG` gives the filter, else `info`.
/// Colours only when stderr is a terminal and `NO_COLOR` is unset (journald, files and
/// pipes get plain text).
pub fn init(format: LogFormat, level: Option<&str>) {
    let env = std::env::var("HYRELAY_LOG").ok();
    let filter = choose_filter(level, env.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(use_colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").is_some(),
        ))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The flag wins over the environment, which wins over the default.
fn choose_filter<'a>(flag: Option<&'a str>, env: Option<&'a str>) -> &'a str {
    flag.or(env.filter(|e| !e.trim().is_empty())).unwrap_or(DEFAULT_LEVEL)
}

fn use_colour(terminal: bool, no_colour: bool) -> bool {
    terminal && !no_colour
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_wins_over_environment() {
        assert_eq!(choose_filter(Some("debug"), Some("warn")), "debug");
        assert_eq!(choose_filter(None, Some("warn")), "warn");
        assert_eq!(choose_filter(None, Some(" ")), "info");
        assert_eq!(choose_filter(None, None), "info");
        assert!(use_colour(true, false));
        assert!(!use_colour(false, false) && !use_colour(true, true));
    }
}
