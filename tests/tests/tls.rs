//! TLS end to end with real processes and certificates from `scripts/make-certs`.
//!
//! - A core, an edge and a checkpointer serve HTTPS; the edge and the checkpointer reach the
//!   core over `https://` with `--ca`; a client trusting another CA, and a plain `http://`
//!   request, get no answer from any of them.
//! - The core's certificate rotates without a restart: a new pair written over the files is
//!   served to new connections, and a pair that does not load leaves the previous one.
//! - Peer links of a 3-node cluster are mutual TLS: peer routes refuse a client without a
//!   certificate (403) and the handshake fails for a certificate of another CA; a node
//!   whose certificate another CA signed cannot join. (The fault tests of
//!   `cluster_failover`, `cluster_partition` and `cluster_catchup` also run over mTLS.)

mod common;

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::tls::Certs;
use changeagent_testkit::{wait_until, Api, ServerOptions, ServerProcess};
use common::*;
use serde_json::json;

/// `GET /health` with `api` fails at the transport (no HTTP answer at all).
async fn refused(api: &Api, what: &str) {
    match api.try_get("/health").await {
        Err(_) => {}
        Ok(r) => panic!("{what}: expected no answer, got {} {}", r.status, r.text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn core_edge_and_checkpointer_serve_https_and_refuse_other_cas() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Certs::new(dir.path().join("ours"));
    let theirs = Certs::new(dir.path().join("theirs"));
    theirs.make("stranger", &[]).unwrap();
    let objects = dir.path().join("objects");
    let store_url = format!("file://{}", objects.display());
    let ca = ours.ca().display().to_string();

    let core_pair = ours.make("core", &[]).unwrap();
    let core = ServerProcess::start_leader(
        ServerOptions::default()
            .tls(&core_pair, ours.ca())
            .arg("--object-store")
            .arg(&store_url),
    )
    .await;
    assert!(core.url().starts_with("https://"), "{}", core.url());
    let api = core.api();
    for i in 0..10 {
        api.post_json("/changes", &json!({ "data": i }).to_string())
            .await
            .expect_status(200);
    }
    let plain = Api::new(core.url().replace("https://", "http://"));
    refused(&plain, "plain HTTP to the core").await;
    refused(
        &api.with_tls(&theirs.ca(), None),
        "a client trusting another CA",
    )
    .await;

    // A checkpointer reaches the core over https with --ca.
    let mut once = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--ca", &ca],
    ))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    wait_checkpoint_past(&api, 0).await;

    // A checkpointer serving its own API over HTTPS.
    let ckpt_pair = ours.make("checkpointer", &[]).unwrap();
    let ckpt = ServerProcess::start(
        checkpointer(&core.url(), &store_url, &["--ca", &ca]).tls(&ckpt_pair, ours.ca()),
    )
    .await;
    ckpt.api().get("/health").await.expect_status(200);
    refused(
        &ckpt.api().with_tls(&theirs.ca(), None),
        "the checkpointer to a client trusting another CA",
    )
    .await;

    // An edge: bootstraps and tails over https, serves HTTPS, forwards writes over https.
    let edge_pair = ours.make("edge", &[]).unwrap();
    let served =
        ServerProcess::start(edge(&core.url(), &["--ca", &ca]).tls(&edge_pair, ours.ca())).await;
    let at_edge = served.api();
    let id = at_edge
        .post_json("/changes", &json!({ "data": "via the edge" }).to_string())
        .await
        .ok_json()["_id"]
        .as_u64()
        .unwrap();
    at_edge.wait_for_change(id, DEADLINE).await;
    assert_eq!(
        at_edge.get("/changes").await.body,
        api.get("/changes").await.body,
        "the edge serves the core's bytes"
    );
    refused(
        &at_edge.with_tls(&theirs.ca(), None),
        "the edge to a client trusting another CA",
    )
    .await;
    refused(
        &Api::new(served.url().replace("https://", "http://")),
        "plain HTTP to the edge",
    )
    .await;

    // An edge that does not trust the core's CA cannot bootstrap: it says so and serves
    // nothing.
    let blind = ServerProcess::launch(edge(&core.url(), &[]).tls(&edge_pair, ours.ca()));
    // The edge without --ca logs the TLS failure.
    blind
        .wait_for_log(&["certificate", "Certificate"], DEADLINE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = Certs::new(dir.path().join("first"));
    let second = Certs::new(dir.path().join("second"));
    let pair = first.make("core", &[]).unwrap();
    let core = ServerProcess::start_leader(ServerOptions::default().tls(&pair, first.ca())).await;
    let next = second.make("core", &[]).unwrap();
    let old_ca = core.api();
    let new_ca = core.api().with_tls(&second.ca(), None);
    old_ca.get("/health").await.expect_status(200);
    refused(&new_ca, "before the rotation, a client of the next CA").await;

    // A pair that does not load is logged; the previous one stays.
    std::fs::write(&pair.cert, "not a certificate\n").unwrap();
    core.wait_for_log(&["TLS certificate not reloaded"], DEADLINE)
        .await;
    // A new client (a new connection: open ones keep the pair they started with).
    core.api().get("/health").await.expect_status(200);

    // The next CA's pair, renamed over the files the node was started with.
    std::fs::rename(&next.key, &pair.key).unwrap();
    std::fs::rename(&next.cert, &pair.cert).unwrap();
    wait_until(DEADLINE, "the node to serve the new certificate", || {
        let new_ca = new_ca.clone();
        async move {
            match new_ca.try_get("/health").await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(r.text()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    refused(
        &core.api(),
        "after the rotation, a new client of the old CA only",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_links_are_mutual_tls() {
    let cluster = Cluster::start_with_peers(ClusterOptions::new(3).mtls()).await;
    let leader = cluster.wait_leader().await;
    let api = cluster.api(leader);
    api.post_json("/changes", &json!({ "data": 1 }).to_string())
        .await
        .expect_status(200);
    cluster.wait_converged(&[0, 1, 2]).await;

    let certs = cluster.certs().unwrap();
    let ca = certs.ca();
    // A client the cluster's CA trusts, without a certificate: users are served, peer
    // routes refuse it.
    let user = Api::new(cluster.node(leader).url()).with_tls(&ca, None);
    user.get("/health").await.expect_status(200);
    for (method, path) in [
        ("POST", "/raft/vote"),
        ("POST", "/raft/append"),
        ("GET", "/raft/identity"),
        ("GET", "/raft/stream"),
        ("POST", "/cluster/join"),
    ] {
        let r = user
            .request(
                method,
                path,
                Some("application/json"),
                Some(b"{}".to_vec()),
                &[],
            )
            .await;
        assert_eq!(
            r.status,
            403,
            "{method} {path} without a certificate: {}",
            r.text()
        );
        assert!(
            r.text().contains("--peer-ca"),
            "{method} {path}: {}",
            r.text()
        );
    }
    // A certificate the cluster's CA did not sign fails the handshake.
    let dir = tempfile::tempdir().unwrap();
    let other = Certs::new(dir.path());
    let stranger = other.make("stranger", &[]).unwrap();
    let forged =
        Api::new(cluster.node(leader).url()).with_tls(&ca, Some((&stranger.cert, &stranger.key)));
    refused(&forged, "a client certificate of another CA").await;

    // A node whose certificate another CA signed cannot join: the cluster never adds it.
    let ip = cluster.node(leader).ip.to_string();
    let joiner = other.make("joiner", &[ip]).unwrap();
    let before = cluster.cluster_doc(leader).await;
    let mut stranger_node = ServerProcess::launch(
        ServerOptions::default()
            .tls(&joiner, other.ca())
            .arg("--peer-ca")
            .arg(ca.display().to_string())
            .arg("--join")
            .arg(cluster.node(leader).advertise_url()),
    );
    // The stranger fails its join attempts.
    stranger_node
        .wait_for_log(&["still trying to join", "cannot join"], DEADLINE)
        .await;
    stranger_node.kill9();
    assert_eq!(
        cluster.cluster_doc(leader).await["members"],
        before["members"],
        "the membership did not change"
    );
    // The members still replicate.
    cluster
        .api(leader)
        .post_json("/changes", &json!({ "data": 2 }).to_string())
        .await
        .expect_status(200);
    cluster.wait_converged(&[0, 1, 2]).await;
}
