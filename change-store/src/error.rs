//! Errors of the change store. Variants carry ids and names, not formatted text.

use std::path::PathBuf;

/// Everything that can go wrong in the change store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the store at {path} has format version {found}, this build reads version {supported}; \
         use a matching ChangeAgent release or start with an empty data dir"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
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
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("background task failed: {0}")]
    Join(String),
}

impl Error {
    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Error::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }
}

/// Result of change-store operations.
pub type Result<T> = std::result::Result<T, Error>;
