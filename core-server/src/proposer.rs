//! The write path on the leader: concurrent client requests are grouped into one Raft entry,
//! so N waiting writers cost one log sync, not N.
//!
//! Ordering rules:
//! 1. A request waits in the channel while earlier entries are being committed.
//! 2. Up to [`MAX_IN_FLIGHT`] entries are in Raft at once; when one is done, everything
//!    waiting becomes the next entry, up to [`MAX_REQUESTS_PER_ENTRY`] requests and
//!    [`MAX_ENTRY_BYTES`] (a larger single request is an entry alone). Entries enter the
//!    log in the order they are proposed, so requests keep their arrival order.
//! 3. Each request gets its own answer from the state machine, in order; a rejected request
//!    (bad reference, duplicate name) never affects the others in its entry.
//!
//! Limits: the requests waiting for the proposer hold at most [`MAX_QUEUE_BYTES`] (a poster
//! waits for room first, within its write timeout) and [`QUEUE_DEPTH`] requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use changeagent_store::now_nanos;
use openraft::async_runtime::WatchReceiver;
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::raft::types::{CallbackResponder, Command, NodeId, Outcome, Request, TypeConfig};
use crate::raft::Raft;
use crate::stages::{Stage, STAGES};

/// Most requests in one entry: bounds the state machine's batch.
pub const MAX_REQUESTS_PER_ENTRY: usize = 4096;
/// Most bytes of requests in one entry (see [`Request::encoded_len`]). An entry must reach
/// the followers within one AppendEntries timeout (the heartbeat), so entries stay small;
/// a single larger request (up to `--max-body-bytes`) is an entry alone.
pub const MAX_ENTRY_BYTES: usize = 1 << 20;
/// Entries proposed but not yet answered. A second entry in flight splits the waiting
/// requests into two entries without making either faster: on a 3-node cluster, 64 clients
/// reached 13.8k changes/s with one entry in flight, 12.9k with two and 11.2k with four
/// (openraft 0.9); with 0.10, which replicates while the leader syncs, 14.1k–14.6k with one,
/// 14.0k–16.5k with two and 14.6k with four, within this machine's run-to-run noise.
pub const MAX_IN_FLIGHT: usize = 1;
/// Requests waiting for the proposer before posters feel back-pressure.
pub const QUEUE_DEPTH: usize = 16_384;
/// Bytes of requests waiting for the proposer before posters feel back-pressure.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;

/// Why a proposal did not get an answer from the state machine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// Raft appended nothing (or truncated it uncommitted); `leader` leads now, if known.
    #[error("this node is not the leader")]
    NotLeader { leader: Option<NodeId> },
    #[error("raft is shutting down: {0}")]
    Stopped(String),
}

struct Pending {
    request: Request,
    /// The request's [`Request::encoded_len`].
    bytes: usize,
    /// Its room in the queue, given back when it is proposed.
    _room: OwnedSemaphorePermit,
    queued: Instant,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Counters showing how well writes are grouped.
#[derive(Debug, Default)]
pub struct ProposerStats {
    pub entries: AtomicU64,
    pub requests: AtomicU64,
}

/// Handle to the proposer; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    /// Requests for the [`ProposeWorker`]; the worker ends when every handle is dropped.
    tx: mpsc::Sender<Pending>,
    /// One permit per byte waiting (at most [`MAX_QUEUE_BYTES`]).
    room: Arc<Semaphore>,
    stats: Arc<ProposerStats>,
    /// While true, requests wait in the queue instead of being proposed.
    held: Arc<watch::Sender<bool>>,
}

impl Proposer {
    /// Starts the worker on `runtime` (Raft's own).
    pub fn start(raft: Raft, runtime: &tokio::runtime::Handle) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let stats = Arc::new(ProposerStats::default());
        let (held, held_rx) = watch::channel(false);
        runtime.spawn(
            ProposeWorker {
                raft,
                rx,
                stats: stats.clone(),
                held: held_rx,
            }
            .run(),
        );
        Proposer {
            tx,
            room: Arc::new(Semaphore::new(MAX_QUEUE_BYTES)),
            stats,
            held: Arc::new(held),
        }
    }

    /// Holds new entries back (`true`) or lets them go again (`false`): a stopping leader
    /// holds them while its followers catch up, then hands leadership over, and what waited
    /// is answered "not the leader" and forwarded to the new one.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Proposes one request and waits for the state machine's answer.
    pub async fn propose(&self, request: Request) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let bytes = request.encoded_len();
        // A request larger than the whole queue waits until the queue is empty.
        let permits = bytes.min(MAX_QUEUE_BYTES) as u32;
        let stopped = || ProposeError::Stopped("proposer stopped".into());
        let room = self
            .room
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| stopped())?;
        let pending = Pending {
            request,
            bytes,
            _room: room,
            queued: Instant::now(),
            reply,
        };
        self.tx.send(pending).await.map_err(|_| stopped())?;
        rx.await
            .map_err(|_| ProposeError::Stopped("proposer stopped".into()))?
    }

    /// Entries proposed and requests they carried.
    pub fn stats(&self) -> &ProposerStats {
        &self.stats
    }
}

