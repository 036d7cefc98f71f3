//! ChangeAgent's change store: the RocksDB change list with its indexes, keyed state and
//! tenant catalog; the applied-index watch long-polls wait on; and the checkpoint format
//! (streaming export and import). It knows nothing of HTTP: refusals are typed
//! [`Rejection`]s that the api crate maps to statuses.
//!
//! # Layout
//! - [`store`]: opening the database, the batch [`Txn`], and reads.
//! - [`record`]: client input, validation, the wire JSON and the stored header.
//! - [`layout`]: column families and key encodings.
//! - [`export`]: checkpoint export and import (also the Raft snapshot format).
//! - [`error`]: the crate's error type.

pub mod error;
pub mod export;
pub mod layout;
pub mod record;
pub mod store;

pub use error::{Error, Rejection, Result};
pub use record::{parse_post_body, ChangeInput, PostBody};
pub use store::{Collection, Filter, PageInfo, Store, Tenant, Txn};
