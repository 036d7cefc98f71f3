//! Raft RPCs between nodes. AppendEntries, pre-votes, votes and leadership transfers travel
//! on a persistent [stream](super::peer_stream) per link, opened on the target's listener
//! with the cluster id and secret; a target that does not serve streams (an older version)
//! gets one JSON `POST /raft/*` per RPC through the shared reqwest client instead. A connect
//! failure is `Unreachable`, so openraft backs off; the time limit is the one openraft
//! passes (the AppendEntries timeout equals the heartbeat). A target that does not know an
//! RPC (Pre-Vote, sent to a version before it) is told apart: openraft counts it as a
//! grant.
//!
//! Snapshots are streamed from the snapshot file in one request (`POST /raft/snapshot`, the
//! vote and snapshot meta in headers); the receiver writes the body to a file and installs it
//! with `install_full_snapshot`. Nothing holds a whole snapshot in memory.

use std::fmt::Write as _;
use std::future::Future;
use std::io::SeekFrom;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_rustls::TlsConnector;

use super::peer_stream::{self, ConnectError, PeerStream, Rpc};
use super::snapshot_file;
use super::types::{entry_len, NodeId, Snapshot, SnapshotData, TypeConfig, Vote};
use crate::identity::Identity;
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

/// Vote requests this node sent as a (pre-)candidate, one per target (`/metrics`:
/// `changeagent_raft_vote_requests_sent_total` by kind): how often it campaigned.
pub struct VotesSent {
    pre_votes: AtomicU64,
    votes: AtomicU64,
}

/// This process's count of sent vote requests.
pub static VOTES_SENT: VotesSent = VotesSent {
    pre_votes: AtomicU64::new(0),
    votes: AtomicU64::new(0),
};

impl VotesSent {
    /// Writes the counts in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        const SENT: &str = "changeagent_raft_vote_requests_sent_total";
        let _ = writeln!(
            out,
            "# HELP {SENT} Vote requests this node sent to its peers as a candidate (vote) or \
             before one (pre_vote, asking whether they would vote for it).\n\
             # TYPE {SENT} counter\n\
             {SENT}{{kind=\"pre_vote\"}} {}\n\
             {SENT}{{kind=\"vote\"}} {}",
            self.pre_votes.load(Ordering::Relaxed),
            self.votes.load(Ordering::Relaxed),
        );
    }
}

/// Creates one [`Connection`] per target; all share the HTTP client.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    identity: Arc<Identity>,
    local_ip: Option<IpAddr>,
    tls: Option<TlsConnector>,
}

impl Network {
    /// A network using `client`, signing every RPC with `identity`; its streams connect
    /// from `local_ip` when given (the address the node listens on, as for the client), over
    /// TLS with `tls` (`--peer-ca`).
    pub fn new(
        client: reqwest::Client,
        identity: Arc<Identity>,
        local_ip: Option<IpAddr>,
        tls: Option<TlsConnector>,
    ) -> Self {
        Network {
            client,
            identity,
            local_ip,
            tls,
        }
    }
}

/// RPCs to one target node. openraft makes one per replication stream, heartbeat worker
/// and election, and calls it one RPC at a time, so each holds its own peer stream.
pub struct Connection {
    client: reqwest::Client,
    identity: Arc<Identity>,
    target: NodeId,
    base: String,
    /// `host:port` for a stream; `None` when the address names a scheme streams do not
    /// speak here (https without `--peer-ca`), or the target answered that it serves none.
    stream_addr: Option<Arc<str>>,
    tls: Option<TlsConnector>,
    /// The open stream, taken out while an RPC uses it: an RPC that fails or is dropped
    /// half-way leaves none, and the next one opens a new stream.
    stream: Option<PeerStream>,
    local_ip: Option<IpAddr>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        let addr = node.addr.trim_end_matches('/');
        let stream_addr = match (addr.split_once("://"), &self.tls) {
            (None, _) => Some(addr.into()),
            (Some(("http", plain)), None) | (Some(("https", plain)), Some(_)) => Some(plain.into()),
            (Some(_), _) => None,
        };
        Connection {
            client: self.client.clone(),
            identity: self.identity.clone(),
            target,
            base: self.identity.base_url(&node.addr),
            stream_addr,
            tls: self.tls.clone(),
            stream: None,
            local_ip: self.local_ip,
        }
    }
}

