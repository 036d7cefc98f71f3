//! Durability: every acknowledged change survives `kill -9` and SIGTERM
//! followed by a restart on the same data dir, byte for byte, with dense
//! ids — also when the kill lands in the middle of concurrent writes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use changeagent_testkit::{change_id, posted_id, wait_until, Api, ServerOptions, ServerProcess};
use serde_json::{json, Value};

/// Everything a client could have observed before the restart.
#[derive(Debug, PartialEq)]
struct State {
    changes: Vec<String>,
    envelope: Value,
    tenants: String,
    collections: String,
    keys: String,
    cluster_id: String,
}

async fn state(api: &Api) -> State {
    let r = api.get("/changes?limit=10000").await;
    r.expect_status(200);
    let mut envelope = r.json();
    envelope["changes"] = Value::Null;
    State {
        changes: changeagent_testkit::raw_changes(&r.body),
        envelope,
        tenants: api.get("/tenants").await.text(),
        collections: api.get("/tenants/acme/collections").await.text(),
        keys: api.get("/collections/flags/keys?limit=10000").await.text(),
        cluster_id: r.header("x-cluster-id").unwrap_or_default(),
    }
}

#[track_caller]
fn assert_same_state(before: &State, after: &State) {
    assert_eq!(
        before.changes.len(),
        after.changes.len(),
        "number of changes differs after restart"
    );
    for (b, a) in before.changes.iter().zip(&after.changes) {
        assert_eq!(b, a, "a change differs after restart");
    }
    assert_eq!(
        before.envelope, after.envelope,
        "list envelope differs after restart"
    );
    assert_eq!(
        before.tenants, after.tenants,
        "tenants differ after restart"
    );
    assert_eq!(
        before.collections, after.collections,
        "collections differ after restart"
    );
    assert_eq!(before.keys, after.keys, "keys differ after restart");
    assert!(!before.cluster_id.is_empty(), "no X-Cluster-Id");
    assert_eq!(
        before.cluster_id, after.cluster_id,
        "cluster id changed across restart"
    );
}

