//! 10,000 long-polls woken again and again while writers post to a 3-node cluster, run by
//! `changeagent-bench storm`: Raft keeps its timers, heartbeats and replication on a runtime
//! of its own, its log writes and applies on threads of their own, and woken long-polls take
//! turns, so the load causes no leader change (the term stays) and no write takes longer
//! than the write timeout.
//!
//! The cluster runs with the server's default timing (heartbeat 50 ms, election 150 ms), the
//! setting under which missed heartbeats show first. The bench binary is found like the
//! others (`CHANGEAGENT_BENCH_BIN`, else beside this test's executable). nextest runs this
//! test alone: it needs the whole machine, and another test's load would be measured too.

mod common;

use std::time::Duration;

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use common::run_bench;

/// Long-polls, spread over the three nodes.
const POLLS: &str = "10000";
/// History posted first, more than a node's tail cache holds (65,536 changes).
const PRELOAD: &str = "150000";
/// Readers paging through that history during the storm: reads behind the tail cache go to
/// RocksDB on the nodes' blocking threads, where Raft's log writes used to queue too.
const READERS: &str = "3000";
/// Seconds of writing.
const DURATION: &str = "20";
/// The nodes' write timeout, and what the bench counts a write as too slow against.
const WRITE_TIMEOUT_MS: u64 = 5000;
/// Setup (opening 10,000 connections), the run, and the bench's end.
const STORM_DEADLINE: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_woken_long_polls_cause_no_election_and_no_slow_write() {
    let cluster = Cluster::start_with_peers(
        ClusterOptions::new(3)
            .timing(50, 150)
            .write_timeout_ms(Some(WRITE_TIMEOUT_MS)),
    )
    .await;
    cluster.wait_leader().await;
    let nodes: Vec<String> = (0..cluster.len()).map(|i| cluster.node(i).url()).collect();
    let nodes = nodes.join(",");
    let timeout = WRITE_TIMEOUT_MS.to_string();
    let args: Vec<std::ffi::OsString> = [
        "storm",
        "--nodes",
        &nodes,
        "--polls",
        POLLS,
        "--ramp",
        "1000",
        "--block",
        "60",
        "--writers",
        "8",
        "--rate",
        "20",
        "--duration",
        DURATION,
        "--preload",
        PRELOAD,
        "--readers",
        READERS,
        "--write-timeout-ms",
        &timeout,
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    let run = run_bench(&args, STORM_DEADLINE).await;
    let summary = run.summary();
    let tail = &run.stderr_tail;
    println!("storm summary: {summary}");
    let n = |field: &str| {
        summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {summary}"))
    };
    assert_eq!(
        n("polls_open"),
        10_000,
        "not every long-poll opened: {summary}"
    );
    // Proof the storm happened: every write woke the long-polls again and again.
    assert!(n("writes") >= 100, "too few writes: {summary}");
    assert!(
        n("reads") >= 10_000,
        "the readers behind the tail caches hardly read: {summary}"
    );
    assert!(
        n("answers_with_changes") >= 10 * n("polls"),
        "the long-polls were not woken repeatedly: {summary}"
    );
    assert_eq!(
        n("term_after"),
        n("term_before"),
        "a new term: {summary}\n{tail}"
    );
    assert_eq!(
        n("leader_changes"),
        0,
        "the leader changed: {summary}\n{tail}"
    );
    assert_eq!(n("write_errors"), 0, "writes without an answer: {summary}");
    assert_eq!(
        n("writes_over_timeout"),
        0,
        "writes over the {WRITE_TIMEOUT_MS} ms write timeout: {summary}"
    );
    assert!(run.status.success(), "{}: {summary}\n{tail}", run.status);
}
