//! The checkpointer tier end to end, with real processes and a real object store: a core
//! node, `changeagent-checkpointer` writing to a `file://` store (and to Garage, a real S3
//! server), consumers following with the client library.
//!
//! - 50,000 changes (keyed writes and deletes, tenants, collections), checkpoints, truncation,
//!   410: a consumer that loads the checkpoint and reads the tail ends with exactly the state
//!   of one that read every change.
//! - Two checkpointers racing; the checkpointer killed at every step of a round: never a
//!   manifest naming a missing or bad object, and the next round completes.
//! - A corrupted object is refused by its sha256, by the checkpointer and by a consumer.
//! - The same against Garage, a real S3 server the project's scripts install.
//! - `--restore-from` starts a new cluster from the newest checkpoint; nodes join it.
//!
//! What kill -9 cannot prove: the page cache survives it, so these tests show the order of
//! the steps (nothing names an object before it was written and read back), not that the
//! object store's writes reach the disk.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use changeagent_client::{Client, NewChange, Query};
use changeagent_testkit::garage::GarageServer;
use changeagent_testkit::state::ConsumerState;
use changeagent_testkit::{wait_until, Api, ServerOptions, ServerProcess};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every kept manifest names an object that exists, with its size and sha256; and
/// `latest.json` (when there is one) names a kept, whole object too.
async fn assert_manifests_sound(api: &Api, objects: &Path) {
    let list = api.get("/checkpoints").await.ok_json();
    for m in list.as_array().unwrap() {
        let path = objects.join(m["object"].as_str().unwrap());
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("manifest {m} names {}: {e}", path.display()));
        assert_eq!(bytes.len() as u64, m["size"].as_u64().unwrap(), "{m}");
        assert_eq!(hex(&Sha256::digest(&bytes)), m["sha256"], "{m}");
    }
    for latest in find_files(objects, "latest.json") {
        let m: Value = serde_json::from_slice(&std::fs::read(&latest).unwrap()).unwrap();
        let bytes = std::fs::read(objects.join(m["object"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("latest.json names a missing object {m}: {e}"));
        assert_eq!(hex(&Sha256::digest(&bytes)), m["sha256"], "latest.json {m}");
    }
}

fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

fn checkpoint_objects(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".jsonl.zst") {
                all.push(p);
            }
        }
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_from_a_checkpoint_ends_with_the_state_of_one_that_read_everything() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, c) = start_core(&store_url, &[]).await;
    let api = core.api();
    let reads_everything = Consumer::start(&core.url(), 0);
    let collections = [("acme", "flags"), ("acme", "users"), ("beta", "flags")];
    let mut work = Workload::create(&c, 7, &collections, 700).await;
    post_changes(&c, &mut work, 30_000).await;
    reads_everything
        .wait_at(health(&api).await["lastIndex"].as_u64().unwrap())
        .await;

    let mut ckpt = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &[
            "--every-changes",
            "20000",
            "--retain",
            "25000",
            "--keep",
            "2",
        ],
    ))
    .await;
    // The checkpointer tails from the start: its first checkpoint is at 20,000 or later.
    let first = wait_checkpoint_past(&api, 0).await;
    let first_index = first["index"].as_u64().unwrap();
    assert!(first_index >= 20_000, "{first}");

    // More of everything after the first checkpoint: a new tenant and collection, keyed
    // writes and deletes over the same keys.
    let gamma = Workload::create(&c, 0, &[("gamma", "flags")], 0).await;
    work.collections.extend(gamma.collections);
    post_changes(&c, &mut work, 20_000).await;
    let second = wait_checkpoint_past(&api, first_index).await;
    let second_index = second["index"].as_u64().unwrap();
    // The truncation after the second checkpoint: before = index + 1 - retain.
    let health_now = wait_until(
        DEADLINE,
        "the truncation after the second checkpoint",
        || async {
            let h = health(&api).await;
            if h["firstIndex"].as_u64() == Some(second_index + 1 - 25_000) {
                Ok(h)
            } else {
                Err(h)
            }
        },
    )
    .await
    .unwrap();
    let last = health_now["lastIndex"].as_u64().unwrap();

    let from_checkpoint = Consumer::start(&core.url(), 0);
    from_checkpoint.wait_at(last).await;
    reads_everything.wait_at(last).await;
    let (everything, loaded) = (reads_everything.state(), from_checkpoint.state());
    assert_eq!(
        from_checkpoint.resets(),
        1,
        "the consumer from 0 got no 410"
    );
    assert_eq!(reads_everything.resets(), 0);
    assert_eq!(everything.tenants.len(), 3);
    assert_eq!(everything.collections.len(), 4);
    assert!(everything.keys.len() > 1000, "{}", everything.summary());
    assert!(
        everything.unkeyed.len() > 20_000,
        "{}",
        everything.summary()
    );
    if everything != loaded {
        let missing: Vec<_> = everything
            .keys
            .keys()
            .filter(|k| !loaded.keys.contains_key(k))
            .take(5)
            .collect();
        panic!(
            "states differ: read everything: {}; loaded the checkpoint: {}; keys missing: {missing:?}",
            everything.summary(),
            loaded.summary()
        );
    }

    // The object store holds the two kept checkpoints and nothing older; every manifest and
    // latest.json names a whole object.
    assert_manifests_sound(&api, objects.path()).await;
    let kept = api.get("/checkpoints").await.ok_json();
    assert_eq!(kept.as_array().unwrap().len(), 2, "{kept}");
    assert_eq!(checkpoint_objects(objects.path()).len(), 2);
    let ckpt_health = ckpt.api().get("/health").await.ok_json();
    assert_eq!(ckpt_health["lastCheckpoint"]["index"], second_index);
    assert_eq!(ckpt_health["role"], "checkpointer");
    assert!(ckpt.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_checkpointers_and_kills_at_every_step_never_leave_a_bad_manifest() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, c) = start_core(&store_url, &[]).await;
    let api = core.api();
    let mut work = Workload::create(&c, 11, &[("acme", "flags")], 200).await;
    post_changes(&c, &mut work, 3_000).await;
    // Parts of 64 KiB, so "uploading" stops between parts of a real multipart upload.
    let small_parts = [
        "--part-bytes",
        "65536",
        "--every-changes",
        "1",
        "--every-seconds",
        "1",
    ];

    // Two checkpointers race: the first stops itself holding its start open, so the second
    // is refused (409) and skips; once the first goes on, it completes.
    let a_opts = checkpointer(&core.url(), &store_url, &small_parts)
        .arg("--stop-at")
        .arg("verified");
    let mut a = ServerProcess::start(a_opts).await;
    a.wait_stopped(DEADLINE).await;
    let mut b = ServerProcess::start(checkpointer(&core.url(), &store_url, &small_parts)).await;
    wait_until(
        DEADLINE,
        "the second checkpointer to be refused",
        || async {
            let m = b.api().get("/metrics").await.text();
            if m.contains("changeagent_checkpointer_skipped_total 0") {
                Err(b.log_tail(3))
            } else {
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(api.get("/checkpoints").await.ok_json(), json!([]));
    a.resume();
    let first = wait_checkpoint_past(&api, 0).await;
    assert_manifests_sound(&api, objects.path()).await;
    // b takes the next round once there is something new.
    post_changes(&c, &mut work, 500).await;
    wait_checkpoint_past(&api, first["index"].as_u64().unwrap()).await;
    // SIGTERM lets a round in progress finish: exit 0, and no open start left behind.
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
    assert_manifests_sound(&api, objects.path()).await;

    // One checkpointer killed with -9 at every step of a round in turn; each restart on the
    // same data dir takes its own open start back and completes a round.
    let mut done = api.get("/checkpoints").await.ok_json()[0]["index"]
        .as_u64()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    for step in ["started", "uploading", "written", "verified", "ended"] {
        post_changes(&c, &mut work, 2_000).await;
        let opts = checkpointer(&core.url(), &store_url, &small_parts)
            .dir(data.path())
            .arg("--stop-at")
            .arg(step);
        let mut k = ServerProcess::start(opts).await;
        k.wait_stopped(DEADLINE).await;
        k.kill9();
        assert_manifests_sound(&api, objects.path()).await;
        let kept = api.get("/checkpoints").await.ok_json();
        let newest = kept[0]["index"].as_u64().unwrap();
        if step == "ended" {
            // The end record was in before the kill; only latest.json was not written.
            assert!(newest > done, "{step}: {kept}");
        } else {
            assert_eq!(
                newest,
                done,
                "{step}: a manifest appeared before its end record: {kept}\n{}",
                k.log_tail(30)
            );
        }
        // The same checkpointer, restarted: it takes its own open start back and completes.
        let restarted = checkpointer(&core.url(), &store_url, &small_parts).dir(data.path());
        drop(k);
        let mut again = ServerProcess::start(restarted).await;
        post_changes(&c, &mut work, 10).await;
        wait_checkpoint_past(&api, newest).await;
        // A round still in progress at SIGTERM finishes before the exit.
        assert!(again.terminate().await.success());
        assert_manifests_sound(&api, objects.path()).await;
        done = api.get("/checkpoints").await.ok_json()[0]["index"]
            .as_u64()
            .unwrap();
    }
}

/// A core with a `file://` store, a few thousand changes, and one checkpoint written by a
/// checkpointer run with `--once` and `retain` so the core truncates.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_checkpoint_is_refused_by_its_sha256() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, manifest, mut work) = core_with_a_checkpoint(objects.path(), "100").await;
    let api = core.api();

    // A consumer: the 410 names the checkpoint, whose bytes no longer match its sha256.
    let path = objects.path().join(manifest["object"].as_str().unwrap());
    let good = std::fs::read(&path).unwrap();
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let c = client(&core.url());
    let mut events = Box::pin(c.follow(0, Query::new()));
    match events.next().await {
        Some(Err(e)) => assert!(e.to_string().contains("sha256"), "{e}"),
        other => panic!("expected a checksum error before any record, got {other:?}"),
    }

    drop(events);
    std::fs::write(&path, &good).unwrap();

    // The checkpointer's read-back: corrupt the object between upload and verification.
    post_changes(&c, &mut work, 500).await;
    let opts = checkpointer(
        &core.url(),
        &store_url,
        &["--every-changes", "1", "--every-seconds", "1"],
    )
    .arg("--stop-at")
    .arg("written");
    let mut ckpt = ServerProcess::start(opts).await;
    ckpt.wait_stopped(DEADLINE).await;
    let written = checkpoint_objects(objects.path())
        .into_iter()
        .max()
        .expect("the uploaded object");
    let mut bytes = std::fs::read(&written).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&written, &bytes).unwrap();
    ckpt.resume();
    // The checkpointer refuses the object.
    ckpt.wait_for_log(&["failed verification"], DEADLINE).await;
    // No manifest names the bad object; the next round uploads it again and completes (the
    // core lists the checkpoint once its end record is in, a moment before the
    // checkpointer's log says so).
    wait_checkpoint_past(&api, manifest["index"].as_u64().unwrap()).await;
    wait_until(DEADLINE, "the next round to complete", || async {
        if ckpt.log().contains("checkpoint written") {
            Ok(())
        } else {
            Err(ckpt.log_tail(3))
        }
    })
    .await
    .unwrap();
    assert_manifests_sound(&api, objects.path()).await;
    assert!(ckpt.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_go_to_a_real_s3_server() {
    let garage = GarageServer::start().await;
    let url = garage.url("changeagent");
    let with_s3 = |mut opts: ServerOptions| {
        for (k, v) in garage.env() {
            opts = opts.env(k, v);
        }
        opts
    };
    let (core, c) = start_core(&url, &garage.env()).await;
    let api = core.api();
    let mut work = Workload::create(&c, 5, &[("acme", "flags")], 300).await;
    post_changes(&c, &mut work, 5_000).await;
    let reads_everything = Consumer::start(&core.url(), 0);
    reads_everything
        .wait_at(health(&api).await["lastIndex"].as_u64().unwrap())
        .await;
    // Parts of 5 MiB (S3's smallest) and a checkpoint below that: a one-part upload; the
    // multipart path with several parts is covered against Garage by the testkit's own test.
    let mut once = ServerProcess::start(with_s3(checkpointer(
        &core.url(),
        &url,
        &["--once", "--retain", "100", "--part-bytes", "5242880"],
    )))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    let manifest = api.get("/checkpoints/latest").await.ok_json();
    assert!(
        manifest["object"]
            .as_str()
            .unwrap()
            .starts_with("changeagent/"),
        "{manifest}"
    );
    // The core streams the object from S3; its bytes match the manifest.
    let data = api
        .get(&format!("/checkpoints/{}/data", manifest["index"]))
        .await;
    assert_eq!(data.status, 200, "{}", data.text());
    assert_eq!(hex(&Sha256::digest(&data.body)), manifest["sha256"]);
    // A consumer from 0 loads it (410, reset) and ends with the same state.
    post_changes(&c, &mut work, 200).await;
    let last = health(&api).await["lastIndex"].as_u64().unwrap();
    let loaded = Consumer::start(&core.url(), 0);
    loaded.wait_at(last).await;
    reads_everything.wait_at(last).await;
    assert_eq!(loaded.resets(), 1);
    assert_eq!(loaded.state(), reads_everything.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_restored_from_a_checkpoint_holds_its_state_and_continues_its_ids() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, manifest, _) = core_with_a_checkpoint(objects.path(), "100").await;
    let index = manifest["index"].as_u64().unwrap();
    let original = Consumer::start(&core.url(), 0);
    original.wait_at(index).await;
    let old_cluster = health(&core.api()).await["clusterId"].clone();

    let restored = ServerProcess::start_leader(
        ServerOptions::default()
            .arg("--object-store")
            .arg(&store_url)
            .arg("--restore-from")
            .arg(&store_url),
    )
    .await;
    let h = health(&restored.api()).await;
    assert_ne!(
        h["clusterId"], old_cluster,
        "a restore starts a new cluster"
    );
    assert_eq!(h["firstIndex"], index + 1);
    assert_eq!(h["lastIndex"], index);
    // Its list starts after the checkpoint; a 410 below points at the checkpoint it came
    // from, which a consumer loads: the same state as the original's at that index.
    let gone = restored.api().get("/changes?since=0").await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.json()["checkpoint"], manifest);
    let from_restored = Consumer::start(&restored.url(), 0);
    from_restored.wait_at(index).await;
    let mut want = original.state();
    // The original's state past the checkpoint (its own checkpoint and truncate records)
    // is not in the checkpoint.
    want.unkeyed.retain(|id, _| *id <= index);
    assert_eq!(from_restored.state(), want);
    // Ids continue after the checkpoint; keyed writes go on from the restored keys.
    let c = client(&restored.url());
    let posted = c
        .post_change(&NewChange::data(json!("after the restore")))
        .await
        .unwrap();
    assert!(posted.id > index, "{posted:?}");
    let key = want.keys.keys().next().unwrap().clone();
    let got = c.get_key(&key.1, &key.2).await.unwrap();
    assert_eq!(serde_json::to_value(&got).unwrap(), want.keys[&key]);
    // Nodes that join it install the restored state by snapshot.
    let joined = ServerProcess::start(
        ServerOptions::default()
            .arg("--object-store")
            .arg(&store_url)
            .arg("--join")
            .arg(restored.url()),
    )
    .await;
    wait_until(
        DEADLINE,
        "the joined node to hold the restored state",
        || async {
            let h = health(&joined.api()).await;
            let key_there = joined
                .api()
                .get(&format!("/collections/{}/keys/{}", key.1, key.2))
                .await;
            if h["firstIndex"] == index + 1
                && h["lastIndex"] == posted.id
                && key_there.status == 200
            {
                Ok(())
            } else {
                Err(h)
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpointer_left_behind_a_truncation_bootstraps_again() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, first, mut work) = core_with_a_checkpoint(objects.path(), "1000000").await;
    let api = core.api();
    let c = client(&core.url());
    // A second checkpointer builds its copy, then stops.
    let behind_dir = tempfile::tempdir().unwrap();
    let behind =
        |extra: &[&str]| checkpointer(&core.url(), &store_url, extra).dir(behind_dir.path());
    let mut b = ServerProcess::start(behind(&["--every-changes", "1000000"])).await;
    let at = health(&api).await["lastIndex"].as_u64().unwrap();
    wait_until(DEADLINE, "the second copy to catch up", || async {
        let h = b.api().get("/health").await.ok_json();
        if h["appliedIndex"].as_u64() >= Some(at) {
            Ok(())
        } else {
            Err(h)
        }
    })
    .await
    .unwrap();
    assert!(b.terminate().await.success());
    // Meanwhile the core moves on and truncates past that copy.
    post_changes(&c, &mut work, 3_000).await;
    let mut once = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--retain", "10"],
    ))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    let newest = api.get("/checkpoints/latest").await.ok_json();
    assert!(newest["index"].as_u64() > first["index"].as_u64());
    assert!(health(&api).await["firstIndex"].as_u64().unwrap() > at + 1);
    // Restarted, the copy gets a 410, loads the newest checkpoint, and goes on.
    post_changes(&c, &mut work, 100).await;
    let mut b = ServerProcess::start(behind(&[
        "--every-changes",
        "1",
        "--every-seconds",
        "1",
        "--retain",
        "1000000",
    ]))
    .await;
    let m = wait_checkpoint_past(&api, newest["index"].as_u64().unwrap()).await;
    let h = b.api().get("/metrics").await.text();
    assert!(
        h.contains("changeagent_checkpointer_bootstraps_total 1"),
        "{h}\n{}",
        b.log_tail(20)
    );
    assert_manifests_sound(&api, objects.path()).await;
    // Its checkpoint holds the state of the one it bootstrapped from plus the changes since.
    let mut want = checkpoint_state(&api, &newest).await;
    let tail = api
        .get(&format!("/changes?since={}&limit=10000", newest["index"]))
        .await
        .ok_json();
    for change in tail["changes"].as_array().unwrap() {
        if change["_id"].as_u64() <= m["index"].as_u64() {
            want.apply(change);
        }
    }
    assert_eq!(checkpoint_state(&api, &m).await, want);
    assert!(b.terminate().await.success());
}

/// The state a checkpoint holds, read through the core's data route.
async fn checkpoint_state(api: &Api, manifest: &Value) -> ConsumerState {
    let scope = manifest["scope"].as_str().unwrap().replace('=', "%3D");
    let data = api
        .get(&format!(
            "/checkpoints/{}/data?scope={scope}",
            manifest["index"]
        ))
        .await;
    assert_eq!(data.status, 200, "{}", data.text());
    let text = String::from_utf8(zstd::decode_all(&data.body[..]).unwrap()).unwrap();
    let mut state = ConsumerState::default();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v.get("_id").is_some() {
            state.apply(&v);
        }
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_scoped_checkpoint_serves_that_tenants_list() {
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let (core, c) = start_core(&store_url, &[]).await;
    let api = core.api();
    let mut work = Workload::create(&c, 9, &[("acme", "flags"), ("beta", "flags")], 100).await;
    post_changes(&c, &mut work, 3_000).await;
    // acme's checkpoint, then a full one that lets the core truncate.
    let mut scoped = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--scope", "tenant=acme"],
    ))
    .await;
    assert!(
        scoped.wait_exit(DEADLINE).await.success(),
        "{}",
        scoped.log_tail(20)
    );
    let acme = api
        .get("/checkpoints/latest?scope=tenant%3Dacme")
        .await
        .ok_json();
    assert_eq!(acme["scope"], "tenant=acme");
    assert!(acme["object"]
        .as_str()
        .unwrap()
        .contains("/checkpoints/tenant-acme/"));
    assert_eq!(
        health(&api).await["firstIndex"],
        1,
        "a scoped checkpoint never truncates"
    );
    let mut full = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--retain", "10"],
    ))
    .await;
    assert!(
        full.wait_exit(DEADLINE).await.success(),
        "{}",
        full.log_tail(20)
    );
    assert_eq!(
        api.get("/checkpoints")
            .await
            .ok_json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // acme's list below the first index names acme's checkpoint; the whole list the full one.
    let gone = api.get("/tenants/acme/changes?since=0").await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.json()["checkpoint"], acme);
    let gone = api.get("/changes?since=0").await;
    assert_eq!(gone.json()["checkpoint"]["scope"], "all");
    // The scoped checkpoint holds acme's catalog, keys and changes only.
    let state = checkpoint_state(&api, &acme).await;
    assert_eq!(state.tenants.values().collect::<Vec<_>>(), ["acme"]);
    assert!(state.keys.keys().all(|(t, _, _)| t == "acme"));
    assert!(state.unkeyed.values().all(|c| c["tenant"] == "acme"));
    assert!(
        !state.keys.is_empty() && !state.unkeyed.is_empty(),
        "{}",
        state.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_lists_shows_and_downloads_checkpoints() {
    let objects = tempfile::tempdir().unwrap();
    let (core, manifest, _) = core_with_a_checkpoint(objects.path(), "100").await;
    let cli = changeagent_testkit::Binary::named("changeagent")
        .locate()
        .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&cli)
            .arg("--server")
            .arg(core.url())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let listed = run(&["checkpoints", "list"]);
    let first: Value =
        serde_json::from_slice(listed.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first, manifest);
    let shown: Value =
        serde_json::from_slice(&run(&["checkpoints", "show", "latest"]).stdout).unwrap();
    assert_eq!(shown, manifest);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.jsonl.zst");
    run(&[
        "checkpoints",
        "download",
        "latest",
        "-o",
        file.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(hex(&Sha256::digest(&bytes)), manifest["sha256"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_go_on_across_a_leader_kill_in_a_cluster() {
    use changeagent_testkit::cluster::{Cluster, ClusterOptions};
    let objects = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", objects.path().display());
    let mut cluster =
        Cluster::start_with_peers(ClusterOptions::new(3).arg("--object-store").arg(&store_url))
            .await;
    let leader = cluster.wait_leader().await;
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).url()).collect();
    let c = Client::builder(urls.clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut work = Workload::create(&c, 13, &[("acme", "flags")], 100).await;
    post_changes(&c, &mut work, 1_000).await;
    let mut ckpt = ServerProcess::start(checkpointer(
        &urls.join(","),
        &store_url,
        &["--every-changes", "500", "--retain", "100"],
    ))
    .await;
    let api = cluster.api(leader);
    let first = wait_checkpoint_past(&api, 0).await;

    // The leader dies; the checkpointer fails over to the others and goes on.
    cluster.kill9(leader);
    let survivor = cluster.others(&[leader])[0];
    cluster
        .wait_new_leader(&cluster.others(&[leader]), leader)
        .await;
    post_changes(&c, &mut work, 1_000).await;
    let api = cluster.api(survivor);
    let second = wait_checkpoint_past(&api, first["index"].as_u64().unwrap()).await;
    assert_manifests_sound(&api, objects.path()).await;
    // The killed node comes back with the same checkpoints and truncation as the others:
    // the newest checkpoint (this one or a later one) and first index = its index + 1 - 100.
    cluster.restart(leader).await;
    let second_index = second["index"].as_u64().unwrap();
    wait_until(
        DEADLINE,
        "every node's checkpoints and first index",
        || async {
            let mut seen = Vec::new();
            for i in 0..3 {
                let a = cluster.api(i);
                let h = a
                    .try_get("/health")
                    .await
                    .map_err(|e| e.to_string())?
                    .json();
                let list = a
                    .try_get("/checkpoints")
                    .await
                    .map_err(|e| e.to_string())?
                    .json();
                seen.push((h["firstIndex"].as_u64(), list[0]["index"].as_u64(), list));
            }
            let (first, newest, _) = &seen[0];
            let settled = newest.is_some_and(|n| n >= second_index && *first == Some(n + 1 - 100));
            if settled && seen.iter().all(|s| s == &seen[0]) {
                Ok(())
            } else {
                Err(format!(
                    "{:?}",
                    seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await
    .unwrap();
    assert!(ckpt.terminate().await.success());
}
