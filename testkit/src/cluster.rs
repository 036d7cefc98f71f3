//! A Raft cluster of real node processes, each on its own loopback IP so a
//! [`Proxy`] in front of a node can tell peers apart by source IP: formed by
//! peers file or `--join`; leader waits, kills, restarts, partitions, and
//! convergence of every node's list (read at the nodes' real addresses).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::binary::Binary;
use crate::error::{Error, OrPanic, Result};
use crate::health::{node_health, wait_leader_where, NodeHealth, Probe, PROBE_TIMEOUT};
use crate::http::{change_id, raw_changes, Api};
use crate::process::{ServerOptions, ServerProcess};
use crate::proxy::Proxy;
use crate::tls::Certs;
use crate::wait::wait_until;

/// Raft heartbeat of test clusters (`--heartbeat-ms`).
pub const HEARTBEAT_MS: u64 = 100;

/// Minimum election timeout of test clusters (`--election-timeout-ms`): five
/// heartbeats, so a debug build on a loaded machine does not see spurious
/// elections, yet failover stays around a second.
pub const ELECTION_TIMEOUT_MS: u64 = 500;

/// `--write-timeout-ms` of test clusters: how long a write may wait for
/// commit before it answers 503.
pub const WRITE_TIMEOUT_MS: u64 = 2000;

/// Allowance on top of [`WRITE_TIMEOUT_MS`] for a 503 to reach the client
/// (debug build, two loaded cores, forwarding through a follower).
pub const WRITE_TIMEOUT_SLACK: Duration = Duration::from_secs(3);

/// Client-side timeout of one write attempt in fault tests: longer than the
/// server's write timeout plus slack, so a timeout here means the server did
/// not answer in time.
pub const CLIENT_TIMEOUT: Duration = Duration::from_millis(WRITE_TIMEOUT_MS + 3000);

/// How long formation, election, membership changes and convergence may
/// take (each on its own) before a test fails.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// Per-process counter of loopback IPs handed out.
static NEXT_HOST: AtomicU32 = AtomicU32::new(0);

/// A loopback IP no other node of this test process uses. The second and
/// third octets come from the process id, so test processes running in
/// parallel (nextest) mostly use disjoint IPs too.
pub fn next_ip() -> Ipv4Addr {
    let pid = std::process::id();
    let n = NEXT_HOST.fetch_add(1, Ordering::SeqCst);
    let b = 100 + (pid % 150) as u8;
    let c = ((pid / 150) % 256) as u8;
    let d = 10 + (n % 240) as u8;
    Ipv4Addr::new(127, b, c, d)
}

/// The IP of node `i`: `first` + `i` when given, else a fresh [`next_ip`]
/// (also past the end of 127.0.0.0/8, where `first` + `i` would leave it).
fn node_ip(first: Option<Ipv4Addr>, i: usize) -> Ipv4Addr {
    first
        .and_then(|first| u32::from(first).checked_add(u32::try_from(i).ok()?))
        .map(Ipv4Addr::from)
        .filter(Ipv4Addr::is_loopback)
        .unwrap_or_else(next_ip)
}

/// A `--peers` file: one advertise address per line, after a comment and a
/// blank line, both of which the format allows.
fn peers_file_text(addrs: &[SocketAddr]) -> String {
    let mut text = String::from("# advertise addresses of the cluster, one node per line\n\n");
    for addr in addrs {
        text.push_str(&format!("{addr}\n"));
    }
    text
}

/// A port that is free on `ip` right now (bind port 0, read it, release; the
/// node binds it a moment later).
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).map_err(Error::io(
        "binding port 0 (is 127.0.0.0/8 on loopback?) on",
        ip.to_string(),
    ))?;
    let addr = listener
        .local_addr()
        .map_err(Error::io("reading the bound address on", ip.to_string()))?;
    Ok(addr.port())
}

