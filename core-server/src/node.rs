//! Starting a node: open storage, pick or load the node id, start Raft, initialize a new
//! single-node cluster exactly once, and keep the cluster id set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use changeagent_store::Store;
use openraft::BasicNode;

use crate::config::Config;
use crate::proposer::Proposer;
use crate::raft::log_store::{read_node_id, write_node_id, LogStore};
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachine;
use crate::raft::types::{NodeId, Op, Raft, Request};

/// Log entries kept behind a snapshot, so a briefly lagging follower catches up from the log.
const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1000;

/// A started Raft node and its storage.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Arc<Store>,
}

/// A fresh node id: random, below 2^53 so JSON clients in every language read it exactly.
fn new_node_id() -> NodeId {
    let id = (uuid::Uuid::new_v4().as_u128() as u64) & ((1 << 53) - 1);
    id.max(1)
}

/// Opens storage and starts Raft. On first start it initializes a one-voter cluster with
/// itself (never again: a restart finds the membership in its log).
pub async fn start(
    config: &Config,
    advertise: &str,
    client: reqwest::Client,
) -> anyhow::Result<Node> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let store = Store::open(dir.join("changes"))
        .with_context(|| format!("cannot open the change store in {}", dir.display()))?;
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
    let raft_config = openraft::Config {
        cluster_name: "changeagent".into(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms * 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
        ..Default::default()
    }
    .validate()
    .context("invalid Raft timing flags")?;
    let sm = StateMachine::new(store.clone(), dir.join("snapshots"))
        .with_context(|| format!("cannot create the snapshot dir in {}", dir.display()))?;
    let raft = Raft::new(
        id,
        Arc::new(raft_config),
        Network::new(client, None),
        log_store,
        sm,
    )
    .await
    .context("cannot start Raft")?;
    if !raft.is_initialized().await? {
        let members = BTreeMap::from([(
            id,
            BasicNode {
                addr: advertise.to_owned(),
            },
        )]);
        raft.initialize(members)
            .await
            .context("cannot initialize a new single-node cluster")?;
        tracing::info!(node_id = id, "initialized a new single-node cluster");
    }
    Ok(Node { id, raft, store })
}

/// Waits until the cluster has a leader and a cluster id, proposing a new id when this node
/// leads a cluster that has none yet (the first one applied wins everywhere).
pub async fn ensure_cluster_id(node_id: NodeId, raft: Raft, store: Arc<Store>, proposer: Proposer) {
    let mut metrics = raft.metrics();
    loop {
        if store.cluster_id().is_some() {
            return;
        }
        let leader = metrics.borrow_and_update().current_leader;
        if leader == Some(node_id) {
            let id = uuid::Uuid::new_v4().to_string();
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
