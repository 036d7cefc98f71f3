//! Command-line flags of `changeagent-server`; every flag can also be set through its
//! `CHANGEAGENT_…` environment variable.

use std::path::PathBuf;
use std::time::Duration;

use changeagent_api::limits::{parse_duration, ListenerDefaults, ListenerFlags};

/// The core's listener defaults.
#[derive(Debug, Clone)]
pub struct CoreListener;

impl ListenerDefaults for CoreListener {
    /// A core's clients are edges, checkpointers and direct consumers, not whole fleets
    /// (those go through edges); at hyper's two 8 KiB buffers per connection 20,000
    /// connections stay under a gigabyte.
    const MAX_CONNECTIONS: &'static str = "20000";
}

/// Default `--max-long-polls` of a core: three quarters of its default `--max-connections`,
/// so a flood of long-polls still leaves 5,000 connections for writes, reads and the cluster.
pub const MAX_LONG_POLLS: usize = 15_000;

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
    #[arg(long, env = "CHANGEAGENT_MAX_BODY_BYTES", default_value_t = changeagent_proto::limits::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Longest long-poll a client may ask for with `block`, in seconds.
    #[arg(long, env = "CHANGEAGENT_MAX_BLOCK_SECS", default_value_t = 300)]
    pub max_block_secs: u64,

    /// Long-polls waiting at once at most; one more is answered 503 with `Retry-After: 5`.
    #[arg(long, env = "CHANGEAGENT_MAX_LONG_POLLS", default_value_t = MAX_LONG_POLLS)]
    pub max_long_polls: usize,

    /// How long a write may wait for commit before it answers 503.
    #[arg(long, env = "CHANGEAGENT_WRITE_TIMEOUT_MS", default_value_t = 5000)]
    pub write_timeout_ms: u64,

    /// Raft heartbeat interval; also the AppendEntries timeout, so it must exceed a round
    /// trip plus one fsync.
    #[arg(long, env = "CHANGEAGENT_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,

    /// Minimum Raft election timeout; the maximum is 1.5 times this. Followers also refuse
    /// votes for that maximum after the last heartbeat (the leader lease), so a failover takes
    /// one to two maximums. Raise it where a disk can stall for longer than the lease plus
    /// this (a follower that misses heartbeats that long starts an election).
    #[arg(long, env = "CHANGEAGENT_ELECTION_TIMEOUT_MS", default_value_t = 150)]
    pub election_timeout_ms: u64,

    /// Pre-Vote (`true` or `false`): a follower whose election timeout fires first asks the
    /// others whether they would vote for it, and starts an election (a new term) only if a
    /// majority would. A node that was cut off then cannot raise the term and unseat a working
    /// leader when it returns, and a follower with a shorter log does not hold a term the
    /// follower with the longest log must outbid (an extra election timeout after a crash).
    /// It costs one round trip per election. Peers of a version without it count as granting.
    #[arg(
        long,
        env = "CHANGEAGENT_PRE_VOTE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub pre_vote: bool,

    /// Raft log entries between snapshots (each entry may carry many changes).
    #[arg(long, env = "CHANGEAGENT_SNAPSHOT_LOGS", default_value_t = 20_000)]
    pub snapshot_logs: u64,

    /// Raft log entries kept behind a snapshot, so a briefly lagging follower catches up
    /// from the log instead of a whole snapshot.
    #[arg(long, env = "CHANGEAGENT_SNAPSHOT_KEEP_LOGS", default_value_t = 1000)]
    pub snapshot_keep_logs: u64,

    /// File listing the initial members, one `host:port` (advertise address) per line, this
    /// node included. Start every listed node with the same file: the node with the lowest
    /// address initializes the cluster once it has reached all of them.
    #[arg(long, env = "CHANGEAGENT_PEERS", conflicts_with = "join")]
    pub peers: Option<PathBuf>,

    /// URL of any member of an existing cluster (`http://host:port`, `https://` with
    /// `--peer-ca`): this node asks to join,
    /// catches up as a learner, then becomes a voter.
    #[arg(long, env = "CHANGEAGENT_JOIN")]
    pub join: Option<String>,

    /// Shared secret required on Raft RPCs and membership routes (header
    /// `X-Cluster-Secret`); every node of a cluster must use the same one.
    #[arg(
        long,
        env = "CHANGEAGENT_CLUSTER_SECRET",
        conflicts_with = "cluster_secret_file"
    )]
    pub cluster_secret: Option<String>,

    /// File holding the cluster secret (surrounding whitespace ignored).
    #[arg(long, env = "CHANGEAGENT_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,

    /// How long shutdown waits for in-flight requests before it stops serving.
    #[arg(long, env = "CHANGEAGENT_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    pub drain_timeout_ms: u64,

    /// Object store holding the checkpoints (`file:///path`, `file://./relative`,
    /// `s3://bucket/prefix` with `AWS_*` variables, `gs://…`, `az://…`). Use the same store as
    /// the checkpointers: `GET /checkpoints/{index}/data` streams from it.
    #[arg(
        long,
        env = "CHANGEAGENT_OBJECT_STORE",
        default_value = "file://./checkpoints"
    )]
    pub object_store: String,

    /// How long a checkpoint start blocks other checkpointers of its scope (`600`, `90s`,
    /// `10m`, `1h`); after that another may take it over.
    #[arg(
        long,
        env = "CHANGEAGENT_CHECKPOINT_STALE_AFTER",
        default_value = "10m",
        value_parser = parse_duration
    )]
    pub checkpoint_stale_after: Duration,

    /// On an empty data dir: start a new one-voter cluster (new cluster id) whose state is the
    /// newest full checkpoint in this object store URL (`latest.json` of any cluster under
    /// it); its list starts after the checkpoint's index. Other nodes then join it. Ignored
    /// once the data dir holds a cluster.
    #[arg(long, env = "CHANGEAGENT_RESTORE_FROM", conflicts_with_all = ["peers", "join"])]
    pub restore_from: Option<String>,

    #[command(flatten)]
    pub auth: changeagent_api::auth::AuthFlags,

    #[command(flatten)]
    pub tls: changeagent_api::tls::TlsFlags,

    /// PEM file of the CA that signs the cluster's node certificates: every peer link (Raft
    /// RPCs, forwarded writes, joins) is then mutual TLS. This node presents `--tls-cert` to
    /// its peers and refuses peer requests from a client without a certificate this CA
    /// signed. Needs `--tls-cert`; every node of the cluster needs it.
    #[arg(long, env = "CHANGEAGENT_PEER_CA", requires = "tls_cert")]
    pub peer_ca: Option<PathBuf>,

    #[command(flatten)]
    pub listener: ListenerFlags<CoreListener>,
}

