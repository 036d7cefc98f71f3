//! Long-poll (`GET /changes?block=S`): a blocked request returns as soon as a
//! matching change is applied, keeps waiting through non-matching ones, and
//! times out with an empty, at-end answer. Pending-ness is proven with
//! bounded waits, never by sleeping.

use std::time::{Duration, Instant};

use changeagent_testkit::{change_ids, wait_until, Api, Reply, ServerOptions, ServerProcess};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long a long-poll must stay pending to count as "still waiting".
const STILL_PENDING: Duration = Duration::from_millis(300);

/// Generous bound for "returned promptly after the post" — far below the
/// 30 s block time, so passing it means the post woke the poll.
const PROMPT: Duration = Duration::from_secs(10);

fn spawn_get(api: &Api, path: String) -> JoinHandle<Reply> {
    let api = api.clone();
    tokio::spawn(async move { api.get(&path).await })
}

/// Asserts that `poll` has not completed within [`STILL_PENDING`].
async fn assert_pending(poll: &mut JoinHandle<Reply>, why: &str) {
    if let Ok(done) = tokio::time::timeout(STILL_PENDING, &mut *poll).await {
        let r = done.expect("long-poll task");
        panic!("long-poll returned {why}: {} {}", r.status, r.text());
    }
}

/// Waits (bounded) for `poll` to complete and returns its reply and how long
/// it took from `since`.
async fn finish(poll: JoinHandle<Reply>, since: Instant) -> (Reply, Duration) {
    let r = tokio::time::timeout(PROMPT, poll)
        .await
        .unwrap_or_else(|_| panic!("long-poll still pending {PROMPT:?} after a matching post"))
        .expect("long-poll task");
    (r, since.elapsed())
}

