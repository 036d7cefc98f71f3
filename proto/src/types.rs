//! Wire types of the ChangeAgent HTTP API, shared by servers and clients.
//! Field names and order follow the original ChangeAgent server.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::{Manifest, Scope};

/// Records with a type below zero are written by ChangeAgent itself; they appear in the
/// unfiltered list only, and clients may not post them.
pub mod internal_type {
    /// A checkpointer started a checkpoint; `data` is a [`StartRecord`](super::StartRecord).
    pub const CHECKPOINT_START: i32 = -1;
    /// A checkpoint was written; `data` is its [`Manifest`](crate::Manifest).
    pub const CHECKPOINT_END: i32 = -2;
    /// Changes before `data.before` were truncated; `data` is a
    /// [`TruncateRecord`](super::TruncateRecord).
    pub const TRUNCATE: i32 = -3;
    /// A tenant was created; `data` is a [`TenantRecord`](super::TenantRecord).
    pub const TENANT_CREATED: i32 = -4;
    /// A collection was created; `data` is a [`CollectionRecord`](super::CollectionRecord).
    pub const COLLECTION_CREATED: i32 = -5;
}

/// One change as served by `GET /changes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Dense position in the global list, starting at 1.
    #[serde(rename = "_id")]
    pub id: u64,
    /// Nanoseconds since the epoch, set when the change was proposed.
    #[serde(rename = "_ts", default)]
    pub ts: i64,
    /// Kind of change; 0 (the default) is omitted on the wire. Types below
    /// zero are internal records, see [`internal_type`].
    #[serde(rename = "type", default, skip_serializing_if = "is_zero")]
    pub change_type: i32,
    /// Tags that filtered reads match on (`?tag=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Name of the tenant the change belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Collection of a keyed write (with `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Key of a keyed write (with `collection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A keyed write that deletes its key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The client's JSON value (absent on a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// A change to post: the `{"data": …}` form of `POST /changes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewChange {
    /// The value to store (absent on a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Tags that filtered reads match on (`?tag=`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Kind of change; 0 (the default) is omitted on the wire. Must not be
    /// negative: those types are reserved for internal records.
    #[serde(rename = "type", default, skip_serializing_if = "is_zero")]
    pub change_type: i32,
    /// Name of the tenant the change belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Collection of a keyed write (with `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Key of a keyed write (with `collection`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A keyed write that deletes its key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl NewChange {
    /// A change carrying only `data`.
    pub fn data(data: Value) -> Self {
        Self {
            data: Some(data),
            ..Self::default()
        }
    }

    /// Adds tags.
    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
}

/// The answer to a successful post.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    /// The `_id` the change was given.
    #[serde(rename = "_id")]
    pub id: u64,
}

/// The body of `GET /changes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeList {
    /// The matching changes, in `_id` order.
    pub changes: Vec<Change>,
    /// Nothing retained comes before the first returned change.
    pub at_start: bool,
    /// Nothing matching comes after the last returned change right now.
    pub at_end: bool,
    /// Oldest retained `_id` on the answering server.
    #[serde(default)]
    pub first_index: u64,
    /// Newest applied `_id` on the answering server.
    #[serde(default)]
    pub last_index: u64,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Numeric id, usable wherever a tenant name is.
    #[serde(rename = "_id")]
    pub id: u64,
    /// Unique name.
    pub name: String,
}

/// A collection of keys inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    /// Numeric id, usable wherever a collection name is.
    #[serde(rename = "_id")]
    pub id: u64,
    /// Name, unique within its tenant.
    pub name: String,
    /// Name of the owning tenant.
    pub tenant: String,
}

/// Answer to `POST /tenants`: the tenant, plus `tenant` (its id) as the original ChangeAgent
/// answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCreated {
    #[serde(rename = "_id")]
    pub id: u64,
    pub name: String,
    /// The tenant's id again, under the original API's name.
    pub tenant: u64,
}

/// Answer to `POST /tenants/{t}/collections`: the collection, plus `collection` (its id) as
/// the original ChangeAgent answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionCreated {
    #[serde(rename = "_id")]
    pub id: u64,
    pub name: String,
    /// Name of the owning tenant.
    pub tenant: String,
    /// The collection's id again, under the original API's name.
    pub collection: u64,
}

