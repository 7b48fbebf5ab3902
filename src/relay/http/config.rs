//! The relay's `[http]` settings (HTTP request/response mode) and their validation.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;

use crate::config::opt_duration;

/// Validated HTTP-mode settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// From dispatch to the listener's `response`; then 504. Also the longest wait for the
    /// listener's rendezvous. Default: 60 s (Azure's).
    pub response_timeout: Duration,
    /// Longest pause inside a streamed request or response body. Default: 60 s (Azure's).
    pub body_idle_timeout: Duration,
    /// Largest request or response body. A larger `Content-Length` gets 413 before a byte
    /// of the body is read; a chunked body is cut off when it crosses the limit.
    /// Default: 1 GiB.
    pub max_body: u64,
    /// HTTP requests in flight per listener; with every listener at the limit a sender
    /// gets 503. Default: 1000.
    pub max_requests_per_listener: usize,
    /// Largest request body sent inline on the control channel; larger (or slower) ones go
    /// through a rendezvous. 0 sends every request through a rendezvous (the form a
    /// listener on another relay node gets). Default: 64 KiB, at most 64 KiB.
    pub inline_max: usize,
    /// How long a rendezvous kept for a sender connection's next request may stay unused;
    /// then it is closed (1000). Default: 30 s (shorter than our hcm's 60 s wait for the
    /// next request, so the relay closes first).
    pub kept_idle: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(60),
            body_idle_timeout: Duration::from_secs(60),
            max_body: 1 << 30,
            max_requests_per_listener: 1000,
            inline_max: 64 * 1024,
            kept_idle: Duration::from_secs(30),
        }
    }
}

/// The `[http]` table of the relay config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    #[serde(default, deserialize_with = "opt_duration")]
    pub response_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub body_idle_timeout: Option<Duration>,
    pub max_body_bytes: Option<u64>,
    pub max_requests_per_listener: Option<usize>,
    pub inline_max_bytes: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub kept_rendezvous_idle: Option<Duration>,
}

impl HttpSettings {
    /// Validates the `[http]` table.
    pub fn from_file(f: HttpFile) -> anyhow::Result<Self> {
        let mut s = Self::default();
        for (slot, v, field) in [
            (&mut s.response_timeout, f.response_timeout, "http.response_timeout"),
            (&mut s.body_idle_timeout, f.body_idle_timeout, "http.body_idle_timeout"),
            (&mut s.kept_idle, f.kept_rendezvous_idle, "http.kept_rendezvous_idle"),
        ] {
            if let Some(d) = v {
                if d.is_zero() {
                    bail!("field `{field}`: must be longer than 0s");
                }
                *slot = d;
            }
        }
        if let Some(n) = f.max_body_bytes {
            if n == 0 {
                bail!("field `http.max_body_bytes`: must be at least 1");
            }
            s.max_body = n;
        }
        if let Some(n) = f.max_requests_per_listener {
            if n == 0 {
                bail!("field `http.max_requests_per_listener`: must be at least 1");
            }
            s.max_requests_per_listener = n;
        }
        if let Some(n) = f.inline_max_bytes {
            if n > 64 * 1024 {
                bail!("field `http.inline_max_bytes`: at most 65536 (what listeners read in one control message)");
            }
            s.inline_max = n;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let d = HttpSettings::from_file(HttpFile::default()).unwrap();
        assert_eq!(d, HttpSettings::default());
        let f: HttpFile = toml::from_str("response_timeout = \"5s\"\nmax_body_bytes = 10\n").unwrap();
        let s = HttpSettings::from_file(f).unwrap();
        assert_eq!((s.response_timeout, s.max_body), (Duration::from_secs(5), 10));
        let f: HttpFile = toml::from_str("max_requests_per_listener = 0").unwrap();
        assert!(HttpSettings::from_file(f).is_err());
        let f: HttpFile = toml::from_str("kept_rendezvous_idle = \"2s\"").unwrap();
        assert_eq!(HttpSettings::from_file(f).unwrap().kept_idle, Duration::from_secs(2));
        let f: HttpFile = toml::from_str("kept_rendezvous_idle = \"0s\"").unwrap();
        assert!(HttpSettings::from_file(f).is_err());
        assert!(toml::from_str::<HttpFile>("nope = 1").is_err());
    }
}
