//! Unit tests of the change store against a real RocksDB in a temp dir.

use std::sync::Arc;

use changeagent_proto::checkpoint::{Line, LineReader};
use changeagent_proto::types::{AdminAnswer, EndRequest, StartRecord};
use changeagent_proto::{Manifest, Scope};
use changeagent_store::{
    parse_post_body, ChangeInput, Error, ExportOptions, Filter, ImportMode, Rejection, Store,
};
use serde_json::Value;

fn open() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    (dir, store)
}

fn change(body: &str) -> ChangeInput {
    parse_post_body(body.as_bytes())
        .unwrap()
        .into_changes()
        .remove(0)
}

fn append(store: &Store, ts: i64, bodies: &[&str]) -> Vec<u64> {
    let changes: Vec<ChangeInput> = bodies.iter().map(|b| change(b)).collect();
    let mut txn = store.begin();
    let ids = txn.append(ts, &changes).unwrap();
    store.commit(txn).unwrap();
    ids
}

fn page(store: &Store, since: u64, limit: usize, filter: &Filter) -> (Vec<Value>, bool) {
    let mut out = b"[".to_vec();
    let info = store.read_page(since, limit, filter, &mut out).unwrap();
    out.push(b']');
    let v: Vec<Value> = serde_json::from_slice(&out).unwrap();
    assert_eq!(v.len(), info.count);
    (v, info.more)
}

fn ids(v: &[Value]) -> Vec<u64> {
    v.iter().map(|c| c["_id"].as_u64().unwrap()).collect()
}

fn tags(t: &[&str]) -> Filter {
    Filter {
        tags: t.iter().map(|s| s.to_string()).collect(),
        ..Filter::default()
    }
}

#[test]
fn ids_are_dense_and_pages_ordered() {
    let (_d, s) = open();
    assert_eq!(
        append(&s, 10, &[r#"{"data":1}"#, r#"{"data":2}"#]),
        vec![1, 2]
    );
    assert_eq!(append(&s, 11, &[r#"{"data":3}"#]), vec![3]);
    let (v, more) = page(&s, 0, 2, &Filter::default());
    assert_eq!(ids(&v), vec![1, 2]);
    assert!(more);
    let (v, more) = page(&s, 2, 2, &Filter::default());
    assert_eq!(ids(&v), vec![3]);
    assert!(!more);
    assert_eq!(v[0]["data"], 3);
    assert_eq!(s.last_id(), 3);
}

#[test]
fn tag_type_and_tenant_filters_use_indexes() {
    let (_d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant(1, "acme").unwrap();
    s.commit(txn).unwrap();
    // Record 1 is the tenant-created record; the changes below are 2 to 6.
    append(
        &s,
        1,
        &[
            r#"{"data":1,"tags":["a"]}"#,
            r#"{"data":2,"tags":["b"]}"#,
            r#"{"data":3,"tags":["a","b"],"type":5}"#,
            r#"{"data":4,"tenant":"acme","type":5}"#,
            r#"{"data":5,"tags":["c"]}"#,
        ],
    );
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["a"])).0), vec![2, 4]);
    // Several tags: any of them, each change once, in order.
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["b", "a"])).0), vec![2, 3, 4]);
    assert_eq!(ids(&page(&s, 2, 10, &tags(&["b", "a"])).0), vec![3, 4]);
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["zzz"])).0), Vec::<u64>::new());
    let by_type = Filter {
        change_type: Some(5),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 10, &by_type).0), vec![4, 5]);
    let by_tenant = Filter {
        tenant: Some(1),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 10, &by_tenant).0), vec![5]);
    let combined = Filter {
        tags: vec!["b".into()],
        change_type: Some(5),
        tenant: None,
    };
    assert_eq!(ids(&page(&s, 0, 10, &combined).0), vec![4]);
    // limit + more with a filter
    let (v, more) = page(&s, 0, 1, &tags(&["a", "b"]));
    assert_eq!(ids(&v), vec![2]);
    assert!(more);
}

#[test]
fn internal_records_only_in_unfiltered_lists() {
    let (_d, s) = open();
    let internal = ChangeInput {
        change_type: -1,
        tags: vec!["a".into()],
        ..ChangeInput::default()
    };
    let mut txn = s.begin();
    txn.append(1, &[internal, change(r#"{"data":1,"tags":["a"]}"#)])
        .unwrap();
    s.commit(txn).unwrap();
    assert_eq!(ids(&page(&s, 0, 10, &Filter::default()).0), vec![1, 2]);
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["a"])).0), vec![2]);
    let explicit = Filter {
        change_type: Some(-1),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 10, &explicit).0), vec![1]);
}

