//! `cluster`: runs a local N-node ChangeAgent core cluster of the
//! `changeagent-server` binary on loopback (node i on 127.0.0.(10+i), all
//! started with one `--peers` file in a temporary directory), finds the
//! leader through `GET /health`, and SIGKILLs and restarts single nodes.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tempfile::TempDir;

use crate::server::Server;

/// Last octet of node 1's loopback address (127.0.0.11); node i gets 10 + i.
/// Every node has its own address, so its outgoing peer connections (which
/// the server makes from its listen IP) are told apart in `ss` and logs.
const FIRST_HOST: u8 = 11;

/// Largest cluster: the nodes' addresses must stay within 127.0.0.0/8's last
/// octet, and more than a handful of nodes on one machine measures nothing.
pub const MAX_NODES: usize = 9;

/// How long a spawned node may take until it answers `GET /health` (opening
/// RocksDB and replaying the Raft log on a loaded 2-core machine).
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);

/// How long the cluster may take to elect a leader every node agrees on.
pub const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// Timeout of one `GET /health`: a live node answers in microseconds, a dead
/// or stopped one must not hold up the poll loop.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Gap between two looks at the nodes' health while waiting; a polling
/// period, never a synchronisation delay. It is also the resolution of the
/// election time `failover` reports.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Log lines of a node quoted in an error about it.
const LOG_TAIL_LINES: usize = 15;

/// Where the server binary is looked for when neither `--server-bin` nor
/// `CHANGEAGENT_SERVER_BIN` says.
const BUILD_HINT: &str = "build first: cargo build --release --workspace --bins \
     (or pass --server-bin / set CHANGEAGENT_SERVER_BIN)";

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
        default_value_t = 250
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

    /// The flags every node gets besides its own address and data dir.
    fn common_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--heartbeat-ms".to_string(),
            self.heartbeat_ms.to_string(),
            "--election-timeout-ms".to_string(),
            self.election_timeout_ms.to_string(),
        ];
        flags.extend(self.server_args.iter().filter(|a| !a.is_empty()).cloned());
        flags
    }
}

/// `GET /health` of one node (the client library's type).
pub type NodeHealth = changeagent_client::types::Health;

/// One node: its address, files and (while running) its process.
struct Node {
    addr: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The running server; `None` after [`LocalCluster::kill9`] until
    /// [`LocalCluster::restart`]. Killed when the cluster is dropped.
    child: Option<Child>,
    server: Server,
}

/// A local cluster of `changeagent-server` processes in one temporary
/// directory. Dropping it SIGKILLs every node and (unless kept) removes the
/// directory.
pub struct LocalCluster {
    /// Owns the peers file, the data dirs and the logs.
    dir: TempDir,
    bin: PathBuf,
    flags: Vec<String>,
    nodes: Vec<Node>,
}

impl LocalCluster {
    /// Starts `size` nodes with one peers file and waits until each answers
    /// and all agree on a leader. On failure the directory is kept and the
    /// error quotes the log of the node that failed.
    pub async fn start(size: usize, args: &NodeArgs) -> Result<Self> {
        if !(1..=MAX_NODES).contains(&size) {
            bail!("--cluster must be within 1..={MAX_NODES}");
        }
        let bin = server_bin(args.server_bin.as_deref())?;
        if bin.components().any(|c| c.as_os_str() == "debug") {
            eprintln!(
                "note: {} looks like a debug build; the figures will measure it, not the \
                 release server (cargo build --release --workspace --bins)",
                bin.display()
            );
        }
        std::fs::create_dir_all(&args.cluster_dir)
            .with_context(|| format!("creating --cluster-dir {}", args.cluster_dir.display()))?;
        // Absolute, so the printed paths can be used from anywhere.
        let parent = args
            .cluster_dir
            .canonicalize()
            .with_context(|| format!("resolving --cluster-dir {}", args.cluster_dir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("changeagent-bench-cluster-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a cluster directory in {}", parent.display()))?;
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let addr = free_addr(node_ip(i))?;
            let name = format!("node{}", i + 1);
            nodes.push(Node {
                addr,
                data_dir: dir.path().join(&name),
                log_path: dir.path().join(format!("{name}.log")),
                child: None,
                server: Server::new(&format!("http://{addr}"))?,
            });
        }
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        std::fs::write(dir.path().join("peers"), peers_file(&addrs))
            .context("writing the peers file")?;
        let mut cluster = Self {
            dir,
            bin,
            flags: args.common_flags(),
            nodes,
        };
        eprintln!("  … starting {}", cluster.describe());
        let started = async {
            for i in 0..size {
                cluster.spawn(i)?;
            }
            for i in 0..size {
                cluster.wait_answering(i).await?;
            }
            cluster.wait_leader(LEADER_DEADLINE).await
        }
        .await;
        if let Err(err) = started {
            let kept = cluster.keep();
            return Err(err.context(format!(
                "starting the cluster failed; its data and logs are kept in {}",
                kept.display()
            )));
        }
        if args.keep_cluster_dir {
            cluster.keep();
        }
        Ok(cluster)
    }

