//! Slowloris: 10,000 connections that send part of a request head and never finish it,
//! against a core and against an edge (`--header-read-timeout 2s`). While they are opened
//! and held, a normal client's writes and reads, each on a new connection, are all served;
//! then every slow connection is closed by the server (the edge answers each with a 408),
//! and `changeagent_header_timeouts_total` counts them.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use changeagent_testkit::cluster::next_ip;
use changeagent_testkit::{Api, ServerOptions, ServerProcess};
use common::*;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Slow connections held against each server.
const SLOW: usize = 10_000;
/// Connections being opened at once (the listen backlog is 1024).
const OPENING: usize = 256;
/// `--header-read-timeout` of the servers under attack.
const HEADER_TIMEOUT: &str = "2s";
/// How long every slow connection may take to be closed once all are open: many times the
/// header timeout, for a loaded machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);
/// The start of a request head that never ends (no empty line).
const PARTIAL_HEAD: &[u8] = b"GET /changes HTTP/1.1\r\nHost: slow\r\nX-Slow: 1\r\n";
/// Source addresses the slow connections are spread over: each has its own ephemeral ports.
/// From one address, the two tests of this file running at once (20,000 bound sockets, with
/// the suite's other clients) once ran out of them (`AddrInUse`).
const SOURCES: usize = 4;

/// Opens [`SLOW`] connections to `to`, each sending [`PARTIAL_HEAD`], from fresh loopback
/// addresses (none is a cluster member's); fails if one cannot be opened.
async fn open_slow(to: SocketAddr) -> Vec<TcpStream> {
    let sources: Vec<IpAddr> = (0..SOURCES).map(|_| IpAddr::V4(next_ip())).collect();
    futures::stream::iter(0..SLOW)
        .map(|i| {
            let from = sources[i % SOURCES];
            async move {
                let mut s = connect_from(from, to).await?;
                s.write_all(PARTIAL_HEAD).await?;
                Ok::<_, std::io::Error>(s)
            }
        })
        .buffer_unordered(OPENING)
        .map(|s| s.expect("open a slow connection"))
        .collect()
        .await
}

/// Holds [`SLOW`] slow connections against `target` while `work` serves one write and one
/// read after another (each on a new connection) until all are open, and a few more after;
/// then waits until the server closed every slow connection and returns what each got.
async fn attack(target: SocketAddr, writes: &str, reads: &str) -> Vec<Vec<u8>> {
    assert!(
        raise_open_files() as usize > SLOW + 1000,
        "too few file descriptors for {SLOW} connections"
    );
    let opening = tokio::spawn(open_slow(target));
    let mut served = 0;
    let mut after = 0;
    while after < 5 {
        if opening.is_finished() {
            after += 1;
        }
        // A new client each time: a new connection that must be accepted and served.
        let id = Api::new(writes)
            .post_change(&format!(r#"{{"data":{served}}}"#))
            .await;
        let page = Api::new(reads)
            .get(&format!("/changes?since={}&block=30", id - 1))
            .await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page: Value = page.json();
        assert_eq!(page["changes"][0]["_id"].as_u64(), Some(id), "{page}");
        served += 1;
    }
    let mut slow = opening.await.expect("opening the slow connections");
    assert_eq!(slow.len(), SLOW);
    let mut closing = tokio::task::JoinSet::new();
    for mut s in slow.drain(..) {
        closing.spawn(async move { read_until_closed(&mut s, CLOSED_WITHIN).await });
    }
    let mut answers = Vec::with_capacity(SLOW);
    while let Some(closed) = closing.join_next().await {
        let got = closed.expect("a reader task");
        answers.push(got.expect("the server closes every slow connection"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_slow_connections_do_not_stop_a_core_from_serving() {
    // On its own IP, so none of the slow connections' sources is a member's address.
    let core = ServerProcess::start_leader(
        ServerOptions::default()
            .listen(SocketAddr::new(next_ip().into(), 0))
            .arg("--header-read-timeout")
            .arg(HEADER_TIMEOUT),
    )
    .await;
    let answers = attack(core.addr(), &core.url(), &core.url()).await;
    // hyper closes without an answer ("408 or close").
    assert!(answers.iter().all(|a| a.is_empty()));
    let api = core.api();
    assert!(metric_sum(&api, "changeagent_header_timeouts_total").await >= SLOW as u64);
    assert_eq!(
        metric_sum(&api, "changeagent_connections_refused_total").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_slow_connections_do_not_stop_an_edge_from_serving() {
    let core = ServerProcess::start_leader(ServerOptions::default()).await;
    core.api().post_change(r#"{"data":"before"}"#).await;
    let edge = ServerProcess::start(edge(
        &core.url(),
        &["--header-read-timeout", HEADER_TIMEOUT],
    ))
    .await;
    // Writes go through the edge to the core; reads are the edge's own.
    let answers = attack(edge.addr(), &edge.url(), &edge.url()).await;
    for a in &answers {
        let text = String::from_utf8_lossy(a);
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(
            text.ends_with("{\"error\":\"the request head did not arrive in time\"}"),
            "{text}"
        );
    }
    let api = edge.api();
    assert!(metric_sum(&api, "changeagent_header_timeouts_total").await >= SLOW as u64);
}
