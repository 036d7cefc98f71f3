//! The client library against the real server: every route family through `Client`, typed
//! errors, idempotent retries, and `follow` resuming after a server restart.

use std::time::Duration;

use changeagent_client::{Client, Error, FollowEvent, NewChange, Query};
use changeagent_testkit::{ServerOptions, ServerProcess};
use futures::StreamExt;
use serde_json::json;

fn client(server: &ServerProcess) -> Client {
    Client::builder([server.url()])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

#[tokio::test]
async fn client_covers_the_change_api() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let c = client(&server);

    let first = c
        .post_change(&NewChange::data(json!({"n": 1})).with_tags(["a"]))
        .await
        .unwrap();
    assert_eq!(first.id, 1);
    let raw = c.post_raw(&json!({"plain": true})).await.unwrap();
    assert_eq!(raw.id, 2);
    let batch = c
        .post_batch(&[NewChange::data(json!(3)), NewChange::data(json!(4))])
        .await
        .unwrap();
    assert_eq!(batch.iter().map(|p| p.id).collect::<Vec<_>>(), vec![3, 4]);
    let again = c
        .post_change_idempotent("same-key", &NewChange::data(json!(5)))
        .await
        .unwrap();
    let retried = c
        .post_change_idempotent("same-key", &NewChange::data(json!(5)))
        .await
        .unwrap();
    assert_eq!(again, retried);

    let all = c.get_changes(&Query::new().limit(10)).await.unwrap();
    assert_eq!(all.changes.len(), 5);
    assert_eq!(all.last_index, 5);
    assert!(all.at_start && all.at_end);
    assert_eq!(all.changes[1].data, Some(json!({"plain": true})));
    let tagged = c.get_changes(&Query::new().tag("a")).await.unwrap();
    assert_eq!(tagged.changes.len(), 1);
    assert_eq!(tagged.changes[0].tags, vec!["a"]);
    assert_eq!(c.get_change(4).await.unwrap().data, Some(json!(4)));
    assert!(c.get_change(99).await.unwrap_err().is_not_found());

    let bad = c
        .post_change(&NewChange {
            change_type: -1,
            ..NewChange::data(json!(1))
        })
        .await
        .unwrap_err();
    assert!(bad.is_bad_request(), "{bad:?}");

    let health = c.health().await.unwrap();
    assert_eq!(health.role, "leader");
    assert_eq!(health.last_index, 5);
    assert!(c
        .metrics()
        .await
        .unwrap()
        .contains("changeagent_http_requests_total"));
}

#[tokio::test]
async fn client_covers_tenants_collections_and_keys() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let c = client(&server);

    let t = c.create_tenant("acme").await.unwrap();
    assert!(matches!(c.create_tenant("acme").await, Err(e) if e.is_conflict()));
    assert_eq!(c.list_tenants().await.unwrap(), vec![t.clone()]);
    assert_eq!(c.get_tenant(&t.id.to_string()).await.unwrap(), t);
    let col = c.create_collection("acme", "flags").await.unwrap();
    assert_eq!(col.tenant, "acme");
    assert_eq!(c.list_collections("acme").await.unwrap(), vec![col.clone()]);
    assert_eq!(c.get_collection("flags").await.unwrap(), col);

    c.put_key("flags", "b", &json!({"on": true})).await.unwrap();
    c.post_key(
        "flags",
        &changeagent_client::KeyWrite {
            key: "a".into(),
            data: json!(1),
            tags: vec![],
        },
    )
    .await
    .unwrap();
    let b = c.get_key("flags", "b").await.unwrap();
    assert_eq!(b.data, Some(json!({"on": true})));
    assert_eq!(b.tenant.as_deref(), Some("acme"));
    let keys = c.list_keys("flags", None, None).await.unwrap();
    let names: Vec<_> = keys.iter().filter_map(|k| k.key.clone()).collect();
    assert_eq!(names, vec!["a", "b"]);
    c.delete_key("flags", "b").await.unwrap();
    assert!(c.get_key("flags", "b").await.unwrap_err().is_not_found());
    let tenant_feed = c.get_tenant_changes("acme", &Query::new()).await.unwrap();
    assert_eq!(tenant_feed.changes.len(), 3);
    assert!(tenant_feed.changes[2].deleted);
    assert!(c.get_tenant("nobody").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn follow_streams_in_order_and_resumes_after_a_restart() {
    let mut server = ServerProcess::start_leader(ServerOptions::default()).await;
    let c = client(&server);
    for i in 1..=3 {
        c.post_change(&NewChange::data(json!(i))).await.unwrap();
    }
    let mut follow = Box::pin(c.follow(0, Query::new()));
    for want in 1..=3u64 {
        let FollowEvent::Change(got) = follow.next().await.unwrap().unwrap() else {
            panic!("expected a change")
        };
        assert_eq!(got.id, want);
    }
    // The server restarts on a new port: a follower for the new address resumes from where
    // the first one stopped, with nothing repeated or skipped.
    server.kill9();
    server.restart_leader().await;
    let c2 = client(&server);
    c2.post_change(&NewChange::data(json!(4))).await.unwrap();
    let mut follow = Box::pin(c2.follow(3, Query::new()));
    let FollowEvent::Change(got) = tokio::time::timeout(Duration::from_secs(30), follow.next())
        .await
        .expect("follow yields the change posted after the restart")
        .unwrap()
        .unwrap()
    else {
        panic!("expected a change")
    };
    assert_eq!(got.id, 4);
    assert_eq!(got.data, Some(json!(4)));
    // A client error (unknown tenant) ends the stream with a typed error instead of retrying.
    let mut bad = Box::pin(c2.follow(0, Query::new().tenant("nobody")));
    let err = bad.next().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Api { status: 404, .. }), "{err:?}");
}
