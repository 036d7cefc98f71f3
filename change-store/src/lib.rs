//! ChangeAgent's change store: the RocksDB change list with its indexes, keyed state and
//! tenant catalog; long-poll waiters; the checkpoint file format; and the read-only HTTP API
//! that core nodes and edge replicas both serve.
//!
//! # Layout
//! - [`store`]: opening the database, the batch [`Txn`], and reads.
//! - [`record`]: client input, validation, the wire JSON and the stored header.
//! - [`layout`]: column families and key encodings.
//! - [`export`]: checkpoint export and import (also the Raft snapshot format).
//! - [`http`]: read routes, `ApiError`, body reading, metrics.
//! - [`error`]: the crate's error type.

pub mod error;
pub mod export;
pub mod http;
pub mod layout;
pub mod record;
pub mod store;

pub use error::{Error, Result};
pub use record::{parse_post_body, ChangeInput, PostBody};
pub use store::{Filter, PageInfo, Store, Txn};
