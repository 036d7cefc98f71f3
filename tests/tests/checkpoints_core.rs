//! The core's side of checkpoints, driven over HTTP like a checkpointer would: start and end
//! records with their conflicts, the kept manifests and their bytes under `/checkpoints`,
//! truncation and the 410 that names the checkpoint, on one node and replicated on a
//! three-node cluster (restart, and a node joining by snapshot after the truncation).

use std::path::Path;

use changeagent_testkit::cluster::{Cluster, ClusterOptions, CLUSTER_DEADLINE};
use changeagent_testkit::{wait_until, Api, Reply, ServerOptions, ServerProcess};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Asserts a status and a JSON error body.
#[track_caller]
fn assert_error(r: &Reply, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v = r.json();
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: {v}"
    );
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a stand-in checkpoint object into a `file://` object store and returns its
/// manifest (the core only stores manifests and streams bytes; it never parses them).
fn put_object(objects: &Path, cluster_id: &str, index: u64, bytes: &[u8]) -> Value {
    let object = format!("{cluster_id}/checkpoints/all/{index:020}.jsonl.zst");
    let path = objects.join(&object);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    json!({
        "index": index,
        "scope": "all",
        "object": object,
        "size": bytes.len(),
        "sha256": hex(&Sha256::digest(bytes)),
        "records": 3,
        "createdTs": 1,
        "clusterId": cluster_id,
    })
}

async fn cluster_id(api: &Api) -> String {
    api.get("/health").await.ok_json()["clusterId"]
        .as_str()
        .expect("a cluster id")
        .to_owned()
}

async fn post_admin(api: &Api, path: &str, body: Value) -> Reply {
    api.post_json(path, &body.to_string()).await
}

/// Posts `n` changes one by one (each its own Raft entry); returns the last `_id`.
async fn post_many(api: &Api, n: usize) -> u64 {
    let mut last = 0;
    for k in 0..n {
        last = api
            .post_change(&json!({"data": k, "tags": ["t"]}).to_string())
            .await;
    }
    last
}

