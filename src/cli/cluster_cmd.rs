//! `hyrelay cluster ...`: the state of a relay cluster in Redis, and growing a single
//! node into a cluster without re-keying anything.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::relay::cluster::{self, catalog};
use crate::relay::store::State;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// The cluster's Redis: redis://HOST:PORT[/DB] or rediss://... (a password goes in
    /// HYRELAY_REDIS_PASSWORD or --redis-password-file).
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "HYRELAY_REDIS",
        hide_env_values = true
    )]
    redis: Option<String>,
    /// File holding the Redis password.
    #[arg(long, global = true, value_name = "FILE")]
    redis_password_file: Option<PathBuf>,
    /// Extra CA certificate for rediss:// (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    redis_ca_file: Option<PathBuf>,
    /// Prefix of the cluster's Redis keys (`[cluster] key_prefix`).
    #[arg(long, global = true, default_value = "hyrelay")]
    key_prefix: String,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The catalog in Redis and every node: public URL, listeners, tunnels, last heartbeat.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Copy a catalog into an empty Redis, keeping every key: a single relay's state.json
    /// (--data-dir), or a node's cached copy to restore a lost one (--from-cache).
    Import {
        /// A single relay's data directory (its state.json is imported; the relay's hcms and
        /// bridges keep their connection strings).
        #[arg(
            long,
            value_name = "DIR",
            conflicts_with = "from_cache",
            required_unless_present = "from_cache"
        )]
        data_dir: Option<PathBuf>,
        /// A cluster node's cluster-cache.json: restores that cluster's catalog (same id), so
        /// nodes that kept serving from their copy resume.
        #[arg(long, value_name = "FILE")]
        from_cache: Option<PathBuf>,
    },
}

/// A Redis client for the command line's settings (no public URL needed here).
fn client(args: &ClusterArgs) -> anyhow::Result<redis::Client> {
    let redis = args
        .redis
        .clone()
        .context("give the cluster's Redis with --redis URL (or HYRELAY_REDIS)")?;
    let file = cluster::config::ClusterFile {
        redis: Some(redis),
        redis_password_file: args.redis_password_file.clone(),
        redis_ca_file: args.redis_ca_file.clone(),
        public_url: Some("ws://cli.invalid:1".into()),
        key_prefix: Some(args.key_prefix.clone()),
        ..Default::default()
    };
    let cfg = file.validate(None)?.context("a Redis URL")?;
    cluster::client(&cfg)
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let client = client(&args)?;
    let prefix = args.key_prefix.clone();
    match args.command {
        ClusterCommand::Status { json } => super::block_on(status(&client, &prefix, json))??,
        ClusterCommand::Import { data_dir, from_cache } => {
            let (state, id, source) = match (data_dir, from_cache) {
                (Some(dir), _) => {
                    let path = dir.join("state.json");
                    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    let state: State =
                        serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
                    (state, None, path)
                }
                (None, Some(file)) => {
                    let dir = file.parent().unwrap_or(std::path::Path::new("."));
                    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    anyhow::ensure!(
                        name == catalog::CACHE_FILE,
                        "--from-cache takes a node's {} file",
                        catalog::CACHE_FILE
                    );
                    let snap =
                        catalog::read_cache(dir)?.with_context(|| format!("{} does not exist", file.display()))?;
                    let state = snap
                        .to_state()
                        .map_err(|why| anyhow::anyhow!("{}: {why}", file.display()))?;
                    (state, Some(snap.cluster_id), file)
                }
                (None, None) => unreachable!("clap requires one"),
            };
            let hcs = state.hybrid_connections.len();
            let id = super::block_on(cluster::import(&client, &prefix, &state, id.as_deref()))??;
            println!(
                "imported {} ({hcs} hybrid connections, every key kept) as cluster {id}",
                source.display()
            );
            println!(
                "next: start each node with --redis and its own --public-url; hcms and bridges keep their connection strings"
            );
        }
    }
    Ok(())
}

async fn status(client: &redis::Client, prefix: &str, json: bool) -> anyhow::Result<()> {
    let (catalog, mut nodes) = cluster::status(client, prefix).await?;
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    if json {
        let v = serde_json::json!({
            "catalog": catalog.as_ref().map(|(id, version, hcs)| serde_json::json!({
                "clusterId": id, "version": version, "hybridConnections": hcs,
            })),
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &catalog {
        Some((id, version, hcs)) => println!("catalog {id}, version {version}, {hcs} hybrid connections"),
        None => println!("no catalog in this Redis (a new cluster creates one; `hyrelay cluster import` restores one)"),
    }
    let now_ms = crate::proto::sas::unix_now() * 1000;
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                n.url.clone(),
                n.listeners.len().to_string(),
                n.tunnels.values().sum::<u64>().to_string(),
                format!("{:.1} s ago", now_ms.saturating_sub(n.at_ms) as f64 / 1000.0),
                if n.draining { "draining".into() } else { "up".into() },
            ]
        })
        .collect();
    super::print_table(
        &["NODE", "PUBLIC URL", "LISTENERS", "TUNNELS", "LAST HEARTBEAT", "STATE"],
        &rows,
    );
    Ok(())
}
