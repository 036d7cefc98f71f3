//! `changeagent-bench fleet` against real processes: a core node, a checkpointer that
//! checkpoints every 2 s and keeps only 20 changes, and an edge. Fifty viewers follow the
//! edge, most of them going offline for longer than the core retains changes, while writers
//! and outbox writers post for 20 s; the fleet must then find every viewer at the reference
//! consumer's state, at least one viewer having reloaded a checkpoint, and every write and
//! outbox post in the list once.
//!
//! The bench binary is found like the others (`CHANGEAGENT_BENCH_BIN`, else beside this
//! test's executable: `cargo build --release --workspace --bins` first).

mod common;

use std::time::Duration;

use changeagent_testkit::{wait_until, ServerProcess};
use common::*;
use serde_json::Value;

/// How long the whole fleet run may take: 20 s of traffic, the settling (a build of
/// 50 consumers reloading checkpoints on a loaded 2-core machine), and the setup.
const FLEET_DEADLINE: Duration = Duration::from_secs(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_occasionally_connected_viewers_ends_with_the_cores_state() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, _client) = start_core(&store_url, &[]).await;
    let core_api = core.api();
    let _checkpointer = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--every-seconds", "2", "--retain", "20"],
    ))
    .await;
    let e = ServerProcess::start(edge(&core.url(), &[])).await;
    // The edge serves once it has caught up with the (empty) core.
    wait_until(DEADLINE, "the edge to answer", || async {
        let h = e
            .api()
            .try_get("/health")
            .await
            .map_err(|err| err.to_string())?;
        if h.status == 200 {
            Ok(())
        } else {
            Err(h.text())
        }
    })
    .await
    .unwrap();

    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("fleet.json");
    let args: Vec<std::ffi::OsString> = [
        "fleet",
        "--cores",
        &core.url(),
        "--edges",
        &e.url(),
        "--consumers",
        "50",
        "--writers",
        "2",
        "--outbox-writers",
        "2",
        "--tenants",
        "2",
        "--keys",
        "40",
        "--rate",
        "40",
        // 30 of the 50 go offline for 6 to 10 s: far longer than the core keeps 20
        // changes at 40 changes a second, so they come back to a 410.
        "--offline-share",
        "0.6",
        "--offline-secs",
        "6..10",
        "--online-secs",
        "2..4",
        "--duration",
        "20",
        "--settle-secs",
        "180",
        "--block-secs",
        "10",
        "--seed",
        "7",
    ]
    .into_iter()
    .map(Into::into)
    .chain([
        "--data-dir".into(),
        work.path().join("data").into(),
        "--report".into(),
        report.clone().into(),
    ])
    .collect();
    let run = run_bench(&args, FLEET_DEADLINE).await;
    assert!(
        run.status.success(),
        "the fleet failed ({}):\n{}\n{}\ncore: {}\nedge: {}",
        run.status,
        run.stdout,
        run.stderr_tail,
        core.log_tail(10),
        e.log_tail(10)
    );
    let summary = run.summary().clone();
    println!("fleet summary: {summary}");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the report file"))
            .expect("the report is JSON");
    assert_eq!(written, summary, "--report holds the same summary");

    let n = |field: &str| {
        summary[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {summary}"))
    };
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["violations"], serde_json::json!([]), "{summary}");
    assert_eq!(n("consumers"), 50, "{summary}");
    assert_eq!(n("offline_consumers"), 30, "{summary}");
    assert_eq!(
        n("consumers_equal"),
        50,
        "every viewer at the reference's state: {summary}"
    );
    assert!(
        n("reloads") >= 1,
        "no viewer reloaded a checkpoint: {summary}"
    );
    assert!(n("writes_acked") > 0, "{summary}");
    assert!(n("outbox_posts") > 0, "{summary}");
    assert_eq!(n("outbox_acked"), n("outbox_posts"), "{summary}");
    assert_eq!(
        n("writes_checked"),
        n("writes_acked") + n("outbox_posts"),
        "every acknowledged write was checked: {summary}"
    );
    assert!(n("changes_delivered") > 0, "{summary}");
    assert!(
        summary["latency_ms"]["count"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    // The log really was truncated under the viewers.
    let first = health(&core_api).await["firstIndex"].as_u64().unwrap();
    assert!(first > 1, "the core never truncated: {summary}");
    assert!(
        n("final_index") >= n("writes_acked") + n("outbox_posts"),
        "{summary}"
    );
}
