//! Forming a 3-node cluster, by peers file and by `--join`: writes through
//! every node (followers forward them) end up in byte-identical lists on
//! every node, every node sends the same `X-Cluster-Id`, and `GET /cluster`
//! shows three voters and one leader everywhere.

use std::collections::BTreeSet;
use std::time::Duration;

use changeagent_testkit::cluster::{Cluster, ClusterOptions, CLUSTER_DEADLINE};
use changeagent_testkit::history::History;
use changeagent_testkit::{health, wait_until};
use serde_json::Value;

/// Writes `rounds` changes through every node in turn and checks the
/// cluster formed properly: identical lists, one cluster id, one leader,
/// every node a voter.
async fn check_formed(cluster: &Cluster, history: &History, rounds: usize) {
    let all = cluster.running();
    assert_eq!(all.len(), 3, "nodes running: {all:?}");
    let before = history.acked_count();
    let mut ids = Vec::new();
    for round in 0..rounds {
        for &i in &all {
            ids.push(
                cluster
                    .write_acked(history, i, i, &format!("via-n{i}-{round}"))
                    .await,
            );
        }
    }
    // Sequential writes get increasing ids, whichever node they went through.
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids of sequential writes through different nodes: {ids:?}"
    );

    let finals = cluster.wait_converged(&all).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.acked, before + rounds * all.len(), "{summary:?}");
    assert_eq!(summary.changes, summary.acked, "{summary:?}");

    // One cluster id, on every answer of every node.
    let mut cluster_ids = BTreeSet::new();
    for &i in &all {
        let api = cluster.api(i);
        for path in ["/changes?limit=1", "/health", "/cluster"] {
            let r = api.get(path).await;
            r.expect_status(200);
            let id = r
                .header("x-cluster-id")
                .unwrap_or_else(|| panic!("n{i}: GET {path} has no X-Cluster-Id"));
            assert!(!id.is_empty(), "n{i}: empty X-Cluster-Id");
            cluster_ids.insert(id);
        }
        let h = health(&api).await.expect("/health");
        cluster_ids.insert(h["clusterId"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        cluster_ids.len(),
        1,
        "nodes disagree on the cluster id: {cluster_ids:?}"
    );
    let cluster_id = cluster_ids.into_iter().next().expect("one id");

    // GET /cluster: three voters, one leader, the same on every node.
    let leader = cluster.wait_leader().await;
    let leader_id = cluster.node(leader).id;
    let node_ids: BTreeSet<u64> = all.iter().map(|&i| cluster.node(i).id).collect();
    assert_eq!(node_ids.len(), 3, "node ids are not distinct: {node_ids:?}");
    for &i in &all {
        let doc = cluster.wait_voters(i, &node_ids).await;
        assert_eq!(doc["clusterId"], cluster_id.as_str(), "n{i}: {doc}");
        assert_eq!(doc["leader"].as_u64(), Some(leader_id), "n{i}: {doc}");
        assert!(doc["term"].as_u64().is_some_and(|t| t >= 1), "n{i}: {doc}");
        let members = doc["members"].as_array().expect("members");
        assert_eq!(members.len(), 3, "n{i}: {doc}");
        for m in members {
            let id = m["id"].as_u64().expect("member id");
            let j = cluster
                .index_of(id)
                .unwrap_or_else(|| panic!("n{i} lists unknown member {m}"));
            assert_eq!(
                m["addr"].as_str(),
                Some(cluster.node(j).advertise.to_string().as_str()),
                "n{i}: member {m} should have n{j}'s advertise address"
            );
            assert_eq!(m["voter"], true, "n{i}: {m}");
            let role = if id == leader_id {
                "leader"
            } else {
                "follower"
            };
            assert_eq!(m["role"], role, "n{i}: {m}");
        }
    }

    // Followers ask the leader, so every node reports the followers'
    // matched index, and once idle it is the leader's last applied index.
    let leader_api = cluster.node(leader).probe_api();
    for &i in &all {
        let api = cluster.node(i).probe_api();
        let leader_api = leader_api.clone();
        wait_until(
            CLUSTER_DEADLINE,
            &format!("n{i} reports every follower's matched index = the leader's applied index"),
            || {
                let api = api.clone();
                let leader_api = leader_api.clone();
                async move {
                    let applied = health(&leader_api).await?["appliedLogIndex"]
                        .as_u64()
                        .ok_or("leader /health has no appliedLogIndex")?;
                    let r = api.try_get("/cluster").await.map_err(|e| e.to_string())?;
                    let doc: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                    let members = doc["members"].as_array().ok_or(doc.to_string())?;
                    let lagging: Vec<&Value> = members
                        .iter()
                        .filter(|m| {
                            m["role"] == "follower" && m["matched"].as_u64() != Some(applied)
                        })
                        .collect();
                    if lagging.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("leader applied {applied}; {doc}"))
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_file_cluster_replicates_writes_through_every_node() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    check_formed(&cluster, &history, 5).await;
    // A new leader's first entry (the cluster id, proposed the moment it leads) is taken,
    // not refused as "not the leader" while its first quorum round is under way.
    for i in cluster.running() {
        let log = cluster.node(i).server.log();
        assert!(
            !log.contains("could not set the cluster id"),
            "n{i}'s first proposal as leader was refused:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_cluster_replicates_writes_through_every_node() {
    // One node alone, with changes the joiners must catch up on.
    let mut cluster = Cluster::start_by_join(ClusterOptions::new(1)).await;
    let history = History::new();
    for k in 0..10 {
        cluster
            .write_acked(&history, 0, 0, &format!("alone-{k}"))
            .await;
    }
    let alone_id = health(&cluster.api(0)).await.expect("/health")["clusterId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!alone_id.is_empty(), "single node has no cluster id");

    // n1 joins through the leader, n2 through n1 (a follower).
    let n1 = cluster.add_node(0).await;
    cluster
        .write_acked(&history, 1, n1, "after-n1-joined")
        .await;
    let n2 = cluster.add_node(n1).await;
    assert_eq!((n1, n2), (1, 2));
    check_formed(&cluster, &history, 5).await;

    // The joiners took the first node's cluster id.
    let h = health(&cluster.api(n2)).await.expect("/health");
    assert_eq!(h["clusterId"], alone_id.as_str(), "{h}");

    // n2 learned who the leader is from the leader's stream itself, which it accepted
    // before it knew the leader as a member, off Raft's runtime. Once it knows, that stream
    // ends and the leader reopens it on Raft's runtime, where every stream is served.
    for i in 0..3 {
        let api = cluster.node(i).probe_api();
        wait_until(
            CLUSTER_DEADLINE,
            &format!("n{i} serves every peer stream on Raft's runtime"),
            || {
                let api = api.clone();
                async move {
                    match api
                        .metric("changeagent_raft_streams_off_raft_runtime")
                        .await?
                    {
                        0 => Ok(()),
                        n => Err(format!("{n} open off Raft's runtime")),
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A node whose data dir was wiped cannot form a second cluster from the peers
/// file: the lowest-address node finds its peers already in a cluster, exits
/// non-zero and says to use `--join`; the others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_seed_refuses_to_initialize_a_second_cluster() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    let leader = cluster.wait_leader().await;
    cluster
        .write_acked(&history, 0, leader, "before-wipe")
        .await;
    // The node that initializes a peers-file cluster is the lowest address.
    let seed = (0..3)
        .min_by_key(|&i| cluster.node(i).advertise.to_string())
        .expect("three nodes");
    cluster.kill9(seed);
    let data = cluster.node(seed).server.data_dir();
    std::fs::remove_dir_all(&data).unwrap_or_else(|e| panic!("wipe {}: {e}", data.display()));
    cluster.nodes[seed].server.relaunch();
    let status = cluster.nodes[seed]
        .server
        .wait_exit(Duration::from_secs(30))
        .await;
    let log = cluster.node(seed).server.log();
    assert!(
        !status.success(),
        "the wiped seed exited with {status}:\n{log}"
    );
    assert!(
        log.contains("already belongs to a cluster") && log.contains("--join"),
        "the wiped seed did not explain itself:\n{log}"
    );

    let survivors = cluster.others(&[seed]);
    let leader = cluster.wait_leader_among(&survivors).await;
    cluster.write_acked(&history, 0, leader, "after-wipe").await;
    let doc = cluster.cluster_doc(leader).await;
    let voters = changeagent_testkit::cluster::voter_ids(&doc).expect("voters");
    assert_eq!(voters.len(), 3, "membership changed: {doc}");
    assert!(
        voters.contains(&cluster.node(seed).id),
        "the old seed id left the membership: {doc}"
    );
}
