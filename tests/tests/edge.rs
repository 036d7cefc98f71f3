//! The edge tier end to end, with real processes: a core node (or a 3-node core),
//! `changeagent-checkpointer` writing checkpoints to a `file://` store and truncating, and
//! `changeagent-edge` tailing the core and serving consumers.
//!
//! - An edge bootstraps from a checkpoint (its list starts where the core's does; it never
//!   replayed from 1) and answers a table of queries with the core's exact bytes, with and
//!   without access to the object store.
//! - 2,000 long-polls waiting on an edge are all woken by one post on the core.
//! - Writes sent to an edge land on the core once, also when retried with the same key.
//! - The core leader dies: the edge moves to another node and misses nothing; with every
//!   core node down it still serves reads and says so in `/health`.
//! - kill -9 of an edge: it resumes from its applied index without a new bootstrap.
//! - An edge paused while the core truncates past it re-bootstraps on resume, answering
//!   reads throughout.
//! - A consumer following an edge across a truncation ends with exactly the state of one
//!   that read the core from the start, seeing no gap, duplicate or reordering.
//!
//! What kill -9 cannot prove: the page cache survives it, so the restart test shows the
//! edge's order of writes, not that they reach the disk.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::{wait_until, Api, ServerOptions, ServerProcess};
use common::*;
use serde_json::Value;

/// Waits until the edge holds exactly the range `upstream` holds.
async fn wait_caught_up(edge: &Api, upstream: &Api) {
    wait_until(DEADLINE, "the edge to catch up", || async {
        let e = edge
            .try_get("/health")
            .await
            .map_err(|e| e.to_string())?
            .json();
        let u = upstream
            .try_get("/health")
            .await
            .map_err(|e| e.to_string())?
            .json();
        let range = |h: &Value| (h["firstIndex"].as_u64(), h["lastIndex"].as_u64());
        if range(&e) == range(&u) && e["lag"] == 0 {
            Ok(())
        } else {
            Err(format!("edge {e} core {u}"))
        }
    })
    .await
    .unwrap();
}

