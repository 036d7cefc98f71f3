//! Raft RPC endpoints: each decodes the request, hands it to the local Raft node, and
//! answers openraft's `Result` as JSON for the caller's transport to decode.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::AppState;
use crate::raft::types::{NodeId, TypeConfig};

/// `POST /raft/append`.
pub async fn append(
    State(app): State<Arc<AppState>>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Json(app.raft.append_entries(req).await)
}

/// `POST /raft/vote`.
pub async fn vote(
    State(app): State<Arc<AppState>>,
    Json(req): Json<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(app.raft.vote(req).await)
}

/// `POST /raft/snapshot` (one chunk).
pub async fn snapshot(
    State(app): State<Arc<AppState>>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Json(app.raft.install_snapshot(req).await)
}
