//! Errors of the change store. Variants carry ids and names, not formatted text.
//!
//! Two kinds: a [`Rejection`] is the caller's doing (bad input, an unknown name, a conflict)
//! and travels back to the client, through Raft answers too; every other [`Error`] is a
//! failure of the store itself.

use std::path::PathBuf;

use changeagent_proto::Scope;
use serde::{Deserialize, Serialize};

/// Everything that can go wrong in the change store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the store at {path} has format version {found}, this build reads version {supported}; \
         start this node with an empty data dir (a core node then catches up from its cluster, \
         or use --restore-from with a checkpoint)"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("record {id} cannot be applied: {detail}")]
    BadRecord { id: u64, detail: String },
    #[error("background task failed: {0}")]
    Join(String),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("{0}")]
    Objects(String),
    #[error("checkpoint object {object} failed verification: {detail}")]
    Verify { object: String, detail: String },
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// An operation the store refused because of its input. Serializable: a Raft state machine
/// sends it back to the node that proposed the write. The api crate maps each variant to an
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

impl Error {
    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Error::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }

    /// The object store has no object at the path asked for.
    pub fn is_missing_object(&self) -> bool {
        matches!(
            self,
            Error::ObjectStore(object_store::Error::NotFound { .. })
        )
    }

    /// An invalid-input rejection.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Rejected(Rejection::Invalid(message.into()))
    }
}

/// Result of change-store operations.
pub type Result<T> = std::result::Result<T, Error>;