/// How to start a cluster. [`new`](Self::new) gives the test defaults; the
/// builders change one thing each.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Put a [`Proxy`] in front of every node (its advertise address), so
    /// the caller can partition nodes.
    pub proxies: bool,
    /// The node binary.
    pub bin: Binary,
    /// `--heartbeat-ms` of every node.
    pub heartbeat_ms: u64,
    /// `--election-timeout-ms` of every node.
    pub election_timeout_ms: u64,
    /// `--write-timeout-ms` of every node; `None` leaves the server's.
    pub write_timeout_ms: Option<u64>,
    /// Extra arguments for every node (after the timing flags).
    pub args: Vec<String>,
    /// Where the cluster's directory (peers file, one directory per node) is
    /// created; `None` is the system's temp dir.
    pub parent_dir: Option<PathBuf>,
    /// Node `i` listens on this IP + `i`; `None` gives each node a fresh
    /// [`next_ip`].
    pub first_ip: Option<Ipv4Addr>,
    /// Keep the cluster's directory when starting it fails.
    pub keep_dir_on_error: bool,
    /// Bearer token the harness's clients send (nodes started with `--auth-file`).
    pub token: Option<String>,
    /// Mutual TLS between the nodes and HTTPS for clients: each node gets a certificate
    /// from a throwaway CA in the cluster's directory (`--tls-cert`, `--tls-key`,
    /// `--peer-ca`).
    pub tls: bool,
}

impl ClusterOptions {
    /// `nodes` nodes, no proxies, the default test timings
    /// ([`HEARTBEAT_MS`], [`ELECTION_TIMEOUT_MS`], [`WRITE_TIMEOUT_MS`]).
    pub fn new(nodes: usize) -> Self {
        ClusterOptions {
            nodes,
            proxies: false,
            bin: Binary::server(),
            heartbeat_ms: HEARTBEAT_MS,
            election_timeout_ms: ELECTION_TIMEOUT_MS,
            write_timeout_ms: Some(WRITE_TIMEOUT_MS),
            args: Vec::new(),
            parent_dir: None,
            first_ip: None,
            keep_dir_on_error: false,
            token: None,
            tls: false,
        }
    }

    /// Every node serves HTTPS with a certificate from the cluster's throwaway CA
    /// ([`Cluster::certs`]), and peer links are mutual TLS; the harness's clients trust
    /// that CA.
    pub fn mtls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Every client the harness makes sends this bearer token (for nodes started with
    /// `--auth-file`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Puts a proxy in front of every node.
    pub fn with_proxies(mut self) -> Self {
        self.proxies = true;
        self
    }

    /// Appends an argument for every node.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts `bin` instead of `changeagent-server`.
    pub fn bin(mut self, bin: Binary) -> Self {
        self.bin = bin;
        self
    }

    /// Raft timing of every node.
    pub fn timing(mut self, heartbeat_ms: u64, election_timeout_ms: u64) -> Self {
        self.heartbeat_ms = heartbeat_ms;
        self.election_timeout_ms = election_timeout_ms;
        self
    }

    /// `--write-timeout-ms` of every node (`None`: the server's default).
    pub fn write_timeout_ms(mut self, ms: Option<u64>) -> Self {
        self.write_timeout_ms = ms;
        self
    }

    /// Creates the cluster's directory in `parent` (e.g. on the disk to
    /// measure).
    pub fn dir_in(mut self, parent: impl Into<PathBuf>) -> Self {
        self.parent_dir = Some(parent.into());
        self
    }

    /// Node `i` listens on `ip` + `i` (e.g. 127.0.0.11, .12, …), so they
    /// are easy to tell apart in `ss` and logs.
    pub fn first_ip(mut self, ip: Ipv4Addr) -> Self {
        self.first_ip = Some(ip);
        self
    }

    /// Keeps the cluster's directory (data and logs) when starting fails.
    pub fn keep_dir_on_error(mut self) -> Self {
        self.keep_dir_on_error = true;
        self
    }

    /// The flags every node gets besides its address, data dir and
    /// formation (`--advertise`, `--peers` or `--join`).
    pub fn node_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--heartbeat-ms".to_string(),
            self.heartbeat_ms.to_string(),
            "--election-timeout-ms".to_string(),
            self.election_timeout_ms.to_string(),
        ];
        if let Some(ms) = self.write_timeout_ms {
            flags.extend(["--write-timeout-ms".to_string(), ms.to_string()]);
        }
        flags.extend(self.args.iter().cloned());
        flags
    }
}

/// One member (or would-be member) of a cluster.
pub struct Node {
    /// `n0`, `n1`, … in start order (for reports and histories).
    pub name: String,
    /// The node's own loopback IP: it listens there and connects out from
    /// there.
    pub ip: Ipv4Addr,
    /// Where the process listens (the caller talks to it here).
    pub listen: SocketAddr,
    /// What peers use: the proxy's address, or `listen` without a proxy.
    pub advertise: SocketAddr,
    /// The Raft node id from `/health` (stable across restarts).
    pub id: u64,
    pub server: ServerProcess,
    pub proxy: Option<Proxy>,
    /// Bearer token of the harness's clients, when the cluster has one.
    pub token: Option<String>,
    /// The CA the harness's clients trust when the node serves HTTPS.
    pub ca: Option<PathBuf>,
}

