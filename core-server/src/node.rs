//! Starting a node: open storage, pick or load the node id and cluster id, start Raft, and
//! form the cluster exactly once:
//! - no `--peers`/`--join`: a new node initializes a one-voter cluster with itself;
//! - `--peers FILE`: the node with the lowest listed address asks every listed node for its
//!   id and initializes the cluster with all of them; the others wait to be contacted;
//! - `--join URL`: the node asks a member to add it (learner, then voter).
//!
//! A node whose log already holds a membership never initializes again.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use changeagent_proto::types::JoinRequest;
use changeagent_store::{Objects, Store};
use openraft::BasicNode;
use tokio::time::Instant;

use crate::config::Config;
use crate::http::raft::NodeIdentity;
use crate::identity::Identity;
use crate::proposer::Proposer;
use crate::raft::log_store::{read_cluster_id, read_node_id, write_node_id, LogStore};
use crate::raft::network::Network;
use crate::raft::state_machine::{AppliedIndex, StateMachine};
use crate::raft::types::{NodeId, Op, Request};
use crate::raft::Raft;
use crate::restore;

/// Pause between two attempts to reach peers while forming or joining a cluster.
const FORM_RETRY: Duration = Duration::from_millis(250);
/// How often a node waiting for peers says so in its log.
const FORM_PROGRESS: Duration = Duration::from_secs(5);
/// Longest a join request may take: the leader answers once this node has caught up, which
/// may mean receiving a large snapshot.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// A started Raft node and its storage.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Arc<Store>,
    pub identity: Arc<Identity>,
    pub snapshot_dir: PathBuf,
    /// Where checkpoints are read from.
    pub objects: Arc<Objects>,
    /// The Raft index applied to the store, ahead of openraft's metrics.
    pub applied: AppliedIndex,
}

/// A fresh node id: random, below 2^53 so JSON clients in every language read it exactly.
fn new_node_id() -> NodeId {
    let id = (uuid::Uuid::new_v4().as_u128() as u64) & ((1 << 53) - 1);
    id.max(1)
}

/// Opens storage and starts Raft. Without `--peers` or `--join`, a new node initializes a
/// one-voter cluster with itself (never again: a restart finds the membership in its log).
pub async fn start(
    config: &Config,
    advertise: &str,
    client: reqwest::Client,
    local_ip: Option<std::net::IpAddr>,
    peer_tls: Option<tokio_rustls::TlsConnector>,
    raft_runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Node> {
    let peers = config.peer_list()?;
    if let Some(peers) = &peers {
        if !peers.iter().any(|p| p == advertise) {
            anyhow::bail!(
                "this node's address {advertise} is not in the peers file; list it there or set \
                 --advertise to the address the file uses for this node"
            );
        }
    }
    let secret = config.secret()?;
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let store = Store::open(dir.join("changes"))
        .with_context(|| format!("cannot open the change store in {}", dir.display()))?;
    let objects = Arc::new(Objects::from_url(&config.object_store)?);
    let log_store = LogStore::open(&dir.join("raft"))
        .with_context(|| format!("cannot open the Raft log in {}", dir.display()))?;
    let id = match read_node_id(&log_store).map_err(|e| anyhow::anyhow!("{e}"))? {
        Some(id) => id,
        None => {
            let id = new_node_id();
            write_node_id(&log_store, id).map_err(|e| anyhow::anyhow!("{e}"))?;
            id
        }
    };
    // Data dirs from before the id was kept beside the log have it in the change store.
    let cluster_id = read_cluster_id(&log_store)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .or_else(|| store.cluster_id());
    let identity = Arc::new(
        Identity::new(id, None, secret, log_store.clone())
            .with_peer_tls(config.tls.tls_cert.is_some(), config.peer_ca.is_some()),
    );
    if let Some(cid) = cluster_id {
        identity.adopt_async(&cid).await?;
    }
    let raft_config = openraft::Config {
        cluster_name: "changeagent".into(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_max_ms(),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: config.snapshot_keep_logs,
        // Replicate an entry as soon as it is in the log, while the leader syncs it.
        broadcast_submitted_on_append: Some(true),
        enable_pre_vote: Some(config.pre_vote),
        ..Default::default()
    }
    .validate()
    .context("invalid Raft timing flags")?;
    let snapshot_dir = dir.join("snapshots");
    let sm = StateMachine::new(store.clone(), snapshot_dir.clone())
        .with_context(|| format!("cannot create the snapshot dir in {}", dir.display()))?;
    let applied = sm.applied();
    // Raft's tasks (core, replication, state machine worker) live on Raft's own runtime, so
    // a flood of client work on the main runtime never delays a heartbeat or an election.
    let network = Network::new(client, identity.clone(), local_ip, peer_tls);
    let raft = raft_runtime
        .spawn(Raft::new(id, Arc::new(raft_config), network, log_store, sm))
        .await
        .context("Raft's start-up task failed")?
        .context("cannot start Raft")?;
    let standalone = peers.is_none() && config.join.is_none();
    let initialized = raft.is_initialized().await?;
    // A restore only ever fills a node with an empty log: its log then replays nothing over
    // the imported state.
    let restored = match &config.restore_from {
        Some(url) if !initialized => restore::import_if_empty(&store, url, dir).await?,
        Some(_) => {
            tracing::info!("this node already belongs to a cluster; --restore-from is ignored");
            false
        }
        None => false,
    };
    if standalone && !initialized {
        let members = BTreeMap::from([(
            id,
            BasicNode {
                addr: advertise.to_owned(),
            },
        )]);
        let cid = initialize(&raft, &identity, members).await?;
        tracing::info!(
            node_id = id,
            cluster_id = cid,
            "initialized a new single-node cluster"
        );
        if restored {
            restore::seal(&raft).await?;
        }
    }
    Ok(Node {
        id,
        raft,
        store,
        identity,
        snapshot_dir,
        objects,
        applied,
    })
}

/// Initializes the cluster with `members` under this node's cluster id (a new one if it has
/// none yet, persisted first); returns the id.
async fn initialize(
    raft: &Raft,
    identity: &Arc<Identity>,
    members: BTreeMap<NodeId, BasicNode>,
) -> anyhow::Result<String> {
    let cid = identity
        .cluster_id()
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), |c| c.to_string());
    identity.adopt_async(&cid).await?;
    raft.initialize(members)
        .await
        .context("cannot initialize the cluster")?;
    Ok(cid)
}

