//! Errors of the change store. Variants carry ids and names, not formatted text.
//!
//! Two kinds: a [`Rejection`] is the caller's doing (bad input, an unknown name, a conflict)
//! and travels back to the client, through Raft answers too; every other [`Error`] is a
//! failure of the store itself.

use std::path::PathBuf;

pub use changeagent_proto::Rejection;

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
