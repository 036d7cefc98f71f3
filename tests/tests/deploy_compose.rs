//! `deploy/compose`: the whole topology in containers (three cores, Garage, a checkpointer,
//! two edges and the fleet simulator) under a project of its own, then `deploy/compose
//! chaos`: faults across the containers while the fleet runs, the fleet's verdict, and the
//! checks of replicas, checkpoints and writes. Skipped, with a line saying why, where Docker
//! or compose is not available.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use changeagent_testkit::{docker, Binary};
use serde_json::Value;

/// The published ports `deploy/compose` moves with `CHANGEAGENT_PORT_<NAME>`.
const PORTS: [&str; 7] = [
    "CORE1",
    "CORE2",
    "CORE3",
    "EDGE1",
    "EDGE2",
    "CHECKPOINTER",
    "S3",
];

/// Consumers of the fleet: enough to exercise the edges, few enough for a 2-core host.
const FLEET_CONSUMERS: &str = "200";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("compose")
}

/// `n` distinct ports free on 127.0.0.1 right now: all bound at once, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A compose project of the test's own; `deploy/compose down` removes it (containers,
/// network, volumes) on drop, whether the test passed, failed or panicked.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn new(bin_dir: &Path) -> Project {
        let name = format!("changeagent-test-{}", std::process::id());
        let mut env = vec![
            ("CHANGEAGENT_COMPOSE_PROJECT".to_string(), name.clone()),
            // Tags of its own, so a topology running from the default tags keeps its images.
            (
                "CHANGEAGENT_IMAGE".to_string(),
                format!("changeagent:{name}"),
            ),
            (
                "CHANGEAGENT_GARAGE_IMAGE".to_string(),
                format!("changeagent-garage:{name}"),
            ),
            (
                "CHANGEAGENT_BIN_DIR".to_string(),
                bin_dir.display().to_string(),
            ),
            (
                "CHANGEAGENT_FLEET_CONSUMERS".to_string(),
                FLEET_CONSUMERS.to_string(),
            ),
        ];
        for (port, value) in PORTS.iter().zip(free_ports(PORTS.len())) {
            env.push((format!("CHANGEAGENT_PORT_{port}"), value.to_string()));
        }
        // scripts/test exports it; without it deploy/compose installs Garage itself.
        if let Ok(garage) = std::env::var("CHANGEAGENT_GARAGE_BIN") {
            env.push(("CHANGEAGENT_GARAGE_BIN".to_string(), garage));
        }
        Project { name, env }
    }

    /// `deploy/compose ARGS`; its progress (stderr) shows as it goes, stdout is kept.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run deploy/compose {args:?}: {e}"))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        eprintln!("deploy_compose: removing project {}", self.name);
        let down = self.run(&["down"]);
        if !down.status.success() {
            eprintln!(
                "deploy_compose: `deploy/compose down` of project {} failed ({}); remove it by \
                 hand: CHANGEAGENT_COMPOSE_PROJECT={} deploy/compose down",
                self.name, down.status, self.name
            );
        }
        // Only the tags go: the layers are shared with the default tags' images.
        for (key, tag) in &self.env {
            if key.ends_with("_IMAGE") {
                let _ = Command::new("docker")
                    .args(["rmi", tag.as_str()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_across_containers() {
    if let Err(why) = docker::daemon_version().await {
        eprintln!("skipped: Docker is not available ({why})");
        return;
    }
    if docker::compose_command().await.is_none() {
        eprintln!(
            "skipped: Docker is not available (neither `docker compose` nor `docker-compose` \
             is installed)"
        );
        return;
    }
    // The images take the release binaries beside this test's: the server's directory
    // holds the checkpointer, the edge, the CLI and the benchmark too (scripts/test builds
    // them all).
    let server = Binary::named("changeagent-server")
        .locate()
        .unwrap_or_else(|e| panic!("{e}"));
    let bin_dir = server
        .parent()
        .expect("the server binary lives in a directory")
        .to_path_buf();

    let project = Project::new(&bin_dir);
    eprintln!(
        "deploy_compose: project {} with the binaries of {}",
        project.name,
        bin_dir.display()
    );
    let up = project.run(&["up"]);
    assert!(
        up.status.success(),
        "deploy/compose up failed ({}); its progress is above; stdout:\n{}",
        up.status,
        stdout(&up)
    );

    let chaos = project.run(&["chaos"]);
    let out = stdout(&chaos);
    let summary: Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "deploy/compose chaos ({}) printed no JSON summary; stdout:\n{out}",
                chaos.status
            )
        });
    assert!(
        chaos.status.success(),
        "deploy/compose chaos failed ({}); what failed and which logs to read is above; \
         summary:\n{summary:#}",
        chaos.status
    );
    assert_eq!(
        summary["ok"],
        Value::Bool(true),
        "the summary says not ok:\n{summary:#}"
    );
    let steps: Vec<&str> = summary["steps"]
        .as_array()
        .expect("a list of steps")
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    for step in [
        "kill-leader",
        "partition",
        "pause-edge",
        "restart-checkpointer",
        "restart-s3",
    ] {
        assert!(steps.contains(&step), "step {step} missing: {summary:#}");
    }
    assert_eq!(
        summary["fleet"]["ok"],
        Value::Bool(true),
        "the fleet's report:\n{summary:#}"
    );
}
