//! `POST /changes` (data form, raw form, batches, Idempotency-Key) and
//! `GET /changes` (paging, byte-exact serialisation, filters, since_time,
//! Link) and `GET /changes/{id}` against the real server binary.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use changeagent_testkit::{
    change_id, change_ids, change_ts, raw_changes, rfc3339_from_nanos, Api, ServerOptions,
    ServerProcess,
};
use serde_json::{json, Value};

async fn start() -> ServerProcess {
    ServerProcess::start_leader(ServerOptions::default()).await
}

fn now_nanos() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after epoch");
    i64::try_from(d.as_nanos()).expect("nanos fit i64")
}

/// The `data` of every change in a `GET /changes` body.
fn datas(v: &Value) -> Vec<Value> {
    v["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes array in {v}"))
        .iter()
        .map(|c| c.get("data").cloned().unwrap_or(Value::Null))
        .collect()
}

async fn create_tenant(api: &Api, name: &str) -> u64 {
    let r = api
        .post_json("/tenants", &json!({ "name": name }).to_string())
        .await;
    let v = r.ok_json();
    assert_eq!(v["name"], name, "{v}");
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("tenant without _id: {v}"))
}

async fn create_collection(api: &Api, tenant: &str, name: &str) -> u64 {
    let r = api
        .post_json(
            &format!("/tenants/{tenant}/collections"),
            &json!({ "name": name }).to_string(),
        )
        .await;
    let v = r.ok_json();
    assert_eq!(v["name"], name, "{v}");
    assert_eq!(v["tenant"], tenant, "{v}");
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("collection without _id: {v}"))
}

#[tokio::test]
async fn empty_store_lists_nothing() {
    let server = start().await;
    let api = server.api();
    let v = api.get("/changes").await.ok_json();
    assert_eq!(
        v,
        json!({"changes": [], "atStart": true, "atEnd": true, "firstIndex": 1, "lastIndex": 0})
    );
    let v = api.get("/changes?since=1000").await.ok_json();
    assert_eq!(v["changes"], json!([]));
    assert_eq!(v["atEnd"], true);
}

