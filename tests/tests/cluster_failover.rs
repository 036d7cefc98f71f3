//! Node failures in a 3-node cluster: `kill -9` of the leader under
//! concurrent writers (a new leader takes over, no acknowledged write is
//! lost or doubled), SIGTERM of the leader (it hands over and exits cleanly, and so does
//! every node after it),
//! `Idempotency-Key` retries across the failover (of a post, and of creates and a
//! delete whose checks would now refuse them), and two of three nodes down (writes
//! answer 503 in time, reads still served).

use std::sync::Arc;
use std::time::{Duration, Instant};

use changeagent_testkit::cluster::{
    read_all, Cluster, ClusterOptions, CLUSTER_DEADLINE, WRITE_TIMEOUT_MS, WRITE_TIMEOUT_SLACK,
};
use changeagent_testkit::history::{write_body, AttemptResult, History};
use changeagent_testkit::workload::{write_once, write_retrying, Writers};
use changeagent_testkit::{wait_until, Api, Reply};

/// Writers in the kill test.
const WRITERS: usize = 8;

/// Acknowledged writes wanted before the kill, and again after it.
const ACKS_EACH_SIDE: usize = 60;

/// How long a writer keeps retrying one write before giving up on it.
const WRITE_GIVE_UP: Duration = Duration::from_secs(15);