#[test]
fn batch_is_all_or_nothing() {
    let (_d, s) = open();
    append(&s, 1, &[r#"{"data":1}"#]);
    let changes = vec![
        change(r#"{"data":2}"#),
        change(r#"{"data":3,"tenant":"nobody"}"#),
    ];
    let mut txn = s.begin();
    assert!(matches!(
        txn.append(2, &changes),
        Err(Error::Rejected(Rejection::UnknownTenant(_)))
    ));
    // The failed append staged nothing; a later one in the same transaction still applies.
    assert_eq!(txn.append(2, &[change(r#"{"data":4}"#)]).unwrap(), vec![2]);
    s.commit(txn).unwrap();
    let (v, _) = page(&s, 0, 10, &Filter::default());
    assert_eq!(ids(&v), vec![1, 2]);
    assert_eq!(v[1]["data"], 4);
}

#[test]
fn keys_upsert_delete_and_list_sorted() {
    let (_d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant(1, "acme").unwrap();
    let c = txn.create_collection(1, "acme", "flags").unwrap();
    s.commit(txn).unwrap();
    append(
        &s,
        1,
        &[
            r#"{"collection":"flags","key":"b","data":1}"#,
            r#"{"collection":"flags","key":"a","data":2}"#,
            r#"{"collection":"flags","key":"b","data":3}"#,
            r#"{"collection":"flags","key":"c","data":4}"#,
            r#"{"collection":"flags","key":"c","deleted":true}"#,
        ],
    );
    let b: Value = serde_json::from_slice(&s.get_key(c.id, "b").unwrap().unwrap()).unwrap();
    assert_eq!(b["data"], 3);
    assert_eq!(b["tenant"], "acme");
    assert!(s.get_key(c.id, "c").unwrap().is_none());
    let mut out = b"[".to_vec();
    assert_eq!(s.list_keys(c.id, None, 10, &mut out).unwrap(), 2);
    out.push(b']');
    let listed: Vec<Value> = serde_json::from_slice(&out).unwrap();
    assert_eq!(listed[0]["key"], "a");
    assert_eq!(listed[1]["key"], "b");
    let mut out = Vec::new();
    assert_eq!(s.list_keys(c.id, Some("a"), 10, &mut out).unwrap(), 1);
    // Deleting a missing key is an error and changes nothing.
    let mut txn = s.begin();
    assert!(matches!(
        txn.append(
            2,
            &[change(
                r#"{"collection":"flags","key":"zz","deleted":true}"#
            )]
        ),
        Err(Error::Rejected(Rejection::UnknownKey { .. }))
    ));
    drop(txn);
    assert_eq!(s.last_id(), 7);
}

#[test]
fn catalog_names_conflict_and_resolve() {
    let (_d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant(1, "acme").unwrap();
    assert!(matches!(
        txn.create_tenant(1, "acme"),
        Err(Error::Rejected(Rejection::TenantExists(_)))
    ));
    txn.create_tenant(1, "other").unwrap();
    txn.create_collection(1, "acme", "flags").unwrap();
    txn.create_collection(1, "other", "flags").unwrap();
    assert!(matches!(
        txn.create_collection(1, "acme", "flags"),
        Err(Error::Rejected(Rejection::CollectionExists { .. }))
    ));
    assert!(matches!(
        txn.create_collection(1, "nobody", "x"),
        Err(Error::Rejected(Rejection::UnknownTenant(_)))
    ));
    s.commit(txn).unwrap();
    assert_eq!(s.tenants().len(), 2);
    assert!(matches!(
        s.collection("flags"),
        Err(Error::Rejected(Rejection::AmbiguousCollection(_)))
    ));
    assert_eq!(s.collection("1").unwrap().tenant, "acme");
    assert_eq!(s.tenant("2").unwrap().name, "other");
}

#[test]
fn timestamps_never_decrease_and_time_lookup_seeks() {
    let (_d, s) = open();
    append(&s, 100, &[r#"{"data":1}"#]);
    append(&s, 300, &[r#"{"data":2}"#]);
    // A proposer with a slower clock: stored _ts is raised to the previous one.
    append(&s, 200, &[r#"{"data":3}"#]);
    let (v, _) = page(&s, 0, 10, &Filter::default());
    let ts: Vec<i64> = v.iter().map(|c| c["_ts"].as_i64().unwrap()).collect();
    assert_eq!(ts, vec![100, 300, 300]);
    assert_eq!(s.since_for_time(50).unwrap(), 0);
    assert_eq!(s.since_for_time(101).unwrap(), 1);
    assert_eq!(s.since_for_time(300).unwrap(), 1);
    assert_eq!(s.since_for_time(301).unwrap(), 3);
}

#[test]
fn reopen_keeps_everything_and_rejects_other_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let s = Store::open(&path).unwrap();
        let mut txn = s.begin();
        txn.create_tenant(1, "acme").unwrap();
        txn.set_cluster_id("cid").unwrap();
        s.commit(txn).unwrap();
        append(&s, 5, &[r#"{"data":{"x":1},"tags":["t"],"tenant":"acme"}"#]);
    }
    {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.last_id(), 2);
        assert_eq!(s.cluster_id().as_deref(), Some("cid"));
        assert_eq!(s.tenant("acme").unwrap().id, 1);
        assert_eq!(ids(&page(&s, 0, 10, &tags(&["t"])).0), vec![2]);
        assert_eq!(append(&s, 6, &[r#"{"data":2}"#]), vec![3]);
    }
    // Bump the stored format version behind the store's back.
    {
        let active = std::fs::read_to_string(path.join("ACTIVE")).unwrap();
        let gen = path.join(active.trim());
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &gen).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &gen, cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(&meta, b"format_version", 99u32.to_be_bytes())
            .unwrap();
    }
    match Store::open(&path) {
        Err(Error::UnsupportedFormat { found: 99, .. }) => {}
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    // A store of format 1 kept RocksDB's files right in its directory.
    let old = dir.path().join("old");
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        rocksdb::DB::open(&opts, &old).unwrap();
    }
    let err = Store::open(&old).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedFormat {
                found: 1,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("empty data dir"), "{err}");
}

#[test]
fn waiters_wake_once_per_batch() {
    let (_d, s) = open();
    let mut rx = s.subscribe();
    rx.borrow_and_update();
    append(&s, 1, &[r#"{"data":1}"#, r#"{"data":2}"#]);
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 2);
    assert!(!rx.has_changed().unwrap());
}

// ---- catalog records, the row writer, checkpoints ------------------------------------------

/// Every change of the unfiltered list, as raw JSON lines.
fn feed(s: &Store) -> Vec<String> {
    let (v, more) = page(s, s.first_index() - 1, 10_000, &Filter::default());
    assert!(!more);
    let mut out = b"[".to_vec();
    s.read_page(s.first_index() - 1, 10_000, &Filter::default(), &mut out)
        .unwrap();
    out.push(b']');
    let raws: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&out).unwrap();
    assert_eq!(raws.len(), v.len());
    raws.iter().map(|r| r.get().to_owned()).collect()
}

/// A store with tenants, collections, keyed writes (overwrites and deletes) and unkeyed
/// changes, some of them tagged or a tenant's.
fn populated() -> (tempfile::TempDir, Arc<Store>) {
    let (d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant(10, "acme").unwrap(); // 1
    txn.create_tenant(10, "beta").unwrap(); // 2
    txn.create_collection(10, "acme", "flags").unwrap(); // 3
    txn.create_collection(10, "beta", "flags").unwrap(); // 4
    txn.set_cluster_id("cid").unwrap();
    s.commit(txn).unwrap();
    append(
        &s,
        20,
        &[
            r#"{"data":{"b":1,"a":2},"tags":["x"]}"#, // 5
            r#"{"tenant":"acme","collection":"flags","key":"k1","data":1}"#, // 6
            r#"{"tenant":"acme","collection":"flags","key":"k2","data":2}"#, // 7
            r#"{"tenant":"acme","collection":"flags","key":"k1","data":3}"#, // 8
            r#"{"tenant":"beta","collection":"flags","key":"k1","data":"b"}"#, // 9
            r#"{"data":"acme only","tenant":"acme","tags":["y"]}"#, // 10
            r#"{"tenant":"acme","collection":"flags","key":"k2","deleted":true}"#, // 11
            r#"{"data":[1, 2,  3],"type":7}"#,        // 12
        ],
    );
    (d, s)
}

#[test]
fn creating_tenants_and_collections_appends_catalog_records() {
    let (_d, s) = populated();
    let lines = feed(&s);
    assert_eq!(
        &lines[..4],
        &[
            r#"{"_id":1,"_ts":10,"type":-4,"data":{"_id":1,"name":"acme"}}"#,
            r#"{"_id":2,"_ts":10,"type":-4,"data":{"_id":2,"name":"beta"}}"#,
            r#"{"_id":3,"_ts":10,"type":-5,"data":{"_id":1,"name":"flags","tenant":"acme"}}"#,
            r#"{"_id":4,"_ts":10,"type":-5,"data":{"_id":2,"name":"flags","tenant":"beta"}}"#,
        ]
    );
    // Filtered lists skip them.
    assert_eq!(ids(&page(&s, 0, 100, &tags(&["x", "y"])).0), vec![5, 10]);
    let acme = Filter {
        tenant: Some(1),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 100, &acme).0), vec![6, 7, 8, 10, 11]);
}

#[test]
fn replaying_a_feed_with_its_ids_rebuilds_the_same_store() {
    let (_d, a) = populated();
    let (_d2, b) = open();
    let mut txn = b.begin();
    for line in feed(&a) {
        txn.apply_record(line.as_bytes(), true).unwrap();
    }
    b.commit(txn).unwrap();
    assert_eq!(feed(&a), feed(&b));
    assert_eq!(a.tenants(), b.tenants());
    assert_eq!(a.state().next_collection_id, b.state().next_collection_id);
    for (coll, key) in [(1, "k1"), (1, "k2"), (2, "k1")] {
        assert_eq!(a.get_key(coll, key).unwrap(), b.get_key(coll, key).unwrap());
    }
    for f in [tags(&["x"]), tags(&["y"])] {
        assert_eq!(page(&a, 0, 100, &f), page(&b, 0, 100, &f));
    }
    // The next local append continues after the replayed ids.
    assert_eq!(append(&b, 30, &[r#"{"data":1}"#]), vec![13]);
    // A record at or before the last applied _id is refused and changes nothing.
    let mut txn = b.begin();
    let again = feed(&a).pop().unwrap();
    assert!(matches!(
        txn.apply_record(again.as_bytes(), true),
        Err(Error::BadRecord { id: 12, .. })
    ));
}

/// Exports `s` and returns the compressed bytes and the decompressed lines.
fn export(s: &Store, opts: &ExportOptions) -> (Vec<u8>, Vec<String>) {
    let mut file = Vec::new();
    s.export(&mut file, opts, |_| true).unwrap().unwrap();
    let text = zstd::decode_all(&file[..]).unwrap();
    let lines = String::from_utf8(text)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (file, lines)
}

fn record_lines(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.starts_with("{\"_id\":"))
        .map(String::as_str)
        .collect()
}

#[test]
fn a_checkpoint_holds_the_catalog_live_keys_and_unkeyed_changes() {
    let (_d, s) = populated();
    let (_, lines) = export(&s, &ExportOptions::default());
    let header: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(header["format"], "changeagent-checkpoint");
    assert_eq!(header["version"], 1);
    assert_eq!(header["index"], 12);
    assert_eq!(header["scope"], "all");
    assert_eq!(header["clusterId"], "cid");
    let all = feed(&s);
    let by_id = |id: usize| all[id - 1].as_str();
    // Catalog 1-4, unkeyed 5, k1's latest 8, beta's k1 9, unkeyed 10 and 12. Not the
    // overwritten 6, not k2 (deleted by 11), not the delete itself.
    assert_eq!(
        record_lines(&lines),
        [1, 2, 3, 4, 5, 8, 9, 10, 12].map(by_id)
    );
    assert_eq!(lines.last().unwrap(), r#"{"end":true,"records":9}"#);

    // A tenant's scope: its catalog, its keys and its changes.
    let acme = ExportOptions {
        scope: Scope::Tenant("acme".into()),
        raft: false,
    };
    let (_, lines) = export(&s, &acme);
    assert_eq!(record_lines(&lines), [1, 3, 8, 10].map(by_id));
    let nobody = ExportOptions {
        scope: Scope::Tenant("nobody".into()),
        raft: false,
    };
    assert!(matches!(
        s.export(Vec::new(), &nobody, |_| true),
        Err(Error::Rejected(Rejection::UnknownTenant(_)))
    ));
}

#[test]
fn an_export_is_as_of_its_snapshot_even_while_writes_go_on() {
    let (_d, s) = populated();
    let mut file = Vec::new();
    let mut seen = None;
    let exported = s
        .export(&mut file, &ExportOptions::default(), |index| {
            seen = Some(index);
            // Writes after the snapshot: a new key and an overwrite of k1.
            append(
                &s,
                40,
                &[
                    r#"{"tenant":"acme","collection":"flags","key":"k9","data":9}"#,
                    r#"{"tenant":"acme","collection":"flags","key":"k1","data":"new"}"#,
                    r#"{"data":"late"}"#,
                ],
            );
            true
        })
        .unwrap()
        .unwrap();
    assert_eq!(seen, Some(12));
    assert_eq!(exported.header.index, 12);
    let text = String::from_utf8(zstd::decode_all(&file[..]).unwrap()).unwrap();
    assert!(!text.contains("k9") && !text.contains("late") && !text.contains("\"new\""));
    assert_eq!(exported.trailer.records, 9);
    // Declining at the snapshot writes nothing.
    let mut none = Vec::new();
    assert!(s
        .export(&mut none, &ExportOptions::default(), |_| false)
        .unwrap()
        .is_none());
    assert!(none.is_empty());
}

/// Starts and ends a full checkpoint at the store's last id, keeping `keep`.
fn commit_checkpoint(s: &Store, ts: i64, by: &str, keep: u32) -> Manifest {
    let index = s.last_id();
    let mut txn = s.begin();
    let start = StartRecord {
        index,
        by: by.into(),
        scope: Scope::All,
    };
    txn.checkpoint_start(ts, &start, 1_000).unwrap();
    let manifest = Manifest {
        index,
        scope: Scope::All,
        object: format!("cid/checkpoints/all/{index:020}.jsonl.zst"),
        size: 10,
        sha256: "00".repeat(32),
        records: 1,
        created_ts: ts,
        cluster_id: "cid".into(),
    };
    let end = EndRequest {
        manifest: manifest.clone(),
        by: by.into(),
        keep,
    };
    txn.checkpoint_end(ts, &end).unwrap();
    s.commit(txn).unwrap();
    manifest
}

#[test]
fn checkpoint_starts_conflict_until_stale_and_ends_keep_the_newest() {
    let (_d, s) = populated();
    let start = |by: &str| StartRecord {
        index: 12,
        by: by.into(),
        scope: Scope::All,
    };
    let mut txn = s.begin();
    txn.checkpoint_start(100, &start("a"), 50).unwrap();
    // Another checkpointer: refused while a's start is younger than 50 ns.
    assert!(matches!(
        txn.checkpoint_start(120, &start("b"), 50),
        Err(Error::Rejected(Rejection::CheckpointInProgress { .. }))
    ));
    // a itself takes its start back at once; a start of another scope is independent.
    txn.checkpoint_start(121, &start("a"), 50).unwrap();
    let acme = StartRecord {
        scope: Scope::Tenant("acme".into()),
        ..start("b")
    };
    txn.checkpoint_start(122, &acme, 50).unwrap();
    s.commit(txn).unwrap();
    assert_eq!(s.open_starts().unwrap().len(), 2);
    // Past the stale time, b takes the start over; then a's end is refused.
    let mut txn = s.begin();
    txn.checkpoint_start(200, &start("b"), 50).unwrap();
    let manifest = Manifest {
        index: 12,
        scope: Scope::All,
        object: "o".into(),
        size: 1,
        sha256: "00".repeat(32),
        records: 9,
        created_ts: 1,
        cluster_id: "cid".into(),
    };
    let end_by = |by: &str| EndRequest {
        manifest: manifest.clone(),
        by: by.into(),
        keep: 2,
    };
    assert!(matches!(
        txn.checkpoint_end(201, &end_by("a")),
        Err(Error::Rejected(Rejection::NoOpenStart { .. }))
    ));
    let answer: AdminAnswer = txn.checkpoint_end(202, &end_by("b")).unwrap();
    assert!(answer.id.is_some());
    // An index past the last applied one is bad input.
    let mut ahead = start("c");
    ahead.index = 10_000;
    assert!(matches!(
        txn.checkpoint_start(203, &ahead, 50),
        Err(Error::Rejected(Rejection::Invalid(_)))
    ));
    s.commit(txn).unwrap();
    assert_eq!(s.latest_manifest(&Scope::All).unwrap(), Some(manifest));
    // The start and end records are in the list, as internal records.
    let types: Vec<i64> = feed(&s)
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_i64()
                .unwrap_or(0)
        })
        .filter(|t| *t == -1 || *t == -2)
        .collect();
    assert_eq!(types, vec![-1, -1, -1, -1, -2]);
    // keep = 2: a third checkpoint forgets the first.
    append(&s, 300, &[r#"{"data":1}"#]);
    commit_checkpoint(&s, 301, "b", 2);
    append(&s, 302, &[r#"{"data":2}"#]);
    let newest = commit_checkpoint(&s, 303, "b", 2);
    let kept: Vec<u64> = s
        .manifests(Some(&Scope::All))
        .unwrap()
        .iter()
        .map(|m| m.index)
        .collect();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0], newest.index);
    assert!(!kept.contains(&12));
}

#[test]
fn truncation_needs_a_checkpoint_and_keeps_keys_and_catalog() {
    let (dir, s) = populated();
    let mut txn = s.begin();
    assert!(matches!(
        txn.truncate(50, 6),
        Err(Error::Rejected(Rejection::NotCheckpointed {
            checkpoint: None,
            ..
        }))
    ));
    drop(txn);
    let checkpoint = commit_checkpoint(&s, 60, "a", 3); // at 12; records 13, 14
    append(&s, 70, &[r#"{"data":"after","tags":["x"]}"#]); // 15
    let mut txn = s.begin();
    // Past the checkpoint: refused.
    assert!(matches!(
        txn.truncate(71, checkpoint.index + 2),
        Err(Error::Rejected(Rejection::NotCheckpointed {
            checkpoint: Some(12),
            ..
        }))
    ));
    let answer = txn.truncate(72, 9).unwrap();
    assert_eq!(answer.first_index, 9);
    s.commit(txn).unwrap();
    assert_eq!(s.first_index(), 9);
    // Below the first index: 410; at it, the list goes on.
    let mut out = Vec::new();
    assert!(matches!(
        s.read_page(7, 10, &Filter::default(), &mut out),
        Err(Error::Rejected(Rejection::Truncated { first_index: 9 }))
    ));
    assert_eq!(
        ids(&page(&s, 8, 100, &Filter::default()).0),
        (9..=16).collect::<Vec<_>>()
    );
    assert_eq!(ids(&page(&s, 8, 100, &tags(&["x"])).0), vec![15]);
    assert!(matches!(
        s.get_change(5),
        Err(Error::Rejected(Rejection::Truncated { .. }))
    ));
    assert_eq!(s.since_for_time(0).unwrap(), 8);
    // Keys written before the truncation and the catalog stay.
    let k1: Value = serde_json::from_slice(&s.get_key(1, "k1").unwrap().unwrap()).unwrap();
    assert_eq!(k1["_id"], 8);
    assert_eq!(s.tenants().len(), 2);
    // The truncate record is in the list.
    let last: Value = serde_json::from_str(feed(&s).last().unwrap()).unwrap();
    assert_eq!(last["type"], -3);
    assert_eq!(
        last["data"],
        serde_json::json!({"before": 9, "checkpoint": 12})
    );
    // Truncating below the first index again does nothing.
    let mut txn = s.begin();
    assert_eq!(txn.truncate(80, 5).unwrap().id, None);
    drop(txn);
    // It survives a restart.
    let path = s.path().to_path_buf();
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.first_index(), 9);
    assert_eq!(ids(&page(&s, 8, 1, &Filter::default()).0), vec![9]);
    drop(dir);
}

#[test]
fn a_raft_snapshot_restores_everything_replicated() {
    let (_d, s) = populated();
    commit_checkpoint(&s, 60, "a", 3);
    let mut txn = s.begin();
    txn.truncate(61, 7).unwrap();
    txn.remember_idempotent("key-1", 62, br#"{"_id":5}"#.to_vec())
        .unwrap();
    txn.checkpoint_start(
        63,
        &StartRecord {
            index: 12,
            by: "b".into(),
            scope: Scope::Tenant("beta".into()),
        },
        1,
    )
    .unwrap();
    txn.put_owner_meta("raft_applied", br#"{"index":42}"#)
        .unwrap();
    s.commit(txn).unwrap();
    let raft = ExportOptions {
        scope: Scope::All,
        raft: true,
    };
    let (file, lines) = export(&s, &raft);
    // Records: the catalog (1-4), then the whole list from the first index (7) on; below it
    // only live keys, and every key written below 7 was overwritten or deleted later.
    let record_ids: Vec<u64> = record_lines(&lines)
        .iter()
        .map(|l| changeagent_proto::checkpoint::record_id(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(
        record_ids,
        (1..=4).chain(7..=s.last_id()).collect::<Vec<_>>()
    );

    let (_d2, t) = open();
    append(&t, 1, &[r#"{"data":"to be replaced"}"#; 5]);
    t.import(&file[..], ImportMode::Raft, &[("extra", b"\"y\"")])
        .unwrap();
    assert_eq!(feed(&s), feed(&t));
    assert_eq!(t.first_index(), 7);
    assert_eq!(t.state(), s.state());
    for f in [tags(&["x"]), tags(&["y"])] {
        assert_eq!(page(&s, 6, 100, &f), page(&t, 6, 100, &f));
    }
    for (coll, key) in [(1, "k1"), (1, "k2"), (2, "k1")] {
        assert_eq!(s.get_key(coll, key).unwrap(), t.get_key(coll, key).unwrap());
    }
    assert_eq!(t.manifests(None).unwrap(), s.manifests(None).unwrap());
    assert_eq!(t.open_starts().unwrap(), s.open_starts().unwrap());
    assert_eq!(
        t.begin().idempotent_answer("key-1").unwrap().unwrap(),
        br#"{"_id":5}"#
    );
    assert_eq!(
        t.owner_meta("raft_applied").unwrap().unwrap(),
        br#"{"index":42}"#
    );
    assert_eq!(t.owner_meta("extra").unwrap().unwrap(), b"\"y\"");
    // The next id continues after the imported state.
    assert_eq!(append(&t, 100, &[r#"{"data":3}"#]), vec![s.last_id() + 1]);
    // The imported state survives a restart.
    let path = t.path().to_path_buf();
    let before = feed(&t);
    drop(t);
    assert_eq!(feed(&Store::open(&path).unwrap()), before);
}

#[test]
fn a_broken_checkpoint_changes_nothing_and_leaves_no_files() {
    let (_d, s) = populated();
    let (file, _) = export(&s, &ExportOptions::default());
    let (dir, t) = open();
    append(&t, 1, &[r#"{"data":"kept"}"#]);
    let before = feed(&t);
    let cut = &file[..file.len() / 2];
    assert!(t.import(cut, ImportMode::Everything, &[]).is_err());
    let mut corrupt = file.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    assert!(t.import(&corrupt[..], ImportMode::Everything, &[]).is_err());
    assert_eq!(feed(&t), before);
    let generations: Vec<String> = std::fs::read_dir(dir.path().join("db"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(generations.len(), 1, "{generations:?}");
    // A good one then imports, and the replaced generation is removed.
    t.import(&file[..], ImportMode::Everything, &[]).unwrap();
    let generations = std::fs::read_dir(dir.path().join("db"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("gen-")
        })
        .count();
    assert_eq!(generations, 1);
}

#[test]
fn importing_a_checkpoint_gives_a_consumer_the_same_state() {
    let (_d, s) = populated();
    let (file, lines) = export(&s, &ExportOptions::default());
    // Everything: a checkpointer's copy; every record joins the list.
    let (_d2, everything) = open();
    everything
        .import(&file[..], ImportMode::Everything, &[])
        .unwrap();
    assert_eq!(feed(&everything), record_lines(&lines));
    // State only: a restored cluster; the list starts after the checkpoint.
    let (_d3, restored) = open();
    restored
        .import(&file[..], ImportMode::StateOnly, &[])
        .unwrap();
    assert_eq!(restored.first_index(), 13);
    assert_eq!(restored.last_id(), 12);
    assert!(restored.cluster_id().is_none());
    assert!(feed(&restored).is_empty());
    for st in [&everything, &restored] {
        assert_eq!(st.tenants(), s.tenants());
        for (coll, key) in [(1, "k1"), (1, "k2"), (2, "k1")] {
            assert_eq!(
                s.get_key(coll, key).unwrap(),
                st.get_key(coll, key).unwrap()
            );
        }
        // Ids continue after the checkpoint; the catalog's next ids too.
        let mut txn = st.begin();
        assert_eq!(txn.create_tenant(99, "gamma").unwrap().id, 3);
        assert_eq!(
            txn.append(99, &[change(r#"{"data":1}"#)]).unwrap(),
            vec![14]
        );
    }
    // Reading the lines back checks them.
    let text = zstd::decode_all(&file[..]).unwrap();
    let mut reader = LineReader::new(&text[..]).unwrap();
    let mut n = 0;
    while let Some(line) = reader.next_line().unwrap() {
        if let Line::Record(_) = line {
            n += 1;
        }
    }
    assert_eq!(n, 9);
}

#[test]
fn only_checkpoint_and_truncate_records_leave_the_state_unmoved() {
    let (_d, s) = populated();
    assert!(s.has_data_after(0).unwrap());
    assert!(!s.has_data_after(12).unwrap());
    commit_checkpoint(&s, 60, "a", 3);
    let mut txn = s.begin();
    txn.truncate(61, 5).unwrap();
    s.commit(txn).unwrap();
    // Start, end and truncate records since 12: nothing a checkpoint holds moved.
    assert!(!s.has_data_after(12).unwrap());
    let mut txn = s.begin();
    txn.create_tenant(62, "delta").unwrap();
    s.commit(txn).unwrap();
    assert!(s.has_data_after(12).unwrap());
}

/// A page read from the tail cache alone, as `(json array, more)`; `None` when the cache
/// does not reach back.
fn cached_page(s: &Store, since: u64, limit: usize, filter: &Filter) -> Option<(Vec<u8>, bool)> {
    let mut out = b"[".to_vec();
    let info = s.read_page_cached(since, limit, filter, &mut out)?.unwrap();
    out.push(b']');
    Some((out, info.more))
}

fn store_page(s: &Store, since: u64, limit: usize, filter: &Filter) -> (Vec<u8>, bool) {
    let mut out = b"[".to_vec();
    let info = s.read_page(since, limit, filter, &mut out).unwrap();
    out.push(b']');
    (out, info.more)
}

#[test]
fn woken_long_polls_read_the_tail_cache_with_the_stores_bytes() {
    let (_d, s) = populated();
    let acme = Filter {
        tenant: Some(1),
        ..Filter::default()
    };
    for since in [0, 4, 7, 11, 12] {
        for limit in [1, 2, 100] {
            for f in [Filter::default(), tags(&["x", "y"]), acme.clone()] {
                assert_eq!(
                    cached_page(&s, since, limit, &f),
                    Some(store_page(&s, since, limit, &f)),
                    "since {since} limit {limit} filter {f:?}"
                );
            }
        }
    }
    // After a truncation the cache answers 410 like the store.
    let m = commit_checkpoint(&s, 30, "c1", 2);
    let mut txn = s.begin();
    txn.truncate(31, m.index - 2).unwrap();
    s.commit(txn).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        s.read_page_cached(1, 10, &Filter::default(), &mut out),
        Some(Err(Error::Rejected(Rejection::Truncated { .. })))
    ));
    // An import replaces the generation: the cache starts over and the store answers.
    let (file, _) = export(&s, &ExportOptions::default());
    s.import(&file[..], ImportMode::Everything, &[]).unwrap();
    assert!(s
        .read_page_cached(s.last_id() - 1, 10, &Filter::default(), &mut out)
        .is_none());
    append(&s, 40, &[r#"{"data":"after"}"#]);
    let last = s.last_id();
    assert_eq!(
        cached_page(&s, last - 1, 10, &Filter::default()),
        Some(store_page(&s, last - 1, 10, &Filter::default()))
    );
}

fn apply_upstream_lines(edge: &Store, lines: &[String]) -> Vec<changeagent_store::Applied> {
    let mut txn = edge.begin();
    let applied = lines
        .iter()
        .map(|l| txn.apply_upstream(l.as_bytes()).unwrap())
        .collect();
    edge.commit(txn).unwrap();
    applied
}

#[test]
fn a_replica_starts_its_list_where_the_upstream_does_and_follows_its_housekeeping() {
    use changeagent_store::{Applied, Replica};
    let (_d, up) = populated();
    let (file, _) = export(&up, &ExportOptions::default()); // the checkpoint at 12
    let m = commit_checkpoint(&up, 30, "c1", 1); // 13 start, 14 end
    append(&up, 31, &[r#"{"data":"after the checkpoint"}"#]); // 15
    let mut txn = up.begin();
    txn.truncate(32, 7).unwrap(); // 16: the list now starts at 7
    up.commit(txn).unwrap();
    let upstream = feed(&up);
    let id = |l: &String| changeagent_proto::checkpoint::record_id(l.as_bytes()).unwrap();
    let lines = |from: u64, to: u64| -> Vec<String> {
        upstream
            .iter()
            .filter(|l| (from..=to).contains(&id(l)))
            .cloned()
            .collect()
    };
    let kept = up.manifests(None).unwrap();

    // A retained run that does not end at the checkpoint is refused; nothing changes.
    let (_d2, edge) = open();
    let short: String = lines(7, 11).iter().map(|l| format!("{l}\n")).collect();
    let refused = edge.import_replica(
        &file[..],
        Replica {
            retained: &mut short.as_bytes(),
            manifests: &kept,
            cluster_id: "cid",
        },
    );
    assert!(refused.is_err());
    assert_eq!((edge.last_id(), edge.first_index()), (0, 1));

    // The checkpoint plus the upstream's list from 7 to 12: the same list from 7.
    let retained: String = lines(7, 12).iter().map(|l| format!("{l}\n")).collect();
    edge.import_replica(
        &file[..],
        Replica {
            retained: &mut retained.as_bytes(),
            manifests: &kept,
            cluster_id: "cid",
        },
    )
    .unwrap();
    assert_eq!((edge.first_index(), edge.last_id()), (7, 12));
    assert_eq!(edge.cluster_id().as_deref(), Some("cid"));
    assert_eq!(edge.manifests(None).unwrap(), kept);
    let applied = apply_upstream_lines(&edge, &lines(13, 16));
    assert_eq!(applied[1], Applied::CheckpointEnd(m));
    assert_eq!(applied[3], Applied::Truncate { before: 7 });
    assert_eq!(feed(&edge), feed(&up));
    assert_eq!(edge.tenants(), up.tenants());
    for (coll, key) in [(1, "k1"), (1, "k2"), (2, "k1")] {
        assert_eq!(
            edge.get_key(coll, key).unwrap(),
            up.get_key(coll, key).unwrap()
        );
    }
    for f in [tags(&["x"]), tags(&["y"])] {
        assert_eq!(page(&edge, 6, 100, &f), page(&up, 6, 100, &f));
    }

    // The upstream checkpoints and truncates again; the replica follows.
    commit_checkpoint(&up, 40, "c1", 1); // 17, 18
    let mut txn = up.begin();
    txn.truncate(41, 15).unwrap(); // 19
    up.commit(txn).unwrap();
    let upstream = feed(&up);
    let tail: Vec<String> = upstream.iter().filter(|l| id(l) > 16).cloned().collect();
    apply_upstream_lines(&edge, &tail);
    assert_eq!(edge.first_index(), 15);
    assert_eq!(feed(&edge), feed(&up));
    // The replica keeps what the upstream keeps once told (its keep decides).
    let mut txn = edge.begin();
    txn.set_manifests(&up.manifests(None).unwrap()).unwrap();
    edge.commit(txn).unwrap();
    assert_eq!(edge.manifests(None).unwrap(), up.manifests(None).unwrap());
}

/// Record lines from elsewhere (a checkpoint file, an upstream's feed) meet the limits of a
/// posted change: the stored header keeps tag counts and lengths in 16 bits, so a longer
/// tag would be stored cut.
#[test]
fn records_over_the_change_limits_are_refused_from_files_and_upstreams() {
    let long_tag = "t".repeat(65_536 + 10);
    let too_many: Vec<String> = (0..=changeagent_proto::limits::MAX_TAGS)
        .map(|i| format!("t{i}"))
        .collect();
    let bad_tags = [
        serde_json::to_string(&[&long_tag]).unwrap(),
        serde_json::to_string(&too_many).unwrap(),
        r#"[""]"#.to_owned(),
    ];
    let (_d, s) = open();
    append(&s, 1, &[r#"{"data":1,"tags":["short"]}"#]);
    let good = feed(&s).pop().unwrap();
    for tags in &bad_tags {
        let line = good.replace(r#"["short"]"#, tags);
        assert_ne!(line, good);
        let (_d, t) = open();
        let mut txn = t.begin();
        for result in [
            txn.apply_record(line.as_bytes(), true),
            txn.apply_upstream(line.as_bytes()).map(|_| 1),
            txn.apply_next(1, line.as_bytes(), changeagent_store::Follow::Copy)
                .map(|_| 1),
        ] {
            match result {
                Err(Error::BadRecord { id: 1, detail }) => {
                    assert!(detail.contains("tags"), "{detail}")
                }
                other => panic!("a record with tags {:.40} was not refused: {other:?}", tags),
            }
        }
        drop(txn);
        assert!(feed(&t).is_empty());

        // The same record in a checkpoint file: the import fails and changes nothing.
        let (_, lines) = export(&s, &ExportOptions::default());
        let text: String = lines
            .iter()
            .map(|l| if *l == good { line.clone() } else { l.clone() } + "\n")
            .collect();
        let file = zstd::encode_all(text.as_bytes(), 1).unwrap();
        let err = t
            .import(&file[..], ImportMode::Everything, &[])
            .unwrap_err();
        assert!(err.to_string().contains("tags"), "{err}");
        assert!(feed(&t).is_empty());
    }

    // A key over the limit, in a keyed record of a replica that has the catalog.
    let (_d, k) = populated();
    let lines = feed(&k);
    let keyed = lines.iter().find(|l| l.contains(r#""key":"k1""#)).unwrap();
    let long_key = format!(
        r#""key":"{}""#,
        "k".repeat(changeagent_proto::limits::MAX_KEY_BYTES + 1)
    );
    let line = keyed.replace(r#""key":"k1""#, &long_key);
    let (_d, t) = open();
    let mut txn = t.begin();
    for catalog in &lines[..4] {
        txn.apply_record(catalog.as_bytes(), true).unwrap();
    }
    match txn.apply_record(line.as_bytes(), true) {
        Err(Error::BadRecord { detail, .. }) => assert!(detail.contains("key"), "{detail}"),
        other => panic!("a record with a key over the limit was not refused: {other:?}"),
    }
}