#[tokio::test]
async fn data_form_is_stored_compacted_with_key_order_kept() {
    let server = start().await;
    let api = server.api();
    let before = now_nanos();
    let r = api
        .post_json("/changes", r#"{"data": {"b" : 1,  "a":[1, 2]}}"#)
        .await;
    assert_eq!(r.ok_json(), json!({"_id": 1}));
    let after = now_nanos();

    let list = api.get("/changes").await;
    list.expect_status(200);
    assert!(
        list.text().contains(r#""data":{"b":1,"a":[1,2]}"#),
        "data not compacted with key order kept: {}",
        list.text()
    );
    let raws = raw_changes(&list.body);
    assert_eq!(raws.len(), 1, "{}", list.text());
    let ts = change_ts(&raws[0]);
    assert_eq!(
        raws[0],
        format!(r#"{{"_id":1,"_ts":{ts},"data":{{"b":1,"a":[1,2]}}}}"#)
    );
    // `_ts` is the proposal time in nanoseconds (allow for clock skew of the
    // test process reading the clock before and after).
    assert!(
        ts >= before - 5_000_000_000 && ts <= after + 5_000_000_000,
        "_ts {ts} not within the post ({before}..{after})"
    );
    let v = list.json();
    assert_eq!(v["atStart"], true);
    assert_eq!(v["atEnd"], true);
    assert_eq!(v["firstIndex"], 1);
    assert_eq!(v["lastIndex"], 1);

    let one = api.get("/changes/1").await;
    one.expect_status(200);
    assert_eq!(
        one.text(),
        raws[0],
        "GET /changes/1 differs from the list entry"
    );
}

#[tokio::test]
async fn all_fields_are_served_in_canonical_order() {
    let server = start().await;
    let api = server.api();
    create_tenant(&api, "acme").await;
    create_collection(&api, "acme", "flags").await;

    // Fields given in reverse order, with spaces: served in the fixed order
    // `_id, _ts, type, tags, tenant, collection, key, deleted, data`.
    let id = api
        .post_change(
            r#"{ "key": "dark-mode", "collection": "flags", "tenant": "acme", "type": 3,
                 "tags": [ "x", "y" ], "data": { "on" : true } }"#,
        )
        .await;
    let one = api.get(&format!("/changes/{id}")).await;
    one.expect_status(200);
    let ts = change_ts(&one.text());
    assert_eq!(
        one.text(),
        format!(
            r#"{{"_id":{id},"_ts":{ts},"type":3,"tags":["x","y"],"tenant":"acme","collection":"flags","key":"dark-mode","data":{{"on":true}}}}"#
        )
    );

    // A delete needs no data and is served with `"deleted":true`, no data.
    let del = api
        .post_change(r#"{"tenant":"acme","collection":"flags","key":"dark-mode","deleted":true}"#)
        .await;
    assert_eq!(del, id + 1);
    let one = api.get(&format!("/changes/{del}")).await;
    one.expect_status(200);
    let ts = change_ts(&one.text());
    assert_eq!(
        one.text(),
        format!(
            r#"{{"_id":{del},"_ts":{ts},"tenant":"acme","collection":"flags","key":"dark-mode","deleted":true}}"#
        )
    );

    // `type` 0 and empty tags are omitted.
    let plain = api.post_change(r#"{"data":"x","type":0,"tags":[]}"#).await;
    let one = api.get(&format!("/changes/{plain}")).await;
    let ts = change_ts(&one.text());
    assert_eq!(
        one.text(),
        format!(r#"{{"_id":{plain},"_ts":{ts},"data":"x"}}"#)
    );

    // The list serves the same bytes as the single-change route.
    let list = api.get(&format!("/changes?since={}", id - 1)).await;
    let raws = raw_changes(&list.body);
    assert_eq!(raws.len(), 3, "{}", list.text());
    for raw in &raws {
        let single = api.get(&format!("/changes/{}", change_id(raw))).await;
        assert_eq!(&single.text(), raw);
    }
}

#[tokio::test]
async fn raw_form_takes_the_whole_value_as_data() {
    let server = start().await;
    let api = server.api();
    let cases: &[(&str, &str)] = &[
        (r#"{"hello": "world"}"#, r#"{"hello":"world"}"#),
        // Other keys beside known ones: the whole object is data, `tags` is
        // not taken as tags.
        (
            r#"{"hello":"world","tags":["t"]}"#,
            r#"{"hello":"world","tags":["t"]}"#,
        ),
        ("42", "42"),
        (r#" "text" "#, r#""text""#),
        ("true", "true"),
        (
            r#"{"z":{"y":[1,{"x":null}]},"a":1.5}"#,
            r#"{"z":{"y":[1,{"x":null}]},"a":1.5}"#,
        ),
    ];
    for (i, (body, stored)) in cases.iter().enumerate() {
        let id = api.post_change(body).await;
        assert_eq!(id, i as u64 + 1, "ids are dense");
        let one = api.get(&format!("/changes/{id}")).await;
        one.expect_status(200);
        let ts = change_ts(&one.text());
        assert_eq!(
            one.text(),
            format!(r#"{{"_id":{id},"_ts":{ts},"data":{stored}}}"#),
            "posted {body}"
        );
    }
}

#[tokio::test]
async fn batch_is_contiguous_and_atomic() {
    let server = start().await;
    let api = server.api();
    create_tenant(&api, "acme").await;
    let first = api.post_change(r#"{"data":0}"#).await;

    let r = api
        .post_json(
            "/changes",
            r#"[{"data":1},{"data":2,"tags":["t"]},{"raw":3}]"#,
        )
        .await;
    assert_eq!(
        r.ok_json(),
        json!([{"_id": first + 1}, {"_id": first + 2}, {"_id": first + 3}])
    );
    let v = api.get(&format!("/changes?since={first}")).await.ok_json();
    assert_eq!(datas(&v), vec![json!(1), json!(2), json!({"raw": 3})]);
    assert_eq!(v["changes"][1]["tags"], json!(["t"]));
    let last = first + 3;
    assert_eq!(api.last_index().await, last);

    // One invalid item rejects the whole batch; nothing is appended.
    let bad: &[(&str, u16)] = &[
        (r#"[{"data":5},{"data":6,"type":-1}]"#, 400),
        (r#"[{"data":7},{"data":8,"tenant":"no-such-tenant"}]"#, 404),
        (r#"[{"data":9},{"data":10,"key":"k"}]"#, 400),
        ("[]", 400),
    ];
    for (body, status) in bad {
        let r = api.post_json("/changes", body).await;
        assert_eq!(r.status, *status, "POST {body}: {}", r.text());
        assert!(r.json()["error"].is_string(), "POST {body}: {}", r.text());
        assert_eq!(
            api.last_index().await,
            last,
            "POST {body} appended something"
        );
    }

    let r = api
        .post_json("/changes", r#"[{"data":"a"},{"data":"b"}]"#)
        .await;
    assert_eq!(r.ok_json(), json!([{"_id": last + 1}, {"_id": last + 2}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_stay_contiguous() {
    let server = start().await;
    let api = server.api();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for n in 0..5u64 {
                if w % 2 == 0 {
                    let items: Vec<Value> = (0..5)
                        .map(|i| json!({"data": {"w": w, "n": n, "i": i}}))
                        .collect();
                    let r = api
                        .post_json("/changes", &Value::Array(items).to_string())
                        .await;
                    let v = r.ok_json();
                    let ids: Vec<u64> = v
                        .as_array()
                        .unwrap_or_else(|| panic!("batch answer not an array: {v}"))
                        .iter()
                        .map(|x| x["_id"].as_u64().expect("_id"))
                        .collect();
                    assert_eq!(ids.len(), 5);
                    for pair in ids.windows(2) {
                        assert_eq!(pair[1], pair[0] + 1, "batch ids not contiguous: {ids:?}");
                    }
                    got.extend(
                        ids.into_iter()
                            .enumerate()
                            .map(|(i, id)| (id, json!({"w": w, "n": n, "i": i}))),
                    );
                } else {
                    let data = json!({"w": w, "n": n});
                    let id = api.post_change(&json!({ "data": data }).to_string()).await;
                    got.push((id, data));
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("poster task"));
    }
    all.sort_by_key(|(id, _)| *id);
    let ids: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "ids not dense and unique"
    );
    let raws = api.all_raw_changes("").await;
    let served: Vec<(u64, Value)> = raws
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r).expect("change JSON");
            (change_id(r), v["data"].clone())
        })
        .collect();
    assert_eq!(served, all);
}

#[tokio::test]
async fn idempotency_key_returns_first_answer() {
    let server = start().await;
    let api = server.api();
    api.post_change(r#"{"data":"before"}"#).await;

    let post = |key: &'static str, body: &'static str| {
        let api = api.clone();
        async move {
            api.request(
                "POST",
                "/changes",
                Some("application/json"),
                Some(body.as_bytes().to_vec()),
                &[("Idempotency-Key", key)],
            )
            .await
        }
    };

    let first = post("key-1", r#"{"data":"a"}"#).await;
    assert_eq!(first.ok_json(), json!({"_id": 2}));
    let last = api.last_index().await;
    assert_eq!(last, 2);
    for _ in 0..3 {
        let retry = post("key-1", r#"{"data":"a"}"#).await;
        retry.expect_status(200);
        assert_eq!(retry.body, first.body, "retry answered differently");
        assert_eq!(api.last_index().await, last, "retry appended");
    }
    let v = api.get("/changes").await.ok_json();
    assert_eq!(datas(&v), vec![json!("before"), json!("a")]);

    // A different key appends.
    let other = post("key-2", r#"{"data":"a"}"#).await;
    assert_eq!(other.ok_json(), json!({"_id": 3}));
    // No key: every post appends.
    assert_eq!(api.post_change(r#"{"data":"a"}"#).await, 4);
    assert_eq!(api.post_change(r#"{"data":"a"}"#).await, 5);

    // Batches too.
    let batch = post("key-3", r#"[{"data":1},{"data":2}]"#).await;
    assert_eq!(batch.ok_json(), json!([{"_id": 6}, {"_id": 7}]));
    let retry = post("key-3", r#"[{"data":1},{"data":2}]"#).await;
    assert_eq!(retry.body, batch.body);
    assert_eq!(api.last_index().await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_dedups_concurrent_retries() {
    let server = start().await;
    let api = server.api();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            api.request(
                "POST",
                "/changes",
                Some("application/json"),
                Some(br#"{"data":"once"}"#.to_vec()),
                &[("Idempotency-Key", "same-key")],
            )
            .await
        }));
    }
    let mut answers = HashSet::new();
    for t in tasks {
        let r = t.await.expect("task");
        answers.insert(r.ok_json().to_string());
    }
    assert_eq!(
        answers.len(),
        1,
        "concurrent retries got different answers: {answers:?}"
    );
    assert_eq!(
        api.last_index().await,
        1,
        "concurrent retries appended more than once"
    );
}

#[tokio::test]
async fn paging_with_since_limit_and_link() {
    let server = start().await;
    let api = server.api();
    let items: Vec<Value> = (1..=25).map(|i| json!({ "data": i })).collect();
    api.post_json("/changes", &Value::Array(items).to_string())
        .await
        .expect_status(200);

    let p1 = api.get("/changes?since=0&limit=10").await;
    let v = p1.ok_json();
    assert_eq!(change_ids(&p1.body), (1..=10).collect::<Vec<_>>());
    assert_eq!(v["atStart"], true);
    assert_eq!(v["atEnd"], false);
    assert_eq!(v["firstIndex"], 1);
    assert_eq!(v["lastIndex"], 25);
    let cluster = p1.header("x-cluster-id").unwrap_or_default();
    assert!(!cluster.trim().is_empty(), "X-Cluster-Id missing or empty");
    let link = p1
        .link_next()
        .unwrap_or_else(|| panic!("no Link rel=next when not at end: {:?}", p1.headers));
    assert!(
        link.contains("since=10"),
        "Link {link} does not continue after 10"
    );

    let p2 = api.get(&link).await;
    let v = p2.ok_json();
    assert_eq!(
        change_ids(&p2.body),
        (11..=20).collect::<Vec<_>>(),
        "Link {link} lost the limit"
    );
    assert_eq!(v["atStart"], false);
    assert_eq!(v["atEnd"], false);
    let link = p2.link_next().expect("Link on page 2");

    let p3 = api.get(&link).await;
    let v = p3.ok_json();
    assert_eq!(change_ids(&p3.body), (21..=25).collect::<Vec<_>>());
    assert_eq!(v["atEnd"], true);
    assert_eq!(datas(&v), (21..=25).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(
        p3.link_next(),
        None,
        "Link rel=next at end: {:?}",
        p3.headers.get("link")
    );

    // Defaults and bounds.
    let all = api.get("/changes").await;
    assert_eq!(change_ids(&all.body), (1..=25).collect::<Vec<_>>());
    let all = api.get("/changes?limit=10000").await;
    assert_eq!(change_ids(&all.body), (1..=25).collect::<Vec<_>>());
    let mid = api.get("/changes?since=24").await;
    assert_eq!(change_ids(&mid.body), vec![25]);
    assert_eq!(mid.json()["atStart"], false);
    let past = api.get("/changes?since=25").await.ok_json();
    assert_eq!(past["changes"], json!([]));
    assert_eq!(past["atEnd"], true);
}

#[tokio::test]
async fn default_limit_is_100() {
    let server = start().await;
    let api = server.api();
    let items: Vec<Value> = (1..=150).map(|i| json!({ "data": i })).collect();
    api.post_json("/changes", &Value::Array(items).to_string())
        .await
        .expect_status(200);
    let r = api.get("/changes").await;
    assert_eq!(change_ids(&r.body), (1..=100).collect::<Vec<_>>());
    assert_eq!(r.json()["atEnd"], false);
    let next = r.link_next().expect("Link when not at end");
    let r = api.get(&next).await;
    assert_eq!(change_ids(&r.body), (101..=150).collect::<Vec<_>>());
}

#[tokio::test]
async fn tag_type_and_tenant_filters() {
    let server = start().await;
    let api = server.api();
    create_tenant(&api, "acme").await;
    create_tenant(&api, "beta").await;
    let a = api.post_change(r#"{"data":"a","tags":["x"]}"#).await;
    let b = api.post_change(r#"{"data":"b","tags":["y"]}"#).await;
    let c = api.post_change(r#"{"data":"c","tags":["x","z"]}"#).await;
    let d = api.post_change(r#"{"data":"d"}"#).await;
    let e = api
        .post_change(r#"{"data":"e","tags":["z"],"type":5}"#)
        .await;
    let f = api
        .post_change(r#"{"data":"f","type":5,"tenant":"acme"}"#)
        .await;
    let g = api
        .post_change(r#"{"data":"g","tenant":"beta","tags":["x"]}"#)
        .await;
    let ids = [a, b, c, d, e, f, g];
    for pair in ids.windows(2) {
        assert!(pair[1] > pair[0], "ids not increasing: {ids:?}");
    }

    let cases: &[(&str, &[u64])] = &[
        ("tag=x", &[a, c, g]),
        ("tag=x&tag=z", &[a, c, e, g]),
        ("tag=z&tag=x", &[a, c, e, g]),
        ("tag=y&tag=nope", &[b]),
        ("tag=nope", &[]),
        ("type=5", &[e, f]),
        ("tenant=acme", &[f]),
        ("tenant=beta", &[g]),
    ];
    for (query, want) in cases {
        let r = api.get(&format!("/changes?{query}")).await;
        r.expect_status(200);
        assert_eq!(&change_ids(&r.body), want, "GET /changes?{query}");
        assert_eq!(r.json()["atEnd"], true, "GET /changes?{query}");
    }
    let r = api.get(&format!("/changes?tag=x&since={a}")).await;
    assert_eq!(change_ids(&r.body), vec![c, g]);

    // Filtered paging: atEnd means "nothing matching comes after", and the
    // Link keeps the filter.
    let p = api.get("/changes?tag=x&limit=1").await;
    assert_eq!(change_ids(&p.body), vec![a]);
    assert_eq!(p.json()["atEnd"], false);
    let link = p.link_next().expect("Link on filtered page");
    let p = api.get(&link).await;
    assert_eq!(
        change_ids(&p.body),
        vec![c],
        "Link {link} lost the tag filter or limit"
    );
    assert_eq!(p.json()["atEnd"], false);
    let link = p.link_next().expect("Link on filtered page 2");
    let p = api.get(&link).await;
    assert_eq!(change_ids(&p.body), vec![g]);
    assert_eq!(
        p.json()["atEnd"],
        true,
        "only non-matching changes follow g"
    );
    assert_eq!(p.link_next(), None);

    // A tag filter on a page whose only later changes do not match.
    let p = api.get(&format!("/changes?tag=y&since={a}&limit=1")).await;
    assert_eq!(change_ids(&p.body), vec![b]);
    assert_eq!(p.json()["atEnd"], true, "no tag=y change after b");
}

#[tokio::test]
async fn since_time_accepts_nanos_and_rfc3339() {
    let server = start().await;
    let api = server.api();
    let mut ts = Vec::new();
    for i in 1..=3 {
        let id = api.post_change(&json!({ "data": i }).to_string()).await;
        assert_eq!(id, i);
        ts.push(change_ts(&api.get(&format!("/changes/{id}")).await.text()));
    }
    assert!(ts[0] < ts[1] && ts[1] < ts[2], "_ts not increasing: {ts:?}");

    let enc = |s: String| s.replace('+', "%2B").replace(':', "%3A");
    let offset = time::UtcOffset::from_hms(2, 0, 0).expect("offset");
    let ts1_plus2 = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts[1]))
        .expect("ts")
        .to_offset(offset)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    assert!(ts1_plus2.ends_with("+02:00"), "{ts1_plus2}");

    let cases: Vec<(String, Vec<u64>)> = vec![
        (ts[1].to_string(), vec![2, 3]),
        ((ts[1] + 1).to_string(), vec![3]),
        ((ts[2] + 1).to_string(), vec![]),
        ("0".to_string(), vec![1, 2, 3]),
        (enc(rfc3339_from_nanos(ts[1])), vec![2, 3]),
        (enc(rfc3339_from_nanos(ts[1] + 1)), vec![3]),
        (enc(ts1_plus2), vec![2, 3]),
        (enc("1970-01-01T00:00:00Z".to_string()), vec![1, 2, 3]),
    ];
    for (param, want) in cases {
        let r = api.get(&format!("/changes?since_time={param}")).await;
        assert_eq!(r.status, 200, "since_time={param}: {}", r.text());
        assert_eq!(change_ids(&r.body), want, "since_time={param}");
    }
}

#[tokio::test]
async fn get_change_by_id() {
    let server = start().await;
    let api = server.api();
    let id = api.post_change(r#"{"data":{"k":"v"},"tags":["t"]}"#).await;
    let r = api.get(&format!("/changes/{id}")).await;
    r.expect_status(200);
    let v = r.json();
    assert_eq!(v["_id"], id);
    assert_eq!(v["data"], json!({"k": "v"}));
    assert_eq!(v["tags"], json!(["t"]));

    for (path, status) in [
        ("/changes/2", 404),
        ("/changes/99999", 404),
        ("/changes/abc", 400),
        ("/changes/-1", 400),
    ] {
        let r = api.get(path).await;
        assert_eq!(r.status, status, "GET {path}: {}", r.text());
        let v = r.json();
        assert!(
            v["error"].as_str().is_some_and(|s| !s.is_empty()),
            "GET {path}: no error message: {v}"
        );
    }
}