impl Node {
    /// `http://listen` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.listen)
    }

    /// `http://advertise` (what `--join` and peers use; `https://` with TLS).
    pub fn advertise_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.advertise)
    }

    fn scheme(&self) -> &'static str {
        if self.ca.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// A client with the harness's long request timeout.
    pub fn api(&self) -> Api {
        self.authorized(Api::new(self.url()))
    }

    /// A client whose requests give up after [`CLIENT_TIMEOUT`].
    pub fn fault_api(&self) -> Api {
        self.authorized(Api::with_timeout(self.url(), CLIENT_TIMEOUT))
    }

    /// A client whose requests give up after [`PROBE_TIMEOUT`].
    pub fn probe_api(&self) -> Api {
        self.authorized(Api::with_timeout(self.url(), PROBE_TIMEOUT))
    }

    fn authorized(&self, api: Api) -> Api {
        let api = match &self.ca {
            Some(ca) => api.with_tls(ca, None),
            None => api,
        };
        match &self.token {
            Some(t) => api.with_token(t),
            None => api,
        }
    }

    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// The data dir (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.server.data_dir()
    }

    /// `n0 (127.0.0.11:40123)`.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.listen)
    }

    /// What a leader wait looks at: `/health`, unless the node is stopped.
    fn probe(&self) -> Probe {
        let api = self.is_running().then(|| self.probe_api());
        Probe::new(self.label(), api)
    }
}

/// A node's place before it starts: its IP, listen and advertise addresses
/// and (with proxies) the proxy in front of it.
struct Planned {
    ip: Ipv4Addr,
    listen: SocketAddr,
    advertise: SocketAddr,
    proxy: Option<Proxy>,
}

/// A started cluster in one directory (the peers file, and per node `nK/`
/// with its data dir and log). Dropping it kills every node, stops every
/// proxy and removes the directory unless [`keep`](Self::keep) was called.
///
/// Methods named `try_…` return an [`Error`]; the others panic with the
/// same message, for tests.
pub struct Cluster {
    /// Declared before `dir`, so the nodes are killed before their
    /// directories are removed.
    pub nodes: Vec<Node>,
    opts: ClusterOptions,
    /// The located node binary, for [`describe`](Self::describe).
    bin: PathBuf,
    /// How the cluster was formed, for [`describe`](Self::describe).
    formed_by: &'static str,
    /// Holds the peers file and every node's directory.
    dir: TempDir,
}

impl Cluster {
    /// Starts `opts.nodes` nodes with one `--peers` file listing every
    /// node's advertise address, waits until each logs its listen address
    /// and all agree on one leader.
    pub async fn try_start_with_peers(opts: ClusterOptions) -> Result<Cluster> {
        let mut cluster = Cluster::empty(opts, "--peers <file>")?;
        let formed = cluster.form_with_peers().await;
        cluster.started(formed)
    }

    /// Starts node `n0` alone (it initializes a one-voter cluster), then
    /// each further node with `--join` through the node started before it
    /// (so the third joins through a follower), each waited for until it is
    /// a voter.
    pub async fn try_start_by_join(opts: ClusterOptions) -> Result<Cluster> {
        let mut cluster = Cluster::empty(opts, "--join <the node before>")?;
        let formed = cluster.form_by_join().await;
        cluster.started(formed)
    }

    fn empty(opts: ClusterOptions, formed_by: &'static str) -> Result<Cluster> {
        let bin = opts.bin.locate()?;
        let mut builder = tempfile::Builder::new();
        builder.prefix("changeagent-cluster-");
        let dir = match &opts.parent_dir {
            Some(parent) => builder
                .tempdir_in(parent)
                .map_err(Error::io("creating a cluster directory in", parent))?,
            None => builder.tempdir().map_err(Error::io(
                "creating a cluster directory in",
                std::env::temp_dir(),
            ))?,
        };
        Ok(Cluster {
            nodes: Vec::new(),
            opts,
            bin,
            formed_by,
            dir,
        })
    }

