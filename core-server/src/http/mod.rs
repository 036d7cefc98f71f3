//! The core node's HTTP surface: the shared read routes from the change store, the write and
//! ops routes, and the Raft RPC endpoints under `/raft/*`.

pub mod handlers;
pub mod raft;
pub mod routes;

use std::sync::Arc;

use changeagent_store::http::HttpMetrics;
use changeagent_store::Store;

use crate::config::Config;
use crate::proposer::Proposer;
use crate::raft::types::{NodeId, Raft};

/// State shared by the core's handlers.
pub struct AppState {
    pub node_id: NodeId,
    pub raft: Raft,
    pub proposer: Proposer,
    pub store: Arc<Store>,
    pub config: Arc<Config>,
    pub metrics: Arc<HttpMetrics>,
}