/// `data` of a tenant-created record (type -4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    #[serde(rename = "_id")]
    pub id: u64,
    pub name: String,
}

/// `data` of a collection-created record (type -5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionRecord {
    #[serde(rename = "_id")]
    pub id: u64,
    pub name: String,
    /// Name of the owning tenant.
    pub tenant: String,
}

/// `data` of a checkpoint-start record (type -1), and the body of
/// `POST /admin/checkpoints/start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRecord {
    /// The index the checkpoint exports.
    pub index: u64,
    /// Id of the checkpointer.
    pub by: String,
    #[serde(default)]
    pub scope: Scope,
}

/// Body of `POST /admin/checkpoints/end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndRequest {
    pub manifest: Manifest,
    /// Id of the checkpointer that sent the start.
    pub by: String,
    /// Manifests of the scope the core keeps (the newest ones); older ones are forgotten.
    pub keep: u32,
}

/// Body of `POST /admin/truncate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TruncateRequest {
    /// Changes with `_id < before` are removed from the list.
    pub before: u64,
}

/// `data` of a truncate record (type -3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruncateRecord {
    /// Changes with `_id < before` are gone.
    pub before: u64,
    /// Index of the newest full checkpoint, which holds what was removed.
    pub checkpoint: u64,
}

/// Answer to the admin routes: the internal record's `_id` (none when nothing was appended,
/// e.g. a truncation below the current first index) and the store's first index after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminAnswer {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub first_index: u64,
}

/// Body of `POST /tenants` and `POST /tenants/{t}/collections`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRequest {
    /// The name to create.
    pub name: String,
}

/// Body of `POST /collections/{c}/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyWrite {
    /// The key to upsert.
    pub key: String,
    /// Its new value.
    #[serde(default)]
    pub data: Value,
    /// Tags of the resulting change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// Every error answer: `{"error": "<message>", …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message (`"truncated"` on 410).
    pub error: String,
    /// Longer explanation, present on some errors (for example `410 truncated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Oldest retained `_id`, on `410 truncated`.
    #[serde(
        rename = "firstIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub first_index: Option<u64>,
    /// Manifest of the checkpoint to load, on `410 truncated` when one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Box<Manifest>>,
}

/// Body of `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `leader`, `follower`, `candidate`, `learner`, `removed` (no longer a member) or `edge`.
    pub role: String,
    /// Raft node id of the answering core node (absent on an edge).
    #[serde(default)]
    pub node_id: Option<u64>,
    /// Node id of the current leader, if one is known.
    #[serde(default)]
    pub leader: Option<u64>,
    /// Current Raft term.
    #[serde(default)]
    pub term: u64,
    /// Id of the cluster, also sent as `X-Cluster-Id`.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Oldest retained `_id`.
    pub first_index: u64,
    /// Newest applied `_id`.
    pub last_index: u64,
    /// Highest Raft log index applied to the state machine.
    #[serde(default)]
    pub applied_log_index: Option<u64>,
    /// Raft log entries committed but not yet applied here.
    #[serde(default)]
    pub lag: u64,
}

/// Body of `GET /cluster` (and the answer to `POST /cluster/join`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// Id of the cluster, also sent as `X-Cluster-Id`.
    pub cluster_id: Option<String>,
    /// Node id of the current leader, if one is known.
    pub leader: Option<u64>,
    /// Current Raft term.
    pub term: u64,
    /// Every member, voters and learners, by id.
    pub members: Vec<ClusterMember>,
}

/// One member of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    pub id: u64,
    /// Address the other members reach it at.
    pub addr: String,
    /// Whether it votes (a learner only receives the log).
    pub voter: bool,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    /// Highest Raft log index known to be replicated to it (from the leader's view; `null`
    /// when no leader answered).
    pub matched: Option<u64>,
}

/// Body of `POST /cluster/join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinRequest {
    /// The joining node's id (from its data dir).
    pub node_id: u64,
    /// Address the members will reach it at (`host:port`).
    pub addr: String,
}

/// Answer to `POST /cluster/leave` and `DELETE /cluster/members/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: u64,
}
