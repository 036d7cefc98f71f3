//! The Raft type configuration and what travels in log entries: a [`Command`] holds the
//! requests the leader grouped into one entry; the state machine answers each with an
//! [`Outcome`].

use changeagent_proto::types::{EndRequest, StartRecord};
use changeagent_proto::{ChangeInput, Rejection};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

/// ChangeAgent's Raft types: openraft's defaults but for the payload, the answer and the
/// [`CallbackResponder`] (which `declare_raft_types!` cannot name, being generic).
#[derive(Debug, Clone, Copy, Default, Eq, PartialEq, Ord, PartialOrd)]
pub struct TypeConfig {}

impl openraft::RaftTypeConfig for TypeConfig {
    type D = Command;
    type R = Response;
    type NodeId = NodeId;
    type Node = BasicNode;
    type Term = u64;
    type LeaderId = openraft::impls::leader_id_adv::LeaderId<Self::Term, Self::NodeId>;
    type Vote = openraft::impls::Vote<Self::LeaderId>;
    type Payload = openraft::EntryPayload<Self::D, Self::NodeId, Self::Node>;
    type Entry =
        openraft::Entry<<Self::LeaderId as openraft::vote::RaftLeaderId>::Committed, Self::Payload>;
    type AsyncRuntime = openraft::impls::TokioRuntime;
    type Responder<T>
        = CallbackResponder<T>
    where
        T: openraft::OptionalSend + 'static;
    type Batch<T>
        = openraft::impls::InlineBatch<T>
    where
        T: openraft::OptionalSend + 'static;
    type ErrorSource = openraft::impls::BoxedErrorSource;
}

/// Where openraft delivers a proposal's result: a closure, called on the thread that
/// finished the proposal (the state machine's, once the entry is applied; Raft's core when
/// it fails early). The proposer's closure answers each waiting poster from there, with no
/// task in between to wake. Dropped uncalled (Raft stopped), it drops what it holds, which
/// the posters see as the proposer stopping.
pub struct CallbackResponder<T>(Box<dyn FnOnce(T) + Send>);

impl<T> CallbackResponder<T> {
    pub fn new(on_complete: impl FnOnce(T) + Send + 'static) -> Self {
        CallbackResponder(Box::new(on_complete))
    }
}

impl<T: openraft::OptionalSend + 'static> openraft::raft::responder::Responder<TypeConfig, T>
    for CallbackResponder<T>
{
    fn on_complete(self, result: T) {
        (self.0)(result)
    }
}

/// A node's id, persisted in its data dir.
pub type NodeId = u64;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::alias::EntryPayloadOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type LeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StorageError = openraft::StorageError<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshots travel and rest as files.
pub type SnapshotData = tokio::fs::File;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// One Raft entry's payload: every request the leader grouped, with the leader's clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Command {
    /// Nanoseconds since the epoch on the proposing leader.
    pub ts: i64,
    pub requests: Vec<Request>,
}

/// How openraft's logs name an entry's payload.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} requests at {}", self.requests.len(), self.ts)
    }
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

/// An entry's size within a small allowance (see [`Request::encoded_len`]): what the log's
/// cache counts and what decides where an entry is encoded.
pub fn entry_len(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(cmd) => cmd.requests.iter().map(Request::encoded_len).sum(),
        openraft::EntryPayload::Blank | openraft::EntryPayload::Membership(_) => 256,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What openraft 0.9 wrote into data dirs (the log's entries, vote, purge point; the
    /// state machine's applied id and membership; snapshot trailers): it must still read.
    #[test]
    fn state_written_by_openraft_0_9_still_reads() {
        let log_id = r#"{"leader_id":{"term":3,"node_id":7},"index":42}"#;
        let id: LogId = serde_json::from_str(log_id).unwrap();
        assert_eq!(
            (id.leader_id.term, id.leader_id.node_id, id.index),
            (3, 7, 42)
        );
        assert_eq!(serde_json::to_string(&id).unwrap(), log_id);

        let vote: Vote =
            serde_json::from_str(r#"{"leader_id":{"term":3,"node_id":7},"committed":true}"#)
                .unwrap();
        assert_eq!((vote.leader_id.term, vote.committed), (3, true));

        let entry: Entry = serde_json::from_str(
            r#"{"log_id":{"leader_id":{"term":3,"node_id":7},"index":42},"payload":{"Normal":
               {"ts":5,"requests":[{"op":{"create_tenant":{"name":"acme"}}}]}}}"#,
        )
        .unwrap();
        let openraft::EntryPayload::Normal(cmd) = &entry.payload else {
            panic!("not a normal entry: {entry:?}");
        };
        assert!(matches!(&cmd.requests[0].op, Op::CreateTenant { name } if name == "acme"));

        let membership = r#"{"log_id":{"leader_id":{"term":1,"node_id":7},"index":1},
            "membership":{"configs":[[7,8]],"nodes":{"7":{"addr":"a:1"},"8":{"addr":"b:2"}}}}"#;
        let m: StoredMembership = serde_json::from_str(membership).unwrap();
        assert_eq!(m.membership().voter_ids().collect::<Vec<_>>(), vec![7, 8]);
        let entry: Entry = serde_json::from_str(
            r#"{"log_id":{"leader_id":{"term":1,"node_id":7},"index":1},"payload":{"Membership":
               {"configs":[[7]],"nodes":{"7":{"addr":"a:1"}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            entry.payload,
            openraft::EntryPayload::Membership(_)
        ));

        let meta: SnapshotMeta = serde_json::from_str(&format!(
            r#"{{"last_log_id":{log_id},"last_membership":{membership},"snapshot_id":"3-42-9"}}"#
        ))
        .unwrap();
        assert_eq!(meta.last_log_id, Some(id));
    }
}

#[cfg(test)]
mod seeds {
    use super::*;
    use crate::frame::{decode_body, Rpc};
    use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};

    /// The checked-in seeds of the `raft_rpc` fuzz target that name a request decode, so
    /// fuzzing starts from requests a node accepts (a selector byte, then the body).
    #[test]
    fn the_raft_rpc_fuzz_seeds_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/raft_rpc");
        let mut decoded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let (selector, body) = input.split_first().unwrap();
            let result = match selector {
                1 => decode_body::<AppendEntriesRequest<TypeConfig>>(Rpc::Append, body).map(drop),
                2 => decode_body::<VoteRequest<TypeConfig>>(Rpc::Vote, body).map(drop),
                3 => decode_body::<TransferLeaderRequest<TypeConfig>>(Rpc::TransferLeader, body)
                    .map(drop),
                4 => decode_body::<SnapshotMeta>(Rpc::Append, body).map(drop),
                5 => decode_body::<Vote>(Rpc::Vote, body).map(drop),
                _ => continue,
            };
            result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            decoded += 1;
        }
        assert!(decoded >= 5, "{decoded} seeds decoded");
    }
}
