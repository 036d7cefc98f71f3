//! Raft RPCs between nodes travel on persistent peer streams (`GET /raft/stream`, upgraded),
//! served on Raft's own runtime:
//! a write load reaches the followers on a handful of streams, not one request per RPC; and
//! a stream that receives garbage refuses it, closes, and changes nothing.

use std::time::Duration;

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::history::History;
use changeagent_testkit::{health, Api};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Writes through the leader in the first test.
const WRITES: usize = 100;

/// The value of metric line `name` (with labels) in `/metrics` of `api`.
async fn metric(api: &Api, name: &str) -> u64 {
    api.metric(name).await.unwrap_or_else(|e| panic!("{e}"))
}

const ON_STREAMS: &str = "changeagent_raft_rpcs_received_total{transport=\"stream\"}";
const OVER_HTTP: &str = "changeagent_raft_rpcs_received_total{transport=\"http\"}";
const ACCEPTED: &str = "changeagent_raft_streams_accepted_total";
const OFF_RAFT_RUNTIME: &str = "changeagent_raft_streams_off_raft_runtime";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_rpcs_travel_on_a_few_persistent_streams() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let leader = cluster.wait_leader().await;
    let history = History::new();
    for n in 0..WRITES {
        cluster
            .write_acked(&history, 0, leader, &format!("w{n}"))
            .await;
    }
    let finals = cluster.wait_converged(&[0, 1, 2]).await;
    history.assert_consistent(&finals);
    for follower in cluster.others(&[leader]) {
        let api = cluster.api(follower);
        let on_streams = metric(&api, ON_STREAMS).await;
        let over_http = metric(&api, OVER_HTTP).await;
        let accepted = metric(&api, ACCEPTED).await;
        // Each acknowledged write needed an AppendEntries to a quorum; sequential writes
        // reach each follower in one each (the other follower may have been the quorum,
        // so only half are certain).
        assert!(
            on_streams >= (WRITES / 2) as u64,
            "n{follower} answered {on_streams} RPCs on streams for {WRITES} writes"
        );
        assert_eq!(over_http, 0, "n{follower} answered RPCs as HTTP requests");
        // Replication, heartbeats, and the vote requests of the first election(s): a
        // stream per RPC would be hundreds.
        assert!(
            (1..=16).contains(&accepted),
            "n{follower} accepted {accepted} streams for {on_streams} RPCs"
        );
    }
    // Every node knew its members before it accepted the first stream (the votes of the
    // first election included), so all of them are served on Raft's runtime.
    for node in 0..3 {
        let off = metric(&cluster.api(node), OFF_RAFT_RUNTIME).await;
        assert_eq!(
            off, 0,
            "n{node} served {off} peer streams off Raft's runtime"
        );
    }
}

/// Opens a stream to `node` (no secret configured) and returns it after the `101`.
async fn open_stream(cluster: &Cluster, node: usize, cluster_id: &str) -> BufReader<TcpStream> {
    let addr = cluster.node(node).listen;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut io = BufReader::new(tcp);
    let request = format!(
        "GET /raft/stream HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\n\
         upgrade: changeagent-raft/1\r\nx-cluster-id: {cluster_id}\r\n\r\n"
    );
    io.get_mut()
        .write_all(request.as_bytes())
        .await
        .expect("send handshake");
    let mut line = String::new();
    io.read_line(&mut line).await.expect("status line");
    assert!(line.starts_with("HTTP/1.1 101"), "handshake: {line}");
    loop {
        line.clear();
        io.read_line(&mut line).await.expect("header line");
        if line.trim().is_empty() {
            return io;
        }
    }
}

/// Sends a frame and reads the answer: its tag and body, then checks the stream ended.
async fn refused(io: &mut BufReader<TcpStream>, frame: &[u8]) -> String {
    io.get_mut().write_all(frame).await.expect("send frame");
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await.expect("answer header");
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.expect("answer body");
    assert_eq!(
        header[4],
        1,
        "not a refusal: {}",
        String::from_utf8_lossy(&body)
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest))
        .await
        .expect("the stream stays open after a refusal")
        .expect("read to the end");
    assert_eq!(n, 0, "bytes after a refusal");
    String::from_utf8_lossy(&body).into_owned()
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.push(tag);
    f.extend_from_slice(body);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_refuses_garbage_and_nothing_changes() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3)).await;
    let leader = cluster.wait_leader().await;
    let follower = cluster.others(&[leader])[0];
    let h = health(&cluster.api(follower)).await.expect("/health");
    let cluster_id = h["clusterId"].as_str().expect("clusterId").to_string();
    let term = h["term"].as_u64().expect("term");

    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("unknown tag", frame(9, b"{}"), "unknown Raft request tag 9"),
        (
            "AppendEntries that is not JSON",
            frame(1, b"{not json"),
            "invalid AppendEntries request",
        ),
        (
            "a frame over the limit",
            (u32::MAX).to_be_bytes().into_iter().chain([1]).collect(),
            "over the limit",
        ),
    ];
    for (what, bytes, says) in cases {
        let mut io = open_stream(&cluster, follower, &cluster_id).await;
        let message = refused(&mut io, &bytes).await;
        assert!(message.contains(says), "{what}: refused with {message:?}");
    }

    // A stream that claims another cluster is refused before it opens.
    let addr = cluster.node(follower).listen;
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /raft/stream HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\n\
         upgrade: changeagent-raft/1\r\nx-cluster-id: another-cluster\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("handshake");
    let mut line = String::new();
    BufReader::new(&mut tcp)
        .read_line(&mut line)
        .await
        .expect("status line");
    assert!(line.starts_with("HTTP/1.1 403"), "foreign stream: {line}");

    // Nothing moved: same leader and term, and writes still replicate.
    assert_eq!(cluster.wait_leader().await, leader, "the leader changed");
    let after = health(&cluster.api(follower)).await.expect("/health")["term"]
        .as_u64()
        .expect("term");
    assert_eq!(after, term, "the term moved");
    cluster.assert_writes_through_every_node("after").await;
}
