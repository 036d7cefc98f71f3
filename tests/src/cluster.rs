//! A Raft cluster of real `changeagent-server` processes, each on its own
//! loopback IP (127.A.B.C, all of 127.0.0.0/8 answers on Linux) so a
//! [`Proxy`] in front of a node can tell peers apart by source IP. Formed by
//! a peers file or by `--join`; helpers find the leader, kill and restart
//! nodes, partition them, and wait until every node serves the same list.
//! The test itself always talks to a node's real listen address, so it can
//! reach both sides of a partition.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tokio::task::JoinHandle;

use crate::history::{marker_of, write_body, AttemptResult, History, ReadRecord};
use crate::proxy::Proxy;
use crate::{change_id, raw_changes, wait_until, Api, Reply, ServerOptions, ServerProcess};

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

/// Timeout of one `/health` or `/cluster` probe: a node that does not answer
/// this quickly is reported as such and polled again.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long formation, election, membership changes and convergence may
/// take (each on its own) before a test fails.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

/// Pause between two attempts of a retrying client after an answer that
/// says "not now" (503, connection refused): client pacing, so a writer does
/// not spin during an election. Not a synchronisation point.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(50);

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

/// A port that is free on `ip` right now (bind port 0, read it, release).
pub fn free_port(ip: Ipv4Addr) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().expect("local_addr").port()
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Put a [`Proxy`] in front of every node (its advertise address), so
    /// the test can partition nodes.
    pub proxies: bool,
    /// Extra arguments for every node (after the timing flags).
    pub args: Vec<String>,
}

impl ClusterOptions {
    /// `nodes` nodes, no proxies, the default test timings.
    pub fn new(nodes: usize) -> Self {
        ClusterOptions {
            nodes,
            proxies: false,
            args: Vec::new(),
        }
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
}

/// One member (or would-be member) of a test cluster.
pub struct Node {
    /// `n0`, `n1`, … in start order (for reports and histories).
    pub name: String,
    /// The node's own loopback IP: it listens there and connects out from
    /// there.
    pub ip: Ipv4Addr,
    /// Where the process listens (the test talks to it here).
    pub listen: SocketAddr,
    /// What peers use: the proxy's address, or `listen` without a proxy.
    pub advertise: SocketAddr,
    /// The Raft node id from `/health` (stable across restarts).
    pub id: u64,
    pub server: ServerProcess,
    pub proxy: Option<Proxy>,
}

impl Node {
    /// `http://listen`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// `http://advertise` (what `--join` and peers use).
    pub fn advertise_url(&self) -> String {
        format!("http://{}", self.advertise)
    }

    /// A client with the harness's long request timeout.
    pub fn api(&self) -> Api {
        Api::new(self.url())
    }

    /// A client whose requests give up after [`CLIENT_TIMEOUT`].
    pub fn fault_api(&self) -> Api {
        Api::with_timeout(self.url(), CLIENT_TIMEOUT)
    }

    /// A client whose requests give up after [`PROBE_TIMEOUT`].
    pub fn probe_api(&self) -> Api {
        Api::with_timeout(self.url(), PROBE_TIMEOUT)
    }

    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// The data dir (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.server.data_dir()
    }
}

/// `GET /health` of a node, as JSON; `Err` describes what went wrong.
pub async fn health(api: &Api) -> Result<Value, String> {
    let r = api.try_get("/health").await.map_err(|e| format!("{e}"))?;
    if r.status != 200 {
        return Err(format!("status {} {}", r.status, r.text()));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("not JSON ({e}): {}", r.text()))
}

