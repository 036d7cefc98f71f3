//! The one harness that starts and controls real ChangeAgent processes, for
//! the system tests (`tests/`) and the benchmark (`bench/`) alike: a binary
//! (`changeagent-server`, and any other that takes `--listen` and
//! `--data-dir` and logs `listening on ADDR`) as a child process in its own
//! directory, whose bound address is read from its log; clusters of such
//! nodes on their own loopback IPs, proxies that cut their traffic, and a
//! history checker that judges what clients saw. It talks raw HTTP, so tests
//! can check exact bytes, statuses and headers, and never trusts the client
//! library it may be testing.
//!
//! Every operation has one fallible implementation, named `try_…`, which
//! returns an [`Error`] that says what was expected and quotes the end of the
//! log of a process that failed; the benchmark uses these. The same name
//! without `try_` panics with that message, for tests. Nothing here sleeps to
//! synchronise: every wait polls observable state against a deadline and
//! reports the last state seen on timeout.
//!
//! # Layout
//! - [`binary`]: where a binary is (`CHANGEAGENT_<NAME>_BIN`, else next to
//!   the running executable) and how to build it when it is missing.
//! - [`process`]: [`ServerProcess`] starts, SIGKILLs, SIGTERMs and restarts
//!   one process on a data dir that outlives its restarts; kills it on drop.
//! - [`health`]: `GET /health` and the one rule for "the nodes agree on a
//!   leader", with the wait built on it.
//! - [`cluster`]: several nodes on their own loopback IPs forming one Raft
//!   cluster (by peers file or by join): leader, kill, restart, partition
//!   and convergence.
//! - [`garage`]: [`GarageServer`](garage::GarageServer), a real
//!   S3-compatible store (Garage, installed by `scripts/install-garage`)
//!   with one bucket and key, for the checkpointer's object storage.
//! - [`proxy`]: a TCP proxy in front of a node that cuts traffic by source
//!   IP, so a cluster can be partitioned.
//! - [`docker`]: containers of a compose project through the `docker` CLI:
//!   found by their labels, inspected, killed, paused, cut off their network,
//!   restarted and stopped; files copied out of them.
//! - [`workload`]: clients that write and read through a cluster and record
//!   every attempt and read in a history.
//! - [`state`]: [`ConsumerState`](state::ConsumerState), what a consumer of the list
//!   holds (catalog, live keys, unkeyed changes), to compare consumers; and
//!   [`StateDigest`](state::StateDigest), the same in a few kilobytes of hashes, for
//!   fleets of them.
//! - [`history`]: checks the final lists of every node against what clients
//!   wrote and read (no lost, duplicated or reordered write).
//! - [`http`]: [`Api`] and [`Reply`], raw HTTP that keeps the exact body,
//!   and readers of `GET /changes` bodies that keep each change's bytes.
//! - [`wait`]: [`wait_until`], polling a probe until it is satisfied or a
//!   deadline passes.
//! - [`error`]: what the fallible operations return.

pub mod binary;
pub mod cluster;
pub mod docker;
pub mod error;
pub mod garage;
pub mod health;
pub mod history;
pub mod http;
pub mod process;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod tools;
pub mod wait;
pub mod workload;

pub use binary::{server_bin, Binary};
pub use error::{Error, Result};
pub use health::health;
pub use http::{
    change_id, change_ids, change_ts, data_by_id, posted_id, raw_changes, rfc3339_from_nanos,
    try_change_id, try_raw_changes, Api, RawPage, Reply, REQUEST_TIMEOUT,
};
pub use process::{ServerOptions, ServerProcess, LEADER_DEADLINE, START_DEADLINE, STOP_DEADLINE};
pub use wait::{wait_until, wait_until_some, POLL_INTERVAL};
