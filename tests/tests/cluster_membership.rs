//! Membership changes: removing the leader (the rest elect a new one and go
//! on writing), removing a follower, an unknown member id, and a follower
//! leaving on its own with `POST /cluster/leave` (it exits 0).

use std::collections::BTreeSet;

use changeagent_testkit::cluster::{read_all, Cluster, ClusterOptions};
use changeagent_testkit::history::History;
use changeagent_testkit::STOP_DEADLINE;

/// The voter ids of the nodes `among`.
fn ids(cluster: &Cluster, among: &[usize]) -> BTreeSet<u64> {
    among.iter().map(|&i| cluster.node(i).id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_the_leader_then_a_follower_keeps_the_rest_writing() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(4)).await;
    let history = History::new();
    for i in 0..4 {
        cluster
            .write_acked(&history, i, i, &format!("four-{i}"))
            .await;
    }

    // An unknown id: 404, nothing changes.
    let leader = cluster.wait_leader().await;
    let r = cluster.api(leader).delete("/cluster/members/12345").await;
    assert_eq!(r.status, 404, "DELETE of an unknown member: {}", r.text());
    assert!(r.json()["error"].is_string(), "{}", r.text());

    // Remove the leader.
    let old = leader;
    let old_id = cluster.node(old).id;
    let r = cluster
        .api(old)
        .delete(&format!("/cluster/members/{old_id}"))
        .await;
    assert_eq!(r.status, 200, "DELETE the leader: {}", r.text());
    assert_eq!(r.json()["removed"].as_u64(), Some(old_id), "{}", r.text());
    let rest = cluster.others(&[old]);
    let new = cluster.wait_new_leader(&rest, old).await;
    for &i in &rest {
        cluster.wait_voters(i, &ids(&cluster, &rest)).await;
    }
    for &i in &rest {
        cluster
            .write_acked(&history, i, i, &format!("three-{i}"))
            .await;
    }

    // Remove a follower, through the new leader.
    let gone = *rest.iter().find(|&&i| i != new).expect("a follower");
    let gone_id = cluster.node(gone).id;
    let r = cluster
        .api(new)
        .delete(&format!("/cluster/members/{gone_id}"))
        .await;
    assert_eq!(r.status, 200, "DELETE a follower: {}", r.text());
    assert_eq!(r.json()["removed"].as_u64(), Some(gone_id), "{}", r.text());
    let left: Vec<usize> = rest.iter().copied().filter(|&i| i != gone).collect();
    for &i in &left {
        cluster.wait_voters(i, &ids(&cluster, &left)).await;
    }
    for &i in &left {
        cluster
            .write_acked(&history, i, i, &format!("two-{i}"))
            .await;
    }

    let finals = cluster.wait_converged(&left).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.acked, 4 + 3 + 2, "{summary:?}");
    // The removed nodes hold no change the members do not: their lists are
    // prefixes of the final one.
    let reference = &finals[0].1;
    for removed in [old, gone] {
        let (_, list) = read_all(&cluster.api(removed))
            .await
            .unwrap_or_else(|e| panic!("removed n{removed}: {e}"));
        assert!(
            list.len() <= reference.len() && list[..] == reference[..list.len()],
            "removed n{removed} serves a list that is not a prefix of the members' ({} vs {} changes)",
            list.len(),
            reference.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_leaving_exits_zero_and_the_rest_go_on() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    for i in 0..3 {
        cluster
            .write_acked(&history, i, i, &format!("before-{i}"))
            .await;
    }
    let leader = cluster.wait_leader().await;
    let leaver = cluster.others(&[leader])[0];
    let leaver_id = cluster.node(leaver).id;

    let r = cluster
        .api(leaver)
        .request("POST", "/cluster/leave", None, None, &[])
        .await;
    assert_eq!(r.status, 200, "POST /cluster/leave: {}", r.text());
    assert_eq!(
        r.json()["removed"].as_u64(),
        Some(leaver_id),
        "{}",
        r.text()
    );
    let status = cluster.nodes[leaver].server.wait_exit(STOP_DEADLINE).await;
    assert_eq!(
        status.code(),
        Some(0),
        "the leaving node exited with {status}"
    );

    let rest = cluster.others(&[leaver]);
    for &i in &rest {
        cluster.wait_voters(i, &ids(&cluster, &rest)).await;
    }
    for &i in &rest {
        cluster
            .write_acked(&history, i, i, &format!("after-{i}"))
            .await;
    }
    let finals = cluster.wait_converged(&rest).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.acked, 5, "{summary:?}");
}