    /// Passes a started cluster on; a failed start becomes
    /// [`Error::ClusterStart`], keeping the directory if the options say so.
    fn started(mut self, formed: Result<()>) -> Result<Cluster> {
        match formed {
            Ok(()) => Ok(self),
            Err(cause) => Err(Error::ClusterStart {
                nodes: self.opts.nodes,
                kept: self.opts.keep_dir_on_error.then(|| self.keep()),
                cause: Box::new(cause),
            }),
        }
    }

    async fn form_with_peers(&mut self) -> Result<()> {
        let mut planned = Vec::new();
        for i in 0..self.opts.nodes {
            planned.push(self.plan_node(i).await?);
        }
        let advertised: Vec<SocketAddr> = planned.iter().map(|p| p.advertise).collect();
        let peers_file = self.dir.path().join("peers");
        std::fs::write(&peers_file, peers_file_text(&advertised))
            .map_err(Error::io("writing", &peers_file))?;
        for p in planned {
            let opts = self
                .server_options(&p)?
                .arg("--peers")
                .arg(peers_file.display().to_string());
            self.push_node(p, opts)?;
        }
        for node in &mut self.nodes {
            node.server.try_wait_started().await?;
        }
        self.learn_ids().await?;
        self.try_wait_leader(CLUSTER_DEADLINE).await.map(drop)
    }

    async fn form_by_join(&mut self) -> Result<()> {
        let first = self.plan_node(0).await?;
        let opts = self.server_options(&first)?;
        self.push_node(first, opts)?;
        self.nodes[0].server.try_wait_started().await?;
        self.learn_ids().await?;
        self.try_wait_leader(CLUSTER_DEADLINE).await?;
        for i in 1..self.opts.nodes {
            self.try_add_node_with(i - 1, &[]).await?;
        }
        Ok(())
    }

    /// Picks an IP and a listen port for node `i` and starts its proxy.
    async fn plan_node(&self, i: usize) -> Result<Planned> {
        let ip = node_ip(self.opts.first_ip, i);
        let listen = SocketAddr::from((ip, free_port(ip)?));
        if self.opts.proxies {
            let proxy = Proxy::try_start(SocketAddr::from((ip, 0)), listen).await?;
            Ok(Planned {
                ip,
                listen,
                advertise: proxy.addr(),
                proxy: Some(proxy),
            })
        } else {
            Ok(Planned {
                ip,
                listen,
                advertise: listen,
                proxy: None,
            })
        }
    }

    /// The options of the node planned as `p`, before its formation flag.
    fn server_options(&self, p: &Planned) -> Result<ServerOptions> {
        let name = format!("n{}", self.nodes.len());
        let mut tls_flags = Vec::new();
        if let Some(certs) = self.certs() {
            let pair = certs.make(&name, &[p.ip.to_string(), p.advertise.ip().to_string()])?;
            tls_flags = pair.flags();
            tls_flags.extend(["--peer-ca".into(), certs.ca().display().to_string()]);
        }
        let mut opts = ServerOptions::default()
            .bin(Binary::Path(self.bin.clone()))
            .dir(self.dir.path().join(&name))
            .name(name)
            .listen(p.listen)
            .arg("--advertise")
            .arg(p.advertise.to_string());
        for a in tls_flags {
            opts = opts.arg(a);
        }
        for a in self.opts.node_flags() {
            opts = opts.arg(a);
        }
        Ok(opts)
    }

    /// Spawns the node planned as `p` without waiting for it.
    fn push_node(&mut self, p: Planned, opts: ServerOptions) -> Result<()> {
        let name = format!("n{}", self.nodes.len());
        let server = ServerProcess::try_launch(opts)?;
        self.nodes.push(Node {
            name,
            ip: p.ip,
            listen: p.listen,
            advertise: p.advertise,
            id: 0,
            server,
            proxy: p.proxy,
            token: self.opts.token.clone(),
            ca: self.certs().map(|c| c.ca()),
        });
        Ok(())
    }

