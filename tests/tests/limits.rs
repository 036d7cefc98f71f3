//! The operator's limits on real processes:
//!
//! - `--header-read-timeout` on a core, an edge and a checkpointer: a request head that
//!   never ends, a connection that sends nothing and an HTTP/2 preface cut short are closed
//!   (the edge answers 408 with a JSON error), while a kept-alive connection idle after a
//!   whole request stays open far longer.
//! - `--max-connections` on a 3-node cluster's leader: once full it closes a client's new
//!   connection unanswered, yet still serves a member, and a follower restarted meanwhile
//!   gets its write forwarded to the leader.
//! - `--max-long-polls` on a core and an edge: one long-poll over it gets 503 with
//!   `Retry-After: 5` and a JSON error, a plain read is still served, and the waiting ones
//!   are answered when a change lands.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use changeagent_testkit::cluster::{next_ip, Cluster, ClusterOptions};
use changeagent_testkit::{wait_until, Api, Binary, Reply, ServerOptions, ServerProcess};
use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The test client's address: not the address of any cluster member.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long a server may take to close a connection it should close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(20);

/// Sends `bytes` on a new connection and returns what arrived before the server closed it.
async fn cut_off(to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect_from(CLIENT_IP, to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_closed(&mut s, CLOSE_DEADLINE)
        .await
        .unwrap_or_else(|| panic!("{to} kept {:?} open", String::from_utf8_lossy(bytes)))
}

/// Sends a whole request on `s` and returns the answer's head and body (the answers here
/// are small: one read after the head arrived is enough).
async fn exchange(s: &mut TcpStream, request: &str) -> String {
    use tokio::io::AsyncReadExt;
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(CLOSE_DEADLINE, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_never_end_are_cut_on_every_tier_but_idle_kept_alive_connections_stay() {
    const TIMEOUT_MS: u64 = 500;
    let timeout = ["--header-read-timeout", "500ms"];
    let core = ServerProcess::start_leader(
        ServerOptions::default()
            .listen(SocketAddr::new(next_ip().into(), 0))
            .arg(timeout[0])
            .arg(timeout[1]),
    )
    .await;
    core.api().post_change(r#"{"data":1}"#).await;
    let objects = tempfile::tempdir().unwrap();
    let store = format!("file://{}", objects.path().display());
    let edge = ServerProcess::start(edge(&core.url(), &timeout));
    let checkpointer = ServerProcess::start(checkpointer(&core.url(), &store, &timeout));
    let (edge, checkpointer) = tokio::join!(edge, checkpointer);
    for (tier, server) in [
        ("core", &core),
        ("edge", &edge),
        ("checkpointer", &checkpointer),
    ] {
        let addr = server.addr();
        // A head that never ends, a connection that sends nothing, and an HTTP/2 client
        // whose preface stops halfway (the edge speaks HTTP/1 only: to it, a head that never
        // ends): the edge answers each with a 408 and a JSON error, hyper just closes.
        for (what, sent) in [
            (
                "a head that never ended",
                &b"GET /health HTTP/1.1\r\nHost: x\r\n"[..],
            ),
            ("a silent connection", &b""[..]),
            ("half a preface", &b"PRI * HTTP/2.0\r\n"[..]),
        ] {
            let got = cut_off(addr, sent).await;
            let got = String::from_utf8_lossy(&got);
            if tier == "edge" {
                assert!(got.starts_with("HTTP/1.1 408 "), "{tier}, {what}: {got}");
                assert!(got.contains("\"error\":"), "{tier}, {what}: {got}");
            } else {
                assert_eq!(got, "", "{tier}: answered {what}");
            }
        }

        // A kept-alive connection idle after a whole request is not cut by the head timeout
        // (our clients pool idle connections for 90 s): still open after four timeouts.
        let mut kept = connect_from(CLIENT_IP, addr).await.unwrap();
        let request = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..2 {
            let answer = exchange(&mut kept, request).await;
            assert!(answer.starts_with("HTTP/1.1 200 "), "{tier}: {answer}");
            let idle = read_until_closed(&mut kept, Duration::from_millis(4 * TIMEOUT_MS)).await;
            assert_eq!(
                idle, None,
                "{tier}: an idle kept-alive connection was closed"
            );
        }
        let timeouts = metric_sum(&server.api(), "changeagent_header_timeouts_total").await;
        assert!(timeouts >= 3, "{tier}: {timeouts} header timeouts counted");
    }
}

/// A `reqwest` client whose connections come from `ip` (a member's address).
fn client_from(ip: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(ip))
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Opens connections from [`CLIENT_IP`] to `to`, each answering one request and kept open,
/// until one is closed unanswered; returns the open ones.
async fn fill(to: SocketAddr, max: usize, held: &mut Vec<TcpStream>) {
    loop {
        assert!(
            held.len() <= max,
            "{} connections open, over the limit",
            held.len()
        );
        let mut s = connect_from(CLIENT_IP, to).await.unwrap();
        let request = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        if s.write_all(request.as_bytes()).await.is_err() {
            return;
        }
        match read_until_closed_or_answered(&mut s).await {
            Some(answer) => {
                assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
                held.push(s);
            }
            None => return,
        }
    }
}

/// The first bytes of an answer on `s`, or `None` when the server closed it unanswered.
async fn read_until_closed_or_answered(s: &mut TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(CLOSE_DEADLINE, s.read(&mut buf))
        .await
        .expect("an answer or a close")
    {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_leader_refuses_clients_but_serves_its_cluster() {
    const MAX: usize = 40;
    let mut cluster = Cluster::start_with_peers(
        ClusterOptions::new(3)
            .arg("--max-connections")
            .arg(MAX.to_string()),
    )
    .await;
    let leader = cluster.wait_leader().await;
    let followers = cluster.others(&[leader]);
    let (f, g) = (followers[0], followers[1]);
    let leader_addr = cluster.node(leader).listen;
    let leader_url = cluster.node(leader).url();
    let mut held = Vec::new();
    fill(leader_addr, MAX, &mut held).await;

    // A member's connection is served although the listener is full.
    let member = client_from(cluster.node(g).ip);
    let health = member
        .get(format!("{leader_url}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = member
        .get(format!("{leader_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("changeagent_connections_refused_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(refused >= Some(1), "{metrics}");

    // A follower restarted now connects to the leader afresh (its write is forwarded
    // there); first the slots its old connections held are taken by clients again.
    cluster.kill9(f);
    fill(leader_addr, MAX, &mut held).await;
    cluster.restart(f).await;
    let id = cluster.api(f).post_change(r#"{"data":"via f"}"#).await;
    cluster.api(g).wait_for_change(id, CLOSE_DEADLINE).await;
    // Still full for clients.
    let mut s = connect_from(CLIENT_IP, leader_addr).await.unwrap();
    let _ = s
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(read_until_closed_or_answered(&mut s).await, None);
}

/// `GET path` in a task.
fn spawn_get(api: &Api, path: String) -> JoinHandle<Reply> {
    let api = api.clone();
    tokio::spawn(async move { api.get(&path).await })
}

/// Fills `api`'s `max` long-poll slots (after `since`), checks the one over them and returns
/// the waiting ones.
async fn full_of_long_polls(api: &Api, since: u64, max: u64) -> Vec<JoinHandle<Reply>> {
    let path = format!("/changes?since={since}&block=60");
    let polls: Vec<_> = (0..max).map(|_| spawn_get(api, path.clone())).collect();
    wait_until(CLOSE_DEADLINE, "every long-poll waiting", || async {
        let open = metric_sum(api, "changeagent_long_polls_open").await;
        if open >= max {
            Ok(())
        } else {
            Err(open)
        }
    })
    .await
    .unwrap();
    let over = api.get(&path).await;
    assert_eq!(over.status, 503, "{}", over.text());
    assert_eq!(over.header("retry-after").as_deref(), Some("5"));
    assert_eq!(
        over.header("content-type").as_deref(),
        Some("application/json")
    );
    let body: Value = over.json();
    assert!(
        body["error"].as_str().unwrap().contains("long-polls"),
        "{body}"
    );
    assert_eq!(
        metric_sum(api, "changeagent_long_polls_refused_total").await,
        1
    );
    // Only waiting is limited: a read that does not wait is served.
    let plain = api.get(&format!("/changes?since={since}")).await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    polls
}

/// Every poll answers with change `id`.
async fn all_answered(polls: Vec<JoinHandle<Reply>>, id: u64) {
    for poll in polls {
        let r = tokio::time::timeout(CLOSE_DEADLINE, poll)
            .await
            .expect("a long-poll answered")
            .unwrap();
        let page: Value = r.ok_json();
        assert_eq!(page["changes"][0]["_id"].as_u64(), Some(id), "{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_over_the_limit_get_503_with_retry_after() {
    let core =
        ServerProcess::start_leader(ServerOptions::default().arg("--max-long-polls").arg("3"))
            .await;
    let api = core.api();
    let since = api.post_change(r#"{"data":"before"}"#).await;
    let polls = full_of_long_polls(&api, since, 3).await;
    let id = api.post_change(r#"{"data":"wake"}"#).await;
    all_answered(polls, id).await;

    // The edge tails the core with a long-poll of its own: one of the core's slots.
    let edge = ServerProcess::start(
        ServerOptions::default()
            .bin(Binary::named("changeagent-edge"))
            .arg("--upstream")
            .arg(core.url())
            .arg("--max-long-polls")
            .arg("2"),
    )
    .await;
    let edge_api = edge.api();
    wait_until(CLOSE_DEADLINE, "the edge at the core's index", || async {
        let h = edge_api.get("/health").await.json();
        if h["lastIndex"].as_u64() == Some(id) {
            Ok(())
        } else {
            Err(h)
        }
    })
    .await
    .unwrap();
    let polls = full_of_long_polls(&edge_api, id, 2).await;
    let next = api.post_change(r#"{"data":"wake the edge"}"#).await;
    all_answered(polls, next).await;
    // The slots are free again.
    let r = edge_api
        .get(&format!("/changes?since={next}&block=1"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