/// Each path answers the same status, body, `X-Cluster-Id` and `Link` on both.
async fn assert_same_answers(edge: &Api, core: &Api, paths: &[String]) {
    for path in paths {
        let (e, c) = (edge.get(path).await, core.get(path).await);
        assert_eq!(e.status, c.status, "{path}: {} vs {}", e.text(), c.text());
        assert_eq!(e.body, c.body, "{path}: {} vs {}", e.text(), c.text());
        for h in ["x-cluster-id", "link", "content-type"] {
            assert_eq!(e.header(h), c.header(h), "{path}: header {h}");
        }
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    hard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_bootstraps_from_a_checkpoint_and_answers_with_the_cores_bytes() {
    let objects = tempfile::tempdir().unwrap();
    let (core, manifest, mut work) = core_with_a_checkpoint(objects.path(), "300").await;
    let core_api = core.api();
    let c = client(&core.url());
    post_changes(&c, &mut work, 200).await;
    let first = health(&core_api).await["firstIndex"].as_u64().unwrap();
    assert!(first > 1, "the core must have truncated");

    let store_url = format!("file://{}", objects.path().display());
    let through_core = ServerProcess::start(edge(&core.url(), &[])).await;
    let with_store = ServerProcess::start(edge(&core.url(), &["--object-store", &store_url])).await;
    for e in [&through_core, &with_store] {
        let api = e.api();
        wait_caught_up(&api, &core_api).await;
        let h = health(&api).await;
        assert_eq!(h["role"], "edge", "{h}");
        assert_eq!(h["firstIndex"].as_u64(), Some(first), "{h}");
        assert_eq!(h["connected"], true, "{h}");
        assert_eq!(
            metric_sum(&api, "changeagent_edge_bootstraps_total").await,
            1
        );
        // It never read the list from 1: the core no longer has it.
        assert!(e.log().contains("bootstrapped; tailing from there"));
    }

    let last = health(&core_api).await["lastIndex"].as_u64().unwrap();
    let index = manifest["index"].as_u64().unwrap();
    let paths: Vec<String> = [
        format!("/changes?since={}&limit=50", first - 1),
        format!("/changes?since={}&limit=7", first + 100),
        format!("/changes?since={last}"),
        format!("/changes?since={}&tag=t1&limit=20", first - 1),
        format!("/changes?since={}&tag=t0&tag=t2&limit=20", first - 1),
        format!("/changes?since={}&type=-2", first - 1),
        format!("/changes?since={}&tenant=acme&limit=30", first - 1),
        format!("/tenants/acme/changes?since={}&limit=30", first - 1),
        "/changes?since=0".to_owned(),
        "/changes?since=1&limit=3".to_owned(),
        format!("/changes/{}", first + 5),
        "/changes/1".to_owned(),
        format!("/changes/{}", last + 10),
        "/tenants".to_owned(),
        "/tenants/acme".to_owned(),
        "/tenants/acme/collections".to_owned(),
        "/collections/flags".to_owned(),
        "/collections/flags/keys?limit=50".to_owned(),
        "/collections/flags/keys?after=k5&limit=5".to_owned(),
        "/collections/flags/keys/k1".to_owned(),
        "/collections/nope/keys".to_owned(),
        "/checkpoints".to_owned(),
        "/checkpoints/latest".to_owned(),
        format!("/checkpoints/{index}/data"),
        "/checkpoints/12345/data".to_owned(),
        "/changes?since=abc".to_owned(),
        "/changes?limit=0&block=x".to_owned(),
        "/no/such/route".to_owned(),
    ]
    .into();
    for e in [&through_core, &with_store] {
        assert_same_answers(&e.api(), &core_api, &paths).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_long_polls_on_an_edge_are_woken_by_one_post_on_the_core() {
    const POLLS: usize = 2_000;
    assert!(
        raise_fd_limit() as usize > 2 * POLLS + 200,
        "too few file descriptors"
    );
    let core = ServerProcess::start_leader(ServerOptions::default()).await;
    let core_api = core.api();
    core_api.post_change(r#"{"data":"before"}"#).await;
    let e = ServerProcess::start(edge(&core.url(), &[])).await;
    let edge_api = e.api();
    wait_caught_up(&edge_api, &core_api).await;
    let since = health(&edge_api).await["lastIndex"].as_u64().unwrap();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("{}/changes?since={since}&block=90", e.url());
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..POLLS {
        let (http, url) = (http.clone(), url.clone());
        polls.spawn(async move {
            let body = http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            Ok::<_, reqwest::Error>(body)
        });
    }
    wait_until(DEADLINE, "every long-poll to wait on the edge", || async {
        let open = metric_sum(&edge_api, "changeagent_long_polls_open").await;
        if open as usize >= POLLS {
            Ok(())
        } else {
            Err(open)
        }
    })
    .await
    .unwrap();
    let from_store = metric_sum(
        &edge_api,
        "changeagent_change_pages_total{source=\"store\"}",
    )
    .await;
    let id = core_api.post_change(r#"{"data":"wake up"}"#).await;
    let mut woken = 0;
    while let Some(answer) = polls.join_next().await {
        let body = answer.unwrap().expect("a long-poll failed");
        let page: Value = serde_json::from_slice(&body).unwrap();
        let changes = page["changes"].as_array().unwrap();
        assert_eq!(changes.len(), 1, "{page}");
        assert_eq!(changes[0]["_id"].as_u64(), Some(id), "{page}");
        assert_eq!(changes[0]["data"], "wake up", "{page}");
        woken += 1;
    }
    assert_eq!(woken, POLLS);
    // Every woken long-poll built its answer from the tail cache, none read RocksDB.
    assert_eq!(
        metric_sum(
            &edge_api,
            "changeagent_change_pages_total{source=\"store\"}"
        )
        .await,
        from_store
    );
    assert!(
        metric_sum(
            &edge_api,
            "changeagent_change_pages_total{source=\"tail_cache\"}"
        )
        .await
            >= 2 * POLLS as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_sent_to_an_edge_land_on_the_core_once() {
    let core = ServerProcess::start_leader(ServerOptions::default()).await;
    let core_api = core.api();
    let e = ServerProcess::start(edge(&core.url(), &[])).await;
    let edge_api = e.api();

    let headers = [("idempotency-key", "once-1")];
    let body = r#"{"data":{"from":"edge"},"tags":["fleet"]}"#;
    let post = || {
        edge_api.request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &headers,
        )
    };
    let first = post().await;
    first.expect_status(200);
    let again = post().await;
    again.expect_status(200);
    assert_eq!(first.body, again.body, "a retry answers the first result");
    let id = first.json()["_id"].as_u64().unwrap();

    // Tenants, collections and keys go through too; errors come back unchanged.
    edge_api
        .post_json("/tenants", r#"{"name":"acme"}"#)
        .await
        .expect_status(200);
    edge_api
        .post_json("/tenants/acme/collections", r#"{"name":"flags"}"#)
        .await
        .expect_status(200);
    edge_api
        .put_json("/collections/flags/keys/dark", r#"{"data":true}"#)
        .await
        .expect_status(200);
    let refused = edge_api.post_json("/tenants", r#"{"name":"acme"}"#).await;
    let direct = core_api.post_json("/tenants", r#"{"name":"acme"}"#).await;
    assert_eq!((refused.status, refused.body), (direct.status, direct.body));
    let not_json = edge_api
        .request(
            "POST",
            "/changes",
            Some("text/plain"),
            Some(b"x".to_vec()),
            &[],
        )
        .await;
    assert_eq!(not_json.status, 415, "{}", not_json.text());

    wait_caught_up(&edge_api, &core_api).await;
    let fleet: Vec<String> = core_api.all_raw_changes("tag=fleet").await;
    assert_eq!(fleet.len(), 1, "{fleet:?}");
    assert!(
        fleet[0].starts_with(&format!("{{\"_id\":{id},")),
        "{fleet:?}"
    );
    assert_same_answers(
        &edge_api,
        &core_api,
        &[
            "/changes?since=0".to_owned(),
            "/collections/flags/keys/dark".to_owned(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_follows_a_new_leader_and_serves_reads_with_every_core_node_down() {
    let mut cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let leader = cluster.wait_leader().await;
    // The leader first, so the edge tails the node that dies.
    let mut order = vec![leader];
    order.extend(cluster.others(&[leader]));
    let urls: Vec<String> = order.iter().map(|&i| cluster.node(i).url()).collect();
    let c = changeagent_client::Client::builder(urls.clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut work = Workload::create(&c, 5, &[("acme", "flags")], 50).await;
    post_changes(&c, &mut work, 500).await;
    let e = ServerProcess::start(edge(&urls.join(","), &[])).await;
    let edge_api = e.api();
    wait_caught_up(&edge_api, &cluster.api(leader)).await;
    assert_eq!(health(&edge_api).await["upstream"], urls[0].as_str());

    cluster.kill9(leader);
    let survivors = cluster.others(&[leader]);
    let new_leader = cluster.wait_new_leader(&survivors, leader).await;
    post_changes(&c, &mut work, 500).await;
    let core_api = cluster.api(new_leader);
    wait_caught_up(&edge_api, &core_api).await;
    let h = health(&edge_api).await;
    assert_ne!(h["upstream"], urls[0].as_str(), "{h}");
    let everything = core_api.all_raw_changes("").await;
    assert_eq!(edge_api.all_raw_changes("").await, everything);

    for i in survivors {
        cluster.kill9(i);
    }
    wait_until(
        DEADLINE,
        "the edge to notice its upstream is gone",
        || async {
            let h = health(&edge_api).await;
            if h["connected"] == false {
                Ok(())
            } else {
                Err(h)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(edge_api.all_raw_changes("").await, everything);
    edge_api
        .get("/collections/flags/keys")
        .await
        .expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_killed_with_sigkill_resumes_without_a_new_bootstrap() {
    let objects = tempfile::tempdir().unwrap();
    let (core, _, mut work) = core_with_a_checkpoint(objects.path(), "300").await;
    let core_api = core.api();
    let c = client(&core.url());
    let mut e = ServerProcess::start(edge(&core.url(), &[])).await;
    let edge_api = e.api();
    wait_caught_up(&edge_api, &core_api).await;
    assert_eq!(
        metric_sum(&edge_api, "changeagent_edge_bootstraps_total").await,
        1
    );

    // Killed while changes keep arriving.
    let poster = {
        let c = c.clone();
        let mut batch = work.batch(300);
        tokio::spawn(async move {
            for chunk in batch.chunks_mut(10) {
                c.post_batch(chunk).await.expect("post");
            }
        })
    };
    e.kill9();
    poster.await.unwrap();
    post_changes(&c, &mut work, 100).await;
    e.restart().await;
    let edge_api = e.api();
    wait_caught_up(&edge_api, &core_api).await;
    assert_eq!(
        metric_sum(&edge_api, "changeagent_edge_bootstraps_total").await,
        0,
        "a restart resumes from the applied index"
    );
    assert_eq!(
        edge_api.retained_raw_changes("").await,
        core_api.retained_raw_changes("").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_edge_left_behind_a_truncation_bootstraps_again_and_keeps_answering() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, _, mut work) = core_with_a_checkpoint(objects.path(), "100").await;
    let core_api = core.api();
    let c = client(&core.url());
    let e = ServerProcess::start(edge(&core.url(), &[])).await;
    let edge_api = e.api();
    wait_caught_up(&edge_api, &core_api).await;
    let behind = health(&edge_api).await["lastIndex"].as_u64().unwrap();

    e.pause();
    post_changes(&c, &mut work, 1_000).await;
    let mut once = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--retain", "100"],
    ))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    let first = health(&core_api).await["firstIndex"].as_u64().unwrap();
    assert!(
        first > behind + 1,
        "the core truncated past the edge: {first} vs {behind}"
    );

    // Readers keep asking while the edge catches up; every answer must be a good one.
    e.resume();
    let answered = Arc::new(AtomicU64::new(0));
    let reader = {
        let (api, answered) = (e.api(), answered.clone());
        tokio::spawn(async move {
            loop {
                let h = api.get("/health").await;
                h.expect_status(200);
                let last = h.json()["lastIndex"].as_u64().unwrap();
                // A 410 is a right answer too: the swap may land between the two reads.
                let page = api.get(&format!("/changes?since={last}")).await;
                assert!(
                    page.status == 200 || page.status == 410,
                    "{} {}",
                    page.status,
                    page.text()
                );
                api.get("/collections/flags/keys?limit=5")
                    .await
                    .expect_status(200);
                answered.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until(DEADLINE, "a second bootstrap", || async {
        let n = metric_sum(&edge_api, "changeagent_edge_bootstraps_total").await;
        if n == 2 {
            Ok(())
        } else {
            Err(n)
        }
    })
    .await
    .unwrap();
    wait_caught_up(&edge_api, &core_api).await;
    assert!(!reader.is_finished(), "a read failed during the swap");
    reader.abort();
    assert!(answered.load(Ordering::Relaxed) > 0);
    assert!(e.log().contains("the upstream truncated past this edge"));
    assert_eq!(
        edge_api.retained_raw_changes("").await,
        core_api.retained_raw_changes("").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_following_an_edge_across_a_truncation_ends_with_the_cores_state() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, c) = start_core(&store_url, &[]).await;
    let core_api = core.api();
    let reads_everything = Consumer::start(&core.url(), 0);
    let collections = [("acme", "flags"), ("beta", "users")];
    let mut work = Workload::create(&c, 11, &collections, 200).await;
    post_changes(&c, &mut work, 3_000).await;
    let e = ServerProcess::start(edge(&core.url(), &[])).await;
    let edge_api = e.api();
    let mut ckpt = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--every-changes", "1000", "--retain", "200", "--keep", "2"],
    ))
    .await;
    let manifest = wait_checkpoint_past(&core_api, 2_500).await;
    wait_until(DEADLINE, "the truncation", || async {
        let f = health(&core_api).await["firstIndex"].as_u64().unwrap();
        if f > 1 {
            Ok(())
        } else {
            Err(f)
        }
    })
    .await
    .unwrap();
    // Starts behind the truncation: its first answer from the edge is a 410.
    let through_edge = Consumer::start(&e.url(), 0);
    post_changes(&c, &mut work, 2_000).await;
    ckpt.terminate().await;
    let last = health(&core_api).await["lastIndex"].as_u64().unwrap();
    reads_everything.wait_at(last).await;
    through_edge.wait_at(last).await;
    assert!(
        through_edge.resets() >= 1,
        "the consumer never loaded a checkpoint"
    );
    assert_eq!(through_edge.state(), reads_everything.state());
    // The edge followed the truncations it saw while tailing: same range, same bytes.
    wait_caught_up(&edge_api, &core_api).await;
    assert_eq!(
        edge_api.retained_raw_changes("").await,
        core_api.retained_raw_changes("").await
    );
    assert_eq!(
        metric_sum(&edge_api, "changeagent_edge_bootstraps_total").await,
        0
    );
    assert!(
        metric_sum(
            &edge_api,
            "changeagent_http_requests_total{route=\"/checkpoints/{index}/data\""
        )
        .await
            >= 1,
        "the consumer loaded checkpoint {manifest} from the edge"
    );
}

/// A stand-in upstream that records the writes it receives: the edge's tailing sees an empty
/// list, so this checks only what the edge forwards.
async fn recording_upstream() -> (String, Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>) {
    use axum::routing::{get, post};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let router = axum::Router::new()
        .route(
            "/health",
            get(|| async {
                axum::Json(serde_json::json!({
                    "role": "leader", "clusterId": "c-test", "firstIndex": 1, "lastIndex": 0
                }))
            }),
        )
        .route(
            "/checkpoints",
            get(|| async { axum::Json(serde_json::json!([])) }),
        )
        .route(
            "/changes",
            get(|| async {
                axum::Json(serde_json::json!({
                    "changes": [], "atStart": true, "atEnd": true, "firstIndex": 1, "lastIndex": 0
                }))
            })
            .post(move |headers: axum::http::HeaderMap, body: String| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(headers);
                    (
                        axum::http::StatusCode::CREATED,
                        format!("{{\"echo\":{body}}}"),
                    )
                }
            }),
        )
        .route(
            "/tenants",
            post(|| async { axum::http::StatusCode::FORBIDDEN }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_write_carries_the_clients_own_headers_and_gets_the_upstreams_answer() {
    let (upstream, seen) = recording_upstream().await;
    let e = ServerProcess::start(edge(&upstream, &[])).await;
    let reply = e
        .api()
        .request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(br#"{"data":1}"#.to_vec()),
            &[
                ("authorization", "Bearer fleet-token"),
                ("idempotency-key", "k-1"),
            ],
        )
        .await;
    assert_eq!(
        reply.status, 201,
        "the upstream's status comes back unchanged"
    );
    assert_eq!(reply.text(), r#"{"echo":{"data":1}}"#);
    let headers = seen
        .lock()
        .unwrap()
        .pop()
        .expect("the upstream got the write");
    assert_eq!(headers["authorization"], "Bearer fleet-token");
    assert_eq!(headers["idempotency-key"], "k-1");
    assert_eq!(headers["content-type"], "application/json");
    let refused = e.api().post_json("/tenants", r#"{"name":"x"}"#).await;
    assert_eq!(refused.status, 403);
}