    /// Reads the node id of every running node whose id is not known yet.
    async fn learn_ids(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if node.id != 0 || !node.server.is_running() {
                continue;
            }
            let api = node.probe_api();
            let what = format!("{} reports a nodeId in /health", node.name);
            node.id = wait_until(CLUSTER_DEADLINE, &what, || {
                let api = api.clone();
                async move {
                    let h = node_health(&api).await?;
                    h.node_id
                        .filter(|&id| id != 0)
                        .ok_or_else(|| format!("no nodeId in {h:?}"))
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Starts one more node with `--join <advertise URL of node via>` and
    /// `extra` arguments, waits until it logs its listen address (it does
    /// once it has joined) and until the cluster lists it as a voter.
    /// Returns its index.
    pub async fn try_add_node_with(&mut self, via: usize, extra: &[&str]) -> Result<usize> {
        let i = self.try_launch_joiner(via, extra).await?;
        self.nodes[i].server.try_wait_started().await?;
        self.learn_ids().await?;
        let mut voters = self.voter_ids_of(via).await?;
        voters.insert(self.nodes[i].id);
        self.try_wait_voters(via, &voters, CLUSTER_DEADLINE).await?;
        Ok(i)
    }

    /// Spawns a node with `--join` through node `via` and returns its index
    /// without waiting for anything.
    pub async fn try_launch_joiner(&mut self, via: usize, extra: &[&str]) -> Result<usize> {
        let p = self.plan_node(self.nodes.len()).await?;
        let mut opts = self
            .server_options(&p)?
            .arg("--join")
            .arg(self.nodes[via].advertise_url());
        for a in extra {
            opts = opts.arg(*a);
        }
        self.push_node(p, opts)?;
        Ok(self.nodes.len() - 1)
    }

    /// Replaces the extra arguments given to nodes started from now on
    /// (e.g. a joiner that reads the secret from a file instead).
    pub fn set_node_args(&mut self, args: Vec<String>) {
        self.opts.args = args;
    }

    /// The throwaway CA of a cluster started with [`ClusterOptions::mtls`] (in its
    /// directory), for more certificates (a client's, a stranger's).
    pub fn certs(&self) -> Option<Certs> {
        self.opts
            .tls
            .then(|| Certs::new(self.dir.path().join("certs")))
    }

    /// The voters node `i` currently lists in `GET /cluster`.
    async fn voter_ids_of(&self, i: usize) -> Result<BTreeSet<u64>> {
        let api = self.nodes[i].probe_api();
        let what = format!("{} lists its voters in GET /cluster", self.nodes[i].name);
        wait_until(CLUSTER_DEADLINE, &what, || {
            let api = api.clone();
            async move { voter_ids(&cluster_doc(&api).await?) }
        })
        .await
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn api(&self, i: usize) -> Api {
        self.nodes[i].api()
    }

    /// Number of nodes, running or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (only while it is being formed).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `n0 (127.0.0.11:40123)`.
    pub fn label(&self, i: usize) -> String {
        self.nodes[i].label()
    }

    /// Process id of node `i`, when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].server.running_pid()
    }

    /// The directory holding the peers file and every node's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory after the cluster is dropped; returns its path.
    pub fn keep(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// Passes `result` on; when it is an error, keeps the cluster's
    /// directory (so the nodes' logs can be read) and says where it is.
    pub fn keep_on_error<T, E>(
        &mut self,
        result: std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if result.is_err() {
            let kept = self.keep();
            eprintln!(
                "note: the cluster's data and logs are kept in {}",
                kept.display()
            );
        }
        result
    }

    /// One line saying what runs: the nodes, the binary, the flags.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(|n| n.listen.to_string()).collect();
        format!(
            "{}-node cluster {}: {} {} {} (data and logs in {})",
            self.nodes.len(),
            addrs.join(" "),
            self.bin.display(),
            self.formed_by,
            self.opts.node_flags().join(" "),
            self.dir.path().display()
        )
    }

    /// Indexes of the nodes whose process is running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect()
    }

    /// Indexes of running nodes other than `except`.
    pub fn others(&self, except: &[usize]) -> Vec<usize> {
        self.running()
            .into_iter()
            .filter(|i| !except.contains(i))
            .collect()
    }

    /// The index of the node with Raft id `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// `GET /health` of every node, in node order (`None` for a node that is
    /// stopped or did not answer).
    pub async fn healths(&self) -> Vec<Option<NodeHealth>> {
        let polls = self.nodes.iter().map(|node| async move {
            match node.is_running() {
                true => node_health(&node.probe_api()).await.ok(),
                false => None,
            }
        });
        futures::future::join_all(polls).await
    }

    /// Every node's health now, one line each, for reports.
    pub async fn status(&self) -> String {
        let healths = self.healths().await;
        let lines: Vec<String> = healths
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                Some(h) => format!("    {}: {}", self.label(i), crate::health::describe(h)),
                None if !self.nodes[i].is_running() => format!("    {}: stopped", self.label(i)),
                None => format!("    {}: no answer", self.label(i)),
            })
            .collect();
        lines.join("\n")
    }

    /// Waits (up to `within`) until every running node names the same
    /// leader in the same term and that node says it leads. Returns its
    /// index.
    pub async fn try_wait_leader(&self, within: Duration) -> Result<usize> {
        self.try_wait_leader_among(&self.running(), within).await
    }

    /// [`try_wait_leader`](Self::try_wait_leader) over the nodes `among`
    /// only (e.g. the majority side of a partition); the leader must be one
    /// of them.
    pub async fn try_wait_leader_among(&self, among: &[usize], within: Duration) -> Result<usize> {
        self.wait_leader_where(among, within, "the nodes agree on one leader", |_, _| true)
            .await
    }

    /// Waits (up to `within`) until the nodes `among` agree on a leader
    /// other than node `old`. Returns the new leader's index.
    pub async fn try_wait_new_leader(
        &self,
        among: &[usize],
        old: usize,
        within: Duration,
    ) -> Result<usize> {
        let what = format!(
            "the nodes agree on a leader other than {}",
            self.nodes[old].name
        );
        self.wait_leader_where(among, within, &what, |leader, _| leader != old)
            .await
    }

    /// Waits (up to `within`) until the running nodes agree on a leader and
    /// node `i` has applied every change up to `last_index`. Returns the
    /// leader's index.
    pub async fn try_wait_caught_up(
        &self,
        i: usize,
        last_index: u64,
        within: Duration,
    ) -> Result<usize> {
        let among = self.running();
        let pos = among.iter().position(|&j| j == i);
        let what = format!(
            "{} catches up to _id {last_index} under an agreed leader",
            self.nodes[i].name
        );
        self.wait_leader_where(&among, within, &what, |_, healths| {
            pos.and_then(|p| healths[p].as_ref())
                .is_some_and(|h| h.last_index >= last_index)
        })
        .await
    }

    /// The leader wait behind all others: `accept` gets the leader and the
    /// healths as indexes into `among`.
    async fn wait_leader_where(
        &self,
        among: &[usize],
        within: Duration,
        what: &str,
        accept: impl Fn(usize, &[Option<NodeHealth>]) -> bool,
    ) -> Result<usize> {
        let probes: Vec<Probe> = among.iter().map(|&i| self.nodes[i].probe()).collect();
        let at = wait_leader_where(&probes, within, what, |leader, healths| {
            accept(among[leader], healths)
        })
        .await?;
        Ok(among[at])
    }

    /// SIGKILLs node `i` and reaps it: when this returns the process is gone.
    pub fn try_kill9(&mut self, i: usize) -> Result<()> {
        self.nodes[i].server.try_kill9()
    }

    /// SIGTERMs node `i` and waits for it to exit; returns its exit status.
    pub async fn try_terminate(&mut self, i: usize) -> Result<ExitStatus> {
        self.nodes[i].server.try_terminate().await
    }

    /// Restarts node `i` on its data dir and address and waits until it
    /// logs its listen address (it has a leader then).
    pub async fn try_restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].server.try_restart().await
    }

    /// Waits (up to `within`) until `GET /cluster` on node `i` lists exactly
    /// `voters` as voting members, one of them with role `leader`. Returns
    /// the document.
    pub async fn try_wait_voters(
        &self,
        i: usize,
        voters: &BTreeSet<u64>,
        within: Duration,
    ) -> Result<Value> {
        let api = self.nodes[i].probe_api();
        let what = format!("{} lists voters {voters:?}", self.nodes[i].name);
        wait_until(within, &what, || {
            let api = api.clone();
            async move {
                let doc = cluster_doc(&api).await?;
                let got = voter_ids(&doc)?;
                let leaders = doc["members"]
                    .as_array()
                    .map_or(0, |m| m.iter().filter(|m| m["role"] == "leader").count());
                if &got == voters && leaders == 1 {
                    Ok(doc)
                } else {
                    Err(doc.to_string())
                }
            }
        })
        .await
    }
}

