//! [`Rejection`]: why a server refused an operation because of its input. Shared by the
//! parsers here, the change store and the Raft answers; the api crate maps each variant to
//! an HTTP status.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Scope;

/// An operation refused because of its input. Serializable: a Raft state machine sends it
/// back to the node that proposed the write. The api crate maps each variant to an
/// HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("unknown collection {0:?}")]
    UnknownCollection(String),
    #[error("collection name {0:?} exists in several tenants; use its _id")]
    AmbiguousCollection(String),
    #[error("collection {collection:?} belongs to tenant {owner:?}, not {requested:?}")]
    CollectionTenantMismatch {
        collection: String,
        owner: String,
        requested: String,
    },
    #[error("key {key:?} not found in collection {collection:?}")]
    UnknownKey { collection: String, key: String },
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("collection {collection:?} already exists in tenant {tenant:?}")]
    CollectionExists { tenant: String, collection: String },
    #[error("changes before {first_index} were truncated")]
    Truncated { first_index: u64 },
    #[error(
        "checkpointer {by:?} started a checkpoint of scope {scope} at index {index} \
         {age_secs} s ago and has not ended it; try again later"
    )]
    CheckpointInProgress {
        scope: Scope,
        by: String,
        index: u64,
        age_secs: u64,
    },
    #[error(
        "no open checkpoint start of scope {scope} at index {index} by {by:?}; send a start \
         first (another checkpointer may have taken a stale start over)"
    )]
    NoOpenStart {
        scope: Scope,
        by: String,
        index: u64,
    },
    #[error(
        "cannot truncate before {before}: the newest full checkpoint is at index {}; \
         changes after it are not in any checkpoint yet",
        checkpoint.map_or("none".to_owned(), |c| c.to_string())
    )]
    NotCheckpointed {
        before: u64,
        checkpoint: Option<u64>,
    },
}