/// Writes a varied history: tenants, collections, single posts in both
/// forms, batches and keyed writes and deletes. Returns the last `_id`.
async fn write_history(api: &Api, changes: u64) -> u64 {
    api.post_json("/tenants", r#"{"name":"acme"}"#)
        .await
        .expect_status(200);
    api.post_json("/tenants/acme/collections", r#"{"name":"flags"}"#)
        .await
        .expect_status(200);
    let mut last = 0;
    let mut i = 0u64;
    while i < changes {
        last = match i % 5 {
            0 => api.post_change(&json!({"data": {"i": i, "z": [1, 2], "a": "x"}, "tags": [format!("t{}", i % 3)]}).to_string()).await,
            1 => api.post_change(&format!(r#"{{"raw" : {i},  "b":  [ true ]}}"#)).await,
            2 => {
                let batch = Value::Array((0..3).map(|j| json!({"data": [i, j], "type": j})).collect());
                let v = api.post_json("/changes", &batch.to_string()).await.ok_json();
                i += 2;
                v[2]["_id"].as_u64().unwrap_or_else(|| panic!("batch answer {v}"))
            }
            3 => posted_id(
                &api.put_json(&format!("/collections/flags/keys/key-{}", i % 7), &json!({"v": i}).to_string())
                    .await
                    .ok_json(),
            ),
            _ => {
                let key = format!("key-{}", (i + 3) % 7);
                let r = api.delete(&format!("/collections/flags/keys/{key}")).await;
                if r.status == 404 {
                    api.post_change(&json!({"data": {"missed": key}}).to_string()).await
                } else {
                    posted_id(&r.ok_json())
                }
            }
        };
        i += 1;
    }
    assert_eq!(api.last_index().await, last);
    last
}

#[tokio::test]
async fn kill9_keeps_every_acknowledged_change() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let last = write_history(&server.api(), 200).await;
    let before = state(&server.api()).await;
    assert!(
        before.changes.len() as u64 >= 200,
        "{} changes",
        before.changes.len()
    );

    server.kill9();
    server.restart_leader().await;
    let api = server.api();
    let after = state(&api).await;
    assert_same_state(&before, &after);

    // Ids are never reused.
    assert_eq!(
        api.post_change(r#"{"data":"after restart"}"#).await,
        last + 1
    );

    // And a second crash keeps that one too.
    let before = state(&api).await;
    server.kill9();
    server.restart_leader().await;
    assert_same_state(&before, &state(&server.api()).await);
}

#[tokio::test]
async fn sigterm_exits_zero_and_keeps_everything() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let last = write_history(&server.api(), 100).await;
    let before = state(&server.api()).await;

    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0), "SIGTERM exit status {status}");
    server.restart_leader().await;
    let api = server.api();
    assert_same_state(&before, &state(&api).await);
    assert_eq!(
        api.post_change(r#"{"data":"after restart"}"#).await,
        last + 1
    );
}

#[tokio::test]
async fn sigterm_with_an_open_long_poll_exits_promptly() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    api.post_change(r#"{"data":1}"#).await;
    let poll = {
        let api = api.clone();
        tokio::spawn(async move { api.try_get("/changes?since=1&block=300").await })
    };
    // Bounded proof that the poll is pending (it would answer at once if it
    // were not blocking).
    let mut poll = poll;
    if let Ok(done) = tokio::time::timeout(Duration::from_millis(300), &mut poll).await {
        panic!("long-poll returned with nothing to wait for: {done:?}");
    }
    // terminate() fails the test if the server takes longer than its
    // deadline (30 s) — far less than the 300 s block.
    let status = server.terminate().await;
    assert_eq!(status.code(), Some(0), "SIGTERM exit status {status}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("long-poll still pending after the server exited")
        .expect("task");
    if let Ok(r) = outcome {
        assert!(
            r.status < 500 || r.status == 503,
            "long-poll answered {} {}",
            r.status,
            r.text()
        );
    }
}

#[tokio::test]
async fn idempotency_key_survives_restart() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let post = |api: Api| async move {
        api.request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(br#"{"data":"once"}"#.to_vec()),
            &[("Idempotency-Key", "retry-me")],
        )
        .await
    };
    let first = post(api.clone()).await;
    first.expect_status(200);
    server.kill9();
    server.restart_leader().await;
    let api = server.api();
    let retry = post(api.clone()).await;
    retry.expect_status(200);
    assert_eq!(
        retry.body, first.body,
        "retry after restart answered differently"
    );
    assert_eq!(api.last_index().await, 1, "retry after restart appended");
}

/// One acknowledged post of a writer.
#[derive(Debug, Clone, Copy)]
struct Acked {
    id: u64,
    round: u64,
    writer: u64,
    n: u64,
}

/// Runs `writers` concurrent posters (each at most `max_posts` sequential
/// posts, stopping at the first failure) against `api`, kills the server once
/// at least `kill_after` posts were acknowledged, and returns the acks.
async fn write_until_killed(
    server: &mut ServerProcess,
    round: u64,
    writers: u64,
    max_posts: u64,
    kill_after: u64,
) -> Vec<Acked> {
    let api = server.api();
    let acked = Arc::new(AtomicU64::new(0));
    // Why each writer that stopped before the kill stopped; shared with the
    // writer tasks, read by the waiting loop below.
    let stops: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let api = api.clone();
        let acked = Arc::clone(&acked);
        let stops = Arc::clone(&stops);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut stopped_by = None;
            for n in 0..max_posts {
                let body = json!({"data": {"round": round, "w": w, "n": n}}).to_string();
                match api.try_post_json("/changes", &body).await {
                    Ok(r) if r.status == 200 => {
                        let v: Value = serde_json::from_slice(&r.body).expect("200 body is JSON");
                        mine.push(Acked {
                            id: posted_id(&v),
                            round,
                            writer: w,
                            n,
                        });
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => {
                        stopped_by = Some(format!("writer {w}: status {} {}", r.status, r.text()));
                        break;
                    }
                    Err(e) => {
                        stopped_by = Some(format!("writer {w}: transport error {e}"));
                        break;
                    }
                }
            }
            if let Some(why) = &stopped_by {
                stops.lock().expect("stops lock").push(why.clone());
            }
            (mine, stopped_by)
        }));
    }
    let progress = Arc::clone(&acked);
    let stopped = Arc::clone(&stops);
    wait_until(
        Duration::from_secs(120),
        "enough posts are acknowledged",
        || {
            let n = progress.load(Ordering::SeqCst);
            let stops = stopped.lock().expect("stops lock").clone();
            async move {
                // Writers only stop early on a failed post: with the server
                // still up, that is already a failure.
                assert!(
                    stops.is_empty(),
                    "writers stopped before the kill ({n} acked): {stops:#?}"
                );
                if n >= kill_after {
                    Ok(())
                } else {
                    Err(format!("{n} acked"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    server.kill9();

    let mut all = Vec::new();
    let mut still_running = 0;
    for t in tasks {
        let (mine, stopped_by) = tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("writer did not notice the kill within 90 s")
            .expect("writer task");
        if stopped_by.is_none() {
            still_running += 1;
        }
        all.extend(mine);
    }
    assert!(
        still_running < writers,
        "every writer finished all its posts before the kill: the kill did not land mid-write"
    );
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_concurrent_writes_loses_no_acknowledged_change() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let mut acked: Vec<Acked> = Vec::new();
    let mut rounds_acked = BTreeMap::new();
    for round in 0..2u64 {
        let got = write_until_killed(&mut server, round, 16, 2_000, 300).await;
        rounds_acked.insert(round, got.len());
        acked.extend(got);
        server.restart_leader().await;
        let api = server.api();

        let raws = api.all_raw_changes("").await;
        let last = api.last_index().await;
        let ids: Vec<u64> = raws.iter().map(|r| change_id(r)).collect();
        assert_eq!(
            ids,
            (1..=last).collect::<Vec<_>>(),
            "round {round}: ids are not dense 1..={last} after restart"
        );
        let served: BTreeMap<u64, Value> = raws
            .iter()
            .map(|r| {
                let v: Value = serde_json::from_str(r).expect("change JSON");
                (change_id(r), v["data"].clone())
            })
            .collect();

        // Every acknowledged change is present with the data that was sent.
        let mut seen_ids = HashSet::new();
        for a in &acked {
            assert!(seen_ids.insert(a.id), "id {} acknowledged twice", a.id);
            let want = json!({"round": a.round, "w": a.writer, "n": a.n});
            assert_eq!(
                served.get(&a.id),
                Some(&want),
                "round {round}: acknowledged change {a:?} missing or different after restart"
            );
        }
        // Nothing was applied twice, and everything is something a writer sent.
        let mut sent = HashSet::new();
        for (id, data) in &served {
            let key = (
                data["round"].as_u64(),
                data["w"].as_u64(),
                data["n"].as_u64(),
            );
            assert!(
                key.0.is_some() && key.1.is_some() && key.2.is_some(),
                "change {id} has data nobody sent: {data}"
            );
            assert!(
                sent.insert(key),
                "change {id} duplicates an earlier post: {data}"
            );
        }
        // A writer's sequential posts were applied in order.
        let mut by_writer: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
        for data in served.values() {
            let key = (
                data["round"].as_u64().expect("round"),
                data["w"].as_u64().expect("w"),
            );
            by_writer
                .entry(key)
                .or_default()
                .push(data["n"].as_u64().expect("n"));
        }
        for (key, ns) in &by_writer {
            assert!(
                ns.windows(2).all(|p| p[0] < p[1]),
                "writer {key:?} posts out of order: {ns:?}"
            );
        }
    }
    // The ids keep going after two crashes.
    let api = server.api();
    let last = api.last_index().await;
    assert_eq!(
        api.post_change(r#"{"data":"done"}"#).await,
        last + 1,
        "acks per round: {rounds_acked:?}"
    );
}