/// Waits until `history` holds `n` acknowledgements after `since`.
async fn wait_acks(history: &History, since: Option<Instant>, n: usize, what: &str) {
    wait_until(CLUSTER_DEADLINE, what, || {
        let got = history.acked_since(since);
        async move {
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} acknowledged"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_under_concurrent_writers_loses_no_acked_write() {
    kill_leader_under_writers(ClusterOptions::new(3)).await;
}

/// The same over mutual TLS between the nodes (HTTPS for clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_under_concurrent_writers_loses_no_acked_write_over_mtls() {
    kill_leader_under_writers(ClusterOptions::new(3).mtls()).await;
}

async fn kill_leader_under_writers(opts: ClusterOptions) {
    let mut cluster = Cluster::start_with_peers(opts).await;
    let history = Arc::new(History::new());
    let writers = Writers::start(
        Arc::clone(&history),
        cluster.client_nodes(),
        WRITERS,
        0,
        WRITE_GIVE_UP,
        Some(5),
    );
    wait_acks(
        &history,
        None,
        ACKS_EACH_SIDE,
        "writes are acknowledged before the kill",
    )
    .await;

    let old = cluster.wait_leader().await;
    let killed_at = Instant::now();
    cluster.kill9(old);
    let survivors = cluster.others(&[old]);
    let new = cluster.wait_new_leader(&survivors, old).await;
    let elected_after = killed_at.elapsed();
    wait_acks(
        &history,
        Some(killed_at),
        ACKS_EACH_SIDE,
        "writers resume after the kill",
    )
    .await;
    let reports = writers.stop(WRITE_GIVE_UP * 2).await;
    // Writers start every third write on the killed node, so the kill must
    // have cost some attempts: proof that it landed under load.
    let disturbed = history
        .attempts()
        .iter()
        .filter(|a| a.at > killed_at && matches!(a.result, AttemptResult::Unknown(_)))
        .count();
    assert!(disturbed > 0, "no write attempt failed after the kill");
    for r in &reports {
        assert_eq!(r.rejected, 0, "a writer got a 4xx: {r:?}");
        assert!(r.acked > 0, "a writer never got an ack: {r:?}");
    }

    cluster.restart(old).await;
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    assert!(
        summary.acked >= 2 * ACKS_EACH_SIDE,
        "{summary:?} (new leader n{new} after {elected_after:?})"
    );
    assert!(
        summary.reads > 0,
        "no consistent read succeeded: {reports:?}"
    );
    // The restarted node follows the same leader as the others.
    cluster.wait_leader().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_the_leader_hands_over_and_exits_cleanly() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = Arc::new(History::new());
    let writers = Writers::start(
        Arc::clone(&history),
        cluster.client_nodes(),
        4,
        0,
        WRITE_GIVE_UP,
        None,
    );
    wait_acks(&history, None, 30, "writes are acknowledged before SIGTERM").await;

    let old = cluster.wait_leader().await;
    let stopped_at = Instant::now();
    let status = cluster.terminate(old).await;
    let log = cluster.node(old).server.log();
    assert!(
        status.success(),
        "the leader exited with {status}; log:\n{log}"
    );
    // It handed leadership over only once a quorum held its whole log, and a follower took
    // it over while the old leader still ran (no election timeout waited out).
    assert!(
        log.contains("followers caught up; handing leadership over"),
        "no hand-over in the leader's log:\n{log}"
    );
    assert!(
        log.contains("handed leadership over; stopping"),
        "leadership was not taken over before the leader stopped:\n{log}"
    );
    let survivors = cluster.others(&[old]);
    let new = cluster.wait_new_leader(&survivors, old).await;
    assert!(
        log.contains(&format!("new_leader={}", cluster.node(new).id)),
        "the node the leader handed over to is not the one leading now (n{new}):\n{log}"
    );
    wait_acks(
        &history,
        Some(stopped_at),
        30,
        "writers resume after the leader stopped",
    )
    .await;
    let reports = writers.stop(WRITE_GIVE_UP * 2).await;
    for r in &reports {
        assert_eq!(r.rejected, 0, "a writer got a 4xx: {r:?}");
    }

    cluster.restart(old).await;
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    assert!(summary.acked >= 60, "{summary:?}");

    // Every node stops cleanly, the leader first, then the followers while their peer
    // streams are busy with heartbeats (a stream's task still holding Raft, and so the log's
    // database, when the process exited made it abort).
    let leader = cluster.wait_leader().await;
    for i in std::iter::once(leader).chain(cluster.others(&[leader])) {
        let status = cluster.terminate(i).await;
        assert!(
            status.success(),
            "n{i} exited with {status}; log:\n{}",
            cluster.node(i).server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_retry_after_leader_kill_returns_the_same_id() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    cluster
        .write_rounds(&history, &[0, 1, 2], 3, "before")
        .await;
    let old = cluster.wait_leader().await;
    let follower = cluster.others(&[old])[0];

    // The first attempt goes through a follower (forwarded to the leader).
    let key = "order-17";
    let (first, first_reply) = write_once(
        &history,
        1,
        &cluster.node(follower).name,
        &cluster.node(follower).fault_api(),
        key,
        "order-17",
    )
    .await;
    let AttemptResult::Acked(id) = first else {
        panic!("first attempt not acknowledged: {first:?} {first_reply:?}");
    };
    let first_body = first_reply.expect("reply").body;

    cluster.kill9(old);
    let survivors = cluster.others(&[old]);
    let new = cluster.wait_new_leader(&survivors, old).await;

    // Retries through every surviving node answer the first answer.
    for &i in &survivors {
        let api = cluster.node(i).fault_api();
        let r = api
            .request(
                "POST",
                "/changes",
                Some("application/json"),
                Some(write_body("order-17").into_bytes()),
                &[("Idempotency-Key", key)],
            )
            .await;
        history.record_attempt(
            1,
            &cluster.node(i).name,
            key,
            "order-17",
            if r.status == 200 {
                AttemptResult::Acked(changeagent_testkit::posted_id(&r.json()))
            } else {
                AttemptResult::Unknown(format!("{} {}", r.status, r.text()))
            },
        );
        assert_eq!(
            r.status,
            200,
            "retry through n{i} after failover: {}",
            r.text()
        );
        assert_eq!(
            r.text(),
            String::from_utf8_lossy(&first_body),
            "retry through n{i} answered differently (first answer: _id {id})"
        );
    }
    assert_eq!(
        cluster.api(new).last_index().await,
        id,
        "a retry appended a change"
    );
    let next = cluster
        .write_acked(&history, 2, new, "after-failover")
        .await;
    assert_eq!(next, id + 1, "ids after the failover are not dense");

    // The old leader, restarted, answers the retry with the same id too. A
    // just-restarted ex-leader may briefly still think it leads (openraft
    // restores it as leader at its old term until it hears the new one) and
    // answer 503; the client retries with the same key, as the API says.
    cluster.restart(old).await;
    let restarted = [(
        cluster.node(old).name.clone(),
        cluster.node(old).fault_api(),
    )];
    let result = write_retrying(
        &history,
        1,
        &restarted,
        0,
        key,
        "order-17",
        CLUSTER_DEADLINE,
    )
    .await;
    assert_eq!(
        result,
        AttemptResult::Acked(id),
        "retry through the restarted n{old}"
    );

    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    let summary = history.assert_consistent(&finals);
    assert_eq!(summary.id_of("order-17"), Some(id), "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_down_writes_answer_503_reads_still_served() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let history = History::new();
    for k in 0..4 {
        for i in 0..3 {
            cluster
                .write_acked(&history, i, i, &format!("acked-{i}-{k}"))
                .await;
        }
    }
    let survivor = cluster.wait_leader().await;
    for f in cluster.others(&[survivor]) {
        cluster.kill9(f);
    }

    // Writes to the survivor fail with 503 + Retry-After within the write
    // timeout (plus slack), and are not applied.
    let bound = Duration::from_millis(WRITE_TIMEOUT_MS) + WRITE_TIMEOUT_SLACK;
    let node = cluster.node(survivor);
    let mut refused = Vec::new();
    for k in 0..2 {
        let marker = format!("no-quorum-{k}");
        let started = Instant::now();
        let (result, reply) =
            write_once(&history, 9, &node.name, &node.fault_api(), &marker, &marker).await;
        let took = started.elapsed();
        let reply = reply.unwrap_or_else(|| panic!("{marker}: no answer: {result:?}"));
        assert_eq!(reply.status, 503, "{marker}: {}", reply.text());
        let retry_after = reply
            .header("retry-after")
            .unwrap_or_else(|| panic!("{marker}: 503 without Retry-After"));
        assert!(
            retry_after.trim().parse::<u64>().is_ok(),
            "{marker}: Retry-After {retry_after:?} is not a number of seconds"
        );
        assert!(
            reply.json()["error"].is_string(),
            "{marker}: 503 body {}",
            reply.text()
        );
        assert!(
            took <= bound,
            "{marker}: 503 after {took:?} (bound {bound:?})"
        );
        refused.push(marker);
    }

    // Reads are still served, with every acknowledged change.
    let api = cluster.api(survivor);
    let (_, list) = read_all(&api).await.expect("survivor serves GET /changes");
    let summary = history.assert_consistent(&[(node.name.clone(), list.clone())]);
    assert_eq!(summary.acked, 12, "{summary:?}");
    for m in &refused {
        assert_eq!(summary.id_of(m), None, "{m} was applied without a quorum");
    }
    let r = api.get("/changes/5").await;
    assert_eq!(r.text(), list[4], "GET /changes/5 on the survivor");
    let r = api.get("/changes?since=10&block=0").await;
    r.expect_status(200);

    // Back to a quorum: the cluster converges and accepts writes again (the
    // refused writes may or may not have committed now: at most once).
    for f in 0..3 {
        if f != survivor {
            cluster.restart(f).await;
        }
    }
    cluster.wait_leader().await;
    for i in 0..3 {
        cluster
            .write_acked(&history, i, i, &format!("healed-{i}"))
            .await;
    }
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
}

/// Sends `method path` with an `Idempotency-Key` until it gets an answer other than 503
/// (a leader change in progress), as a client following `Retry-After` does.
async fn keyed(api: &Api, method: &str, path: &str, body: Option<&str>, key: &str) -> Reply {
    let headers: Vec<(&str, &str)> = match key {
        "" => Vec::new(),
        k => vec![("Idempotency-Key", k)],
    };
    wait_until(CLUSTER_DEADLINE, "an answer other than 503", || {
        let body = body.map(|b| b.as_bytes().to_vec());
        let headers = headers.clone();
        async move {
            let r = api
                .try_request(method, path, Some("application/json"), body, &headers)
                .await
                .map_err(|e| e.to_string())?;
            if r.status == 503 {
                Err(r.text())
            } else {
                Ok(r)
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A retry whose first attempt succeeded answers that first outcome, even where the checks
/// before a write would now refuse it: the tenant exists (409), the key is deleted (404).
/// The retries go to the new leader and through a follower after the old leader is killed;
/// the same requests without their key, or with a new one, are refused as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_deletes_and_creates_retried_after_failover_answer_their_first_outcome() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let old = cluster.wait_leader().await;
    let api = cluster.node(old).fault_api();
    let tenant = keyed(&api, "POST", "/tenants", Some(r#"{"name":"acme"}"#), "t-1").await;
    let tenant = tenant.expect_status(200).text();
    let coll_path = "/tenants/acme/collections";
    let coll = keyed(&api, "POST", coll_path, Some(r#"{"name":"flags"}"#), "c-1").await;
    let coll = coll.expect_status(200).text();
    let key_path = "/collections/flags/keys/dark-mode";
    keyed(&api, "PUT", key_path, Some(r#"{"on":true}"#), "")
        .await
        .expect_status(200);
    let deleted = keyed(&api, "DELETE", key_path, None, "d-1").await;
    let deleted = deleted.expect_status(200).text();
    let last = api.last_index().await;

    cluster.kill9(old);
    let survivors = cluster.others(&[old]);
    let new = cluster.wait_new_leader(&survivors, old).await;
    for &i in &survivors {
        let api = cluster.node(i).fault_api();
        let who = cluster.label(i);
        let r = keyed(&api, "POST", "/tenants", Some(r#"{"name":"acme"}"#), "t-1").await;
        assert_eq!(
            (r.status, r.text()),
            (200, tenant.clone()),
            "tenant retry via {who}"
        );
        let r = keyed(&api, "POST", coll_path, Some(r#"{"name":"flags"}"#), "c-1").await;
        assert_eq!(
            (r.status, r.text()),
            (200, coll.clone()),
            "collection retry via {who}"
        );
        let r = keyed(&api, "DELETE", key_path, None, "d-1").await;
        assert_eq!(
            (r.status, r.text()),
            (200, deleted.clone()),
            "delete retry via {who}"
        );
    }

    let api = cluster.node(new).fault_api();
    let r = keyed(&api, "POST", "/tenants", Some(r#"{"name":"acme"}"#), "t-2").await;
    assert_eq!(
        r.status,
        409,
        "a new create of an existing tenant: {}",
        r.text()
    );
    let r = keyed(&api, "POST", coll_path, Some(r#"{"name":"flags"}"#), "").await;
    assert_eq!(r.status, 409, "a create without key: {}", r.text());
    let r = keyed(&api, "DELETE", key_path, None, "d-2").await;
    assert_eq!(r.status, 404, "a new delete of a deleted key: {}", r.text());
    let r = keyed(&api, "DELETE", key_path, None, "").await;
    assert_eq!(r.status, 404, "a delete without key: {}", r.text());
    assert_eq!(
        api.last_index().await,
        last,
        "a retry or a refusal appended"
    );
}