fn send_error(e: reqwest::Error) -> RPCError<TypeConfig> {
    if e.is_connect() {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

fn network_error(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(e.to_string()))
}

impl Connection {
    /// Sends one RPC, on the stream to the target when it serves one.
    async fn call<Req, Resp>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let frame = peer_stream::encode_frame(rpc as u8, req).map_err(network_error)?;
        self.call_frame(rpc, frame, option).await
    }

    /// Sends an encoded request frame within openraft's time limit: on the stream to the
    /// target, or as an HTTP request when it serves no streams.
    async fn call_frame<Resp>(
        &mut self,
        rpc: Rpc,
        frame: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
    {
        self.try_call_frame(rpc, frame, option)
            .await
            .map_err(|failure| match failure {
                Failure::Rpc(e) => e,
                Failure::Unknown => network_error(format!(
                    "node {} does not know the {} RPC (an older version)",
                    self.target,
                    rpc.name()
                )),
            })
    }

    /// [`call_frame`](Self::call_frame), telling a target that does not know the RPC apart.
    async fn try_call_frame<Resp>(
        &mut self,
        rpc: Rpc,
        frame: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, Failure>
    where
        Resp: DeserializeOwned,
    {
        if let Some(addr) = self.stream_addr.clone() {
            let ttl = option.hard_ttl();
            match tokio::time::timeout(ttl, self.call_on_stream(&addr, rpc, &frame)).await {
                Ok(Some(result)) => return result,
                Ok(None) => {
                    tracing::info!(
                        target_node = self.target,
                        "the node serves no Raft streams (an older version?); \
                         sending one HTTP request per RPC"
                    );
                    self.stream_addr = None;
                }
                Err(_) => {
                    return Err(Failure::Rpc(network_error(format!(
                        "raft RPC {} to node {} got no answer within {} ms",
                        rpc.path(),
                        self.target,
                        ttl.as_millis()
                    ))))
                }
            }
        }
        let body = peer_stream::frame_body(&frame).to_vec();
        self.call_raw(rpc.path(), body, option).await
    }

    /// Sends a request frame on the stream to `addr`, opening one if needed; `None` when
    /// the target serves no streams.
    async fn call_on_stream<Resp>(
        &mut self,
        addr: &str,
        rpc: Rpc,
        frame: &[u8],
    ) -> Option<Result<Resp, Failure>>
    where
        Resp: DeserializeOwned,
    {
        let cluster_id = self.identity.cluster_id();
        // A stream opened before this node knew its cluster id is replaced, so the target
        // checks the id.
        let mut reused = self.stream.take().filter(|s| s.cluster_id == cluster_id);
        loop {
            let fresh = reused.is_none();
            let mut stream = match reused.take() {
                Some(stream) => stream,
                None => match PeerStream::connect(
                    addr,
                    self.local_ip,
                    &self.identity,
                    self.tls.as_ref(),
                )
                .await
                {
                    Ok(stream) => stream,
                    Err(ConnectError::Unsupported { .. }) => return None,
                    Err(e @ ConnectError::Unreachable { .. }) => {
                        return Some(Err(Failure::Rpc(RPCError::Unreachable(Unreachable::new(
                            &e,
                        )))))
                    }
                    Err(e @ ConnectError::Refused { .. }) => {
                        return Some(Err(Failure::Rpc(network_error(e))))
                    }
                },
            };
            let failed = match stream.call(frame).await {
                Ok(Ok(answer)) => {
                    self.stream = Some(stream);
                    return Some(
                        answer
                            .map_err(|e| Failure::Rpc(RPCError::Unreachable(Unreachable::new(&e)))),
                    );
                }
                // The target closes the stream after a refusal; the next RPC opens another.
                Ok(Err(refusal)) if refusal.starts_with(peer_stream::UNKNOWN_TAG) => {
                    return Some(Err(Failure::Unknown))
                }
                Ok(Err(refusal)) => format!("was refused: {refusal}"),
                // A stream that sat open may have been closed by the target (a restart);
                // every Raft RPC can be sent twice, so one retry goes on a new stream.
                Err(_) if !fresh => continue,
                Err(e) => format!("broke off: {e}"),
            };
            return Some(Err(Failure::Rpc(network_error(format!(
                "raft RPC {} to node {} {failed}",
                rpc.path(),
                self.target
            )))));
        }
    }

    /// Posts an encoded request. The peer answers openraft's `Result`; its error (the peer
    /// stopped or is stopping) makes the peer unreachable for now, so openraft backs off.
    async fn call_raw<Resp>(
        &self,
        path: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, Failure>
    where
        Resp: DeserializeOwned,
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
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(Failure::Unknown);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(Failure::Rpc(network_error(format!(
                "raft RPC {path} to node {} answered {status}: {text}",
                self.target
            ))));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let result: Result<Resp, RaftError<TypeConfig>> =
            serde_json::from_slice(&bytes).map_err(network_error)?;
        result.map_err(|e| Failure::Rpc(RPCError::Unreachable(Unreachable::new(&e))))
    }
}

/// Why an RPC failed.
enum Failure {
    /// What openraft hears.
    Rpc(RPCError<TypeConfig>),
    /// The target does not know the RPC: an older version, for an RPC added since.
    Unknown,
}

impl From<RPCError<TypeConfig>> for Failure {
    fn from(e: RPCError<TypeConfig>) -> Self {
        Failure::Rpc(e)
    }
}

/// Bytes of entries encoded on the async worker; larger payloads on the blocking pool.
const ENCODE_INLINE_BYTES: usize = 64 * 1024;

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        if rpc.entries.is_empty() {
            return self.call(Rpc::Append, &rpc, &option).await;
        }
        let started = Instant::now();
        // Large payloads are encoded off the async workers. Replication reads are bounded
        // (see the log store), so a request is larger than that only for one large entry,
        // which the peer's Raft request limit always admits.
        let bytes: usize = rpc.entries.iter().map(entry_len).sum();
        let tag = Rpc::Append as u8;
        let frame = if bytes <= ENCODE_INLINE_BYTES {
            peer_stream::encode_frame(tag, &rpc)
        } else {
            tokio::task::spawn_blocking(move || peer_stream::encode_frame(tag, &rpc))
                .await
                .map_err(network_error)?
        }
        .map_err(network_error)?;
        let result = self.call_frame(Rpc::Append, frame, &option).await;
        if result.is_ok() {
            STAGES.since(Stage::Replicate, started);
        }
        result
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = self.stream_snapshot(vote, snapshot) => result,
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        VOTES_SENT.votes.fetch_add(1, Ordering::Relaxed);
        self.call(Rpc::Vote, &rpc, &option).await
    }

    /// A target of a version before Pre-Vote is counted as granting it, as openraft does for
    /// a network without the RPC, so a rolling upgrade elects as before; a target that cannot
    /// be reached is not.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        VOTES_SENT.pre_votes.fetch_add(1, Ordering::Relaxed);
        let frame = peer_stream::encode_frame(Rpc::PreVote as u8, &rpc).map_err(network_error)?;
        match self.try_call_frame(Rpc::PreVote, frame, &option).await {
            Ok(answer) => Ok(answer),
            Err(Failure::Rpc(e)) => Err(e),
            Err(Failure::Unknown) => {
                tracing::info!(
                    target_node = self.target,
                    "the node does not know Pre-Vote (an older version); counted as granting it"
                );
                Ok(VoteResponse::new(rpc.vote, None, true))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::TransferLeader, &req, &option).await
    }
}

