//! Command-line flags of `changeagent-server`; every flag can also be set through its
//! `CHANGEAGENT_…` environment variable.

use std::path::PathBuf;
use std::time::Duration;

/// Configuration of one core node.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "changeagent-server", version, about = "ChangeAgent core node")]
pub struct Config {
    /// Address to listen on for the API and Raft RPCs (port 0 picks a free port).
    #[arg(long, env = "CHANGEAGENT_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: String,

    /// Directory for the change store, the Raft log and snapshots.
    #[arg(long, env = "CHANGEAGENT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address other nodes use to reach this one (default: the bound listen address).
    #[arg(long, env = "CHANGEAGENT_ADVERTISE")]
    pub advertise: Option<String>,

    /// Largest accepted request body, in bytes (larger bodies get 413).
    #[arg(long, env = "CHANGEAGENT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Longest long-poll a client may ask for with `block`, in seconds.
    #[arg(long, env = "CHANGEAGENT_MAX_BLOCK_SECS", default_value_t = 300)]
    pub max_block_secs: u64,

    /// How long a write may wait for commit before it answers 503.
    #[arg(long, env = "CHANGEAGENT_WRITE_TIMEOUT_MS", default_value_t = 5000)]
    pub write_timeout_ms: u64,

    /// Raft heartbeat interval; also the AppendEntries timeout, so it must exceed a round
    /// trip plus one fsync.
    #[arg(long, env = "CHANGEAGENT_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,

    /// Minimum Raft election timeout; the maximum is twice this.
    #[arg(long, env = "CHANGEAGENT_ELECTION_TIMEOUT_MS", default_value_t = 400)]
    pub election_timeout_ms: u64,

    /// Raft log entries between snapshots (each entry may carry many changes).
    #[arg(long, env = "CHANGEAGENT_SNAPSHOT_LOGS", default_value_t = 20_000)]
    pub snapshot_logs: u64,

    /// How long shutdown waits for in-flight requests before it stops serving.
    #[arg(long, env = "CHANGEAGENT_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,
}

impl Config {
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// Checks values that clap cannot; call once at startup.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= self.heartbeat_ms {
            return Err(format!(
                "--election-timeout-ms ({}) must be larger than --heartbeat-ms ({}), which must be > 0",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes must be at least 1024".into());
        }
        if self.write_timeout_ms == 0 || self.snapshot_logs == 0 {
            return Err("--write-timeout-ms and --snapshot-logs must be > 0".into());
        }
        Ok(())
    }
}