#[tokio::test]
async fn admin_routes_record_checkpoints_and_truncate() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let mut server = ServerProcess::start_leader(
        ServerOptions::default()
            .arg("--object-store")
            .arg(&store_url),
    )
    .await;
    let api = server.api();
    api.post_json("/tenants", r#"{"name":"acme"}"#)
        .await
        .ok_json();
    api.post_json("/tenants/acme/collections", r#"{"name":"flags"}"#)
        .await
        .ok_json();
    api.put_json("/collections/flags/keys/k", r#"{"v":1}"#)
        .await
        .ok_json();
    let last = post_many(&api, 17).await;
    assert_eq!(last, 20);
    let cid = cluster_id(&api).await;

    assert_eq!(api.get("/checkpoints").await.ok_json(), json!([]));
    assert_error(
        &api.get("/checkpoints/latest").await,
        404,
        "no checkpoint yet",
    );
    let r = post_admin(&api, "/admin/truncate", json!({"before": 5})).await;
    assert_error(&r, 409, "truncate without a checkpoint");

    // A start, a conflicting start, an end by the wrong checkpointer, the right end.
    let start = post_admin(
        &api,
        "/admin/checkpoints/start",
        json!({"index": 20, "by": "a"}),
    )
    .await;
    assert_eq!(start.ok_json()["_id"], 21);
    let other = post_admin(
        &api,
        "/admin/checkpoints/start",
        json!({"index": 20, "by": "b"}),
    )
    .await;
    let body = assert_error(
        &other,
        409,
        "a second checkpointer while a's start is fresh",
    );
    assert!(body["error"].as_str().unwrap().contains("\"a\""), "{body}");
    let bytes = b"not really zstd, the core streams it as stored".repeat(100);
    let manifest = put_object(objects.path(), &cid, 20, &bytes);
    let end = |by: &str, keep: u32| json!({"manifest": manifest, "by": by, "keep": keep});
    assert_error(
        &post_admin(&api, "/admin/checkpoints/end", end("b", 3)).await,
        409,
        "an end without its start",
    );
    assert_error(
        &post_admin(&api, "/admin/checkpoints/end", end("a", 0)).await,
        400,
        "keep 0",
    );
    post_admin(&api, "/admin/checkpoints/end", end("a", 3))
        .await
        .ok_json();
    assert_eq!(api.get("/checkpoints").await.ok_json(), json!([manifest]));
    assert_eq!(
        api.get("/checkpoints?scope=all").await.ok_json(),
        json!([manifest])
    );
    assert_eq!(api.get("/checkpoints/latest").await.ok_json(), manifest);
    let data = api.get("/checkpoints/20/data").await;
    assert_eq!(data.status, 200, "{}", data.text());
    assert_eq!(data.body, bytes);
    assert_eq!(
        data.header("content-type").as_deref(),
        Some("application/zstd")
    );
    assert_error(
        &api.get("/checkpoints/19/data").await,
        404,
        "no such checkpoint",
    );
    assert_error(
        &api.get("/checkpoints?scope=everything").await,
        400,
        "bad scope",
    );

    // Truncation: not past the checkpoint; then before 11.
    assert_error(
        &post_admin(&api, "/admin/truncate", json!({"before": 22})).await,
        409,
        "truncating past the checkpoint",
    );
    let t = post_admin(&api, "/admin/truncate", json!({"before": 11}))
        .await
        .ok_json();
    assert_eq!(t["firstIndex"], 11);
    let check_truncated = |api: Api| {
        let manifest = manifest.clone();
        async move {
            let gone = api.get("/changes?since=0").await;
            let body = assert_error(&gone, 410, "reading truncated changes");
            assert_eq!(body["error"], "truncated");
            assert_eq!(body["firstIndex"], 11);
            assert_eq!(body["checkpoint"], manifest);
            let tenant = api.get("/tenants/acme/changes?since=0").await;
            assert_eq!(
                assert_error(&tenant, 410, "a tenant's truncated list")["checkpoint"],
                manifest
            );
            assert_error(&api.get("/changes/3").await, 410, "a truncated change");
            let page = api.get("/changes?since=10&limit=1").await.ok_json();
            assert_eq!(page["firstIndex"], 11);
            assert_eq!(page["changes"][0]["_id"], 11);
            // Keys and the catalog stay.
            assert_eq!(
                api.get("/collections/flags/keys/k").await.ok_json()["data"],
                json!({"v": 1})
            );
            assert_eq!(api.get("/tenants").await.ok_json()[0]["name"], "acme");
            assert_eq!(api.get("/checkpoints").await.ok_json(), json!([manifest]));
        }
    };
    check_truncated(api.clone()).await;
    // The start, end and truncate records are in the feed.
    let types: Vec<i64> = api.get("/changes?since=20").await.ok_json()["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_i64().unwrap())
        .collect();
    assert_eq!(types, vec![-1, -2, -3]);

    // Bad input changes nothing.
    let last_index =
        |api: Api| async move { api.get("/health").await.ok_json()["lastIndex"].clone() };
    let last = last_index(api.clone()).await;
    for (path, body, status) in [
        (
            "/admin/checkpoints/start",
            json!({"index": "x", "by": "a"}),
            400,
        ),
        (
            "/admin/checkpoints/start",
            json!({"index": 1, "by": "a", "scope": "tenant=nobody"}),
            404,
        ),
        (
            "/admin/checkpoints/start",
            json!({"index": 1, "by": "a", "extra": 1}),
            400,
        ),
        (
            "/admin/checkpoints/start",
            json!({"index": 10_000, "by": "a"}),
            400,
        ),
        ("/admin/truncate", json!([]), 400),
    ] {
        assert_error(
            &post_admin(&api, path, body.clone()).await,
            status,
            &body.to_string(),
        );
    }
    assert_eq!(last_index(api.clone()).await, last);

    // A restart after kill -9 keeps it all.
    server.kill9();
    server.restart_leader().await;
    check_truncated(server.api()).await;
}

#[tokio::test]
async fn admin_routes_need_the_cluster_secret_when_one_is_set() {
    let server = ServerProcess::start_leader(
        ServerOptions::default()
            .arg("--cluster-secret")
            .arg("s3cret"),
    )
    .await;
    let api = server.api();
    post_many(&api, 2).await;
    let body = json!({"index": 2, "by": "a"}).to_string();
    for path in ["/admin/checkpoints/start", "/admin/truncate"] {
        let r = api.post_json(path, &body).await;
        assert_error(&r, 401, "no secret");
    }
    let ok = api
        .request(
            "POST",
            "/admin/checkpoints/start",
            Some("application/json"),
            Some(body.into_bytes()),
            &[("x-cluster-secret", "s3cret")],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// `firstIndex`, the kept checkpoints and the retained list of node `i`.
async fn view(api: &Api) -> Result<(u64, Value, Value), String> {
    let health = api
        .try_get("/health")
        .await
        .map_err(|e| e.to_string())?
        .json();
    let first = health["firstIndex"].as_u64().ok_or("no firstIndex")?;
    let checkpoints = api
        .try_get("/checkpoints")
        .await
        .map_err(|e| e.to_string())?
        .json();
    let list = api
        .try_get(&format!("/changes?since={}&limit=10000", first - 1))
        .await
        .map_err(|e| e.to_string())?
        .json()["changes"]
        .clone();
    Ok((first, checkpoints, list))
}

/// Waits until `nodes` all show first index `first`, exactly `[manifest]` as their kept
/// checkpoints, and the same retained list.
async fn same_everywhere(cluster: &Cluster, nodes: &[usize], first: u64, manifest: &Value) {
    let apis: Vec<Api> = nodes.iter().map(|&i| cluster.api(i)).collect();
    let want = json!([manifest]);
    wait_until(
        CLUSTER_DEADLINE,
        "every node's first index, checkpoints and list",
        || {
            let (apis, want) = (apis.clone(), want.clone());
            async move {
                let mut views = Vec::new();
                for a in &apis {
                    views.push(view(a).await?);
                }
                let head = &views[0];
                if head.0 != first || head.1 != want {
                    return Err(format!("{:?}", (head.0, &head.1)));
                }
                if views.iter().all(|v| v == head) {
                    Ok(())
                } else {
                    let summary: Vec<_> = views
                        .iter()
                        .map(|v| (v.0, v.2.as_array().map(Vec::len)))
                        .collect();
                    Err(format!("views differ: {summary:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncation_is_replicated_and_survives_restarts_and_snapshots() {
    let objects = tempfile::tempdir().unwrap();
    let opts = ClusterOptions::new(3)
        .arg("--object-store")
        .arg(format!("file://{}", objects.path().display()))
        .arg("--snapshot-logs")
        .arg("20")
        .arg("--snapshot-keep-logs")
        .arg("0");
    let mut cluster = Cluster::start_with_peers(opts).await;
    let leader = cluster.wait_leader().await;
    let api = cluster.api(leader);
    let last = post_many(&api, 60).await;
    let cid = cluster_id(&api).await;
    let manifest = put_object(objects.path(), &cid, last, b"checkpoint bytes");
    post_admin(
        &api,
        "/admin/checkpoints/start",
        json!({"index": last, "by": "a"}),
    )
    .await
    .ok_json();
    // Through a follower: admin calls are forwarded to the leader.
    let follower = cluster.others(&[leader])[0];
    post_admin(
        &cluster.api(follower),
        "/admin/checkpoints/end",
        json!({"manifest": manifest, "by": "a", "keep": 2}),
    )
    .await
    .ok_json();
    post_admin(&api, "/admin/truncate", json!({"before": 30}))
        .await
        .ok_json();
    post_many(&api, 30).await;

    same_everywhere(&cluster, &[0, 1, 2], 30, &manifest).await;

    // A node killed and restarted comes back with the same truncation.
    cluster.kill9(follower);
    cluster.restart(follower).await;
    same_everywhere(&cluster, &[0, 1, 2], 30, &manifest).await;

    // A node joining now gets a snapshot (the log behind it is purged).
    let joined = cluster.add_node(leader).await;
    same_everywhere(&cluster, &[0, 1, 2, joined], 30, &manifest).await;
    let log = cluster.node(joined).server.log();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "{log}"
    );
    let gone = cluster.api(joined).get("/changes?since=0").await;
    assert_eq!(
        assert_error(&gone, 410, "below the first index on the new node")["firstIndex"],
        30
    );
    let data = cluster
        .api(joined)
        .get(&format!("/checkpoints/{last}/data"))
        .await;
    assert_eq!(data.body, b"checkpoint bytes");
}
