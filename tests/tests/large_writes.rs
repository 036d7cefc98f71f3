//! Writes near the body limit on a 3-node cluster. Raft entries and AppendEntries requests
//! are bounded in bytes (not only in requests), so many large posts at once are split into
//! entries a follower can take within one AppendEntries timeout: all of them commit and
//! every follower ends with the same bytes. Before the bound, 64 such posts became one entry
//! of about 200 MB that no follower could take within the timeout, and replication resent
//! it forever.

use std::collections::BTreeMap;
use std::time::Instant;

use changeagent_testkit::cluster::{Cluster, ClusterOptions, CLUSTER_DEADLINE};
use changeagent_testkit::{posted_id, wait_until, Api};
use serde_json::Value;

/// Concurrent posts.
const POSTS: usize = 64;
/// Bytes of each post's data (the default body limit is 4 MiB).
const DATA_BYTES: usize = 3 << 20;
/// Generous: the test is about replication finishing at all, not about its speed.
const WRITE_TIMEOUT_MS: u64 = 60_000;

/// Post `i`'s filler: its number repeated, so a change holding another's bytes shows.
fn filler(i: usize) -> String {
    let unit = format!("{i:03}-");
    unit.repeat(DATA_BYTES / unit.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_3mib_posts_commit_and_every_follower_converges() {
    let cluster =
        Cluster::start_with_peers(ClusterOptions::new(3).write_timeout_ms(Some(WRITE_TIMEOUT_MS)))
            .await;
    cluster.wait_leader().await;
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..POSTS {
        // Spread over every node: followers forward to the leader.
        let api = cluster.api(i % cluster.len());
        posts.spawn(async move {
            let body = format!("{{\"data\":{{\"n\":{i},\"fill\":\"{}\"}}}}", filler(i));
            (i, api.post_json("/changes", &body).await)
        });
    }
    let mut ids = BTreeMap::new();
    while let Some(done) = posts.join_next().await {
        let (i, reply) = done.expect("post task");
        assert_eq!(reply.status, 200, "post {i}: {}", reply.text());
        ids.insert(posted_id(&reply.json()), i);
    }
    assert_eq!(ids.len(), POSTS, "two posts got the same _id: {ids:?}");
    eprintln!(
        "{POSTS} posts of {} MiB committed in {:.1} s",
        DATA_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    let last = *ids.keys().last().expect("ids");

    for node in 0..cluster.len() {
        let api = cluster.api(node);
        wait_until(CLUSTER_DEADLINE, "the node applied every post", || {
            let api = api.clone();
            async move {
                let at = api.last_index().await;
                if at >= last {
                    Ok(())
                } else {
                    Err(format!("at {at} of {last}"))
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", cluster.label(node)));
        for (&id, &i) in &ids {
            assert_change(&api, id, i).await;
        }
    }
}

async fn assert_change(api: &Api, id: u64, i: usize) {
    let reply = api.get(&format!("/changes/{id}")).await;
    assert_eq!(reply.status, 200, "change {id} on {}", api.base());
    let change: Value = reply.json();
    let data = &change["data"];
    assert_eq!(
        data["n"],
        i,
        "change {id} on {} is another post's",
        api.base()
    );
    assert!(
        data["fill"].as_str() == Some(filler(i).as_str()),
        "change {id} on {} does not hold post {i}'s bytes",
        api.base()
    );
}
