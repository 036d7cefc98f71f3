//! The client's preference for its first endpoints against real servers: a
//! client that failed over from its first server to its second goes back to
//! the first once it answers again and the preference interval has passed.

use std::net::SocketAddr;
use std::time::Duration;

use changeagent_client::{Client, NewChange, RetryPolicy};
use changeagent_testkit::cluster::{free_port, next_ip};
use changeagent_testkit::{wait_until, ServerOptions, ServerProcess};
use serde_json::json;

/// How long the client stays on the second server before trying the first
/// again: short, so the test is quick, yet long enough for posts to go to
/// the second server in between.
const PREFER_FIRST_AFTER: Duration = Duration::from_millis(500);

#[tokio::test]
async fn a_client_returns_to_its_first_server_once_it_is_back() {
    // The first server keeps its address across the restart; the client
    // names it first. Two separate single-node clusters, so each server's
    // lastIndex counts the posts that went to it.
    let ip = next_ip();
    let first_addr = SocketAddr::from((ip, free_port(ip).expect("a free port")));
    let mut first = ServerProcess::start_leader(ServerOptions::default().listen(first_addr)).await;
    let second = ServerProcess::start_leader(ServerOptions::default()).await;
    let client = Client::builder([first.url(), second.url()])
        .timeout(Duration::from_secs(30))
        .retry(RetryPolicy {
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            ..RetryPolicy::default()
        })
        .prefer_first_after(Some(PREFER_FIRST_AFTER))
        .build()
        .expect("client");
    let post = |n: u64| {
        let client = client.clone();
        async move {
            client
                .post_change(&NewChange::data(json!({ "n": n })))
                .await
                .expect("post")
        }
    };

    post(1).await;
    assert_eq!(first.api().last_index().await, 1, "the first server first");
    assert_eq!(second.api().last_index().await, 0);

    first.kill9();
    post(2).await;
    assert_eq!(second.api().last_index().await, 1, "failed over");

    first.restart_leader().await;
    assert_eq!(first.addr(), first_addr);
    let mut n = 2;
    wait_until(
        Duration::from_secs(30),
        "a post lands on the first server again",
        || {
            n += 1;
            let post = post(n);
            let (first, second) = (first.api(), second.api());
            async move {
                post.await;
                if first.last_index().await > 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "first lastIndex 1, second {}",
                        second.last_index().await
                    ))
                }
            }
        },
    )
    .await
    .expect("the client goes back to the first server");
    // And stays there.
    let (on_first, on_second) = (
        first.api().last_index().await,
        second.api().last_index().await,
    );
    post(n + 1).await;
    assert_eq!(first.api().last_index().await, on_first + 1);
    assert_eq!(second.api().last_index().await, on_second);
}
