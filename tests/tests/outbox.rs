//! The client's outbox against the real server: changes queued while nothing
//! listens reach a server started later, in order and once each, and an
//! entry whose post reached the server without its ack being recorded is
//! not applied twice when it is sent again.

use std::net::SocketAddr;
use std::time::Duration;

use changeagent_client::{Client, NewChange, Outbox, RetryPolicy, Sent};
use changeagent_testkit::cluster::{free_port, next_ip};
use changeagent_testkit::{change_id, data_by_id, ServerOptions, ServerProcess};
use serde_json::json;

/// A loopback address nothing listens on yet, for a server started later.
fn reserved_addr() -> SocketAddr {
    let ip = next_ip();
    SocketAddr::from((ip, free_port(ip).expect("a free port")))
}

/// A client that gives up on a request after two quick attempts, so a
/// flush with no server ends at once.
fn client(url: &str) -> Client {
    Client::builder([url])
        .timeout(Duration::from_secs(30))
        .retry(RetryPolicy {
            max_attempts: 2,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .build()
        .expect("client")
}

fn change(n: u64) -> NewChange {
    NewChange::data(json!({ "n": n })).with_tags(["outbox"])
}

/// `(_id, data)` of every change on the server, in order.
async fn server_changes(server: &ServerProcess) -> Vec<(u64, serde_json::Value)> {
    let raws = server.api().all_raw_changes("").await;
    let data = data_by_id(&raws);
    raws.iter()
        .map(|raw| {
            let id = change_id(raw);
            (id, data[&id].clone())
        })
        .collect()
}

#[tokio::test]
async fn changes_queued_while_no_server_answers_arrive_in_order_once_each() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = reserved_addr();
    let outbox = Outbox::open(dir.path(), client(&format!("http://{addr}")))
        .await
        .expect("open the outbox");
    for n in 1..=20 {
        assert_eq!(outbox.queue(&change(n)).await.expect("queue"), n);
    }
    let report = outbox.flush().await.expect("flush");
    assert!(report.sent.is_empty(), "{report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.pending, 20, "nothing is lost while offline");
    let error = report.stopped.expect("the flush says why it stopped");
    assert!(error.is_transient(), "{error:?}");
    let queued = outbox.entries().await;
    assert_eq!(queued.len(), 20);

    // Reopening (as after a restart of the writer) keeps every entry.
    drop(outbox);
    let outbox = Outbox::open(dir.path(), client(&format!("http://{addr}")))
        .await
        .expect("reopen the outbox");
    assert_eq!(outbox.entries().await, queued);

    let server = ServerProcess::start_leader(ServerOptions::default().listen(addr)).await;
    let report = outbox.flush().await.expect("flush");
    assert!(report.stopped.is_none(), "{:?}", report.stopped);
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.pending, 0);
    assert_eq!(
        report.sent.iter().map(|s| s.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(outbox.pending(), 0);

    let on_server = server_changes(&server).await;
    let want: Vec<(u64, serde_json::Value)> = report
        .sent
        .iter()
        .map(|s| (s.id, json!({ "n": s.seq })))
        .collect();
    assert_eq!(
        on_server, want,
        "exactly the 20 queued changes, in queue order, each once"
    );

    // A flush with nothing pending sends nothing.
    let report = outbox.flush().await.expect("flush");
    assert!(report.sent.is_empty() && report.stopped.is_none());
    assert_eq!(server_changes(&server).await.len(), 20);
}

#[tokio::test]
async fn an_entry_whose_ack_was_lost_is_applied_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let c = client(&server.url());
    let outbox = Outbox::open(dir.path(), c.clone())
        .await
        .expect("open the outbox");
    for n in 1..=3 {
        outbox.queue(&change(n)).await.expect("queue");
    }
    let first = outbox.entries().await[0].clone();
    // A flush posted entry 1 and the process died before it recorded the
    // ack: the server has the change, the outbox still holds the entry.
    let posted = c
        .post_change_idempotent(&first.key, &first.change)
        .await
        .expect("post");
    drop(outbox);

    let outbox = Outbox::open(dir.path(), c).await.expect("reopen");
    assert_eq!(outbox.pending(), 3);
    let report = outbox.flush().await.expect("flush");
    assert!(report.stopped.is_none(), "{:?}", report.stopped);
    assert_eq!(
        report.sent[0],
        Sent {
            seq: 1,
            id: posted.id
        },
        "the resend is answered with the first post's _id"
    );
    let on_server = server_changes(&server).await;
    assert_eq!(
        on_server,
        vec![
            (posted.id, json!({"n": 1})),
            (report.sent[1].id, json!({"n": 2})),
            (report.sent[2].id, json!({"n": 3})),
        ],
        "entry 1 is applied once"
    );
}
