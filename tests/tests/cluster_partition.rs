//! Network partitions through the test's proxies: a leader cut off from the
//! other two cannot commit (its writes answer 503 in time and never apply),
//! the majority elects a new leader and goes on, and after healing the old
//! leader converges to the majority's list with nothing diverged. Consistent
//! reads on a cut-off follower fail rather than miss an acknowledged write.
//! A follower cut off for a while comes back without unseating the leader (Pre-Vote).

use std::time::{Duration, Instant};

use changeagent_testkit::cluster::{
    read_all, Cluster, ClusterOptions, CLUSTER_DEADLINE, WRITE_TIMEOUT_MS, WRITE_TIMEOUT_SLACK,
};
use changeagent_testkit::health::node_health;
use changeagent_testkit::history::{marker_of, History};
use changeagent_testkit::wait_until;
use changeagent_testkit::workload::{consistent_read, plain_read, write_once};
use changeagent_testkit::Api;
use futures::future::join_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_commits_nothing_and_converges_after_heal() {
    isolate_the_leader(ClusterOptions::new(3).with_proxies()).await;
}

/// The same over mutual TLS between the nodes (HTTPS for clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_commits_nothing_and_converges_after_heal_over_mtls() {
    isolate_the_leader(ClusterOptions::new(3).with_proxies().mtls()).await;
}

async fn isolate_the_leader(opts: ClusterOptions) {
    let cluster = Cluster::start_with_peers(opts).await;
    let history = History::new();
    cluster
        .write_rounds(&history, &[0, 1, 2], 3, "before")
        .await;
    let old = cluster.wait_leader().await;
    let majority = cluster.others(&[old]);
    cluster.isolate(old);

    // Writes sent to the isolated old leader: 503 with Retry-After within
    // the write timeout (plus slack). Sent concurrently.
    let bound = Duration::from_millis(WRITE_TIMEOUT_MS) + WRITE_TIMEOUT_SLACK;
    let isolated = cluster.node(old);
    let api = isolated.fault_api();
    let markers: Vec<String> = (0..3).map(|k| format!("isolated-{k}")).collect();
    let answers = join_all(markers.iter().map(|m| {
        let (api, history, name) = (&api, &history, &isolated.name);
        async move {
            let started = Instant::now();
            let (result, reply) = write_once(history, 10, name, api, m, m).await;
            (m, result, reply, started.elapsed())
        }
    }))
    .await;
    for (m, result, reply, took) in &answers {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|| panic!("{m}: no answer from the isolated leader: {result:?}"));
        assert_eq!(reply.status, 503, "{m}: {}", reply.text());
        assert!(
            reply.header("retry-after").is_some(),
            "{m}: 503 without Retry-After"
        );
        assert!(
            took <= &bound,
            "{m}: answered after {took:?} (bound {bound:?})"
        );
    }

    // The majority elects a new leader and accepts writes through both
    // of its nodes.
    let new = cluster.wait_new_leader(&majority, old).await;
    cluster
        .write_rounds(&history, &majority, 3, "majority")
        .await;
    // The isolated node really is cut off: it has none of them, and what it
    // serves is a prefix of the majority's list.
    let (_, on_majority) = read_all(&cluster.api(new))
        .await
        .expect("read the new leader");
    let on_old = plain_read(&history, 20, &isolated.name, &cluster.api(old))
        .await
        .expect("the isolated node still serves reads");
    assert!(
        on_old.len() < on_majority.len(),
        "isolated n{old} has {} changes, the majority {}",
        on_old.len(),
        on_majority.len()
    );
    assert_eq!(
        on_old[..],
        on_majority[..on_old.len()],
        "the isolated node's list is not a prefix of the majority's"
    );
    assert!(
        on_old
            .iter()
            .all(|raw| !marker_of(raw).unwrap_or_default().starts_with("majority-")),
        "the isolated node has majority writes through a partition"
    );

    cluster.heal();
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    for m in &markers {
        assert_eq!(
            summary.id_of(m),
            None,
            "{m}, written to the isolated leader, was committed"
        );
    }
    assert_eq!(summary.acked, 9 + 6, "{summary:?}");

    // All three follow one leader again and the old leader takes writes.
    cluster.wait_leader().await;
    cluster
        .write_acked(&history, old, old, "old-leader-after-heal")
        .await;
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consistent_read_on_a_cut_off_follower_fails_rather_than_lag() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3).with_proxies()).await;
    let history = History::new();
    let leader = cluster.wait_leader().await;
    let cut = cluster.others(&[leader])[0];
    for i in 0..3 {
        cluster
            .write_acked(&history, 0, i, &format!("before-{i}"))
            .await;
    }
    cluster.wait_converged(&[0, 1, 2]).await;

    cluster.isolate(cut);
    let id = cluster
        .write_acked(&history, 0, leader, "while-cut-off")
        .await;

    // A plain read on the cut-off follower lags (this is what makes the
    // consistent read below meaningful).
    let stale = plain_read(&history, 1, &cluster.node(cut).name, &cluster.api(cut))
        .await
        .expect("plain read on the cut-off follower");
    assert!(
        stale.len() < id as usize,
        "the cut-off follower has the new write: {} changes",
        stale.len()
    );
    // A consistent read cannot confirm with the leader: 503, not a stale 200.
    let api = cluster.node(cut).fault_api();
    let r = api
        .try_get(&format!("/changes?since={}&consistent=true", id - 1))
        .await
        .unwrap_or_else(|e| panic!("consistent read on the cut-off follower: {e}"));
    assert_eq!(
        r.status,
        503,
        "consistent read on a follower cut off from the leader: {}",
        r.text()
    );
    let r = api
        .try_get(&format!("/changes/{id}?consistent=true"))
        .await
        .unwrap_or_else(|e| panic!("consistent GET /changes/{id}: {e}"));
    assert_eq!(r.status, 503, "consistent GET /changes/{id}: {}", r.text());

    // Healed, the consistent read includes the write.
    cluster.heal();
    let name = cluster.node(cut).name.clone();
    let read = wait_until(
        CLUSTER_DEADLINE,
        "a consistent read on the healed follower answers",
        || {
            let (history, name, api) = (&history, &name, &api);
            async move { consistent_read(history, 0, name, api).await }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        read.entries
            .iter()
            .any(|(i, m)| *i == id && m.as_deref() == Some("while-cut-off")),
        "consistent read after healing misses _id {id}: {read:?}"
    );
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
}

