//! Unit tests of the change store against a real RocksDB in a temp dir.

use std::sync::Arc;

use changeagent_store::export::ExportOptions;
use changeagent_store::{parse_post_body, ChangeInput, Error, Filter, Rejection, Store};
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
    txn.create_tenant("acme").unwrap();
    s.commit(txn).unwrap();
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
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["a"])).0), vec![1, 3]);
    // Several tags: any of them, each change once, in order.
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["b", "a"])).0), vec![1, 2, 3]);
    assert_eq!(ids(&page(&s, 1, 10, &tags(&["b", "a"])).0), vec![2, 3]);
    assert_eq!(ids(&page(&s, 0, 10, &tags(&["zzz"])).0), Vec::<u64>::new());
    let by_type = Filter {
        change_type: Some(5),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 10, &by_type).0), vec![3, 4]);
    let by_tenant = Filter {
        tenant: Some(1),
        ..Filter::default()
    };
    assert_eq!(ids(&page(&s, 0, 10, &by_tenant).0), vec![4]);
    let combined = Filter {
        tags: vec!["b".into()],
        change_type: Some(5),
        tenant: None,
    };
    assert_eq!(ids(&page(&s, 0, 10, &combined).0), vec![3]);
    // limit + more with a filter
    let (v, more) = page(&s, 0, 1, &tags(&["a", "b"]));
    assert_eq!(ids(&v), vec![1]);
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
    txn.create_tenant("acme").unwrap();
    let c = txn.create_collection("acme", "flags").unwrap();
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
    assert_eq!(s.last_id(), 5);
}

#[test]
fn catalog_names_conflict_and_resolve() {
    let (_d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant("acme").unwrap();
    assert!(matches!(
        txn.create_tenant("acme"),
        Err(Error::Rejected(Rejection::TenantExists(_)))
    ));
    txn.create_tenant("other").unwrap();
    txn.create_collection("acme", "flags").unwrap();
    txn.create_collection("other", "flags").unwrap();
    assert!(matches!(
        txn.create_collection("acme", "flags"),
        Err(Error::Rejected(Rejection::CollectionExists { .. }))
    ));
    assert!(matches!(
        txn.create_collection("nobody", "x"),
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
fn reopen_keeps_everything_and_rejects_unknown_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let s = Store::open(&path).unwrap();
        let mut txn = s.begin();
        txn.create_tenant("acme").unwrap();
        txn.set_cluster_id("cid").unwrap();
        s.commit(txn).unwrap();
        append(&s, 5, &[r#"{"data":{"x":1},"tags":["t"],"tenant":"acme"}"#]);
    }
    {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.last_id(), 1);
        assert_eq!(s.cluster_id().as_deref(), Some("cid"));
        assert_eq!(s.tenant("acme").unwrap().id, 1);
        assert_eq!(ids(&page(&s, 0, 10, &tags(&["t"])).0), vec![1]);
        assert_eq!(append(&s, 6, &[r#"{"data":2}"#]), vec![2]);
    }
    // Bump the stored format version behind the store's back.
    {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(&meta, b"format_version", 99u32.to_be_bytes())
            .unwrap();
    }
    match Store::open(&path) {
        Err(Error::UnsupportedFormat { found: 99, .. }) => {}
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
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

#[test]
fn export_import_roundtrip() {
    let (_d, s) = open();
    let mut txn = s.begin();
    txn.create_tenant("acme").unwrap();
    txn.create_collection("acme", "flags").unwrap();
    txn.set_cluster_id("cid").unwrap();
    txn.remember_idempotent("k1", 1, br#"{"_id":1}"#.to_vec())
        .unwrap();
    s.commit(txn).unwrap();
    append(
        &s,
        1,
        &[
            r#"{"data":{"b":1,"a":2},"tags":["x"]}"#,
            r#"{"collection":"flags","key":"k","data":"v"}"#,
        ],
    );
    let mut file = Vec::new();
    let header = s
        .export(
            &mut file,
            ExportOptions {
                idempotency: true,
                owner: false,
            },
        )
        .unwrap();
    assert_eq!(header.index, 2);
    assert_eq!(header.records, 2);
    assert_eq!(header.idempotency_keys, 1);

    let (_d2, t) = open();
    append(&t, 1, &[r#"{"data":"to be replaced"}"#; 5]);
    t.import(std::io::Cursor::new(&file), &[("x", b"y")])
        .unwrap();
    assert_eq!(t.last_id(), 2);
    assert_eq!(t.cluster_id().as_deref(), Some("cid"));
    assert_eq!(t.owner_meta("x").unwrap().as_deref(), Some(&b"y"[..]));
    let all = |st: &Store| {
        let mut out = Vec::new();
        st.read_page(0, 100, &Filter::default(), &mut out).unwrap();
        out
    };
    assert_eq!(all(&s), all(&t));
    assert_eq!(ids(&page(&t, 0, 10, &tags(&["x"])).0), vec![1]);
    let c = t.collection("flags").unwrap();
    assert!(t.get_key(c.id, "k").unwrap().is_some());
    let txn = t.begin();
    assert_eq!(
        txn.idempotent_answer("k1").unwrap().unwrap(),
        br#"{"_id":1}"#
    );
    // The next id continues after the imported state.
    drop(txn);
    assert_eq!(append(&t, 2, &[r#"{"data":3}"#]), vec![3]);

    // A truncated file is refused and leaves the state alone.
    let cut = &file[..file.len() / 2];
    assert!(t.import(std::io::Cursor::new(cut), &[]).is_err());
    assert_eq!(t.last_id(), 3);
}
