//! A persistent connection per peer link for the Raft RPCs on the write path (AppendEntries,
//! votes, leadership transfer). One HTTP request per RPC cost about 0.2 ms of a 3-node
//! write on loopback (request building, the client pool, routing, header checks); on an
//! open stream an RPC is one write and one read on each side.
//!
//! The stream starts as an HTTP/1.1 request to [`STREAM_PATH`] on the peer's listener with
//! `Upgrade: changeagent-raft/1`, carrying the cluster id and secret like every Raft RPC, so
//! the peer's checks (and its routing of member connections to Raft's runtime) are the
//! same. The peer answers `101 Switching Protocols`; from then on both sides exchange
//! frames (the raft-wire crate's [`frame`](changeagent_raft_wire::frame) codec), strictly
//! one request then its answer. A request's tag names the RPC ([`Rpc`]), its body is the
//! openraft request as JSON. An answer's tag is [`ANSWER`] (body: openraft's `Result` as
//! JSON, exactly what the HTTP endpoints answer) or [`REFUSED`] (body: why, as text; the
//! peer closes the stream).
//!
//! A peer that does not know the path (404) is an older version: the caller falls back to
//! one HTTP request per RPC.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use changeagent_api::tls::{self, ClientStream};

use super::types::TypeConfig;
use super::Raft;
use crate::identity::Identity;
use crate::stages::{Stage, STAGES};
pub use changeagent_raft_wire::frame::{
    encode_frame, frame_body, Rpc, ANSWER, REFUSED, UNKNOWN_TAG,
};
use changeagent_raft_wire::frame::{raw_frame, read_frame};

/// Where a peer stream starts.
pub const STREAM_PATH: &str = "/raft/stream";
/// The `Upgrade` token of a peer stream.
pub const PROTOCOL: &str = "changeagent-raft/1";

/// Largest answer a node reads (answers are a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Largest handshake answer (status line and headers, or a refusal's body).
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// Bodies up to this size are decoded on the async worker; larger ones on the blocking pool.
const DECODE_INLINE_BYTES: usize = 64 * 1024;

/// How this node received Raft RPCs (`/metrics`: `changeagent_raft_rpcs_received_total`
/// by transport and `changeagent_raft_streams_accepted_total`).
pub struct Received {
    streams: AtomicU64,
    /// Open streams served off Raft's runtime (see [`serve`]).
    off_raft_runtime: AtomicU64,
    on_streams: AtomicU64,
    over_http: AtomicU64,
}

/// This process's count of received Raft RPCs.
pub static RECEIVED: Received = Received {
    streams: AtomicU64::new(0),
    off_raft_runtime: AtomicU64::new(0),
    on_streams: AtomicU64::new(0),
    over_http: AtomicU64::new(0),
};

impl Received {
    /// Counts an RPC that came as one HTTP request.
    pub fn http_rpc(&self) {
        self.over_http.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the counts in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        const RPCS: &str = "changeagent_raft_rpcs_received_total";
        const STREAMS: &str = "changeagent_raft_streams_accepted_total";
        const OFF: &str = "changeagent_raft_streams_off_raft_runtime";
        let _ = writeln!(
            out,
            "# HELP {RPCS} Raft RPCs (AppendEntries, votes, transfers) this node answered.\n\
             # TYPE {RPCS} counter\n\
             {RPCS}{{transport=\"stream\"}} {}\n\
             {RPCS}{{transport=\"http\"}} {}\n\
             # HELP {STREAMS} Peer streams this node accepted.\n\
             # TYPE {STREAMS} counter\n\
             {STREAMS} {}\n\
             # HELP {OFF} Open peer streams served on this node's client runtime, behind \
             client work (accepted before it knew the peer as a member).\n\
             # TYPE {OFF} gauge\n\
             {OFF} {}",
            self.on_streams.load(Ordering::Relaxed),
            self.over_http.load(Ordering::Relaxed),
            self.streams.load(Ordering::Relaxed),
            self.off_raft_runtime.load(Ordering::Relaxed),
        );
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing answered (connection refused, reset or timed out): the peer is down.
    #[error("cannot reach {addr}: {source}")]
    Unreachable { addr: String, source: io::Error },
    /// The peer does not serve streams (an older version): use one request per RPC.
    #[error("{addr} does not serve Raft streams")]
    Unsupported { addr: String },
    /// The peer refused the stream (wrong secret or cluster) or broke off the handshake.
    #[error("{addr} refused a Raft stream: {message}")]
    Refused { addr: String, message: String },
}

/// The client end of a stream to one peer.
pub struct PeerStream {
    io: BufReader<ClientStream>,
    /// The cluster id this node sent when it opened the stream. A stream opened before
    /// this node learned its cluster id is reopened, so the peer checks (or adopts) it.
    pub cluster_id: Option<Arc<str>>,
}

impl PeerStream {
    /// Opens a stream to `addr` (`host:port`) from `local_ip` (any when `None`), signed
    /// with `identity`, over TLS with `tls`.
    pub async fn connect(
        addr: &str,
        local_ip: Option<IpAddr>,
        identity: &Identity,
        tls: Option<&TlsConnector>,
    ) -> Result<PeerStream, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable {
            addr: addr.to_owned(),
            source,
        };
        let refused = |message: String| ConnectError::Refused {
            addr: addr.to_owned(),
            message,
        };
        let cluster_id = identity.cluster_id();
        let mut request = format!(
            "GET {STREAM_PATH} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\n\
             upgrade: {PROTOCOL}\r\n"
        );
        for (name, value) in identity.peer_headers() {
            if value.contains(['\r', '\n']) {
                return Err(refused(format!("the {name} header holds a line break")));
            }
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let tcp = connect_tcp(addr, local_ip).await.map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;
        let tcp = tls::connect(tls, addr, tcp).await.map_err(unreachable)?;
        let mut io = BufReader::new(tcp);
        io.get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(unreachable)?;
        io.get_mut().flush().await.map_err(unreachable)?;
        let head = read_head(&mut io).await.map_err(unreachable)?;
        if head.status == 101 && head.upgrade.eq_ignore_ascii_case(PROTOCOL) {
            return Ok(PeerStream { io, cluster_id });
        }
        if head.status == 404 || head.status == 405 {
            return Err(ConnectError::Unsupported {
                addr: addr.to_owned(),
            });
        }
        let mut body = vec![0u8; head.content_length.min(MAX_HANDSHAKE_BYTES)];
        // The reason is best effort: the status alone says enough.
        let _ = io.read_exact(&mut body).await;
        Err(refused(format!(
            "answered {}: {}",
            head.status,
            String::from_utf8_lossy(&body).trim()
        )))
    }

