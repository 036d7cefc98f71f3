//! Tenants, collections and keyed writes: create/list/get by name and id,
//! conflicts, keyed PUT/POST/GET/DELETE, sorted key listing with
//! `after`/`limit`, and keyed writes showing up in the change feeds.

use changeagent_testkit::{
    change_id, change_ids, change_ts, raw_changes, Api, ServerOptions, ServerProcess,
};
use serde_json::{json, Value};

async fn start() -> (ServerProcess, Api) {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    (server, api)
}

/// Creates a tenant; checks that the answer also carries `tenant` (its id), as the original
/// ChangeAgent answered, and returns the tenant as `GET` shows it (`_id`, `name`).
async fn create_tenant(api: &Api, name: &str) -> Value {
    let mut answer = api
        .post_json("/tenants", &json!({ "name": name }).to_string())
        .await
        .ok_json();
    let seed = answer
        .as_object_mut()
        .and_then(|o| o.remove("tenant"))
        .unwrap_or_else(|| panic!("no \"tenant\" in the answer {answer}"));
    assert_eq!(seed, answer["_id"], "{answer}");
    answer
}

/// Creates a collection; checks that the answer also carries `collection` (its id), as the
/// original ChangeAgent answered, and returns the collection as `GET` shows it.
async fn create_collection(api: &Api, tenant: &str, name: &str) -> Value {
    let mut answer = api
        .post_json(
            &format!("/tenants/{tenant}/collections"),
            &json!({ "name": name }).to_string(),
        )
        .await
        .ok_json();
    let seed = answer
        .as_object_mut()
        .and_then(|o| o.remove("collection"))
        .unwrap_or_else(|| panic!("no \"collection\" in the answer {answer}"));
    assert_eq!(seed, answer["_id"], "{answer}");
    answer
}

fn id_of(v: &Value) -> u64 {
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric _id in {v}"))
}

/// Asserts an error status with a JSON `{"error": "…"}` body.
#[track_caller]
fn assert_error(r: &changeagent_testkit::Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v = r.json();
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: error body without message: {v}"
    );
}

