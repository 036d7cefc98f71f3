//! ChangeAgent's client side: an async client over one or more endpoints with
//! retries, failover and idempotent posts, an [`Outbox`] that keeps posts on
//! disk until a server takes them, the [`Client::follow`] change
//! stream (which loads a checkpoint when the changes it needs were
//! truncated), a checkpoint reader, and the logic of the `changeagent`
//! command-line tool. The wire types come from `changeagent-proto` and are
//! re-exported here.
//!
//! ```no_run
//! # async fn example() -> changeagent_client::Result<()> {
//! use changeagent_client::{Client, FollowEvent, NewChange, Query};
//! use futures::StreamExt;
//!
//! let client = Client::new(["http://127.0.0.1:9000", "http://127.0.0.1:9001"])?;
//! let posted = client
//!     .post_change(&NewChange::data(serde_json::json!({"on": true})).with_tags(["flags"]))
//!     .await?;
//! let mut events = Box::pin(client.follow(posted.id - 1, Query::new().tag("flags")));
//! while let Some(event) = events.next().await {
//!     match event? {
//!         FollowEvent::Reset { checkpoint, .. } => println!("rebuild from {}", checkpoint.index),
//!         FollowEvent::Record(change) | FollowEvent::Change(change) => println!("{}", change.id),
//!         FollowEvent::ResetEnd { .. } => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`types`], [`query`]: the wire types and query parameters (re-exported
//!   from `changeagent-proto`).
//! - [`client`]: [`Client`] and [`ClientBuilder`]: every route (checkpoint
//!   downloads included), retries and failover.
//! - [`failover`]: which endpoint each attempt goes to, and the return to
//!   the first endpoints ([`ClientBuilder::prefer_first_after`]).
//! - [`follow`]: [`Client::follow`] and [`Client::follow_raw`], the change
//!   streams, and their items [`FollowEvent`] and [`RawPage`].
//! - [`checkpoint`]: [`CheckpointReader`], which streams a checkpoint's
//!   records and checks them against their manifest, and [`checkpoint::spool`].
//! - [`outbox`]: [`Outbox`], a durable queue of posts for writers that are
//!   only sometimes connected, each sent once with the key it was queued
//!   with.
//! - [`token`]: [`TokenFlags`], the bearer token sent to servers that need one.
//! - [`tls`]: [`CaFlags`], the private CA trusted for `https://` endpoints.
//! - [`error`]: [`Error`], the one error type, and [`Result`].
//! - [`cli`]: arguments and commands of the `changeagent` binary.

pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod error;
pub mod failover;
pub mod follow;
pub mod outbox;
pub mod tls;
pub mod token;

pub use changeagent_proto as proto;
pub use changeagent_proto::{query, types};

pub use changeagent_proto::{Manifest, Scope};
pub use checkpoint::{CheckpointReader, VerifiedCheckpoint};
pub use client::{Client, ClientBuilder, RawResponse, RetryPolicy};
pub use error::{Error, Result};
pub use failover::DEFAULT_PREFER_FIRST_AFTER;
pub use follow::{FollowEvent, RawChange, RawPage};
pub use outbox::{Entry, FlushReport, Outbox, Rejected, Sent};
pub use query::Query;
pub use tls::{read_ca_file, CaFlags};
pub use token::{read_token_file, TokenFlags};
pub use types::{
    Change, ChangeList, Collection, ErrorBody, Health, KeyWrite, NameRequest, NewChange, Posted,
    Tenant,
};