/// The panicking face of [`Cluster`], for tests: each method is its `try_`
/// twin with [`CLUSTER_DEADLINE`] where that takes a deadline, panicking
/// with that error's message.
impl Cluster {
    /// See [`try_start_with_peers`](Self::try_start_with_peers).
    pub async fn start_with_peers(opts: ClusterOptions) -> Cluster {
        Self::try_start_with_peers(opts).await.or_panic()
    }

    /// See [`try_start_by_join`](Self::try_start_by_join).
    pub async fn start_by_join(opts: ClusterOptions) -> Cluster {
        Self::try_start_by_join(opts).await.or_panic()
    }

    /// [`add_node_with`](Self::add_node_with) without extra arguments.
    pub async fn add_node(&mut self, via: usize) -> usize {
        self.add_node_with(via, &[]).await
    }

    /// See [`try_add_node_with`](Self::try_add_node_with).
    pub async fn add_node_with(&mut self, via: usize, extra: &[&str]) -> usize {
        self.try_add_node_with(via, extra).await.or_panic()
    }

    /// See [`try_launch_joiner`](Self::try_launch_joiner).
    pub async fn launch_joiner(&mut self, via: usize, extra: &[&str]) -> usize {
        self.try_launch_joiner(via, extra).await.or_panic()
    }