    /// Sends one request frame and reads its answer: openraft's `Result`, or why the peer
    /// refused the request. An I/O error leaves the stream unusable.
    pub async fn call<Resp: DeserializeOwned>(
        &mut self,
        frame: &[u8],
    ) -> io::Result<Result<Result<Resp, RaftError<TypeConfig>>, String>> {
        self.io.get_mut().write_all(frame).await?;
        self.io.get_mut().flush().await?;
        let (tag, body) = read_frame(&mut self.io, MAX_ANSWER_BYTES)
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        match tag {
            ANSWER => serde_json::from_slice(&body)
                .map(Ok)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            _ => Ok(Err(String::from_utf8_lossy(&body).into_owned())),
        }
    }
}

/// Connects to the first of `addr`'s addresses that answers, from `local_ip` when it is of
/// the same family.
async fn connect_tcp(addr: &str, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        match socket.connect(target).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// What a node needs of the handshake's answer.
struct Head {
    status: u16,
    upgrade: String,
    content_length: usize,
}

/// Reads the status line and headers of the handshake's answer.
async fn read_head<R: AsyncRead + Unpin>(io: &mut BufReader<R>) -> io::Result<Head> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut head = Head {
        status: 0,
        upgrade: String::new(),
        content_length: 0,
    };
    let mut read = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = io.read_until(b'\n', &mut line).await?;
        read += n;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if read > MAX_HANDSHAKE_BYTES {
            return Err(invalid("the handshake answer's head is too long"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if head.status == 0 {
            head.status = text
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| invalid("the handshake answer has no HTTP/1.1 status line"))?;
            continue;
        }
        if text.is_empty() {
            return Ok(head);
        }
        if let Some((name, value)) = text.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("upgrade") {
                head.upgrade = value.to_owned();
            } else if name.eq_ignore_ascii_case("content-length") {
                head.content_length = value.parse().unwrap_or(0);
            }
        }
    }
}

/// How a stream is served.
pub struct Serving<'a> {
    /// Requests over this many bytes are refused and end the stream.
    pub max_request: usize,
    /// Cancelled: the stream ends (checked between requests).
    pub until: CancellationToken,
    /// Whether the peer's connection would now be served on Raft's runtime: a stream served
    /// off it ends after an answer once this says yes.
    pub rehome: &'a (dyn Fn() -> bool + Send + Sync),
}

/// Counts a stream served off Raft's runtime while it lasts.
struct OffRaftRuntime;

impl OffRaftRuntime {
    fn new() -> OffRaftRuntime {
        RECEIVED.off_raft_runtime.fetch_add(1, Ordering::Relaxed);
        OffRaftRuntime
    }
}

