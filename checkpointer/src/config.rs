//! Command-line flags of `changeagent-checkpointer`; every flag can also be set through its
//! `CHANGEAGENT_…` environment variable.

use std::path::PathBuf;

use changeagent_api::limits::{ListenerDefaults, ListenerFlags};
use changeagent_proto::Scope;

/// The checkpointer's listener defaults.
#[derive(Debug, Clone)]
pub struct CheckpointerListener;

impl ListenerDefaults for CheckpointerListener {
    /// A checkpointer serves only `/health` and `/metrics` to probes and scrapers; a
    /// thousand connections is far more than they open.
    const MAX_CONNECTIONS: &'static str = "1000";
}

/// Steps at which `--stop-at` stops the process (a test hook).
pub const STOP_STEPS: [&str; 5] = ["started", "uploading", "written", "verified", "ended"];

/// Configuration of one checkpointer.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "changeagent-checkpointer",
    version,
    about = "ChangeAgent checkpointer: tails the core and writes checkpoints to object storage"
)]
pub struct Config {
    /// Core nodes to tail and to send admin calls to (`http://host:port`, comma-separated);
    /// any node will do, the others are failover.
    #[arg(long, env = "CHANGEAGENT_CORE", value_delimiter = ',', required = true)]
    pub core: Vec<String>,

    /// Object store for the checkpoints, the same one the core serves them from
    /// (`file:///path`, `file://./relative`, `s3://bucket/prefix` with `AWS_*` variables).
    #[arg(
        long,
        env = "CHANGEAGENT_OBJECT_STORE",
        default_value = "file://./checkpoints"
    )]
    pub object_store: String,

    /// Directory for this checkpointer's copy of the state, its id and temp files.
    #[arg(
        long,
        env = "CHANGEAGENT_DATA_DIR",
        default_value = "./checkpointer-data"
    )]
    pub data_dir: PathBuf,

    /// The core's cluster secret, needed for the admin routes when the core has one.
    #[arg(
        long,
        env = "CHANGEAGENT_CLUSTER_SECRET",
        conflicts_with = "cluster_secret_file"
    )]
    pub cluster_secret: Option<String>,

    /// File holding the cluster secret (surrounding whitespace ignored).
    #[arg(long, env = "CHANGEAGENT_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// Checkpoint once this many changes arrived since the last checkpoint.
    #[arg(long, env = "CHANGEAGENT_EVERY_CHANGES", default_value_t = 100_000)]
    pub every_changes: u64,

    /// Checkpoint at least this often (seconds), when anything arrived since the last one.
    #[arg(long, env = "CHANGEAGENT_EVERY_SECONDS", default_value_t = 3600)]
    pub every_seconds: u64,

    /// Changes the core keeps before a checkpoint's index: after checkpoint N it truncates
    /// before N + 1 - retain, so consumers a little behind read on without a 410.
    #[arg(long, env = "CHANGEAGENT_RETAIN", default_value_t = 10_000)]
    pub retain: u64,

    /// Checkpoints of the scope kept in the object store (and listed by the core); older
    /// objects are deleted.
    #[arg(long, env = "CHANGEAGENT_KEEP", default_value_t = 3)]
    pub keep: u32,

    /// `all`, or `tenant=NAME` for one tenant's catalog, keys and changes (a scoped
    /// checkpoint never truncates the core).
    #[arg(long, env = "CHANGEAGENT_SCOPE", default_value = "all")]
    pub scope: Scope,

    /// Catch up with the core, write one checkpoint, and exit.
    #[arg(long, env = "CHANGEAGENT_ONCE")]
    pub once: bool,

    /// Address for `/health` and `/metrics` (port 0 picks a free port).
    #[arg(long, env = "CHANGEAGENT_LISTEN", default_value = "127.0.0.1:9200")]
    pub listen: String,

    /// Bytes per part of a multipart upload (at least 5 MiB for S3).
    #[arg(long, env = "CHANGEAGENT_PART_BYTES", default_value_t = 8 * 1024 * 1024, hide = true)]
    pub part_bytes: usize,

    /// Test hook: stop the process (SIGSTOP) at this step of the first checkpoint, so a test
    /// can kill it there: started (start record), uploading (first part sent), written (upload
    /// done, not yet read back), verified, ended (end record, before latest.json).
    #[arg(long, env = "CHANGEAGENT_STOP_AT", hide = true)]
    pub stop_at: Option<String>,

    /// The token sent to the core: it follows the whole list (`read` without a tenant limit)
    /// and writes checkpoint records (`admin`; a tenant-limited one is enough for that
    /// tenant's scope).
    #[command(flatten)]
    pub token: changeagent_client::TokenFlags,

    /// The CA trusted for an `https://` core.
    #[command(flatten)]
    pub ca: changeagent_client::CaFlags,

    /// The tokens this checkpointer's own API (`/metrics`) accepts; `/health` stays open.
    #[command(flatten)]
    pub auth: changeagent_api::auth::AuthFlags,

    /// The certificate of this checkpointer's own API (HTTPS).
    #[command(flatten)]
    pub tls: changeagent_api::tls::TlsFlags,

    #[command(flatten)]
    pub listener: ListenerFlags<CheckpointerListener>,
}

impl Config {
    /// The cluster secret from `--cluster-secret` or `--cluster-secret-file`, if any.
    pub fn secret(&self) -> anyhow::Result<Option<String>> {
        let secret = match (&self.cluster_secret, &self.cluster_secret_file) {
            (Some(s), _) => s.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    anyhow::anyhow!("cannot read --cluster-secret-file {}: {e}", path.display())
                })?
                .trim()
                .to_owned(),
            (None, None) => return Ok(None),
        };
        if secret.is_empty() {
            anyhow::bail!("the cluster secret is empty");
        }
        Ok(Some(secret))
    }

    /// Checks values that clap cannot; call once at startup.
    pub fn validate(&self) -> Result<(), String> {
        if self.every_changes == 0 || self.every_seconds == 0 {
            return Err("--every-changes and --every-seconds must be > 0".into());
        }
        if self.keep == 0 {
            return Err("--keep must be at least 1".into());
        }
        if self.part_bytes < 64 * 1024 {
            return Err("--part-bytes must be at least 65536".into());
        }
        if let Some(step) = &self.stop_at {
            if !STOP_STEPS.contains(&step.as_str()) {
                return Err(format!("--stop-at must be one of {STOP_STEPS:?}"));
            }
        }
        self.listener.validate()
    }
}
