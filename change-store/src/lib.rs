//! ChangeAgent's change store: the RocksDB change list with its indexes, keyed state, tenant
//! catalog and checkpoint records; the applied feed long-polls wait on (a watch of the
//! applied index and a tail cache of the newest changes); and the checkpoint format (streaming export and import). It knows nothing of HTTP: refusals are
//! typed [`Rejection`]s that the api crate maps to statuses.
//!
//! # Layout
//! - [`store`]: opening the store, its in-memory mirrors, and reads.
//! - [`txn`]: the write transaction and the one row writer every change goes through.
//! - [`record`]: client input, validation, the wire JSON and the stored header.
//! - [`layout`]: column families and key encodings.
//! - [`feed`]: the tail cache of the newest changes that wakes long-polls without reads.
//! - [`db`]: generation directories and how a new one is swapped in.
//! - [`export`] and [`import`]: the checkpoint format, both ways (also Raft snapshots).
//! - [`objects`]: checkpoint objects in object storage.
//! - [`error`]: the crate's error and rejection types.

mod db;
pub mod error;
pub mod export;
pub mod feed;
pub mod import;
pub mod layout;
pub mod objects;
pub mod record;
pub mod store;
pub mod txn;

pub use error::{Error, Rejection, Result};
pub use export::{ExportOptions, Exported};
pub use import::{ImportMode, Imported, Replica};
pub use objects::Objects;
pub use record::{parse_post_body, ChangeInput, PostBody};
pub use store::{Collection, Filter, PageInfo, State, Store, Tenant};
pub use txn::{Applied, Follow, Txn};

/// Nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
