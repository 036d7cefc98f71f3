//! `deploy/compose`: the whole topology in containers (three cores, Garage, a checkpointer,
//! two edges and the fleet simulator) under a project of its own, then `deploy/compose
//! chaos`: faults across the containers while the fleet runs, the fleet's verdict, and the
//! checks of replicas, checkpoints and writes. Once in plain HTTP, once with `up --tls`
//! (HTTPS everywhere, mutual TLS between the cores). Skipped, with a line saying why, where
//! Docker or compose is not available.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use changeagent_testkit::{docker, Api, Binary};
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

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

fn script() -> PathBuf {
    deploy_dir().join("compose")
}

/// The CA `deploy/compose up --tls` makes (kept across runs of this checkout).
fn compose_ca() -> PathBuf {
    deploy_dir().join(".local").join("tls").join("ca.pem")
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
    fn new(bin_dir: &Path, tag: &str) -> Project {
        let name = format!("changeagent-test-{tag}-{}", std::process::id());
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

    /// The published port of `name` (one of [`PORTS`]).
    fn port(&self, name: &str) -> u16 {
        let key = format!("CHANGEAGENT_PORT_{name}");
        self.env
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no port for {name}"))
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
    chaos_in(Mode::Plain).await;
}

/// The same with `up --tls`. Before the chaos: every server answers HTTPS with the compose
/// CA as trust root on its published port and nothing over plain HTTP; the cores formed their
/// cluster, and so spoke mutual TLS among them (their listeners speak nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_across_containers_over_tls() {
    chaos_in(Mode::Tls).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Tls,
}

async fn chaos_in(mode: Mode) {
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

    let tag = match mode {
        Mode::Plain => "plain",
        Mode::Tls => "tls",
    };
    let project = Project::new(&bin_dir, tag);
    eprintln!(
        "deploy_compose: project {} ({mode:?}) with the binaries of {}",
        project.name,
        bin_dir.display()
    );
    let up_args: &[&str] = match mode {
        Mode::Plain => &["up"],
        Mode::Tls => &["up", "--tls"],
    };
    let up = project.run(up_args);
    assert!(
        up.status.success(),
        "deploy/compose up failed ({}); its progress is above; stdout:\n{}",
        up.status,
        stdout(&up)
    );
    if mode == Mode::Tls {
        assert_tls_only(&project).await;
    }

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

/// Every server of a `--tls` project: `/health` answers over HTTPS trusting the compose CA,
/// and a plain HTTP request gets no HTTP answer.
async fn assert_tls_only(project: &Project) {
    let ca = compose_ca();
    for name in ["CORE1", "CORE2", "CORE3", "EDGE1", "EDGE2", "CHECKPOINTER"] {
        let port = project.port(name);
        let https = Api::new(format!("https://127.0.0.1:{port}")).with_tls(&ca, None);
        let health = https
            .try_get("/health")
            .await
            .unwrap_or_else(|e| panic!("{name}: GET https://127.0.0.1:{port}/health: {e}"));
        health.expect_status(200);
        let plain = Api::new(format!("http://127.0.0.1:{port}"));
        if let Ok(reply) = plain.try_get("/health").await {
            panic!(
                "{name} answered plain HTTP with {} on port {port}: {}",
                reply.status,
                reply.text()
            );
        }
    }
    eprintln!("deploy_compose: every server answers HTTPS only");
}
