//! The Raft type configuration and what travels in log entries, defined in the raft-wire
//! crate (so the parsers can be fuzzed without storage) and re-exported here.

pub use changeagent_raft_wire::types::*;
