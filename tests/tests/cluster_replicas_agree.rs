//! Every replica of a 3-node cluster serves the same bytes for each change, whatever the
//! data: the leader applies the entries it built, followers the entries they decoded, and
//! the two must not differ (a posted `null` once did: `"data":null` on the leader, no data
//! on followers).

use changeagent_testkit::cluster::{read_all, Cluster, ClusterOptions, CLUSTER_DEADLINE};

/// Bodies whose data is, or holds, JSON `null`, each with what the leader must serve as the
/// change's `data` (`None`: no `data` field).
const BODIES: [(&str, Option<&str>); 6] = [
    ("null", Some("null")),
    (r#"{"data":null}"#, None),
    (r#"{"data":null,"tags":["t"]}"#, None),
    (r#"{"data":{"a":null}}"#, Some(r#"{"a":null}"#)),
    (r#"[null,{"data":[null]}]"#, Some("null")),
    (" null ", Some("null")),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_serves_the_same_bytes_for_null_data() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    // Through the leader, and through a follower (which forwards to the leader).
    for via in [leader, follower] {
        for (body, _) in BODIES {
            let r = cluster.api(via).post_json("/changes", body).await;
            assert_eq!(r.status, 200, "POST {body} via n{via}: {}", r.text());
        }
    }
    let last = cluster.api(leader).last_index().await;
    for i in 0..3 {
        cluster
            .try_wait_caught_up(i, last, CLUSTER_DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut lists = Vec::new();
    for i in 0..3 {
        let (_, raws) = read_all(&cluster.api(i))
            .await
            .unwrap_or_else(|e| panic!("reading n{i}: {e}"));
        lists.push(raws);
    }
    let leader_list = &lists[leader];
    // The leader serves what was posted (the batch's first change stands for it).
    let posted: Vec<&str> = leader_list
        .iter()
        .filter(|c| !c.contains(r#""type":-"#))
        .map(String::as_str)
        .collect();
    let expected: Vec<Option<&str>> = BODIES
        .iter()
        .flat_map(|(body, data)| {
            if body.starts_with('[') {
                vec![*data, Some("[null]")]
            } else {
                vec![*data]
            }
        })
        .collect();
    assert_eq!(posted.len(), 2 * expected.len(), "{posted:#?}");
    for (change, data) in posted.iter().zip(expected.iter().chain(expected.iter())) {
        match data {
            Some(d) => assert!(
                change.ends_with(&format!(r#","data":{d}}}"#)),
                "{change} does not hold data {d}"
            ),
            None => assert!(!change.contains(r#""data""#), "{change} holds data"),
        }
    }
    for (i, list) in lists.iter().enumerate() {
        assert_eq!(
            list.len(),
            leader_list.len(),
            "n{i} and the leader n{leader}"
        );
        for (a, b) in leader_list.iter().zip(list) {
            assert_eq!(b, a, "n{i} and the leader n{leader} serve different bytes");
        }
    }
}
