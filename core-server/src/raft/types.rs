//! The Raft type configuration and what travels in log entries: a [`Command`] holds the
//! requests the leader grouped into one entry; the state machine answers each with an
//! [`Outcome`].

use changeagent_proto::types::{EndRequest, StartRecord};
use changeagent_store::{ChangeInput, Rejection};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// ChangeAgent's Raft types.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = tokio::fs::File,
);

/// A node's id, persisted in its data dir.
pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;

/// One Raft entry's payload: every request the leader grouped, with the leader's clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Command {
    /// Nanoseconds since the epoch on the proposing leader.
    pub ts: i64,
    pub requests: Vec<Request>,
}

/// One client request inside a command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// A retried request with the same key gets the first answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub op: Op,
}

/// Fixed allowance per request and per change for what is not counted byte by byte (field
/// names, quotes, numbers) in [`Request::encoded_len`].
const REQUEST_OVERHEAD: usize = 64;
/// Admin requests carry at most a manifest; counted at this size.
const ADMIN_REQUEST_BYTES: usize = 4096;

impl Request {
    /// The request's size in a log entry, within a small allowance: what bounds entries,
    /// AppendEntries payloads and the proposer's queue in bytes.
    pub fn encoded_len(&self) -> usize {
        let key = self.idempotency_key.as_ref().map_or(0, String::len);
        let op = match &self.op {
            Op::Append { changes, .. } => changes.iter().map(change_len).sum(),
            Op::CreateTenant { name } => name.len(),
            Op::CreateCollection { tenant, name } => tenant.len() + name.len(),
            Op::SetClusterId { id } => id.len(),
            Op::CheckpointStart { .. } | Op::CheckpointEnd { .. } | Op::Truncate { .. } => {
                ADMIN_REQUEST_BYTES
            }
        };
        REQUEST_OVERHEAD + key + op
    }
}

fn change_len(c: &ChangeInput) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    REQUEST_OVERHEAD
        + c.data.as_ref().map_or(0, |d| d.get().len())
        + c.tags.iter().map(|t| t.len() + 3).sum::<usize>()
        + text(&c.tenant)
        + text(&c.collection)
        + text(&c.key)
}

/// What a request does to the state.
///
/// Externally tagged on purpose: change data is kept as raw JSON, which serde cannot read
/// back through the buffering an internally tagged enum needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Append changes with consecutive ids, all or none. `batch` selects the answer shape
    /// (`[{"_id"}…]` rather than `{"_id"}`).
    Append {
        changes: Vec<ChangeInput>,
        #[serde(default)]
        batch: bool,
    },
    CreateTenant {
        name: String,
    },
    CreateCollection {
        tenant: String,
        name: String,
    },
    /// Sets the cluster id if none is set yet; the first one applied wins.
    SetClusterId {
        id: String,
    },
    /// `POST /admin/checkpoints/start`. The leader's `--checkpoint-stale-after` travels with
    /// it, so every replica decides the same.
    CheckpointStart {
        start: StartRecord,
        stale_after_nanos: i64,
    },
    /// `POST /admin/checkpoints/end`.
    CheckpointEnd {
        end: EndRequest,
    },
    /// `POST /admin/truncate`.
    Truncate {
        before: u64,
    },
}

/// The state machine's answers, one per request of a command, in order.
pub type Response = Vec<Outcome>;

/// The answer to one request: the JSON body to send, or why the store refused it (the api
/// crate maps that to a status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok { body: String },
    Rejected { rejection: Rejection },
}