#[tokio::test]
async fn tenants_create_list_get() {
    let (_server, api) = start().await;
    assert_eq!(api.get("/tenants").await.ok_json(), json!([]));

    let acme = create_tenant(&api, "acme").await;
    assert_eq!(acme, json!({"_id": id_of(&acme), "name": "acme"}));
    let beta = create_tenant(&api, "beta.team_2-x").await;
    assert_eq!(beta["name"], "beta.team_2-x");
    assert_ne!(id_of(&acme), id_of(&beta));

    let dup = api.post_json("/tenants", r#"{"name":"acme"}"#).await;
    assert_error(&dup, 409, "duplicate tenant");

    let list = api.get("/tenants").await.ok_json();
    let mut want = vec![acme.clone(), beta.clone()];
    want.sort_by_key(id_of);
    assert_eq!(list, Value::Array(want));

    assert_eq!(api.get("/tenants/acme").await.ok_json(), acme);
    assert_eq!(
        api.get(&format!("/tenants/{}", id_of(&acme)))
            .await
            .ok_json(),
        acme
    );
    assert_eq!(api.get("/tenants/beta.team_2-x").await.ok_json(), beta);
    assert_error(&api.get("/tenants/nope").await, 404, "unknown tenant name");
    assert_error(&api.get("/tenants/98765").await, 404, "unknown tenant id");
}

#[tokio::test]
async fn collections_create_list_get() {
    let (_server, api) = start().await;
    let acme = create_tenant(&api, "acme").await;
    create_tenant(&api, "beta").await;

    let flags = create_collection(&api, "acme", "flags").await;
    assert_eq!(
        flags,
        json!({"_id": id_of(&flags), "name": "flags", "tenant": "acme"})
    );
    // By tenant id too.
    let users = create_collection(&api, &id_of(&acme).to_string(), "users").await;
    assert_eq!(users["tenant"], "acme");
    assert_error(
        &api.post_json("/tenants/acme/collections", r#"{"name":"flags"}"#)
            .await,
        409,
        "duplicate collection",
    );
    // Names are unique per tenant only.
    let beta_flags = create_collection(&api, "beta", "flags").await;
    assert_eq!(beta_flags["tenant"], "beta");
    assert_ne!(id_of(&beta_flags), id_of(&flags));

    let mut want = vec![flags.clone(), users.clone()];
    want.sort_by_key(id_of);
    assert_eq!(
        api.get("/tenants/acme/collections").await.ok_json(),
        Value::Array(want)
    );
    assert_eq!(
        api.get("/tenants/beta/collections").await.ok_json(),
        json!([beta_flags.clone()])
    );

    assert_eq!(
        api.get(&format!("/collections/{}", id_of(&flags)))
            .await
            .ok_json(),
        flags
    );
    assert_eq!(api.get("/collections/users").await.ok_json(), users);
    // "flags" exists in two tenants: ambiguous by name.
    assert_error(
        &api.get("/collections/flags").await,
        409,
        "ambiguous collection name",
    );
    assert_error(
        &api.get("/collections/nope").await,
        404,
        "unknown collection",
    );
    assert_error(
        &api.get("/collections/98765").await,
        404,
        "unknown collection id",
    );
    assert_error(
        &api.post_json("/tenants/nope/collections", r#"{"name":"x"}"#)
            .await,
        404,
        "collection in unknown tenant",
    );
    assert_error(
        &api.get("/tenants/nope/collections").await,
        404,
        "collections of unknown tenant",
    );
}

#[tokio::test]
async fn keyed_put_post_get_delete() {
    let (_server, api) = start().await;
    create_tenant(&api, "acme").await;
    let coll = id_of(&create_collection(&api, "acme", "flags").await);

    let put = api
        .put_json("/collections/flags/keys/dark-mode", r#"{"on" : true}"#)
        .await;
    let id1 = id_of(&put.ok_json());
    let got = api.get("/collections/flags/keys/dark-mode").await;
    got.expect_status(200);
    let ts = change_ts(&got.text());
    let want = format!(
        r#"{{"_id":{id1},"_ts":{ts},"tenant":"acme","collection":"flags","key":"dark-mode","data":{{"on":true}}}}"#
    );
    assert_eq!(got.text(), want);
    // The same change, byte for byte, in the feed.
    assert_eq!(api.get(&format!("/changes/{id1}")).await.text(), want);

    // Upsert by collection id.
    let id2 = id_of(
        &api.put_json(
            &format!("/collections/{coll}/keys/dark-mode"),
            r#"{"on":false}"#,
        )
        .await
        .ok_json(),
    );
    assert!(id2 > id1);
    let v = api
        .get(&format!("/collections/{coll}/keys/dark-mode"))
        .await
        .ok_json();
    assert_eq!(v["_id"], id2);
    assert_eq!(v["data"], json!({"on": false}));

    // POST form with tags.
    let id3 = id_of(
        &api.post_json(
            "/collections/flags/keys",
            r#"{"key":"beta","data":[1,2],"tags":["t"]}"#,
        )
        .await
        .ok_json(),
    );
    let got = api.get("/collections/flags/keys/beta").await;
    let ts = change_ts(&got.text());
    assert_eq!(
        got.text(),
        format!(
            r#"{{"_id":{id3},"_ts":{ts},"tags":["t"],"tenant":"acme","collection":"flags","key":"beta","data":[1,2]}}"#
        )
    );

    // Keys with characters that need escaping in a URL.
    let id4 = id_of(
        &api.put_json("/collections/flags/keys/hello%20w%C3%B6rld", "1")
            .await
            .ok_json(),
    );
    let v = api
        .get("/collections/flags/keys/hello%20w%C3%B6rld")
        .await
        .ok_json();
    assert_eq!(v["_id"], id4);
    assert_eq!(v["key"], "hello wörld");

    // Delete.
    let last = api.last_index().await;
    let del = id_of(
        &api.delete("/collections/flags/keys/dark-mode")
            .await
            .ok_json(),
    );
    assert_eq!(del, last + 1);
    let feed = api.get(&format!("/changes/{del}")).await;
    let ts = change_ts(&feed.text());
    assert_eq!(
        feed.text(),
        format!(
            r#"{{"_id":{del},"_ts":{ts},"tenant":"acme","collection":"flags","key":"dark-mode","deleted":true}}"#
        )
    );
    assert_error(
        &api.get("/collections/flags/keys/dark-mode").await,
        404,
        "deleted key",
    );
    assert_error(
        &api.delete("/collections/flags/keys/dark-mode").await,
        404,
        "delete of deleted key",
    );
    assert_eq!(api.last_index().await, del, "a 404 delete appended");
    assert_error(
        &api.get("/collections/flags/keys/never").await,
        404,
        "absent key",
    );
    assert_error(
        &api.delete("/collections/flags/keys/never").await,
        404,
        "delete of absent key",
    );
    assert_error(
        &api.get("/collections/nope/keys/x").await,
        404,
        "key in unknown collection",
    );
    assert_error(
        &api.put_json("/collections/nope/keys/x", "1").await,
        404,
        "put in unknown collection",
    );
    assert_eq!(api.last_index().await, del, "a 404 write appended");

    // A deleted key can be written again.
    let again = id_of(
        &api.put_json("/collections/flags/keys/dark-mode", r#""back""#)
            .await
            .ok_json(),
    );
    assert_eq!(
        api.get("/collections/flags/keys/dark-mode").await.ok_json()["_id"],
        again
    );
}

#[tokio::test]
async fn keyed_writes_through_post_changes() {
    let (_server, api) = start().await;
    create_tenant(&api, "acme").await;
    let coll = id_of(&create_collection(&api, "acme", "flags").await);

    let id = api
        .post_change(r#"{"tenant":"acme","collection":"flags","key":"k","data":1}"#)
        .await;
    let v = api.get("/collections/flags/keys/k").await.ok_json();
    assert_eq!(v["_id"], id);
    // Collection by id in the body.
    let id2 = api
        .post_change(
            &json!({"tenant": "acme", "collection": coll.to_string(), "key": "k", "data": 2})
                .to_string(),
        )
        .await;
    let v = api.get("/collections/flags/keys/k").await.ok_json();
    assert_eq!(v["_id"], id2);
    assert_eq!(v["data"], 2);
    assert_eq!(v["collection"], "flags");
    let id3 = api
        .post_change(r#"{"tenant":"acme","collection":"flags","key":"k","deleted":true}"#)
        .await;
    assert_eq!(api.get("/collections/flags/keys/k").await.status, 404);
    assert_eq!(id3, id2 + 1);
}

#[tokio::test]
async fn key_listing_is_sorted_and_paged() {
    let (_server, api) = start().await;
    create_tenant(&api, "acme").await;
    create_collection(&api, "acme", "flags").await;
    create_collection(&api, "acme", "other").await;
    let mut latest = std::collections::BTreeMap::new();
    for (key, data) in [
        ("d", 1),
        ("b", 2),
        ("a", 3),
        ("e", 4),
        ("c", 5),
        ("c", 6),
        ("b", 7),
    ] {
        let id = id_of(
            &api.put_json(&format!("/collections/flags/keys/{key}"), &data.to_string())
                .await
                .ok_json(),
        );
        latest.insert(key, (id, data));
    }
    api.put_json("/collections/other/keys/aa", "0")
        .await
        .expect_status(200);

    let keys_of = |v: &Value| -> Vec<(String, u64, Value)> {
        v.as_array()
            .unwrap_or_else(|| panic!("key listing is not an array: {v}"))
            .iter()
            .map(|c| {
                (
                    c["key"].as_str().expect("key").to_string(),
                    id_of(c),
                    c["data"].clone(),
                )
            })
            .collect()
    };
    let want = |keys: &[&str]| -> Vec<(String, u64, Value)> {
        keys.iter()
            .map(|k| {
                let (id, data) = latest[k];
                (k.to_string(), id, json!(data))
            })
            .collect()
    };

    assert_eq!(
        keys_of(&api.get("/collections/flags/keys").await.ok_json()),
        want(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(
        keys_of(&api.get("/collections/flags/keys?limit=2").await.ok_json()),
        want(&["a", "b"])
    );
    assert_eq!(
        keys_of(
            &api.get("/collections/flags/keys?after=b&limit=2")
                .await
                .ok_json()
        ),
        want(&["c", "d"])
    );
    assert_eq!(
        keys_of(&api.get("/collections/flags/keys?after=d").await.ok_json()),
        want(&["e"])
    );
    assert_eq!(
        keys_of(&api.get("/collections/flags/keys?after=bb").await.ok_json()),
        want(&["c", "d", "e"])
    );
    assert_eq!(
        keys_of(&api.get("/collections/flags/keys?after=e").await.ok_json()),
        want(&[])
    );

    // Each listed entry is the full latest change.
    let listed = api.get("/collections/flags/keys?limit=1").await.ok_json();
    let single = api.get("/collections/flags/keys/a").await.ok_json();
    assert_eq!(listed[0], single);

    api.delete("/collections/flags/keys/b")
        .await
        .expect_status(200);
    assert_eq!(
        keys_of(&api.get("/collections/flags/keys").await.ok_json()),
        want(&["a", "c", "d", "e"])
    );
    assert_eq!(
        keys_of(&api.get("/collections/other/keys").await.ok_json())[0].0,
        "aa"
    );
    assert_error(
        &api.get("/collections/nope/keys").await,
        404,
        "listing of unknown collection",
    );
}

#[tokio::test]
async fn keyed_writes_appear_in_the_feeds() {
    let (_server, api) = start().await;
    create_tenant(&api, "acme").await;
    create_tenant(&api, "beta").await;
    create_collection(&api, "acme", "flags").await;
    create_collection(&api, "beta", "stuff").await;

    let k1 = id_of(
        &api.put_json("/collections/flags/keys/one", "1")
            .await
            .ok_json(),
    );
    let b1 = id_of(
        &api.put_json("/collections/stuff/keys/x", "2")
            .await
            .ok_json(),
    );
    let t1 = id_of(
        &api.post_json("/tenants/acme/changes", r#"{"data":"tenant-post"}"#)
            .await
            .ok_json(),
    );
    let u1 = api.post_change(r#"{"data":"untenanted"}"#).await;
    let k2 = id_of(
        &api.post_json("/collections/flags/keys", r#"{"key":"two","data":3}"#)
            .await
            .ok_json(),
    );
    let k3 = id_of(&api.delete("/collections/flags/keys/one").await.ok_json());

    let all = api.get(&format!("/changes?since={}", k1 - 1)).await;
    let ids = change_ids(&all.body);
    for id in [k1, b1, t1, u1, k2, k3] {
        assert!(ids.contains(&id), "{id} missing from /changes: {ids:?}");
    }

    let tenant_feed = api.get("/tenants/acme/changes").await;
    tenant_feed.expect_status(200);
    let acme_ids = change_ids(&tenant_feed.body);
    assert_eq!(acme_ids, vec![k1, t1, k2, k3]);
    for raw in raw_changes(&tenant_feed.body) {
        let v: Value = serde_json::from_str(&raw).expect("json");
        assert_eq!(v["tenant"], "acme", "{raw}");
        // Same bytes as in the global feed.
        assert_eq!(
            api.get(&format!("/changes/{}", change_id(&raw)))
                .await
                .text(),
            raw
        );
    }
    let by_param = api.get("/changes?tenant=acme").await;
    assert_eq!(change_ids(&by_param.body), acme_ids);
    assert_eq!(
        change_ids(&api.get("/tenants/beta/changes").await.body),
        vec![b1]
    );
    // The tenant feed pages like /changes.
    let page = api.get("/tenants/acme/changes?limit=2").await;
    assert_eq!(change_ids(&page.body), vec![k1, t1]);
    assert_eq!(page.json()["atEnd"], false);
    let next = page.link_next().expect("Link on tenant feed");
    assert_eq!(change_ids(&api.get(&next).await.body), vec![k2, k3]);
    assert_error(
        &api.get("/tenants/nope/changes").await,
        404,
        "feed of unknown tenant",
    );
    assert_error(
        &api.post_json("/tenants/nope/changes", "1").await,
        404,
        "post to unknown tenant",
    );
}

#[tokio::test]
async fn the_catalog_travels_in_the_feed_as_internal_records() {
    let (_server, api) = start().await;
    let acme = create_tenant(&api, "acme").await;
    let flags = create_collection(&api, "acme", "flags").await;
    api.post_change(r#"{"data":1,"tenant":"acme"}"#).await;
    let raws = api.all_raw_changes("").await;
    assert_eq!(raws.len(), 3, "{raws:?}");
    let tenant: Value = serde_json::from_str(&raws[0]).unwrap();
    assert_eq!(tenant["type"], -4);
    assert_eq!(tenant["data"], json!({"_id": id_of(&acme), "name": "acme"}));
    let collection: Value = serde_json::from_str(&raws[1]).unwrap();
    assert_eq!(collection["type"], -5);
    assert_eq!(
        collection["data"],
        json!({"_id": id_of(&flags), "name": "flags", "tenant": "acme"})
    );
    // A tenant's list and filtered lists skip internal records.
    let tenant_list = api.get("/tenants/acme/changes").await;
    assert_eq!(change_ids(&tenant_list.body), vec![3]);
    let by_tenant = api.get("/changes?tenant=acme").await;
    assert_eq!(change_ids(&by_tenant.body), vec![3]);
    // Clients cannot post internal records.
    let refused = api.post_json("/changes", r#"{"data":1,"type":-4}"#).await;
    assert_error(&refused, 400, "negative type");
    assert_eq!(api.last_index().await, 3);
}