#[tokio::test]
async fn blocked_get_returns_when_a_change_is_posted() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let first = api.post_change(r#"{"data":"old"}"#).await;

    let mut poll = spawn_get(&api, format!("/changes?since={first}&block=30"));
    assert_pending(&mut poll, "before anything was posted").await;

    let posted_at = Instant::now();
    let id = api.post_change(r#"{"data":"new"}"#).await;
    let (r, took) = finish(poll, posted_at).await;
    assert!(took < PROMPT, "took {took:?}");
    let v = r.ok_json();
    assert_eq!(change_ids(&r.body), vec![id]);
    assert_eq!(v["changes"][0]["data"], "new");
    assert_eq!(v["atEnd"], true);
    assert_eq!(v["lastIndex"], id);
}

#[tokio::test]
async fn blocked_get_with_tag_ignores_other_tags() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let start = api.last_index().await;

    let mut poll = spawn_get(&api, format!("/changes?since={start}&block=30&tag=x"));
    assert_pending(&mut poll, "before anything was posted").await;

    api.post_change(r#"{"data":1,"tags":["y"]}"#).await;
    api.post_change(r#"{"data":2}"#).await;
    let r = api
        .post_json(
            "/changes",
            r#"[{"data":3,"tags":["z"]},{"data":4,"tags":["yx"]}]"#,
        )
        .await;
    r.expect_status(200);
    let applied = start + 4;
    wait_until(
        Duration::from_secs(10),
        "the other-tag changes are applied",
        || {
            let api = api.clone();
            async move {
                let n = api.last_index().await;
                if n >= applied {
                    Ok(())
                } else {
                    Err(format!("lastIndex {n}"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_pending(&mut poll, "for changes without tag x").await;

    let posted_at = Instant::now();
    let id = api
        .post_change(r#"{"data":"match","tags":["w","x"]}"#)
        .await;
    let (r, took) = finish(poll, posted_at).await;
    assert!(took < PROMPT, "took {took:?}");
    let v = r.ok_json();
    assert_eq!(change_ids(&r.body), vec![id], "{}", r.text());
    assert_eq!(v["changes"][0]["data"], "match");
    assert_eq!(v["atEnd"], true);
}

#[tokio::test]
async fn blocked_get_with_tenant_and_type_filters() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    for name in ["acme", "beta"] {
        api.post_json("/tenants", &json!({ "name": name }).to_string())
            .await
            .expect_status(200);
    }
    let start = api.last_index().await;

    let mut by_tenant = spawn_get(&api, format!("/changes?since={start}&block=30&tenant=acme"));
    let mut by_type = spawn_get(&api, format!("/changes?since={start}&block=30&type=7"));
    assert_pending(&mut by_tenant, "before anything was posted").await;
    assert_pending(&mut by_type, "before anything was posted").await;

    api.post_change(r#"{"data":1,"tenant":"beta","type":6}"#)
        .await;
    let typed = api.post_change(r#"{"data":2,"type":7}"#).await;
    let (r, _) = finish(by_type, Instant::now()).await;
    assert_eq!(change_ids(&r.body), vec![typed], "{}", r.text());
    assert_pending(&mut by_tenant, "for changes of other tenants").await;

    let id = api.post_change(r#"{"data":3,"tenant":"acme"}"#).await;
    let (r, _) = finish(by_tenant, Instant::now()).await;
    assert_eq!(change_ids(&r.body), vec![id], "{}", r.text());
}

#[tokio::test]
async fn block_times_out_with_empty_answer() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let id = api.post_change(r#"{"data":1}"#).await;

    let t0 = Instant::now();
    let r = api.get(&format!("/changes?since={id}&block=1")).await;
    let took = t0.elapsed();
    let v = r.ok_json();
    assert_eq!(v["changes"], json!([]));
    assert_eq!(v["atEnd"], true);
    assert_eq!(v["lastIndex"], id);
    assert!(
        took >= Duration::from_millis(900),
        "block=1 answered after only {took:?}"
    );
    assert!(took < PROMPT, "block=1 answered after {took:?}");

    // block=0 answers at once.
    let t0 = Instant::now();
    let v = api
        .get(&format!("/changes?since={id}&block=0"))
        .await
        .ok_json();
    assert_eq!(v["changes"], json!([]));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn block_with_changes_available_answers_at_once() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    api.post_change(r#"{"data":1,"tags":["x"]}"#).await;
    let t0 = Instant::now();
    let r = api.get("/changes?since=0&block=30&tag=x").await;
    assert!(t0.elapsed() < PROMPT, "took {:?}", t0.elapsed());
    assert_eq!(change_ids(&r.body), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_post_wakes_many_waiters() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let mut polls: Vec<JoinHandle<Reply>> = (0..50)
        .map(|_| spawn_get(&api, "/changes?since=0&block=30".to_string()))
        .collect();
    // Bounded wait on one, then every poll must still be pending.
    assert_pending(polls.last_mut().expect("polls"), "with nothing posted").await;
    for (i, p) in polls.iter().enumerate() {
        assert!(
            !p.is_finished(),
            "long-poll {i} returned with nothing posted"
        );
    }

    let posted_at = Instant::now();
    let id = api.post_change(r#"{"data":"wake"}"#).await;
    for p in polls {
        let (r, took) = finish(p, posted_at).await;
        assert!(took < PROMPT);
        assert_eq!(change_ids(&r.body), vec![id]);
    }
}

#[tokio::test]
async fn open_long_polls_are_counted_in_metrics() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let mut poll = spawn_get(&api, "/changes?since=0&block=30".to_string());
    let metric = "changeagent_long_polls_open";
    wait_until(
        Duration::from_secs(10),
        "metrics show one open long-poll",
        || {
            let api = api.clone();
            async move {
                let text = api.get("/metrics").await.text();
                let value = text
                    .lines()
                    .find(|l| l.starts_with(metric) && !l.starts_with('#'))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|v| v.parse::<f64>().ok());
                match value {
                    Some(v) if v >= 1.0 => Ok(()),
                    other => Err(format!("{metric} = {other:?}")),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_pending(&mut poll, "with nothing posted").await;
    api.post_change(r#"{"data":1}"#).await;
    let (r, _) = finish(poll, Instant::now()).await;
    let v: Value = r.ok_json();
    assert_eq!(v["changes"].as_array().map(Vec::len), Some(1));
}
