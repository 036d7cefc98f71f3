//! Who may talk to a cluster: a node of another cluster is refused (403) on
//! `/cluster/join`, the Raft RPCs and peer streams, and with `--cluster-secret` the Raft
//! and membership routes answer 401 without the secret and work with it,
//! while the client API needs none.

use std::collections::BTreeSet;
use std::time::Duration;

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::history::History;
use changeagent_testkit::{health, wait_until, Api, Reply, ServerOptions, ServerProcess};
use serde_json::{json, Value};

/// A vote request for `term` from a node no cluster has.
fn vote_body(term: u64) -> String {
    json!({
        "vote": {"leader_id": {"term": term, "node_id": 7}, "committed": false},
        "last_log_id": null
    })
    .to_string()
}

/// A heartbeat (empty AppendEntries) for `term` from a node no cluster has.
fn append_body(term: u64) -> String {
    json!({
        "vote": {"leader_id": {"term": term, "node_id": 7}, "committed": true},
        "prev_log_id": null,
        "entries": [],
        "leader_commit": null
    })
    .to_string()
}

async fn post(api: &Api, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    api.request(
        "POST",
        path,
        Some("application/json"),
        Some(body.as_bytes().to_vec()),
        headers,
    )
    .await
}

/// Asserts `r` is `status` with a JSON `{"error": …}` body.
#[track_caller]
fn assert_error(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", r.text()));
    assert!(v["error"].is_string(), "{what}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_another_cluster_is_refused() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let foreign = ServerProcess::start_leader(ServerOptions::default()).await;
    let fh = health(&foreign.api()).await.expect("foreign /health");
    let foreign_node = fh["nodeId"].as_u64().expect("foreign nodeId");
    let foreign_cluster = fh["clusterId"]
        .as_str()
        .expect("foreign clusterId")
        .to_string();
    let leader = cluster.wait_leader().await;
    let ours = health(&cluster.api(leader)).await.expect("/health")["clusterId"]
        .as_str()
        .expect("clusterId")
        .to_string();
    assert_ne!(ours, foreign_cluster, "two clusters got the same id");
    let voters: BTreeSet<u64> = (0..3).map(|i| cluster.node(i).id).collect();

    // Joining: refused by the leader and by a follower.
    let join = json!({"nodeId": foreign_node, "addr": foreign.addr().to_string()}).to_string();
    for i in [leader, cluster.others(&[leader])[0]] {
        let r = post(
            &cluster.api(i),
            "/cluster/join",
            &join,
            &[("X-Cluster-Id", foreign_cluster.as_str())],
        )
        .await;
        assert_error(&r, 403, &format!("foreign join through n{i}"));
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap_or_default()
                .contains("cluster"),
            "403 should say why: {}",
            r.text()
        );
    }

    // Raft RPCs with a foreign cluster id, carrying a term far ahead: 403,
    // and the term does not move (the request was not acted on).
    for i in 0..3 {
        let api = cluster.api(i);
        let term = health(&api).await.expect("/health")["term"]
            .as_u64()
            .expect("term");
        let r = post(
            &api,
            "/raft/vote",
            &vote_body(term + 1000),
            &[("X-Cluster-Id", foreign_cluster.as_str())],
        )
        .await;
        assert_error(&r, 403, &format!("foreign vote to n{i}"));
        let r = post(
            &api,
            "/raft/append",
            &append_body(term + 1000),
            &[("X-Cluster-Id", foreign_cluster.as_str())],
        )
        .await;
        assert_error(&r, 403, &format!("foreign append to n{i}"));
        let r = api
            .request(
                "GET",
                "/raft/stream",
                None,
                None,
                &[
                    ("X-Cluster-Id", foreign_cluster.as_str()),
                    ("Upgrade", "changeagent-raft/1"),
                ],
            )
            .await;
        assert_error(&r, 403, &format!("foreign stream to n{i}"));
        let after = health(&api).await.expect("/health")["term"]
            .as_u64()
            .expect("term");
        assert!(
            after < term + 1000,
            "n{i} took the foreign term: {term} -> {after}"
        );
    }

    // Nothing changed: same voters, same leader, writes work.
    for i in 0..3 {
        cluster.wait_voters(i, &voters).await;
    }
    assert_eq!(cluster.wait_leader().await, leader, "the leader changed");
    cluster.assert_writes_through_every_node("after").await;
    // The foreign node is still its own one-node cluster.
    let fh = health(&foreign.api()).await.expect("foreign /health");
    assert_eq!(fh["clusterId"], foreign_cluster.as_str(), "{fh}");
}

