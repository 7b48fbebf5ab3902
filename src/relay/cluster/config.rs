//! The `[cluster]` settings of a relay node: where Redis is, how this node is named and
//! reached, and the timers of presence and routing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::config::opt_duration;
use crate::proto::Secret;
use crate::proto::connstr::RelayEndpoint;

/// Environment variable that may hold the Redis password (instead of the URL or a file).
pub const PASSWORD_ENV: &str = "HYRELAY_REDIS_PASSWORD";

/// A cluster node's validated settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS). Holds the password if
    /// the URL has one: never logged ([`ClusterConfig::redis_display`]).
    pub redis: Secret,
    /// Password from `redis_password_file` or [`PASSWORD_ENV`]; replaces the URL's.
    pub password: Option<Secret>,
    /// Extra CA certificates for `rediss://` (PEM); the system store is trusted too.
    pub ca_files: Vec<PathBuf>,
    /// This node's name in the cluster. Default: its public URL's `host:port`.
    pub node_id: String,
    /// This node's own URL (wss://node-2.example.com): rendezvous addresses of senders that
    /// arrive here name it, so an hcm opens its rendezvous on the node where the sender
    /// waits. Required.
    pub public_url: RelayEndpoint,
    /// The address clients use for the whole cluster (the load balancer), written into the
    /// connection strings the management API prints. Default: the `Host` the request came
    /// in on.
    pub service_url: Option<RelayEndpoint>,
    /// Prefix of every Redis key, so several clusters may share one Redis. Default: `hyrelay`.
    pub key_prefix: String,
    /// How long a node's presence lives without a heartbeat (beats every second). Default: 5 s.
    pub presence_ttl: Duration,
    /// How long a node waits for another node to hand an `accept` to its listener before it
    /// tries another listener. Default: 2 s.
    pub route_timeout: Duration,
}

impl ClusterConfig {
    /// The Redis URL without its password, for logs and status.
    pub fn redis_display(&self) -> String {
        redacted(self.redis.expose())
    }
}

/// `url` with any password replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".into();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// The `[cluster]` table of the relay's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub redis: Option<String>,
    pub redis_password_file: Option<PathBuf>,
    pub redis_ca_file: Option<PathBuf>,
    pub node_id: Option<String>,
    pub public_url: Option<String>,
    pub service_url: Option<String>,
    pub key_prefix: Option<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub presence_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub route_timeout: Option<Duration>,
}

impl ClusterFile {
    /// `None` when no Redis is configured (a single node); `public_url` is the relay's own
    /// top-level setting, used when the table does not name one.
    pub fn validate(self, public_url: Option<&RelayEndpoint>) -> anyhow::Result<Option<ClusterConfig>> {
        let Some(redis) = self.redis else {
            if self.node_id.is_some() || self.service_url.is_some() || self.redis_password_file.is_some() {
                bail!("field `cluster.redis`: the other [cluster] settings need a Redis URL");
            }
            return Ok(None);
        };
        let lower = redis.to_ascii_lowercase();
        if !(lower.starts_with("redis://") || lower.starts_with("rediss://")) {
            bail!(
                "field `cluster.redis`: expected redis://HOST:PORT[/DB] or rediss://..., got {}",
                redacted(&redis)
            );
        }
        redis::Client::open(redis.as_str()).map_err(|e| anyhow::anyhow!("field `cluster.redis`: {e}"))?;
        let public_url = match self.public_url.as_deref() {
            Some(u) => RelayEndpoint::parse(u).context("field `cluster.public_url`: expected wss://HOST[:PORT]")?,
            None => public_url.cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "a cluster node needs its own public URL (--public-url wss://node-1.example.com, or `public_url`): \
                     rendezvous addresses must name the node where the sender waits"
                )
            })?,
        };
        let service_url = self
            .service_url
            .as_deref()
            .map(RelayEndpoint::parse)
            .transpose()
            .context("field `cluster.service_url`: expected wss://HOST[:PORT]")?;
        let node_id = match self.node_id {
            Some(n) => {
                if n.is_empty() || n.len() > 128 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                {
                    bail!("field `cluster.node_id`: 1 to 128 letters, digits, '-', '_', '.' or ':'");
                }
                n
            }
            None => format!("{}:{}", public_url.host, public_url.port),
        };
        let key_prefix = self.key_prefix.unwrap_or_else(|| "hyrelay".into());
        if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
            bail!("field `cluster.key_prefix`: a non-empty name without braces or spaces");
        }
        let password = match (&self.redis_password_file, std::env::var(PASSWORD_ENV)) {
            (Some(f), _) => Some(Secret::new(
                std::fs::read_to_string(f)
                    .with_context(|| format!("field `cluster.redis_password_file`: reading {}", f.display()))?
                    .trim()
                    .to_owned(),
            )),
            (None, Ok(p)) if !p.is_empty() => Some(Secret::new(p)),
            _ => None,
        };
        let presence_ttl = self.presence_ttl.unwrap_or(Duration::from_secs(5));
        if presence_ttl < Duration::from_secs(2) {
            bail!("field `cluster.presence_ttl`: at least 2s (nodes beat every second)");
        }
        let route_timeout = self.route_timeout.unwrap_or(Duration::from_secs(2));
        if route_timeout.is_zero() {
            bail!("field `cluster.route_timeout`: must be longer than 0s");
        }
        Ok(Some(ClusterConfig {
            redis: Secret::new(redis),
            password,
            ca_files: self.redis_ca_file.into_iter().collect(),
            node_id,
            public_url,
            service_url,
            key_prefix,
            presence_ttl,
            route_timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(redis: &str) -> ClusterFile {
        ClusterFile {
            redis: Some(redis.into()),
            ..Default::default()
        }
    }

    #[test]
    fn needs_a_public_url_and_derives_the_node_id() {
        let e = file("redis://127.0.0.1:6379").validate(None).unwrap_err().to_string();
        assert!(e.contains("--public-url"), "{e}");
        let url = RelayEndpoint::parse("wss://node-2.example.com").unwrap();
        let c = file("redis://127.0.0.1:6379/2").validate(Some(&url)).unwrap().unwrap();
        assert_eq!(c.node_id, "node-2.example.com:443");
        assert_eq!(c.key_prefix, "hyrelay");
        assert!(ClusterFile::default().validate(Some(&url)).unwrap().is_none());
    }

    #[test]
    fn refuses_bad_values_and_never_shows_the_password() {
        let url = RelayEndpoint::parse("wss://n").unwrap();
        let e = file("http://x").validate(Some(&url)).unwrap_err().to_string();
        assert!(e.contains("redis://"), "{e}");
        let e = file("mysql://u:hunter2@x")
            .validate(Some(&url))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(redacted("rediss://app:hunter2@r:6380/1"), "rediss://app:***@r:6380/1");
        assert_eq!(redacted("redis://r:6379"), "redis://r:6379");
        let bad_id = ClusterFile {
            node_id: Some("a b".into()),
            ..file("redis://r")
        };
        assert!(bad_id.validate(Some(&url)).is_err());
        let orphan = ClusterFile {
            node_id: Some("n1".into()),
            ..Default::default()
        };
        assert!(orphan.validate(Some(&url)).is_err());
    }
}
