//! Many concurrent posters: every acknowledged `_id` is unique, the ids are
//! exactly 1..=N (dense), each poster's posts are ordered, and the feed lists
//! every change in order with the data its poster sent.

use std::collections::{BTreeMap, HashSet};

use changeagent_testkit::{change_id, posted_id, ServerOptions, ServerProcess};
use serde_json::{json, Value};

const POSTERS: u64 = 64;
const POSTS_EACH: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_posters_get_dense_unique_ids() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();

    let mut tasks = Vec::new();
    for p in 0..POSTERS {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(POSTS_EACH as usize);
            for n in 0..POSTS_EACH {
                let body = json!({"data": {"p": p, "n": n}, "tags": [format!("p{p}")]}).to_string();
                let r = api.post_json("/changes", &body).await;
                assert_eq!(r.status, 200, "poster {p} post {n}: {}", r.text());
                ids.push((posted_id(&r.json()), n));
            }
            (p, ids)
        }));
    }
    let mut sent: BTreeMap<u64, Value> = BTreeMap::new();
    let mut unique = HashSet::new();
    for t in tasks {
        let (p, ids) = t.await.expect("poster task");
        for pair in ids.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "poster {p}: later post got a smaller id: {ids:?}"
            );
        }
        for (id, n) in ids {
            assert!(unique.insert(id), "id {id} handed out twice");
            sent.insert(id, json!({"p": p, "n": n}));
        }
    }
    let total = POSTERS * POSTS_EACH;
    assert_eq!(
        sent.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "ids are not exactly 1..={total}"
    );
    assert_eq!(api.last_index().await, total);

    let raws = api.all_raw_changes("").await;
    let served: Vec<(u64, Value)> = raws
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r).expect("change JSON");
            (change_id(r), v["data"].clone())
        })
        .collect();
    assert_eq!(served.len() as u64, total);
    for ((id, data), (want_id, want)) in served.iter().zip(&sent) {
        assert_eq!(id, want_id, "feed out of order");
        assert_eq!(data, want, "change {id} has the wrong data");
    }

    // One poster's tag selects exactly its posts.
    let mine = api.get("/changes?tag=p7&limit=1000").await.ok_json();
    let got: Vec<u64> = mine["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["data"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(got, (0..POSTS_EACH).collect::<Vec<_>>());
}
