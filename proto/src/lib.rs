//! ChangeAgent's wire protocol, shared by every other crate: the JSON bodies of the HTTP API,
//! the query parameters of `GET /changes`, header names, limits, and the lines of a
//! checkpoint file. Pure data and parsing; no I/O.
//!
//! # Layout
//! - [`types`]: the JSON bodies of the API (`Change`, `ChangeList`, `Tenant`, `ErrorBody`, …)
//!   and the data of internal records.
//! - [`query`]: [`Query`], the parameters a client sends to `GET /changes`, and
//!   [`ChangesQuery`], the same parameters as a server validates them.
//! - [`checkpoint`]: manifests, scopes, object paths and the header, record and trailer lines
//!   of a checkpoint file.
//! - [`headers`]: names of the HTTP headers ChangeAgent defines.
//! - [`limits`]: the limits every change and request must meet.
//! - [`post`]: what a client posts to `POST /changes`, parsed and validated
//!   ([`ChangeInput`], [`PostBody`]).
//! - [`rejection`]: [`Rejection`], why a server refused an operation because of its input.

pub mod checkpoint;
pub mod headers;
pub mod limits;
pub mod post;
pub mod query;
pub mod rejection;
pub mod types;

pub use checkpoint::{Manifest, Scope};
pub use post::{parse_post_body, ChangeInput, PostBody};
pub use query::{ChangesQuery, Query, QueryError};
pub use rejection::Rejection;
pub use types::{
    Change, ChangeList, Collection, ErrorBody, Health, KeyWrite, NameRequest, NewChange, Posted,
    Tenant,
};