/// Forms or joins the cluster as the flags say; runs while the node is already serving (the
/// peers must reach it). An error means the node cannot become a member as configured.
pub async fn form(
    config: Arc<Config>,
    raft: Raft,
    identity: Arc<Identity>,
    advertise: String,
    client: reqwest::Client,
) -> anyhow::Result<()> {
    if let Some(peers) = config.peer_list()? {
        form_from_peers(&raft, &identity, &peers, &advertise, &client).await
    } else if let Some(url) = &config.join {
        join(&raft, &identity, url, &advertise, &client).await
    } else {
        Ok(())
    }
}

async fn ask_identity(
    identity: &Identity,
    client: &reqwest::Client,
    addr: &str,
) -> anyhow::Result<NodeIdentity> {
    let req = client
        .get(format!("{}/raft/identity", identity.base_url(addr)))
        .timeout(Duration::from_secs(2));
    let resp = identity.sign(req).send().await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("{addr} answered {status}: {text}");
    }
    Ok(resp.json().await?)
}

/// `--peers`: the lowest address initializes the cluster with every listed node, once all
/// of them answered and none belongs to a cluster yet.
async fn form_from_peers(
    raft: &Raft,
    identity: &Arc<Identity>,
    peers: &[String],
    advertise: &str,
    client: &reqwest::Client,
) -> anyhow::Result<()> {
    if raft.is_initialized().await? {
        return Ok(());
    }
    let seed = peers.iter().min().map(String::as_str).unwrap_or(advertise);
    if seed != advertise {
        tracing::info!(%seed, "waiting for {seed} to initialize the cluster");
        return Ok(());
    }
    let mut last_progress = Instant::now();
    let members = loop {
        if raft.is_initialized().await? {
            return Ok(());
        }
        let mut members = BTreeMap::from([(
            identity.node_id,
            BasicNode {
                addr: advertise.to_owned(),
            },
        )]);
        let mut missing = Vec::new();
        for peer in peers.iter().filter(|p| *p != advertise) {
            match ask_identity(identity, client, peer).await {
                Ok(them) => {
                    let foreign = them
                        .cluster_id
                        .as_deref()
                        .is_some_and(|c| identity.cluster_id().as_deref() != Some(c));
                    if them.initialized || foreign {
                        anyhow::bail!(
                            "peer {peer} already belongs to a cluster ({}); this node's data dir \
                             is new or was wiped, so it must join that cluster: restart it with \
                             --join {} instead of --peers",
                            them.cluster_id.unwrap_or_default(),
                            identity.base_url(peer)
                        );
                    }
                    if members.contains_key(&them.node_id) {
                        anyhow::bail!(
                            "peer {peer} has the same node id {} as another peer; was a data \
                             dir copied? give each node its own",
                            them.node_id
                        );
                    }
                    members.insert(them.node_id, BasicNode { addr: peer.clone() });
                }
                Err(e) => missing.push(format!("{peer} ({e})")),
            }
        }
        if missing.is_empty() {
            break members;
        }
        if last_progress.elapsed() >= FORM_PROGRESS {
            tracing::info!(
                "waiting for every peer before initializing the cluster; not reached yet: {}",
                missing.join(", ")
            );
            last_progress = Instant::now();
        }
        tokio::time::sleep(FORM_RETRY).await;
    };
    let n = members.len();
    let cid = initialize(raft, identity, members).await?;
    tracing::info!(
        cluster_id = cid,
        members = n,
        "initialized the cluster from the peers file"
    );
    Ok(())
}

