//! `deploy/local-cluster`: start a 3-node cluster, write through a follower, read the
//! change on every node, show the status, stop every node.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use changeagent_testkit::{server_bin, wait_until, Api};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("local-cluster")
}

/// A base port whose next three ports are free on 127.0.0.1 right now.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port().saturating_sub(4);
        drop(probe);
        if base < 20_000 {
            continue;
        }
        let held: Vec<_> = (1..=3)
            .filter_map(|k| TcpListener::bind(("127.0.0.1", base + k)).ok())
            .collect();
        if held.len() == 3 {
            return base;
        }
    }
    panic!("found no three consecutive free ports");
}

struct LocalCluster {
    dir: tempfile::TempDir,
    base: u16,
}

impl LocalCluster {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("CHANGEAGENT_SERVER_BIN", server_bin())
            .env("CHANGEAGENT_LOCAL_CLUSTER_DIR", self.dir.path())
            .env("CHANGEAGENT_LOCAL_CLUSTER_BASE_PORT", self.base.to_string())
            .output()
            .expect("run deploy/local-cluster")
    }

    fn api(&self, k: u16) -> Api {
        Api::new(format!("http://127.0.0.1:{}", self.base + k))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Stops whatever a failed test left running.
        let _ = self.run(&["stop"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_script_starts_serves_and_stops_three_nodes() {
    let cluster = LocalCluster {
        dir: tempfile::tempdir().expect("temp dir"),
        base: free_base_port(),
    };
    let started = cluster.run(&[
        "start",
        "3",
        "--",
        "--heartbeat-ms",
        "100",
        "--election-timeout-ms",
        "500",
    ]);
    assert!(started.status.success(), "start failed: {}", text(&started));
    assert!(
        String::from_utf8_lossy(&started.stdout).contains("cluster of 3 nodes running"),
        "{}",
        text(&started)
    );

    // A write through node 2 (forwarded if it follows) is then served by every node.
    let posted = cluster
        .api(2)
        .post_json("/changes", r#"{"data":"through the script"}"#)
        .await;
    posted.expect_status(200);
    for k in 1..=3 {
        let api = cluster.api(k);
        wait_until(
            Duration::from_secs(30),
            "the change reaches every node",
            || {
                let api = api.clone();
                async move {
                    let body = api.get("/changes").await.text();
                    if body.contains("through the script") {
                        Ok(())
                    } else {
                        Err(body)
                    }
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("node {k}: {e}"));
    }

    let status = cluster.run(&["status"]);
    assert!(status.status.success(), "status failed: {}", text(&status));
    let out = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        out.matches("\"role\":\"leader\"").count(),
        1,
        "{}",
        text(&status)
    );
    assert_eq!(
        out.matches("\"role\":\"follower\"").count(),
        2,
        "{}",
        text(&status)
    );

    let stopped = cluster.run(&["stop"]);
    assert!(stopped.status.success(), "stop failed: {}", text(&stopped));
    assert!(
        String::from_utf8_lossy(&stopped.stdout).contains("3 node(s) stopped"),
        "{}",
        text(&stopped)
    );
    let after = cluster.run(&["status"]);
    assert!(
        !after.status.success(),
        "status after stop: {}",
        text(&after)
    );
    assert_eq!(
        String::from_utf8_lossy(&after.stdout)
            .matches("not running")
            .count(),
        3,
        "{}",
        text(&after)
    );
}
