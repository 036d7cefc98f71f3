//! Catching up: a follower killed while the others go on writing catches up
//! after its restart, and a node joining after the leader has purged its log
//! behind snapshots converges from a snapshot.

use std::collections::BTreeSet;
use std::path::Path;

use changeagent_testkit::cluster::{Cluster, ClusterOptions, CLUSTER_DEADLINE};
use changeagent_testkit::history::History;
use changeagent_testkit::{health, wait_until};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_follower_catches_up() {
    restart_a_follower(ClusterOptions::new(3)).await;
}

/// The same over mutual TLS between the nodes (HTTPS for clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_follower_catches_up_over_mtls() {
    restart_a_follower(ClusterOptions::new(3).mtls()).await;
}

async fn restart_a_follower(opts: ClusterOptions) {
    let mut cluster = Cluster::start_with_peers(opts).await;
    let history = History::new();
    cluster
        .write_rounds(&history, &[0, 1, 2], 3, "before")
        .await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.others(&[leader])[0];
    cluster.kill9(follower);

    let up = cluster.others(&[follower]);
    for k in 0..20 {
        let i = up[k % up.len()];
        cluster
            .write_acked(&history, i, i, &format!("while-down-{k}"))
            .await;
    }
    cluster.restart(follower).await;
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.acked, 29, "{summary:?}");

    // And it takes writes again.
    cluster
        .write_acked(&history, follower, follower, "via-restarted")
        .await;
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
}

/// The files directly in `dir/snapshots`, or the reason there are none.
fn snapshot_files(data_dir: &Path) -> Result<Vec<String>, String> {
    let dir = data_dir.join("snapshots");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let files: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if files.is_empty() {
        Err(format!("{} holds no file", dir.display()))
    } else {
        Ok(files)
    }
}

/// Sequential posts: each is its own Raft entry, so with `--snapshot-logs
/// 20` they trigger several snapshots.
const POSTS: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_node_catches_up_from_a_snapshot() {
    join_from_a_snapshot(ClusterOptions::new(3)).await;
}

/// The same over mutual TLS: the join, the streamed snapshot and the RPCs all on TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_node_catches_up_from_a_snapshot_over_mtls() {
    join_from_a_snapshot(ClusterOptions::new(3).mtls()).await;
}

async fn join_from_a_snapshot(opts: ClusterOptions) {
    let opts = opts
        .arg("--snapshot-logs")
        .arg("20")
        .arg("--snapshot-keep-logs")
        .arg("0");
    let mut cluster = Cluster::start_with_peers(opts).await;
    let history = History::new();
    let leader = cluster.wait_leader().await;
    for k in 0..POSTS {
        cluster
            .write_acked(&history, 0, leader, &format!("seq-{k}"))
            .await;
    }
    let data_dir = cluster.node(leader).data_dir();
    let files = wait_until(
        CLUSTER_DEADLINE,
        "the leader has written a snapshot",
        || {
            let r = snapshot_files(&data_dir);
            async move { r }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Join through a follower.
    let follower = cluster.others(&[leader])[0];
    let joined = cluster.add_node(follower).await;
    let all: Vec<usize> = (0..4).collect();
    let finals = cluster.wait_converged(&all).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.acked, POSTS, "{summary:?}");
    // The leader's log was purged behind its snapshot, so the new node can
    // only have caught up by installing one, which it keeps as its own.
    let log = cluster.node(joined).server.log();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "the joined node installed no snapshot:\n{log}"
    );
    let kept = snapshot_files(&cluster.node(joined).data_dir())
        .unwrap_or_else(|e| panic!("the joined node kept no snapshot: {e}"));
    assert!(kept.iter().any(|f| f == "current.snap"), "{kept:?}");

    // Same indexes as the leader, and the leader reports the new node
    // matched up to its own applied log index.
    let leader = cluster.wait_leader().await;
    let leader_api = cluster.node(leader).probe_api();
    let joined_api = cluster.node(joined).probe_api();
    let joined_id = cluster.node(joined).id;
    wait_until(
        CLUSTER_DEADLINE,
        "the joined node has the leader's indexes and is matched up to its applied index",
        || {
            let (leader_api, joined_api) = (leader_api.clone(), joined_api.clone());
            async move {
                let lh = health(&leader_api).await?;
                let jh = health(&joined_api).await?;
                let same = ["firstIndex", "lastIndex", "clusterId"]
                    .iter()
                    .all(|k| lh[*k] == jh[*k]);
                let r = leader_api
                    .try_get("/cluster")
                    .await
                    .map_err(|e| e.to_string())?;
                let doc: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                let matched = doc["members"]
                    .as_array()
                    .and_then(|m| m.iter().find(|m| m["id"].as_u64() == Some(joined_id)))
                    .map(|m| m["matched"].clone());
                if same
                    && matched.as_ref().and_then(Value::as_u64) == lh["appliedLogIndex"].as_u64()
                {
                    Ok(())
                } else {
                    Err(format!("leader {lh}; joined {jh}; matched {matched:?}"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e} (leader snapshots: {files:?})"));

    // The joined node is a full voter that takes writes.
    let voters: BTreeSet<u64> = all.iter().map(|&i| cluster.node(i).id).collect();
    cluster.wait_voters(joined, &voters).await;
    cluster.write_acked(&history, 1, joined, "via-joined").await;
    let finals = cluster.wait_converged(&all).await;
    history.assert_consistent(&finals);
}