impl Connection {
    /// Sends the snapshot file's checkpoint data as one streamed request.
    async fn stream_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
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
        let result: Result<SnapshotResponse<TypeConfig>, RaftError<TypeConfig>> = resp
            .json()
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        tracing::info!(
            target_node = self.target,
            bytes = data_len,
            "sent a snapshot"
        );
        result.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::raft::log_store::LogStore;
    use changeagent_raft_wire::frame::{raw_frame, read_frame, REFUSED};

    /// How a fake peer answers.
    #[derive(Clone, Copy)]
    enum Peer {
        /// Serves streams and refuses every request on them with `why`.
        Refuses(&'static str),
        /// Serves no streams and knows no Raft path: 404 to everything (one request per
        /// connection).
        NotFound,
    }

    /// A peer on 127.0.0.1 answering as `peer`; its address.
    async fn fake_peer(peer: Peer) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp, peer));
            }
        });
        addr
    }

    async fn serve(tcp: TcpStream, peer: Peer) {
        let mut io = BufReader::new(tcp);
        let mut length = 0;
        loop {
            let mut line = String::new();
            if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(n) = lower.strip_prefix("content-length:") {
                length = n.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        let _ = io.read_exact(&mut body).await;
        match peer {
            Peer::NotFound => {
                let _ = io
                    .get_mut()
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
            Peer::Refuses(why) => {
                let head = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                     upgrade: {}\r\n\r\n",
                    peer_stream::PROTOCOL
                );
                let _ = io.get_mut().write_all(head.as_bytes()).await;
                if let Ok(Some(_)) = read_frame(&mut io, 1 << 20).await {
                    let _ = io
                        .get_mut()
                        .write_all(&raw_frame(REFUSED, why.as_bytes()))
                        .await;
                }
            }
        }
        let _ = io.get_mut().shutdown().await;
    }

    async fn pre_vote(
        addr: &str,
    ) -> (
        VoteRequest<TypeConfig>,
        Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let identity = Arc::new(Identity::new(1, Some("c".into()), None, log));
        let mut network = Network::new(reqwest::Client::new(), identity, None, None);
        let mut conn = network.new_client(2, &BasicNode::new(addr)).await;
        let req = VoteRequest::new(Vote::new(3, 1), None);
        let answer = conn
            .pre_vote(req.clone(), RPCOption::new(Duration::from_secs(5)))
            .await;
        (req, answer)
    }

    #[tokio::test]
    async fn a_peer_without_pre_vote_counts_as_granting_it() {
        // What versions before Pre-Vote answer to tag 4, word for word.
        let on_stream = fake_peer(Peer::Refuses("unknown Raft request tag 4")).await;
        let over_http = fake_peer(Peer::NotFound).await;
        for addr in [on_stream, over_http] {
            let (req, answer) = pre_vote(&addr).await;
            let answer = answer.unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert!(answer.vote_granted, "{addr}: {answer:?}");
            assert_eq!(answer.vote, req.vote);
        }
    }

    #[tokio::test]
    async fn a_peer_that_refuses_or_cannot_be_reached_grants_no_pre_vote() {
        let refusing = fake_peer(Peer::Refuses("invalid PreVote request")).await;
        let (_, answer) = pre_vote(&refusing).await;
        assert!(
            answer.is_err(),
            "a refusal counted as an answer: {answer:?}"
        );
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let (_, answer) = pre_vote(&addr).await;
        assert!(
            matches!(answer, Err(RPCError::Unreachable(_))),
            "a closed port: {answer:?}"
        );
    }
}