const SECRET: &str = "s3cret-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_secret_guards_raft_and_membership_routes() {
    // Formation itself proves the nodes send the secret on their own RPCs.
    let mut cluster =
        Cluster::start_with_peers(ClusterOptions::new(3).arg("--cluster-secret").arg(SECRET)).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.others(&[leader])[0];
    let api = cluster.api(follower);
    let h = health(&api).await.expect("/health");
    let cluster_id = h["clusterId"].as_str().expect("clusterId").to_string();
    let term = h["term"].as_u64().expect("term");
    let voters: BTreeSet<u64> = (0..3).map(|i| cluster.node(i).id).collect();

    let id = cluster.node(leader).id.to_string();
    let join = json!({"nodeId": 4242, "addr": "127.0.0.1:9"}).to_string();
    let vote = vote_body(0);
    let append = append_body(0);
    let guarded: Vec<(&str, String, Option<&str>)> = vec![
        ("POST", "/raft/vote".to_string(), Some(vote.as_str())),
        ("POST", "/raft/append".to_string(), Some(append.as_str())),
        ("GET", "/raft/stream".to_string(), None),
        ("POST", "/cluster/join".to_string(), Some(join.as_str())),
        ("POST", "/cluster/leave".to_string(), None),
        ("DELETE", format!("/cluster/members/{id}"), None),
    ];
    for (method, path, body) in &guarded {
        for secret in [None, Some("wrong-secret")] {
            let mut headers = vec![("X-Cluster-Id", cluster_id.as_str())];
            if let Some(s) = secret {
                headers.push(("X-Cluster-Secret", s));
            }
            let r = api
                .request(
                    method,
                    path,
                    body.map(|_| "application/json"),
                    body.map(|b| b.as_bytes().to_vec()),
                    &headers,
                )
                .await;
            assert_error(&r, 401, &format!("{method} {path} with secret {secret:?}"));
        }
    }
    // None of them acted: the follower still runs, same voters and term.
    assert!(
        cluster.nodes[follower].server.try_exit_status().is_none(),
        "the follower exited after an unauthenticated /cluster/leave"
    );
    for i in 0..3 {
        cluster.wait_voters(i, &voters).await;
    }
    assert_eq!(cluster.wait_leader().await, leader, "the leader changed");

    // With the secret, a Raft RPC is handled (a stale vote is answered, not
    // refused).
    let r = post(
        &api,
        "/raft/vote",
        &vote,
        &[
            ("X-Cluster-Id", cluster_id.as_str()),
            ("X-Cluster-Secret", SECRET),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "vote with the secret: {}", r.text());
    let after = health(&api).await.expect("/health")["term"]
        .as_u64()
        .expect("term");
    assert!(after >= term, "term went backwards: {term} -> {after}");

    // The client API needs no secret.
    let history = History::new();
    for i in 0..3 {
        cluster
            .write_acked(&history, i, i, &format!("client-{i}"))
            .await;
        for path in ["/changes", "/health", "/cluster"] {
            cluster.api(i).get(path).await.expect_status(200);
        }
    }

    // A node with the secret in a file joins.
    let dir = tempfile::tempdir().expect("temp dir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write secret file");
    cluster.set_node_args(vec![
        "--cluster-secret-file".to_string(),
        secret_file.display().to_string(),
    ]);
    let joined = cluster.add_node(follower).await;
    cluster.write_acked(&history, 3, joined, "via-joined").await;
    let members: Vec<usize> = (0..4).collect();
    let finals = cluster.wait_converged(&members).await;
    history.assert_consistent(&finals);

    // A node with the wrong secret does not get in (bounded wait).
    cluster.set_node_args(vec![
        "--cluster-secret".to_string(),
        "wrong-secret".to_string(),
    ]);
    let intruder = cluster.launch_joiner(leader, &[]).await;
    let voters: BTreeSet<u64> = members.iter().map(|&i| cluster.node(i).id).collect();
    let leader_api = cluster.node(leader).probe_api();
    let admitted = wait_until(
        Duration::from_secs(5),
        "the node with the wrong secret becomes a member",
        || {
            let leader_api = leader_api.clone();
            let voters = voters.clone();
            async move {
                let r = leader_api
                    .try_get("/cluster")
                    .await
                    .map_err(|e| e.to_string())?;
                let doc: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                let n = doc["members"].as_array().map_or(0, Vec::len);
                let listed = changeagent_testkit::cluster::voter_ids(&doc)?;
                if n > voters.len() || listed != voters {
                    Ok(doc)
                } else {
                    Err(format!("{n} members"))
                }
            }
        },
    )
    .await;
    assert!(
        admitted.is_err(),
        "n{intruder} joined with the wrong secret: {admitted:?}"
    );
}
