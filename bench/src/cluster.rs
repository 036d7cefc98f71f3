//! `cluster`: the flags for a local N-node core cluster of the
//! `changeagent-server` binary on loopback (node i on 127.0.0.(11+i), one
//! `--peers` file, a temporary directory), started with the test kit, which
//! also finds the leader and SIGKILLs and restarts nodes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::Binary;
use clap::Args;

use crate::server::Server;

/// Node 1's loopback address; node i gets the next ones. Every node has its
/// own address, so its outgoing peer connections (which the server makes
/// from its listen IP) are told apart in `ss` and logs.
const FIRST_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// Largest cluster: the nodes' addresses must stay within 127.0.0.0/8's last
/// octet, and more than a handful of nodes on one machine measures nothing.
pub const MAX_NODES: usize = 9;

/// `--cluster N` of `write` and `all`: benchmark a local cluster started
/// for the run instead of the node at `--server`.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Start a local cluster of this many nodes of the release server
    /// (loopback, one --peers file) and measure it: writes against the
    /// leader, then spread over all nodes; --server is ignored.
    #[arg(long, env = "CHANGEAGENT_BENCH_CLUSTER")]
    pub cluster: Option<usize>,
    #[command(flatten)]
    pub nodes: NodeArgs,
}

/// How the benchmark starts the nodes of a local cluster; shared by every
/// subcommand that can run one.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The changeagent-server binary (default: the one next to this
    /// executable, i.e. target/release/changeagent-server).
    #[arg(long, env = "CHANGEAGENT_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// `--heartbeat-ms` of every node (default: the server's).
    #[arg(long, env = "CHANGEAGENT_BENCH_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// `--election-timeout-ms` of every node (the minimum; the server derives
    /// the maximum from it; default: the server's).
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_ELECTION_TIMEOUT_MS",
        default_value_t = 150
    )]
    pub election_timeout_ms: u64,
    /// Directory in which the cluster's temporary directory (peers file,
    /// data dirs, one log per node) is created; put it on the disk to
    /// measure. It is removed afterwards unless --keep-cluster-dir is given
    /// or the run failed.
    #[arg(long, env = "CHANGEAGENT_BENCH_CLUSTER_DIR", default_value = ".")]
    pub cluster_dir: PathBuf,
    /// Keep the cluster directory (data and logs) after a successful run.
    #[arg(long, env = "CHANGEAGENT_BENCH_KEEP_CLUSTER_DIR")]
    pub keep_cluster_dir: bool,
    /// Extra flags for every node, split at spaces, repeatable, e.g.
    /// `--server-arg "--write-timeout-ms 2000"`.
    #[arg(
        long = "server-arg",
        env = "CHANGEAGENT_BENCH_SERVER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub server_args: Vec<String>,
}

impl NodeArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= self.heartbeat_ms {
            bail!("--election-timeout-ms must be larger than --heartbeat-ms, which must be > 0");
        }
        Ok(())
    }

    /// The binary the flags name: `--server-bin`, else the one next to
    /// this executable.
    fn binary(&self) -> Binary {
        match &self.server_bin {
            Some(path) => Binary::Path(path.clone()),
            None => Binary::server(),
        }
    }

    /// How to start `size` nodes of `bin` in a directory under `parent`:
    /// the timing flags and extra flags given, nothing else (the server's
    /// defaults apply), the directory kept if the start fails.
    fn options(&self, size: usize, bin: Binary, parent: &Path) -> ClusterOptions {
        let mut opts = ClusterOptions::new(size)
            .bin(bin)
            .timing(self.heartbeat_ms, self.election_timeout_ms)
            .write_timeout_ms(None)
            .dir_in(parent)
            .first_ip(FIRST_IP)
            .keep_dir_on_error();
        for arg in self.server_args.iter().filter(|a| !a.is_empty()) {
            opts = opts.arg(arg.clone());
        }
        opts
    }
}

/// Starts a local cluster of `size` nodes as `args` say and waits until
/// every node agrees on a leader. On failure the cluster's directory is
/// kept and the error quotes the log of the node that failed; with
/// `--keep-cluster-dir` it is kept anyway.
pub async fn start(size: usize, args: &NodeArgs) -> Result<Cluster> {
    if !(1..=MAX_NODES).contains(&size) {
        bail!("--cluster must be within 1..={MAX_NODES}");
    }
    let bin = located(args.binary())?;
    std::fs::create_dir_all(&args.cluster_dir)
        .with_context(|| format!("creating --cluster-dir {}", args.cluster_dir.display()))?;
    // Absolute, so the printed paths can be used from anywhere.
    let parent = args
        .cluster_dir
        .canonicalize()
        .with_context(|| format!("resolving --cluster-dir {}", args.cluster_dir.display()))?;
    eprintln!(
        "  … starting a {size}-node cluster of {} in {}",
        bin.display(),
        parent.display()
    );
    let opts = args.options(size, Binary::Path(bin), &parent);
    let mut cluster = Cluster::try_start_with_peers(opts).await?;
    if args.keep_cluster_dir {
        cluster.keep();
    }
    Ok(cluster)
}

/// Where binary `name` (`changeagent-server`, `changeagent-edge`, …) is:
/// `flag` when given, else its `CHANGEAGENT_<NAME>_BIN` variable, else next
/// to this executable. Notes a debug build.
pub fn locate(flag: Option<&PathBuf>, name: &str) -> Result<PathBuf> {
    located(match flag {
        Some(path) => Binary::Path(path.clone()),
        None => Binary::named(name),
    })
}

fn located(bin: Binary) -> Result<PathBuf> {
    let path = bin.locate()?;
    if path.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "note: {} looks like a debug build; the figures will measure it, not the \
             release build (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// The benchmark's HTTP client of every node, in node order.
pub fn servers(cluster: &Cluster) -> Result<Vec<Server>> {
    cluster
        .nodes
        .iter()
        .map(|n| Ok(Server::new(&n.url())?.with_pid(n.server.pid())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_flags_carry_timing_and_extra_args() {
        let args = NodeArgs {
            server_bin: None,
            heartbeat_ms: 50,
            election_timeout_ms: 200,
            cluster_dir: PathBuf::from("."),
            keep_cluster_dir: false,
            server_args: vec!["--write-timeout-ms".into(), "2000".into(), String::new()],
        };
        let opts = args.options(3, args.binary(), Path::new("."));
        assert_eq!(
            opts.node_flags(),
            [
                "--heartbeat-ms",
                "50",
                "--election-timeout-ms",
                "200",
                "--write-timeout-ms",
                "2000"
            ]
        );
        assert_eq!(opts.nodes, 3);
        assert_eq!(opts.first_ip, Some(FIRST_IP));
        assert!(opts.keep_dir_on_error);
        assert_eq!(opts.bin, Binary::server());
        assert!(args.validate().is_ok());
        let bad = NodeArgs {
            election_timeout_ms: 50,
            ..args
        };
        assert!(bad.validate().is_err());
    }
}