impl Drop for OffRaftRuntime {
    fn drop(&mut self) {
        RECEIVED.off_raft_runtime.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the RPCs of one stream, in order, until the peer closes it or `how.until` is
/// cancelled. Requests that cannot be read are refused and end the stream.
///
/// A member's connection is moved to Raft's runtime when it is accepted, so its RPCs never
/// wait behind client work. One accepted before this node knew the peer as a member (a
/// node that joined learns its members from the stream itself) is served where it is
/// until this node knows: then it ends after an answer, and the peer sends its next RPC on
/// a new stream, which lands on Raft's runtime.
///
/// As on the HTTP endpoint, the first poll of `append_entries` hands the request to the
/// Raft core, so an append finishes even when the peer has gone.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(raft: Raft, io: S, how: Serving<'_>) {
    let Serving {
        max_request,
        until,
        rehome,
    } = how;
    RECEIVED.streams.fetch_add(1, Ordering::Relaxed);
    let off_raft_runtime = (!crate::on_raft_runtime()).then(OffRaftRuntime::new);
    let mut io = BufReader::new(io);
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut io, max_request) => frame,
            _ = until.cancelled() => return,
        };
        let (tag, body) = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            // The peer went away mid-frame (it stopped, or dropped a timed-out RPC).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(error = %e, "a peer stream broke off");
                return;
            }
            Err(e) => {
                let message = format!("cannot read a Raft request: {e}");
                tracing::warn!("{message}; closing the peer stream");
                let _ = io
                    .get_mut()
                    .write_all(&raw_frame(REFUSED, message.as_bytes()))
                    .await;
                let _ = io.get_mut().flush().await;
                return;
            }
        };
        let answer = match Rpc::from_tag(tag) {
            Some(rpc) => {
                RECEIVED.on_streams.fetch_add(1, Ordering::Relaxed);
                answer(&raft, rpc, body).await
            }
            None => Err(format!("{UNKNOWN_TAG} {tag}")),
        };
        let (frame, close) = match answer {
            Ok(frame) => (frame, false),
            Err(message) => {
                tracing::warn!("{message}; closing the peer stream");
                (raw_frame(REFUSED, message.as_bytes()), true)
            }
        };
        // Flushed: over TLS the record may wait in the session otherwise.
        let sent = io.get_mut().write_all(&frame).await;
        if sent.is_err() || io.get_mut().flush().await.is_err() || close {
            return;
        }
        if off_raft_runtime.is_some() && rehome() {
            tracing::debug!("ending a peer stream served off Raft's runtime; the peer reopens it");
            return;
        }
    }
}

/// Runs one RPC and encodes its answer frame; `Err` when the request cannot be read.
async fn answer(raft: &Raft, rpc: Rpc, body: Vec<u8>) -> Result<Vec<u8>, String> {
    let encoded = match rpc {
        Rpc::Append => {
            let started = Instant::now();
            let req: AppendEntriesRequest<TypeConfig> = decode(rpc, body).await?;
            let heartbeat = req.entries.is_empty();
            let answer = raft.append_entries(req).await;
            if !heartbeat {
                STAGES.since(Stage::FollowerAppend, started);
            }
            encode_frame(ANSWER, &answer)
        }
        Rpc::Vote => {
            let req: VoteRequest<TypeConfig> = decode(rpc, body).await?;
            encode_frame(ANSWER, &raft.vote(req).await)
        }
        Rpc::PreVote => {
            let req: VoteRequest<TypeConfig> = decode(rpc, body).await?;
            encode_frame(ANSWER, &raft.pre_vote(req).await)
        }
        Rpc::TransferLeader => {
            let req: TransferLeaderRequest<TypeConfig> = decode(rpc, body).await?;
            let answer = raft
                .handle_transfer_leader(req)
                .await
                .map_err(RaftError::<TypeConfig>::Fatal);
            encode_frame(ANSWER, &answer)
        }
    };
    encoded.map_err(|e| format!("cannot encode the answer to a {} request: {e}", rpc.name()))
}

/// Decodes a request body, off the async workers when large.
pub async fn decode<T, B>(rpc: Rpc, body: B) -> Result<T, String>
where
    T: DeserializeOwned + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
{
    let parse = move |body: &[u8]| changeagent_raft_wire::frame::decode_body(rpc, body);
    if body.as_ref().len() <= DECODE_INLINE_BYTES {
        parse(body.as_ref())
    } else {
        tokio::task::spawn_blocking(move || parse(body.as_ref()))
            .await
            .map_err(|e| format!("decoding task failed: {e}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_handshake_head() {
        let text = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                     Upgrade: changeagent-raft/1\r\n\r\nrest";
        let mut io = BufReader::new(&text[..]);
        let head = read_head(&mut io).await.unwrap();
        assert_eq!((head.status, &head.upgrade[..]), (101, PROTOCOL));
        let mut rest = String::new();
        io.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "rest", "bytes after the head stay in the stream");

        let text = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 12\r\n\r\n{\"error\":1}\n";
        let head = read_head(&mut BufReader::new(&text[..])).await.unwrap();
        assert_eq!((head.status, head.content_length), (401, 12));
        assert!(read_head(&mut BufReader::new(&b"SSH-2.0\r\n\r\n"[..]))
            .await
            .is_err());
        assert!(read_head(&mut BufReader::new(&b"HTTP/1.1 101 x\r\n"[..]))
            .await
            .is_err());
    }
}