/// Largest `--max-body-bytes`: one request is at most one Raft entry, which must fit in one
/// AppendEntries request (see the router's limit on `/raft/append`).
pub const MAX_BODY_LIMIT: usize = 64 << 20;

impl Config {
    /// The maximum election timeout (also openraft's leader lease).
    pub fn election_timeout_max_ms(&self) -> u64 {
        self.election_timeout_ms + self.election_timeout_ms.div_ceil(2)
    }

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
        if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the cluster secret must be non-empty visible ASCII without spaces");
        }
        Ok(Some(secret))
    }

    /// The initial members listed in `--peers`, in file order.
    pub fn peer_list(&self) -> anyhow::Result<Option<Vec<String>>> {
        let Some(path) = &self.peers else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read --peers file {}: {e}", path.display()))?;
        let peers = parse_peers(&text)
            .map_err(|e| anyhow::anyhow!("bad --peers file {}: {e}", path.display()))?;
        Ok(Some(peers))
    }

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
        if !(1024..=MAX_BODY_LIMIT).contains(&self.max_body_bytes) {
            return Err(format!(
                "--max-body-bytes must be between 1024 and {MAX_BODY_LIMIT} (a body larger \
                 than what a peer takes in one Raft request could never be replicated)"
            ));
        }
        if self.write_timeout_ms == 0 || self.snapshot_logs == 0 {
            return Err("--write-timeout-ms and --snapshot-logs must be > 0".into());
        }
        if self.tls.tls_cert.is_some()
            && self.peer_ca.is_none()
            && (self.peers.is_some() || self.join.is_some())
        {
            return Err(
                "--tls-cert with --peers or --join needs --peer-ca, the CA that signed \
                 the nodes' certificates: the listener speaks only HTTPS, so peer links are \
                 mutual TLS"
                    .into(),
            );
        }
        if self.max_long_polls == 0 {
            return Err("--max-long-polls must be at least 1".into());
        }
        self.listener.validate()
    }
}

/// Parses a peers file: one `host:port` per line; blank lines and `#` comments are ignored;
/// an optional `http://` prefix is dropped.
pub fn parse_peers(text: &str) -> Result<Vec<String>, String> {
    let mut peers: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let addr = line
            .strip_prefix("http://")
            .unwrap_or(line)
            .trim_end_matches('/');
        let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(format!("line {}: {line:?} is not host:port", n + 1));
        }
        if peers.iter().any(|p| p == addr) {
            return Err(format!("line {}: {addr} is listed twice", n + 1));
        }
        peers.push(addr.to_owned());
    }
    if peers.is_empty() {
        return Err("it lists no peers".into());
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::parse_peers;

    #[test]
    fn peers_file_lines() {
        let text = "# core\n127.0.0.1:9001\n\n http://127.0.0.1:9002/ # second\n127.0.0.1:9003\n";
        assert_eq!(
            parse_peers(text).unwrap(),
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
        );
    }

    #[test]
    fn bad_peers_files_are_refused() {
        for bad in [
            "",
            "# only a comment\n",
            "127.0.0.1",
            "127.0.0.1:0",
            "a:1\na:1",
            ":80",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad:?} accepted");
        }
    }
}
