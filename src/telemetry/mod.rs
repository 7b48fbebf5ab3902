//! Logging set-up: tracing to stderr, human-readable by default or JSON lines.
//!
//! Lifecycle events carry a stable `event` field (`listener_registered`,
//! `listener_unregistered`, `sender_refused`, `sender_rejected`, `endpoint_dial_failed`,
//! `control_channel_up`, `control_channel_down`, `token_renewed`, `token_expired`, …).
//! Keys, tokens and signatures are never logged: they are [`crate::proto::Secret`]s or
//! stay inside the auth code.

pub mod admin;
pub mod metrics;

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

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `hyrelay=debug`; `HYRELAY_LOG` overrides it.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_env("HYRELAY_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