    /// Waits until every running node reports the same leader, and that
    /// node reports itself leader. Returns its index.
    pub async fn wait_leader(&self) -> usize {
        self.wait_leader_among(&self.running()).await
    }

    /// See [`try_wait_leader_among`](Self::try_wait_leader_among).
    pub async fn wait_leader_among(&self, among: &[usize]) -> usize {
        self.try_wait_leader_among(among, CLUSTER_DEADLINE)
            .await
            .or_panic()
    }

    /// See [`try_wait_new_leader`](Self::try_wait_new_leader).
    pub async fn wait_new_leader(&self, among: &[usize], old: usize) -> usize {
        self.try_wait_new_leader(among, old, CLUSTER_DEADLINE)
            .await
            .or_panic()
    }

    /// SIGKILLs node `i`.
    #[track_caller]
    pub fn kill9(&mut self, i: usize) {
        self.try_kill9(i).or_panic();
    }

    /// SIGTERMs node `i` and waits for it to exit; returns its exit status.
    pub async fn terminate(&mut self, i: usize) -> ExitStatus {
        self.try_terminate(i).await.or_panic()
    }

    /// Restarts node `i` on its data dir and address and waits until it
    /// logs its listen address (it has a leader then).
    pub async fn restart(&mut self, i: usize) {
        self.try_restart(i).await.or_panic();
    }

    /// See [`try_wait_voters`](Self::try_wait_voters).
    pub async fn wait_voters(&self, i: usize, voters: &BTreeSet<u64>) -> Value {
        self.try_wait_voters(i, voters, CLUSTER_DEADLINE)
            .await
            .or_panic()
    }

    /// `GET /cluster` on node `i` (200 asserted).
    pub async fn cluster_doc(&self, i: usize) -> Value {
        let r = self.nodes[i].api().get("/cluster").await;
        assert_eq!(
            r.status,
            200,
            "{}: GET /cluster: {}",
            self.nodes[i].name,
            r.text()
        );
        r.json()
    }

    /// Cuts node `i` off from every other node, both ways: the others'
    /// proxies drop `i`'s connections and `i`'s proxy drops theirs.
    pub fn isolate(&self, i: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|&j| j != i).collect();
        self.partition(&[i], &others);
    }

    /// Cuts every node of `a` off from every node of `b`, both ways.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.proxy(y).block_source(IpAddr::V4(self.nodes[x].ip));
                self.proxy(x).block_source(IpAddr::V4(self.nodes[y].ip));
            }
        }
    }

    /// Lets every connection through again.
    pub fn heal(&self) {
        for node in &self.nodes {
            if let Some(p) = &node.proxy {
                p.heal();
            }
        }
    }

    fn proxy(&self, i: usize) -> &Proxy {
        self.nodes[i]
            .proxy
            .as_ref()
            .expect("partitions need ClusterOptions::with_proxies()")
    }

    /// Waits until the nodes `among` serve byte-identical `GET /changes`
    /// lists (all pages), and returns each node's list for a
    /// [`History::check`].
    pub async fn wait_converged(&self, among: &[usize]) -> Vec<(String, Vec<String>)> {
        let apis: Vec<(String, Api)> = among
            .iter()
            .map(|&i| (self.nodes[i].name.clone(), self.nodes[i].api()))
            .collect();
        wait_until(CLUSTER_DEADLINE, "every node serves the same list", || {
            let apis = apis.clone();
            async move {
                let mut lists: Vec<(String, Vec<u8>, Vec<String>)> = Vec::new();
                for (name, api) in &apis {
                    let (bodies, raws) = read_all(api).await.map_err(|e| format!("{name}: {e}"))?;
                    lists.push((name.clone(), bodies, raws));
                }
                let (ref_name, ref_bodies, ref_raws) = &lists[0];
                for (name, bodies, raws) in &lists[1..] {
                    if bodies != ref_bodies {
                        let pos = ref_raws.iter().zip(raws).position(|(a, b)| a != b);
                        return Err(format!(
                            "{ref_name} has {} changes, {name} has {}; first different change at {pos:?}",
                            ref_raws.len(),
                            raws.len()
                        ));
                    }
                }
                Ok(lists
                    .into_iter()
                    .map(|(name, _, raws)| (name, raws))
                    .collect())
            }
        })
        .await
        .or_panic()
    }
}

