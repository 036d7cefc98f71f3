//! The core node's HTTP surface: the shared read routes of the api crate, the write, admin
//! and ops routes, membership routes, and the Raft RPC endpoints under `/raft/*`.

pub mod admin;
pub mod cluster;
pub mod consistent;
pub mod forward;
pub mod handlers;
pub mod raft;
pub mod routes;

use crate::raft::state_machine::AppliedIndex;
use std::path::PathBuf;
use std::sync::Arc;

use changeagent_api::HttpMetrics;
use changeagent_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::identity::Identity;
use crate::proposer::Proposer;
use crate::raft::types::NodeId;
use crate::raft::Raft;

/// State shared by the core's handlers.
pub struct AppState {
    pub node_id: NodeId,
    pub identity: Arc<Identity>,
    pub raft: Raft,
    pub proposer: Proposer,
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub metrics: Arc<HttpMetrics>,
    /// The shared HTTP client for peers (forwarding, membership, read index).
    pub client: reqwest::Client,
    /// Where snapshots are kept and received.
    pub snapshot_dir: PathBuf,
    /// Cancelled to stop the node (`POST /cluster/leave`).
    pub shutdown: CancellationToken,
    /// Cancelled once the node stops serving (after a stopping leader handed over); peer
    /// streams end then, as other connections do.
    pub serving: CancellationToken,
    /// The peer streams' tasks: they hold the Raft handle, so the node waits for them to end
    /// before it closes its storage.
    pub peer_streams: TaskTracker,
    /// The Raft index applied to the store (what `/health` reports).
    pub applied: AppliedIndex,
    /// Whether an address is a member's (whose connections are served on Raft's runtime).
    pub is_member: Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>,
}