/// Every change a node serves, read in pages of 1000: the concatenated
/// response bodies (for a byte-for-byte comparison) and each change's raw
/// JSON text.
pub async fn read_all(api: &Api) -> Result<(Vec<u8>, Vec<String>), String> {
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

/// A started cluster. Dropping it kills every node and stops every proxy.
pub struct Cluster {
    pub nodes: Vec<Node>,
    opts: ClusterOptions,
    /// Holds the peers file.
    dir: TempDir,
}

impl Cluster {
    /// Starts `opts.nodes` nodes with one `--peers` file listing every
    /// node's advertise address, waits until each logs its listen address
    /// and all agree on one leader.
    pub async fn start_with_peers(opts: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::empty(opts.clone());
        let mut planned = Vec::new();
        for _ in 0..opts.nodes {
            planned.push(cluster.plan_node().await);
        }
        let mut peers = String::from("# advertise addresses of the test cluster\n\n");
        for (_, _, advertise, _) in &planned {
            peers.push_str(&format!("{advertise}\n"));
        }
        let peers_file = cluster.dir.path().join("peers");
        std::fs::write(&peers_file, peers).expect("write peers file");
        for (ip, listen, advertise, proxy) in planned {
            let opts = cluster
                .server_options(listen, advertise)
                .arg("--peers")
                .arg(peers_file.display().to_string());
            cluster.push_node(ip, listen, advertise, proxy, opts);
        }
        for node in &mut cluster.nodes {
            node.server.wait_started().await;
        }
        cluster.learn_ids().await;
        cluster.wait_leader().await;
        cluster
    }

    /// Starts node `n0` alone (it initializes a one-voter cluster), then
    /// each further node with `--join` through the node started before it
    /// (so the third joins through a follower), each waited for until it is
    /// a voter.
    pub async fn start_by_join(opts: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::empty(opts.clone());
        let (ip, listen, advertise, proxy) = cluster.plan_node().await;
        let server_opts = cluster.server_options(listen, advertise);
        cluster.push_node(ip, listen, advertise, proxy, server_opts);
        cluster.nodes[0].server.wait_started().await;
        cluster.learn_ids().await;
        cluster.wait_leader().await;
        for i in 1..opts.nodes {
            cluster.add_node(i - 1).await;
        }
        cluster
    }

    fn empty(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("changeagent-cluster-")
            .tempdir()
            .expect("create cluster temp dir");
        Cluster {
            nodes: Vec::new(),
            opts,
            dir,
        }
    }

    /// Picks an IP and a listen port for a new node and starts its proxy.
    async fn plan_node(&self) -> (Ipv4Addr, SocketAddr, SocketAddr, Option<Proxy>) {
        let ip = next_ip();
        let listen = SocketAddr::from((ip, free_port(ip)));
        if self.opts.proxies {
            let proxy = Proxy::start(SocketAddr::from((ip, 0)), listen).await;
            (ip, listen, proxy.addr(), Some(proxy))
        } else {
            (ip, listen, listen, None)
        }
    }

    fn server_options(&self, listen: SocketAddr, advertise: SocketAddr) -> ServerOptions {
        let mut opts = ServerOptions::default()
            .listen(listen)
            .arg("--advertise")
            .arg(advertise.to_string())
            .arg("--heartbeat-ms")
            .arg(HEARTBEAT_MS.to_string())
            .arg("--election-timeout-ms")
            .arg(ELECTION_TIMEOUT_MS.to_string())
            .arg("--write-timeout-ms")
            .arg(WRITE_TIMEOUT_MS.to_string());
        for a in &self.opts.args {
            opts = opts.arg(a.clone());
        }
        opts
    }

    fn push_node(
        &mut self,
        ip: Ipv4Addr,
        listen: SocketAddr,
        advertise: SocketAddr,
        proxy: Option<Proxy>,
        opts: ServerOptions,
    ) {
        let name = format!("n{}", self.nodes.len());
        let server = ServerProcess::launch(opts);
        self.nodes.push(Node {
            name,
            ip,
            listen,
            advertise,
            id: 0,
            server,
            proxy,
        });
    }

    /// Reads the node id of every running node whose id is not known yet.
    async fn learn_ids(&mut self) {
        for node in &mut self.nodes {
            if node.id != 0 || !node.server.is_running() {
                continue;
            }
            let api = node.probe_api();
            let id = wait_until(CLUSTER_DEADLINE, "/health reports a nodeId", || {
                let api = api.clone();
                async move {
                    let v = health(&api).await?;
                    v["nodeId"]
                        .as_u64()
                        .filter(|&id| id != 0)
                        .ok_or_else(|| format!("no nodeId in {v}"))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", node.name));
            node.id = id;
        }
    }

    /// Starts one more node with `--join <advertise URL of node via>`, waits
    /// until it logs its listen address (it does once it has joined) and
    /// until the cluster lists it as a voter. Returns its index.
    pub async fn add_node(&mut self, via: usize) -> usize {
        self.add_node_with(via, &[]).await
    }

    /// [`add_node`](Self::add_node) with extra arguments for the new node.
    pub async fn add_node_with(&mut self, via: usize, extra: &[&str]) -> usize {
        let i = self.launch_joiner(via, extra).await;
        self.nodes[i].server.wait_started().await;
        self.learn_ids().await;
        let mut voters = self.voter_ids_of(via).await;
        voters.insert(self.nodes[i].id);
        self.wait_voters(via, &voters).await;
        i
    }

    /// Spawns a node with `--join` through node `via` and returns its index
    /// without waiting for anything.
    pub async fn launch_joiner(&mut self, via: usize, extra: &[&str]) -> usize {
        let (ip, listen, advertise, proxy) = self.plan_node().await;
        let mut opts = self
            .server_options(listen, advertise)
            .arg("--join")
            .arg(self.nodes[via].advertise_url());
        for a in extra {
            opts = opts.arg(*a);
        }
        self.push_node(ip, listen, advertise, proxy, opts);
        self.nodes.len() - 1
    }

    /// Replaces the extra arguments given to nodes started from now on
    /// (e.g. a joiner that reads the secret from a file instead).
    pub fn set_node_args(&mut self, args: Vec<String>) {
        self.opts.args = args;
    }

    /// Name and fault-test client ([`Node::fault_api`]) of every node, for
    /// [`Writers`] and [`write_retrying`].
    pub fn client_nodes(&self) -> Vec<(String, Api)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.fault_api()))
            .collect()
    }

    /// Writes `marker` once through node `i` (key = marker), records it as
    /// `client`, and asserts it was acknowledged. Returns the `_id`.
    pub async fn write_acked(
        &self,
        history: &History,
        client: usize,
        i: usize,
        marker: &str,
    ) -> u64 {
        let node = &self.nodes[i];
        let (result, reply) = write_once(
            history,
            client,
            &node.name,
            &node.fault_api(),
            marker,
            marker,
        )
        .await;
        match result {
            AttemptResult::Acked(id) => id,
            other => panic!(
                "write {marker} through {} ({}) was not acknowledged: {other:?} {:?}",
                node.name,
                node.listen,
                reply.map(|r| (r.status, r.headers))
            ),
        }
    }

    /// `rounds` rounds of one write through each node in `nodes` (node `i`
    /// writes as client `i`, marker `{prefix}-{i}-{round}`), each asserted
    /// acknowledged.
    pub async fn write_rounds(
        &self,
        history: &History,
        nodes: &[usize],
        rounds: usize,
        prefix: &str,
    ) {
        for k in 0..rounds {
            for &i in nodes {
                self.write_acked(history, i, i, &format!("{prefix}-{i}-{k}"))
                    .await;
            }
        }
    }

    /// The voters node `i` currently lists in `GET /cluster`.
    async fn voter_ids_of(&self, i: usize) -> BTreeSet<u64> {
        let doc = self.cluster_doc(i).await;
        voter_ids(&doc).unwrap_or_else(|e| panic!("{}: GET /cluster: {e}", self.nodes[i].name))
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn api(&self, i: usize) -> Api {
        self.nodes[i].api()
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

    /// Waits until every running node reports the same leader, and that
    /// node reports itself leader. Returns its index.
    pub async fn wait_leader(&self) -> usize {
        self.wait_leader_among(&self.running()).await
    }

    /// [`wait_leader`](Self::wait_leader) over the nodes `among` only (e.g.
    /// the majority side of a partition); the leader must be one of them.
    pub async fn wait_leader_among(&self, among: &[usize]) -> usize {
        self.wait_leader_where(among, |_| true, "agree on one leader")
            .await
    }

    /// Waits until the nodes `among` agree on a leader other than `old`
    /// (an index). Returns the new leader's index.
    pub async fn wait_new_leader(&self, among: &[usize], old: usize) -> usize {
        let old_id = self.nodes[old].id;
        self.wait_leader_where(
            among,
            move |id| id != old_id,
            &format!("agree on a leader other than n{old}"),
        )
        .await
    }

    async fn wait_leader_where(
        &self,
        among: &[usize],
        accept: impl Fn(u64) -> bool,
        what: &str,
    ) -> usize {
        let apis: Vec<(usize, Api)> = among
            .iter()
            .map(|&i| (i, self.nodes[i].probe_api()))
            .collect();
        let ids: Vec<(usize, u64)> = among.iter().map(|&i| (i, self.nodes[i].id)).collect();
        let accept = &accept;
        let result = wait_until(CLUSTER_DEADLINE, what, || {
            let apis = apis.clone();
            let ids = ids.clone();
            async move {
                let mut seen = Vec::new();
                let mut leaders = BTreeSet::new();
                let mut leader_says_leader = None;
                for (i, api) in &apis {
                    match health(api).await {
                        Ok(v) => {
                            let leader = v["leader"].as_u64();
                            leaders.insert(leader);
                            if leader.is_some() && v["nodeId"].as_u64() == leader {
                                leader_says_leader = Some(v["role"] == "leader");
                            }
                            seen.push(format!(
                                "n{i}: role={} leader={} term={}",
                                v["role"], v["leader"], v["term"]
                            ));
                        }
                        Err(e) => {
                            leaders.insert(None);
                            seen.push(format!("n{i}: {e}"));
                        }
                    }
                }
                let agreed = match leaders.iter().collect::<Vec<_>>().as_slice() {
                    [Some(id)] => Some(*id),
                    _ => None,
                };
                match agreed {
                    Some(id) if accept(id) && leader_says_leader == Some(true) => ids
                        .iter()
                        .find(|(_, nid)| *nid == id)
                        .map(|(i, _)| *i)
                        .ok_or_else(|| seen.join("; ")),
                    _ => Err(seen.join("; ")),
                }
            }
        })
        .await;
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGKILLs node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].server.kill9();
    }

    /// SIGTERMs node `i` and waits for it to exit; returns its exit status.
    pub async fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        self.nodes[i].server.terminate().await
    }

    /// Restarts node `i` on its data dir and address and waits until it
    /// logs its listen address (it has a leader then).
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].server.restart().await;
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

    /// Waits until `GET /cluster` on node `i` lists exactly `voters` as
    /// voting members, one of them with role `leader`. Returns the document.
    pub async fn wait_voters(&self, i: usize, voters: &BTreeSet<u64>) -> Value {
        let api = self.nodes[i].probe_api();
        let what = format!("{} lists voters {voters:?}", self.nodes[i].name);
        wait_until(CLUSTER_DEADLINE, &what, || {
            let api = api.clone();
            async move {
                let r = api.try_get("/cluster").await.map_err(|e| e.to_string())?;
                if r.status != 200 {
                    return Err(format!("{} {}", r.status, r.text()));
                }
                let doc: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
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
        .unwrap_or_else(|e| panic!("{e}"))
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
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The ids of the voting members of a `GET /cluster` document.
pub fn voter_ids(doc: &Value) -> Result<BTreeSet<u64>, String> {
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

/// Posts the write marked `marker` once to `api` with `Idempotency-Key: key`
/// and records the attempt. Panics on a 200 without an `_id` (a broken
/// answer, not an uncertain one).
pub async fn write_once(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
    key: &str,
    marker: &str,
) -> (AttemptResult, Option<Reply>) {
    let body = write_body(marker);
    let answer = api
        .try_request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(body.into_bytes()),
            &[("Idempotency-Key", key)],
        )
        .await;
    let result = match &answer {
        Ok(r) if r.status == 200 => {
            let v: Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("{node}: 200 body is not JSON ({e}): {}", r.text()));
            AttemptResult::Acked(
                v["_id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{node}: 200 without _id: {v}")),
            )
        }
        Ok(r) if (400..500).contains(&r.status) => AttemptResult::Rejected(r.status),
        Ok(r) => AttemptResult::Unknown(format!("{} {}", r.status, r.text())),
        Err(e) => AttemptResult::Unknown(format!("transport: {e}")),
    };
    history.record_attempt(client, node, key, marker, result.clone());
    (result, answer.ok())
}

/// Writes `marker` with `Idempotency-Key: key`, trying the nodes in turn
/// from `first` after every uncertain answer (503, other 5xx, connection
/// error, timeout) until one acknowledges or rejects it or `give_up` has
/// passed. Every attempt is recorded. Returns the last attempt's result.
pub async fn write_retrying(
    history: &History,
    client: usize,
    nodes: &[(String, Api)],
    first: usize,
    key: &str,
    marker: &str,
    give_up: Duration,
) -> AttemptResult {
    let deadline = Instant::now() + give_up;
    let mut attempt = 0usize;
    loop {
        let (name, api) = &nodes[(first + attempt) % nodes.len()];
        let (result, _) = write_once(history, client, name, api, key, marker).await;
        if !matches!(result, AttemptResult::Unknown(_)) || Instant::now() >= deadline {
            return result;
        }
        attempt += 1;
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// What one background writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterReport {
    pub client: usize,
    pub acked: usize,
    pub rejected: usize,
    /// Writes given up on with an uncertain outcome.
    pub unknown: usize,
    pub reads: usize,
    pub last_problem: Option<String>,
}

/// Background writers, each writing `w{client}-{n}` (marker and key) for
/// n = 0, 1, … through [`write_retrying`], starting each write on another
/// node, and doing a consistent read every `read_every` writes, until
/// [`stop`](Self::stop).
pub struct Writers {
    /// Set by `stop`; each writer checks it before every write.
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<WriterReport>>,
}

impl Writers {
    /// Starts `count` writers over `nodes` (name and client of each node),
    /// numbered `first_client..`. Each write gives up after `give_up`.
    pub fn start(
        history: Arc<History>,
        nodes: Vec<(String, Api)>,
        count: usize,
        first_client: usize,
        give_up: Duration,
        read_every: Option<u64>,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (first_client..first_client + count)
            .map(|client| {
                let history = Arc::clone(&history);
                let nodes = nodes.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    writer_loop(history, nodes, client, stop, give_up, read_every).await
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Tells every writer to stop after its current write and waits (up to
    /// `timeout`) for all of them.
    pub async fn stop(self, timeout: Duration) -> Vec<WriterReport> {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for t in self.tasks {
            let report = tokio::time::timeout(timeout, t)
                .await
                .unwrap_or_else(|_| panic!("a writer did not stop within {timeout:?}"))
                .expect("writer task panicked");
            reports.push(report);
        }
        reports
    }
}

async fn writer_loop(
    history: Arc<History>,
    nodes: Vec<(String, Api)>,
    client: usize,
    stop: Arc<AtomicBool>,
    give_up: Duration,
    read_every: Option<u64>,
) -> WriterReport {
    let mut report = WriterReport {
        client,
        ..WriterReport::default()
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let marker = format!("w{client}-{n}");
        let first = (client + n as usize) % nodes.len();
        match write_retrying(&history, client, &nodes, first, &marker, &marker, give_up).await {
            AttemptResult::Acked(_) => report.acked += 1,
            AttemptResult::Rejected(s) => {
                report.rejected += 1;
                report.last_problem = Some(format!("{marker}: rejected {s}"));
            }
            AttemptResult::Unknown(why) => {
                report.unknown += 1;
                report.last_problem = Some(format!("{marker}: gave up: {why}"));
            }
        }
        n += 1;
        // Integer division instead of `%`: the crate's MSRV (1.85) has no
        // `is_multiple_of`, and clippy asks for it over `n % k == 0`.
        if read_every.is_some_and(|k| k > 0 && n / k * k == n) {
            let (name, api) = &nodes[(client + n as usize / 2) % nodes.len()];
            if consistent_read(&history, client, name, api).await.is_ok() {
                report.reads += 1;
            }
        }
    }
    report
}

/// Reads node `api`'s whole list (plain, not consistent) and records it as
/// a read by `client`. Returns the raw changes.
pub async fn plain_read(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
) -> Result<Vec<String>, String> {
    let (_, raws) = read_all(api).await?;
    let entries: Vec<(u64, Option<String>)> = raws
        .iter()
        .map(|raw| (change_id(raw), marker_of(raw)))
        .collect();
    history.record_read(ReadRecord {
        client,
        node: node.to_string(),
        consistent: false,
        since: 0,
        last_index: entries.last().map_or(0, |(id, _)| *id),
        entries,
        acked_before: history.highest_acked(client),
    });
    Ok(raws)
}

/// A `GET /changes?consistent=true` from a little before the client's
/// highest acknowledged id, recorded on success.
pub async fn consistent_read(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
) -> Result<ReadRecord, String> {
    let acked_before = history.highest_acked(client);
    let since = acked_before.unwrap_or(0).saturating_sub(10);
    let r = api
        .try_get(&format!(
            "/changes?since={since}&limit=1000&consistent=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.text()));
    }
    let v = r.json();
    let entries = raw_changes(&r.body)
        .iter()
        .map(|raw| (change_id(raw), marker_of(raw)))
        .collect();
    let read = ReadRecord {
        client,
        node: node.to_string(),
        consistent: true,
        since,
        entries,
        last_index: v["lastIndex"]
            .as_u64()
            .unwrap_or_else(|| panic!("{node}: no lastIndex in {v}")),
        acked_before,
    };
    history.record_read(read.clone());
    Ok(read)
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
        let port = free_port(a);
        assert_ne!(port, 0);
        // The address is usable.
        TcpListener::bind((a, port)).expect("bind the free port");
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
