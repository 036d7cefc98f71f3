//! Raft RPCs over HTTP: one shared reqwest client (keep-alive) posts JSON to `/raft/*` on the
//! target's listener, signed with the cluster id and secret. A connect failure is
//! `Unreachable`, so openraft backs off; the request timeout is the one openraft passes (the
//! AppendEntries timeout equals the heartbeat).
//!
//! Snapshots are streamed from the snapshot file in one request (`POST /raft/snapshot`, the
//! vote and snapshot meta in headers); the receiver writes the body to a file and installs it
//! with `install_full_snapshot`. Nothing holds a whole snapshot in memory.

use std::future::Future;
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::snapshot_file;
use super::types::{Entry, NodeId, Request, Snapshot, TypeConfig, Vote};
use crate::identity::{base_url, Identity};
use crate::stages::{Stage, STAGES};

/// Header carrying the sender's vote on a streamed snapshot.
pub const SNAPSHOT_VOTE_HEADER: &str = "x-raft-vote";
/// Header carrying the snapshot's meta on a streamed snapshot.
pub const SNAPSHOT_META_HEADER: &str = "x-raft-snapshot-meta";
/// Longest a streamed snapshot may take (openraft's timeout is per chunk; ours is one
/// request). A cancelled replication stops it sooner.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes read from the snapshot file per body chunk.
const SNAPSHOT_CHUNK: usize = 256 * 1024;

/// Creates one [`Connection`] per target; all share the HTTP client.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    identity: Arc<Identity>,
}

impl Network {
    /// A network using `client`, signing every RPC with `identity`.
    pub fn new(client: reqwest::Client, identity: Arc<Identity>) -> Self {
        Network { client, identity }
    }
}

/// RPCs to one target node.
pub struct Connection {
    client: reqwest::Client,
    identity: Arc<Identity>,
    target: NodeId,
    base: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            client: self.client.clone(),
            identity: self.identity.clone(),
            target,
            base: base_url(&node.addr),
        }
    }
}

fn send_error<E: std::error::Error>(
    e: reqwest::Error,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    if e.is_connect() {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

impl Connection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call_raw(path, body, option).await
    }

    /// Posts an encoded request. A peer answering 413 for a request of several entries asks
    /// openraft to send fewer (`PayloadTooLarge`), so replication never resends the same
    /// too-large range forever.
    async fn call_raw<Resp, E>(
        &self,
        path: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let builder = self
            .client
            .post(format!("{}{path}", self.base))
            .timeout(option.hard_ttl())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let resp = self
            .identity
            .sign(builder)
            .send()
            .await
            .map_err(send_error)?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(1),
                ));
            }
            return Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(format!("raft RPC {path} answered {status}: {text}")),
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Bytes of entries encoded on the async worker; larger payloads on the blocking pool.
const ENCODE_INLINE_BYTES: usize = 64 * 1024;

/// An entry's size for the encoding decision (see [`Request::encoded_len`]).
fn entry_len(e: &Entry) -> usize {
    match &e.payload {
        EntryPayload::Normal(cmd) => cmd.requests.iter().map(Request::encoded_len).sum(),
        EntryPayload::Blank | EntryPayload::Membership(_) => 256,
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        if entries == 0 {
            return self.call("/raft/append", &rpc, &option).await;
        }
        let started = Instant::now();
        // Large payloads are encoded off the async workers.
        let bytes: usize = rpc.entries.iter().map(entry_len).sum();
        let body = if bytes <= ENCODE_INLINE_BYTES {
            serde_json::to_vec(&rpc)
        } else {
            tokio::task::spawn_blocking(move || serde_json::to_vec(&rpc))
                .await
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
        }
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let result = self.call_raw("/raft/append", body, &option).await;
        match result {
            // One entry cannot be split: report it, and openraft retries on its next round.
            Err(RPCError::PayloadTooLarge(_)) if entries == 1 => Err(RPCError::Network(
                NetworkError::new(&std::io::Error::other(format!(
                    "node {} refused one Raft entry of about {bytes} bytes as larger than its \
                     Raft request limit; every node must run the same version",
                    self.target
                ))),
            )),
            Err(RPCError::PayloadTooLarge(hint)) => {
                tracing::warn!(
                    target_node = self.target,
                    entries,
                    bytes,
                    "the peer refused an AppendEntries request as too large; sending fewer entries"
                );
                Err(RPCError::PayloadTooLarge(hint))
            }
            other => {
                STAGES.since(Stage::Replicate, started);
                other
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let _ = (rpc, option);
        Err(RPCError::Network(NetworkError::new(
            &std::io::Error::other("chunked snapshots are not used: snapshots are streamed whole"),
        )))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = self.stream_snapshot(vote, snapshot) => result,
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}

impl Connection {
    /// Sends the snapshot file's checkpoint data as one streamed request.
    async fn stream_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let local = |e: std::io::Error| {
            StreamingError::Network(NetworkError::new(&std::io::Error::other(format!(
                "cannot read the local snapshot: {e}"
            ))))
        };
        let meta = snapshot.meta;
        let mut file = snapshot.snapshot.into_std().await;
        let (file, data_len) = tokio::task::spawn_blocking(move || {
            let len = match snapshot_file::read_trailer(&mut file)? {
                Some(t) => t.data_len,
                None => file.metadata()?.len(),
            };
            Ok::<_, std::io::Error>((file, len))
        })
        .await
        .map_err(|e| local(std::io::Error::other(e)))?
        .map_err(local)?;
        let mut file = tokio::fs::File::from_std(file);
        file.seek(SeekFrom::Start(0)).await.map_err(local)?;
        let body = futures::stream::try_unfold(
            (file.take(data_len), vec![0u8; SNAPSHOT_CHUNK]),
            |(mut reader, mut buf)| async move {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                Ok::<_, std::io::Error>(Some((chunk, (reader, buf))))
            },
        );
        let vote_json = serde_json::to_string(&vote).map_err(|e| local(e.into()))?;
        let meta_json = serde_json::to_string(&meta).map_err(|e| local(e.into()))?;
        let builder = self
            .client
            .post(format!("{}/raft/snapshot", self.base))
            .timeout(SNAPSHOT_TIMEOUT)
            .header(SNAPSHOT_VOTE_HEADER, vote_json)
            .header(SNAPSHOT_META_HEADER, meta_json)
            .header(reqwest::header::CONTENT_LENGTH, data_len)
            .body(reqwest::Body::wrap_stream(body));
        let resp = self.identity.sign(builder).send().await.map_err(|e| {
            if e.is_connect() {
                StreamingError::Unreachable(Unreachable::new(&e))
            } else {
                StreamingError::Network(NetworkError::new(&e))
            }
        })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(StreamingError::Network(NetworkError::new(
                &std::io::Error::other(format!("snapshot upload answered {status}: {text}")),
            )));
        }
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> = resp
            .json()
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        tracing::info!(
            target_node = self.target,
            bytes = data_len,
            "sent a snapshot"
        );
        result.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
