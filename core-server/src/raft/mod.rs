//! Raft: types, the RocksDB log store, the state machine over the change store, and the HTTP
//! transport, split as in openraft's examples; [`io`] gives storage its own threads.

pub mod io;
pub mod log_store;
pub mod network;
pub mod peer_stream;
pub mod snapshot_file;
pub mod state_machine;
pub mod types;

/// The Raft handle of a node: its types and its state machine.
pub type Raft = openraft::Raft<types::TypeConfig, state_machine::StateMachine>;