/// Vote requests node `api` has sent, Pre-Vote and real.
async fn campaign_requests(api: &Api) -> Result<u64, String> {
    const SENT: &str = "changeagent_raft_vote_requests_sent_total";
    let pre = api.metric(&format!("{SENT}{{kind=\"pre_vote\"}}")).await?;
    let real = api.metric(&format!("{SENT}{{kind=\"vote\"}}")).await?;
    Ok(pre + real)
}

/// Pre-Vote: a follower cut off from the others campaigns, but as no majority answers its
/// Pre-Vote it never starts an election, so its term stays. When it returns, the leader
/// goes on leading in the same term. (Without Pre-Vote it raises its term at each
/// campaign, and on its return its higher term unseats the leader.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_cut_off_and_back_does_not_unseat_the_leader() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3).with_proxies()).await;
    let history = History::new();
    let leader = cluster.wait_leader().await;
    cluster.write_acked(&history, 0, leader, "before").await;
    let health = |i: usize| {
        let api = cluster.api(i);
        async move {
            node_health(&api)
                .await
                .unwrap_or_else(|e| panic!("n{i}: {e}"))
        }
    };
    let term = health(leader).await.term;
    let cut = cluster.others(&[leader])[0];
    let api = cluster.api(cut);
    let before = campaign_requests(&api)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    cluster.isolate(cut);
    // Each campaign asks both other nodes; wait for two campaigns.
    wait_until(
        CLUSTER_DEADLINE,
        "the cut-off follower campaigns twice",
        || {
            let api = &api;
            async move {
                let sent = campaign_requests(api).await?;
                match sent >= before + 4 {
                    true => Ok(()),
                    false => Err(format!("{} vote requests sent", sent - before)),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let cut_off = health(cut).await;
    assert_eq!(
        cut_off.term, term,
        "the cut-off follower raised its term: {cut_off:?}"
    );

    cluster.heal();
    cluster.write_acked(&history, 0, leader, "after").await;
    // Converged: the returned follower took the leader's entries, in the leader's term.
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
    for i in 0..3 {
        let h = health(i).await;
        assert_eq!(
            (h.leader, h.term),
            (health(leader).await.node_id, term),
            "n{i} after the follower returned: {h:?}"
        );
    }
}