/// The ids of the voting members of a `GET /cluster` document.
pub fn voter_ids(doc: &Value) -> std::result::Result<BTreeSet<u64>, String> {
    let members = doc["members"]
        .as_array()
        .ok_or_else(|| format!("no members array: {doc}"))?;
    let mut ids = BTreeSet::new();
    for m in members {
        if m["voter"] == true {
            ids.insert(
                m["id"]
                    .as_u64()
                    .ok_or_else(|| format!("member without numeric id: {m}"))?,
            );
        }
    }
    Ok(ids)
}

/// `GET /cluster` of a node, as JSON; `Err` describes what went wrong.
pub async fn cluster_doc(api: &Api) -> std::result::Result<Value, String> {
    let r = api.try_get("/cluster").await.map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.text()));
    }
    serde_json::from_slice(&r.body).map_err(|e| e.to_string())
}

/// Every change a node serves, read in pages of 1000: the concatenated
/// response bodies (for a byte-for-byte comparison) and each change's raw
/// JSON text.
pub async fn read_all(api: &Api) -> std::result::Result<(Vec<u8>, Vec<String>), String> {
    let mut bodies = Vec::new();
    let mut raws = Vec::new();
    let mut since = 0u64;
    loop {
        let r = api
            .try_get(&format!("/changes?since={since}&limit=1000"))
            .await
            .map_err(|e| format!("GET /changes?since={since}: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "GET /changes?since={since}: {} {}",
                r.status,
                r.text()
            ));
        }
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("GET /changes body is not JSON ({e})"))?;
        let page = raw_changes(&r.body);
        bodies.extend_from_slice(&r.body);
        let at_end = v["atEnd"].as_bool().unwrap_or(true);
        let empty = page.is_empty();
        if let Some(last) = page.last() {
            since = change_id(last);
        }
        raws.extend(page);
        if at_end || empty {
            return Ok((bodies, raws));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_distinct_loopback_addresses() {
        let a = next_ip();
        let b = next_ip();
        assert_ne!(a, b);
        assert!(a.is_loopback() && b.is_loopback());
        let port = free_port(a).expect("a free port");
        assert_ne!(port, 0);
        // The address is usable.
        TcpListener::bind((a, port)).expect("bind the free port");
    }

    #[test]
    fn nodes_get_their_own_loopback_address_and_a_peers_line() {
        let first = Some(Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(node_ip(first, 0), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(node_ip(first, 2), Ipv4Addr::new(127, 0, 0, 13));
        // Past 127.255.255.255: a fresh loopback IP instead.
        assert!(node_ip(Some(Ipv4Addr::new(127, 255, 255, 255)), 1).is_loopback());
        let a = SocketAddr::from((node_ip(first, 0), free_port(node_ip(first, 0)).unwrap()));
        let b = SocketAddr::from((node_ip(first, 1), free_port(node_ip(first, 1)).unwrap()));
        assert_ne!(a.ip(), b.ip());
        let text = peers_file_text(&[a, b]);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(lines, [a.to_string(), b.to_string()]);
    }

    #[test]
    fn voters_of_a_cluster_document() {
        let doc = serde_json::json!({"members": [
            {"id": 5, "addr": "a:1", "voter": true, "role": "leader", "matched": 3},
            {"id": 7, "addr": "b:1", "voter": false, "role": "learner", "matched": null},
            {"id": 9, "addr": "c:1", "voter": true, "role": "follower", "matched": 3},
        ]});
        assert_eq!(voter_ids(&doc), Ok(BTreeSet::from([5, 9])));
        assert!(voter_ids(&serde_json::json!({})).is_err());
    }
}
