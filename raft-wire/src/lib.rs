//! What ChangeAgent's Raft nodes exchange, without the storage behind it: openraft's type
//! configuration, the payload of log entries (the requests the leader grouped and the state
//! machine's answers), and the frames of a peer stream. The core server builds its node on
//! these; the fuzz targets decode them without linking RocksDB.
//!
//! # Layout
//! - [`types`]: [`TypeConfig`](types::TypeConfig), [`Command`](types::Command),
//!   [`Request`](types::Request), [`Op`](types::Op) and [`Outcome`](types::Outcome).
//! - [`frame`]: the frame codec of a peer stream and the RPCs its request frames carry.

pub mod frame;
pub mod types;