    /// Number of nodes, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The HTTP client of node `i` (0-based).
    pub fn server(&self, i: usize) -> &Server {
        &self.nodes[i].server
    }

    /// Clients of every node, in node order.
    pub fn servers(&self) -> Vec<Server> {
        self.nodes.iter().map(|n| n.server.clone()).collect()
    }

    /// Process id of node `i`, when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// The temporary directory holding peers file, data dirs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `node 2 (127.0.0.12:40123)`.
    pub fn name(&self, i: usize) -> String {
        format!("node {} ({})", i + 1, self.nodes[i].addr)
    }

    /// One line saying what runs: the nodes, the binary, the flags used.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.addr.to_string()).collect();
        format!(
            "{}-node cluster {}: {} --peers <file> {} (data and logs in {})",
            self.nodes.len(),
            addrs.join(" "),
            self.bin.display(),
            self.flags.join(" "),
            self.dir.path().display()
        )
    }

    /// Keeps the directory after the cluster is dropped; returns its path.
    pub fn keep(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// SIGKILLs node `i` and reaps it: when this returns the process is gone.
    pub fn kill9(&mut self, i: usize) -> Result<()> {
        let Some(mut child) = self.nodes[i].child.take() else {
            bail!("{} is not running", self.name(i));
        };
        child
            .kill()
            .with_context(|| format!("kill -9 {}", self.name(i)))?;
        child
            .wait()
            .with_context(|| format!("waiting for {} to exit", self.name(i)))?;
        Ok(())
    }

    /// Starts the killed node `i` again on its data dir and address and
    /// waits until it answers.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_answering(i).await
    }

    /// Spawns node `i`, appending its stdout and stderr to its log.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        if node.child.is_some() {
            bail!("{} is already running", self.name(i));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("opening {}", node.log_path.display()))?;
        let stderr = log.try_clone().context("duplicating the log handle")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(node.addr.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--peers")
            .arg(self.dir.path().join("peers"))
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .env("NO_COLOR", "1");
        // The server reads every flag from CHANGEAGENT_* too: only the flags
        // printed with the results may apply.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHANGEAGENT_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Waits until node `i` answers `GET /health`; fails at once, quoting its
    /// log, if the process exits.
    async fn wait_answering(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + ANSWER_DEADLINE;
        loop {
            if let Some(status) = self.exited(i) {
                bail!(
                    "{} exited with {status} before answering; the end of its log {}:\n{}",
                    self.name(i),
                    self.nodes[i].log_path.display(),
                    self.log_tail(i)
                );
            }
            let last_error = match health(&self.nodes[i].server).await {
                Ok(_) => return Ok(()),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer GET /health within {} s (last: {last_error}); the end of \
                     its log {}:\n{}",
                    self.name(i),
                    ANSWER_DEADLINE.as_secs(),
                    self.nodes[i].log_path.display(),
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The exit status of node `i` if its process has ended (it is then
    /// reaped and marked as not running).
    fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let child = self.nodes[i].child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        self.nodes[i].child = None;
        Some(status)
    }

    /// The last lines of node `i`'s log, indented.
    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        if tail.is_empty() {
            return "    (empty)".to_string();
        }
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `GET /health` of every running node, in node order (`None` for a
    /// node that is stopped or did not answer).
    pub async fn healths(&self) -> Vec<Option<NodeHealth>> {
        let polls = self.nodes.iter().map(|node| async move {
            match node.child {
                Some(_) => health(&node.server).await.ok(),
                None => None,
            }
        });
        futures::future::join_all(polls).await
    }

    /// Waits until a majority of the nodes answer, one of them is leader and
    /// every answering node names it; returns its index. The error lists the
    /// last health seen of every node.
    pub async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let healths = self.healths().await;
            if let Some(leader) = agreed_leader(&healths) {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no leader all nodes agree on within {} s; last health seen:\n{}\n\
                     (logs: {})",
                    within.as_secs(),
                    self.health_table(&healths),
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the running nodes agree on a leader other than node
    /// `old`; returns its index and when that was first seen (polled every
    /// [`POLL_INTERVAL`]).
    pub async fn wait_new_leader(&self, old: usize, within: Duration) -> Result<(usize, Instant)> {
        let deadline = Instant::now() + within;
        loop {
            let healths = self.healths().await;
            if let Some(leader) = agreed_leader(&healths).filter(|&l| l != old) {
                return Ok((leader, Instant::now()));
            }
            if Instant::now() >= deadline {
                bail!(
                    "no new leader after {} within {} s; last health seen:\n{}\n(logs: {})",
                    self.name(old),
                    within.as_secs(),
                    self.health_table(&healths),
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until every answering node (a majority at least, node `i`
    /// among them) agrees on a leader and node `i` has applied every change
    /// up to `last_index`; returns the leader's index.
    pub async fn wait_caught_up(
        &self,
        i: usize,
        last_index: u64,
        within: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let healths = self.healths().await;
            let caught_up = healths[i]
                .as_ref()
                .is_some_and(|h| h.last_index >= last_index);
            if let (Some(leader), true) = (agreed_leader(&healths), caught_up) {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not catch up to _id {last_index} under an agreed leader within {} s; \
                     last health seen:\n{}\n(log: {})",
                    self.name(i),
                    within.as_secs(),
                    self.health_table(&healths),
                    self.nodes[i].log_path.display()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Every node's health now, one line each, for errors.
    pub async fn status(&self) -> String {
        self.health_table(&self.healths().await)
    }

    /// Passes `result` on; when it is an error, keeps the cluster directory
    /// (so the nodes' logs can be read) and says where it is.
    pub fn keep_on_error<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            let kept = self.keep();
            eprintln!(
                "note: the cluster's data and logs are kept in {}",
                kept.display()
            );
        }
        result
    }

    /// One line per node with its last health, for errors.
    fn health_table(&self, healths: &[Option<NodeHealth>]) -> String {
        healths
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                Some(h) => format!(
                    "    {}: {} id {:?}, leader {:?}, term {}, lastIndex {}",
                    self.name(i),
                    h.role,
                    h.node_id,
                    h.leader,
                    h.term,
                    h.last_index
                ),
                None if self.nodes[i].child.is_none() => format!("    {}: stopped", self.name(i)),
                None => format!("    {}: no answer", self.name(i)),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // Best effort: the process may already have exited.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `GET /health` of one node.
pub async fn health(server: &Server) -> Result<NodeHealth> {
    let body = server.get_ok("/health", HEALTH_TIMEOUT).await?;
    serde_json::from_slice(&body)
        .with_context(|| format!("GET {}: not a health document", server.url("/health")))
}

/// The index of the node that answers as leader (the highest term wins if
/// a stale one still claims it), provided a majority of all nodes answered
/// and every answering follower names it.
pub fn agreed_leader(healths: &[Option<NodeHealth>]) -> Option<usize> {
    let answered = healths.iter().flatten().count();
    if answered * 2 <= healths.len() {
        return None;
    }
    let (index, leader) = healths
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|h| (i, h)))
        .filter(|(_, h)| h.role == "leader")
        .max_by_key(|(_, h)| h.term)?;
    let id = leader.node_id?;
    let agreed = healths
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .filter_map(|(_, h)| h.as_ref())
        .all(|h| h.leader == Some(id) && h.term == leader.term);
    agreed.then_some(index)
}

/// Loopback address of node `i` (0-based).
fn node_ip(i: usize) -> Ipv4Addr {
    // `start` caps the node count at MAX_NODES, far below 255 - FIRST_HOST.
    let host = FIRST_HOST.saturating_add(u8::try_from(i).unwrap_or(u8::MAX));
    Ipv4Addr::new(127, 0, 0, host)
}

/// A port on `ip` that nothing listens on right now (bound and released at
/// once; the node binds it a moment later).
fn free_addr(ip: Ipv4Addr) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("finding a free port on {ip} (is 127.0.0.0/8 on loopback?)"))?;
    listener.local_addr().context("reading the bound address")
}

/// The peers file: one advertise address per line.
fn peers_file(addrs: &[SocketAddr]) -> String {
    let mut text = String::from("# written by changeagent-bench: one node per line\n");
    for addr in addrs {
        text.push_str(&format!("{addr}\n"));
    }
    text
}

/// The server binary: `flag` (`--server-bin` / `CHANGEAGENT_SERVER_BIN`),
/// else `changeagent-server` next to this executable.
pub fn server_bin(flag: Option<&Path>) -> Result<PathBuf> {
    let path = match flag {
        Some(path) => path.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("locating this executable")?;
            exe.parent()
                .map(|dir| dir.join("changeagent-server"))
                .context("this executable has no directory")?
        }
    };
    if !path.is_file() {
        bail!(
            "changeagent-server binary not found at {}: {BUILD_HINT}",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(role: &str, id: u64, leader: Option<u64>, term: u64) -> Option<NodeHealth> {
        Some(NodeHealth {
            role: role.to_string(),
            node_id: Some(id),
            leader,
            term,
            cluster_id: None,
            first_index: 1,
            last_index: 0,
            applied_log_index: None,
            lag: 0,
        })
    }

    #[test]
    fn leader_needs_a_majority_that_agrees() {
        let all = [
            health("follower", 1, Some(2), 3),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&all), Some(1));
        // One node down: two of three still agree.
        let one_down = [
            None,
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&one_down), Some(1));
        // A follower still naming the old leader: not yet.
        let stale = [
            health("follower", 1, Some(9), 2),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&stale), None);
        // Only one of three answering: no majority.
        let alone = [None, health("leader", 2, Some(2), 3), None];
        assert_eq!(agreed_leader(&alone), None);
        // An old leader that has not noticed yet loses to the higher term.
        let two_leaders = [
            health("leader", 1, Some(1), 2),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&two_leaders), None);
        let candidates = [
            health("candidate", 1, None, 4),
            health("follower", 2, None, 4),
            health("candidate", 3, None, 4),
        ];
        assert_eq!(agreed_leader(&candidates), None);
    }

    #[test]
    fn health_parses_the_documented_fields() {
        let body = br#"{"role":"follower","nodeId":12,"leader":7,"term":3,"clusterId":"c",
                        "firstIndex":1,"lastIndex":40,"appliedLogIndex":41,"lag":0}"#;
        let h: NodeHealth = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (h.role.as_str(), h.node_id, h.leader, h.term, h.last_index),
            ("follower", Some(12), Some(7), 3, 40)
        );
    }

    #[test]
    fn nodes_get_their_own_loopback_address_and_a_peers_line() {
        assert_eq!(node_ip(0), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(node_ip(2), Ipv4Addr::new(127, 0, 0, 13));
        let a = free_addr(node_ip(0)).unwrap();
        let b = free_addr(node_ip(1)).unwrap();
        assert_ne!(a.ip(), b.ip());
        let text = peers_file(&[a, b]);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines, [a.to_string(), b.to_string()]);
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = server_bin(Some(Path::new("/nonexistent/changeagent-server"))).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("cargo build --release --workspace --bins"),
            "{text}"
        );
    }

    #[test]
    fn common_flags_carry_timing_and_extra_args() {
        let args = NodeArgs {
            server_bin: None,
            heartbeat_ms: 50,
            election_timeout_ms: 200,
            cluster_dir: PathBuf::from("."),
            keep_cluster_dir: false,
            server_args: vec!["--write-timeout-ms".into(), "2000".into(), String::new()],
        };
        assert_eq!(
            args.common_flags(),
            [
                "--heartbeat-ms",
                "50",
                "--election-timeout-ms",
                "200",
                "--write-timeout-ms",
                "2000"
            ]
        );
        assert!(args.validate().is_ok());
        let bad = NodeArgs {
            election_timeout_ms: 50,
            ..args
        };
        assert!(bad.validate().is_err());
    }
}
