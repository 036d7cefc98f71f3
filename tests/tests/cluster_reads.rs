//! Consistent reads: after a write is acknowledged through node A,
//! `GET /changes?consistent=true` and `GET /changes/{id}?consistent=true` on
//! any node B include it at once, with no waiting by the client.

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::history::{marker_of, History};
use changeagent_testkit::workload::consistent_read;

/// Rounds over every ordered pair of nodes.
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consistent_read_sees_a_write_acked_through_another_node() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    let mut client = 0;
    for round in 0..ROUNDS {
        for a in 0..3 {
            for b in (0..3).filter(|&b| b != a) {
                client += 1;
                let marker = format!("r{round}-via-n{a}-read-n{b}");
                let id = cluster.write_acked(&history, client, a, &marker).await;
                let node = cluster.node(b);
                let api = node.fault_api();
                let read = consistent_read(&history, client, &node.name, &api)
                    .await
                    .unwrap_or_else(|e| panic!("consistent read on n{b}: {e}"));
                assert!(
                    read.entries
                        .iter()
                        .any(|(i, m)| *i == id && m.as_deref() == Some(marker.as_str())),
                    "consistent read on n{b} right after _id {id} was acknowledged through n{a} misses it: {read:?}"
                );
                let r = api
                    .try_get(&format!("/changes/{id}?consistent=true"))
                    .await
                    .unwrap_or_else(|e| panic!("GET /changes/{id}?consistent=true on n{b}: {e}"));
                assert_eq!(
                    r.status,
                    200,
                    "GET /changes/{id}?consistent=true on n{b}: {}",
                    r.text()
                );
                assert_eq!(
                    marker_of(&r.text()).as_deref(),
                    Some(marker.as_str()),
                    "GET /changes/{id}?consistent=true on n{b}"
                );
            }
        }
    }
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.reads, ROUNDS * 6, "{summary:?}");
}