fn is_voter(raft: &Raft, id: NodeId) -> bool {
    raft.metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .any(|v| v == id)
}

/// `--join`: asks `url` to add this node until it is a voter. Refusals (another cluster,
/// wrong secret, address taken) are errors; unavailability is retried.
async fn join(
    raft: &Raft,
    identity: &Arc<Identity>,
    url: &str,
    advertise: &str,
    client: &reqwest::Client,
) -> anyhow::Result<()> {
    let url = url.trim_end_matches('/');
    let target = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    if is_voter(raft, identity.node_id) {
        // Already a member; only make sure it is a member of the cluster named.
        if let Ok(them) = ask_identity(identity, client, target).await {
            if let Some(cid) = them.cluster_id {
                identity
                    .adopt_async(&cid)
                    .await
                    .map_err(|e| anyhow::anyhow!("--join {url} names another cluster: {e}"))?;
            }
        }
        return Ok(());
    }
    let mut last_progress = Instant::now();
    loop {
        let outcome = try_join(identity, client, url, target, advertise).await;
        match outcome {
            Ok(()) => {
                tracing::info!(%url, "joined the cluster as a voter");
                return Ok(());
            }
            Err(JoinError::Refused(why)) => anyhow::bail!("cannot join through {url}: {why}"),
            Err(JoinError::Retry(why)) => {
                if is_voter(raft, identity.node_id) {
                    return Ok(());
                }
                if last_progress.elapsed() >= FORM_PROGRESS {
                    tracing::info!(%url, "still trying to join: {why}");
                    last_progress = Instant::now();
                }
                tokio::time::sleep(FORM_RETRY).await;
            }
        }
    }
}

enum JoinError {
    Refused(String),
    Retry(String),
}

async fn try_join(
    identity: &Arc<Identity>,
    client: &reqwest::Client,
    url: &str,
    target: &str,
    advertise: &str,
) -> Result<(), JoinError> {
    let them = ask_identity(identity, client, target)
        .await
        .map_err(|e| JoinError::Retry(e.to_string()))?;
    if let Some(cid) = &them.cluster_id {
        identity
            .adopt_async(cid)
            .await
            .map_err(|e| JoinError::Refused(e.to_string()))?;
    }
    let body = JoinRequest {
        node_id: identity.node_id,
        addr: advertise.to_owned(),
    };
    let req = client
        .post(format!("{url}/cluster/join"))
        .timeout(JOIN_TIMEOUT)
        .json(&body);
    let resp = identity
        .sign(req)
        .send()
        .await
        .map_err(|e| JoinError::Retry(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    if status.is_client_error() {
        Err(JoinError::Refused(format!("{status}: {text}")))
    } else {
        Err(JoinError::Retry(format!("{status}: {text}")))
    }
}

/// Waits until the cluster has a leader and the replicated state holds the cluster id; a
/// leader proposes its own (the first one applied wins everywhere).
pub async fn ensure_cluster_id(
    identity: Arc<Identity>,
    raft: Raft,
    store: Arc<Store>,
    proposer: Proposer,
) {
    // The full metrics, as the proposer reads them: the server metrics name a new leader
    // before the full metrics say it leads, and a proposal in between is refused. This
    // watcher ends once the cluster id is set, so its wake-ups at every write do not last.
    let mut metrics = raft.metrics();
    loop {
        if store.cluster_id().is_some() {
            return;
        }
        let leader = metrics.borrow_and_update().current_leader;
        let mine = identity.cluster_id();
        if let (true, Some(id)) = (leader == Some(identity.node_id), mine) {
            let id = id.to_string();
            let req = Request {
                idempotency_key: None,
                op: Op::SetClusterId { id },
            };
            match proposer.propose(req).await {
                Ok(_) => continue,
                Err(e) => tracing::warn!(error = %e, "could not set the cluster id; will retry"),
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