/// Drains waiting requests into entries, at most [`MAX_IN_FLIGHT`] in Raft at once.
struct ProposeWorker {
    raft: Raft,
    /// Fed by [`Proposer`] handles; closes when the last handle drops.
    rx: mpsc::Receiver<Pending>,
    stats: Arc<ProposerStats>,
    held: watch::Receiver<bool>,
}

type Reply = oneshot::Sender<Result<Outcome, ProposeError>>;
type ClientWriteResult = openraft::raft::ClientWriteResult<TypeConfig>;

impl ProposeWorker {
    /// A leader refuses entries until a quorum has answered it once in its term (openraft's
    /// leader lease), as if it did not lead. Right after an election that is a round trip
    /// away: wait for it (at most one election timeout) rather than answer "not the leader"
    /// to writes that reach the new leader first.
    async fn wait_for_first_quorum(&self) {
        let unconfirmed = |m: &openraft::RaftMetrics<crate::raft::types::TypeConfig>| {
            m.state == openraft::ServerState::Leader && m.last_quorum_acked.is_none()
        };
        let mut metrics = self.raft.metrics();
        if !unconfirmed(&metrics.borrow_watched()) {
            return;
        }
        let bound = Duration::from_millis(self.raft.config().election_timeout_max);
        let confirmed = metrics.wait_until(|m| !unconfirmed(m));
        let _ = tokio::time::timeout(bound, confirmed).await;
    }

    async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut batch = Vec::with_capacity(256);
        // A request that did not fit the previous entry; it starts the next one.
        let mut carried: Option<Pending> = None;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => match self.rx.recv().await {
                    Some(p) => p,
                    None => return,
                },
            };
            if self.held.wait_for(|held| !held).await.is_err() {
                return;
            }
            self.wait_for_first_quorum().await;
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut bytes = first.bytes;
            batch.push(first);
            while batch.len() < MAX_REQUESTS_PER_ENTRY {
                match self.rx.try_recv() {
                    Ok(p) if bytes + p.bytes > MAX_ENTRY_BYTES => {
                        carried = Some(p);
                        break;
                    }
                    Ok(p) => {
                        bytes += p.bytes;
                        batch.push(p);
                    }
                    Err(_) => break,
                }
            }
            // A poster that gave up (timed out, disconnected) is not proposed for.
            batch.retain(|p: &Pending| !p.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            let proposed = Instant::now();
            let (requests, replies): (Vec<_>, Vec<Reply>) = batch
                .drain(..)
                .map(|p| {
                    STAGES.record(Stage::Queue, proposed - p.queued);
                    (p.request, p.reply)
                })
                .unzip();
            self.stats.entries.fetch_add(1, Ordering::Relaxed);
            self.stats
                .requests
                .fetch_add(requests.len() as u64, Ordering::Relaxed);
            let cmd = Command {
                ts: now_nanos(),
                requests,
            };
            // Answered on the thread that applies the entry, straight to each poster.
            let responder = CallbackResponder::new(move |answer: ClientWriteResult| {
                let _slot = slot;
                STAGES.since(Stage::Commit, proposed);
                match answer {
                    Ok(resp) => {
                        let mut outcomes = resp.data.into_iter();
                        for reply in replies {
                            let outcome = outcomes.next().ok_or_else(|| {
                                ProposeError::Stopped("state machine gave too few answers".into())
                            });
                            let _ = reply.send(outcome);
                        }
                    }
                    Err(ClientWriteError::ForwardToLeader(f)) => answer_all(
                        replies,
                        ProposeError::NotLeader {
                            leader: f.leader_id,
                        },
                    ),
                    Err(other) => answer_all(replies, ProposeError::Stopped(other.to_string())),
                }
            });
            // When Raft has stopped, the responder is dropped with the replies it holds and
            // the posters hear that the proposer stopped.
            if let Err(fatal) = self.raft.client_write_ff(cmd, Some(responder)).await {
                tracing::warn!("raft refused a proposal: {fatal}");
            }
        }
    }
}

fn answer_all(replies: Vec<Reply>, err: ProposeError) {
    for reply in replies {
        let _ = reply.send(Err(err.clone()));
    }
}
