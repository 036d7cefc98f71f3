//! Raft RPC endpoints under `/raft/*`: each decodes the request, hands it to the local Raft
//! node, and answers openraft's `Result` as JSON for the caller's transport to decode. Every
//! request first passes [`peer_guard`] (cluster id and secret).

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_api::serve::ClientAddr;
use changeagent_api::ApiError;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use openraft::error::RaftError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::AppState;
use crate::raft::network::{SNAPSHOT_META_HEADER, SNAPSHOT_VOTE_HEADER};
use crate::raft::peer_stream::{self, Rpc, PROTOCOL, RECEIVED, STREAM_PATH};
use crate::raft::snapshot_file;
use crate::raft::types::{NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::stages::{Stage, STAGES};

/// Largest Raft RPC body. An AppendEntries request carries at most `MAX_APPEND_BYTES` of
/// entries, or one entry, which holds at most one request of `--max-body-bytes` (at most
/// `MAX_BODY_LIMIT`) when larger; this leaves room for the encoding. The same limit bounds a
/// request frame on a peer stream. A larger request is refused (413, or a refusal that
/// closes the stream) and fails as a network error naming the sizes. Snapshots are streamed
/// to a file, unbounded.
pub const MAX_RAFT_BODY: usize = 2 * crate::config::MAX_BODY_LIMIT;

/// Middleware on `/raft/*`: refuses RPCs without the secret, from another cluster, or (with
/// `--peer-ca`) without a peer certificate.
pub async fn peer_guard(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // `/raft/identity` answers nodes that do not know the cluster id yet (formation).
    let checked = if let Err(e) = app.identity.check_certificate(req.extensions()) {
        Err(e)
    } else if path == "/raft/identity" {
        app.identity.check_secret(req.headers())
    } else {
        app.identity.check_rpc_async(req.headers()).await
    };
    if let Err(e) = checked {
        tracing::warn!(path, error = %e, "refused a peer request");
        return ApiError::from(e).into_response();
    }
    next.run(req).await
}

/// `POST /raft/append` (peers without streams). The body is decoded off the async workers
/// when large. The first poll of `append_entries` hands the request to the Raft core, so
/// when the leader's timeout drops this request the follower still finishes the append
/// (only the answer is lost), and the leader's retry finds the entries present.
pub async fn append(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>>>, ApiError> {
    RECEIVED.http_rpc();
    let started = Instant::now();
    let req: AppendEntriesRequest<TypeConfig> = peer_stream::decode(Rpc::Append, body)
        .await
        .map_err(ApiError::BadRequest)?;
    let heartbeat = req.entries.is_empty();
    let answer = app.raft.append_entries(req).await;
    if !heartbeat {
        STAGES.since(Stage::FollowerAppend, started);
    }
    Ok(Json(answer))
}

/// `GET /raft/stream` with `Upgrade: changeagent-raft/1`: turns the connection into a
/// [peer stream](crate::raft::peer_stream) serving this node's Raft RPCs. The connection
/// has passed [`peer_guard`], and a member's connection is already on Raft's runtime,
/// where the stream's task runs too.
pub async fn stream(State(app): State<Arc<AppState>>, mut req: Request) -> Response {
    let wanted = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
    if !wanted {
        return ApiError::BadRequest(format!(
            "{STREAM_PATH} needs `connection: upgrade` and `upgrade: {PROTOCOL}`"
        ))
        .into_response();
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0.ip());
    let tasks = app.peer_streams.clone();
    tasks.spawn(async move {
        match upgrade.await {
            Ok(io) => {
                let io = TokioIo::new(io);
                // Accepted before this node knew the peer as a member, the stream is served
                // off Raft's runtime; once it knows, the stream ends for the peer to reopen.
                let is_member = app.is_member.clone();
                let rehome = move || client.is_some_and(|ip| is_member(ip));
                let how = peer_stream::Serving {
                    max_request: MAX_RAFT_BODY,
                    until: app.serving.clone(),
                    rehome: &rehome,
                };
                peer_stream::serve(app.raft.clone(), io, how).await
            }
            Err(e) => tracing::debug!(error = %e, "a peer stream's upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default()
}

/// `POST /raft/vote`.
pub async fn vote(
    State(app): State<Arc<AppState>>,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Json<Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>> {
    RECEIVED.http_rpc();
    Json(app.raft.vote(req).await)
}

/// `POST /raft/pre-vote`: would this node grant the vote? It changes nothing.
pub async fn pre_vote(
    State(app): State<Arc<AppState>>,
    Json(req): Json<VoteRequest<TypeConfig>>,
) -> Json<Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>> {
    RECEIVED.http_rpc();
    Json(app.raft.pre_vote(req).await)
}

/// `POST /raft/transfer-leader`: the leader hands over to this node (it stops leading and
/// asks this node to campaign at once).
pub async fn transfer_leader(
    State(app): State<Arc<AppState>>,
    Json(req): Json<TransferLeaderRequest<TypeConfig>>,
) -> Json<Result<TransferLeaderResponse<TypeConfig>, RaftError<TypeConfig>>> {
    RECEIVED.http_rpc();
    Json(
        app.raft
            .handle_transfer_leader(req)
            .await
            .map_err(RaftError::Fatal),
    )
}

fn json_header<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    name: &str,
) -> Result<T, ApiError> {
    let raw = headers
        .get(name)
        .ok_or_else(|| ApiError::BadRequest(format!("missing header {name}")))?;
    serde_json::from_slice(raw.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("bad header {name}: {e}")))
}

/// `POST /raft/snapshot`: the leader's whole snapshot as one streamed body, written to a
/// temp file in the snapshot dir, then installed.
pub async fn snapshot(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>>>, ApiError> {
    let vote: Vote = json_header(&headers, SNAPSHOT_VOTE_HEADER)?;
    let meta: SnapshotMeta = json_header(&headers, SNAPSHOT_META_HEADER)?;
    let io = |what: &str, e: std::io::Error| ApiError::Internal(format!("{what}: {e}"));
    let file = tempfile::tempfile_in(&app.snapshot_dir)
        .map_err(|e| io("cannot create a file for the incoming snapshot", e))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::BadRequest(format!(
                "snapshot upload broke off after {received} bytes: {e}"
            ))
        })?;
        received += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| io("cannot write the incoming snapshot", e))?;
    }
    file.flush()
        .await
        .map_err(|e| io("cannot write the incoming snapshot", e))?;
    let mut std_file = file.into_std().await;
    let trailer_meta = meta.clone();
    let std_file = tokio::task::spawn_blocking(move || {
        snapshot_file::write_trailer(&mut std_file, &trailer_meta)?;
        Ok::<_, std::io::Error>(std_file)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| io("cannot write the incoming snapshot", e))?;
    tracing::info!(snapshot = %meta, bytes = received, "received a snapshot; installing");
    let snapshot = Snapshot {
        meta,
        snapshot: tokio::fs::File::from_std(std_file),
    };
    Ok(Json(
        app.raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(RaftError::Fatal),
    ))
}

/// Answer of `POST /raft/read-index`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadIndex {
    /// The Raft log index a follower must have applied before serving a consistent read.
    pub index: u64,
}

/// `POST /raft/read-index`: the leader confirms it still leads (a heartbeat round to a
/// quorum) and answers the log index a consistent read must wait for.
pub async fn read_index(State(app): State<Arc<AppState>>) -> Result<Json<ReadIndex>, ApiError> {
    let timeout = app.config.write_timeout();
    match tokio::time::timeout(timeout, app.raft.get_read_log_id(ReadPolicy::ReadIndex)).await {
        Ok(Ok((read, _applied))) => Ok(Json(ReadIndex {
            index: read.index(),
        })),
        Ok(Err(e)) => Err(ApiError::Unavailable {
            message: format!("cannot confirm leadership for a consistent read: {e}"),
            retry_after_secs: 1,
        }),
        Err(_) => Err(ApiError::Unavailable {
            message: format!(
                "leadership not confirmed within {} ms (no quorum?)",
                timeout.as_millis()
            ),
            retry_after_secs: 1,
        }),
    }
}

/// Answer of `GET /raft/identity`, used while forming a cluster.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub cluster_id: Option<String>,
    /// Whether the node already holds a membership (belongs to a cluster).
    pub initialized: bool,
}

/// `GET /raft/identity`.
pub async fn identity(State(app): State<Arc<AppState>>) -> Result<Json<NodeIdentity>, ApiError> {
    let initialized = app
        .raft
        .is_initialized()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(NodeIdentity {
        node_id: app.node_id,
        cluster_id: app.identity.cluster_id().map(|c| c.to_string()),
        initialized,
    }))
}
