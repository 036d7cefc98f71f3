//! Helpers shared by the system tests of the checkpointer and edge tiers: clients, a
//! consumer that follows with the client library and checks what it sees, a deterministic
//! workload, and starting a core and a checkpointer.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use changeagent_client::{Client, FollowEvent, NewChange, Query};
use changeagent_testkit::state::ConsumerState;
use changeagent_testkit::{wait_until, Api, Binary, ServerOptions, ServerProcess};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How long a checkpoint, a truncation or a consumer catching up may take on a loaded 2-core
/// machine running debug builds.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn client(url: &str) -> Client {
    Client::builder([url])
        .timeout(Duration::from_secs(60))
        .follow_block_secs(5)
        .build()
        .expect("client")
}

/// A consumer following the list with the client library, from `since`.
pub struct Consumer {
    state: Arc<Mutex<(ConsumerState, u64, u64)>>,
    task: JoinHandle<()>,
}

impl Consumer {
    /// State, position and resets are kept in one lock.
    pub fn start(url: &str, since: u64) -> Consumer {
        let client = client(url);
        let state = Arc::new(Mutex::new((ConsumerState::default(), since, 0u64)));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut events = Box::pin(client.follow(since, Query::new()));
            while let Some(event) = events.next().await {
                let event = event.unwrap_or_else(|e| panic!("follow failed: {e}"));
                let mut s = shared.lock().unwrap();
                match event {
                    FollowEvent::Reset { .. } => {
                        s.0.reset();
                        s.2 += 1;
                    }
                    FollowEvent::Record(c) => s.0.apply(&serde_json::to_value(&c).unwrap()),
                    FollowEvent::ResetEnd { index } => s.1 = index,
                    FollowEvent::Change(c) => {
                        // An unfiltered list is dense: every change is the one after the
                        // position (no gap, no duplicate, no reordering).
                        assert_eq!(
                            c.id,
                            s.1 + 1,
                            "a consumer at {} got change {} next",
                            s.1,
                            c.id
                        );
                        s.0.apply(&serde_json::to_value(&c).unwrap());
                        s.1 = c.id;
                    }
                }
            }
        });
        Consumer { state, task }
    }

    pub async fn wait_at(&self, index: u64) {
        wait_until(DEADLINE, &format!("a consumer at {index}"), || async {
            assert!(!self.task.is_finished(), "the consumer stopped");
            let at = self.state.lock().unwrap().1;
            if at >= index {
                Ok(())
            } else {
                Err(at)
            }
        })
        .await
        .unwrap();
    }

    pub fn state(&self) -> ConsumerState {
        self.state.lock().unwrap().0.clone()
    }

    pub fn resets(&self) -> u64 {
        self.state.lock().unwrap().2
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A deterministic workload: keyed upserts and deletes over `keys` keys in the given
/// collections, and unkeyed changes (some a tenant's, some tagged).
pub struct Workload {
    pub seed: u64,
    pub live: std::collections::BTreeSet<(usize, u64)>,
    pub collections: Vec<(String, String)>,
    pub keys: u64,
}

impl Workload {
    pub fn next(&mut self) -> u64 {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.seed >> 33
    }

    /// One batch of `n` changes that the server accepts whole (deletes only of live keys).
    pub fn batch(&mut self, n: usize) -> Vec<NewChange> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r = self.next() % 100;
            let c = (self.next() as usize) % self.collections.len();
            let (tenant, collection) = self.collections[c].clone();
            let k = self.next() % self.keys;
            let mut change = NewChange::data(
                json!({"n": i, "r": self.next(), "pad": "x".repeat((r % 40) as usize)}),
            );
            if r < 40 {
                change.tenant = Some(tenant);
                change.collection = Some(collection);
                change.key = Some(format!("k{k}"));
                self.live.insert((c, k));
            } else if r < 47 {
                let pick = (self.next() as usize) % self.live.len().max(1);
                let Some(&(c, k)) = self.live.iter().nth(pick) else {
                    continue;
                };
                let (tenant, collection) = self.collections[c].clone();
                self.live.remove(&(c, k));
                change = NewChange {
                    tenant: Some(tenant),
                    collection: Some(collection),
                    key: Some(format!("k{k}")),
                    deleted: true,
                    ..NewChange::default()
                };
            } else if r < 70 {
                change.tenant = Some(tenant);
                change.tags = vec![format!("t{}", r % 3)];
            }
            out.push(change);
        }
        out
    }
}

impl Workload {
    /// Creates the tenants and collections (`(tenant, collection)` pairs) over `client`, and
    /// a workload over them with `keys` keys per collection.
    pub async fn create(
        client: &Client,
        seed: u64,
        collections: &[(&str, &str)],
        keys: u64,
    ) -> Workload {
        let mut tenants: Vec<&str> = collections.iter().map(|(t, _)| *t).collect();
        tenants.dedup();
        for t in tenants {
            client.create_tenant(t).await.expect("create a tenant");
        }
        for (t, coll) in collections {
            client
                .create_collection(t, coll)
                .await
                .expect("create a collection");
        }
        Workload {
            seed,
            live: Default::default(),
            collections: collections
                .iter()
                .map(|(t, c)| (t.to_string(), c.to_string()))
                .collect(),
            keys,
        }
    }
}

/// One core node whose checkpoints are read from `store_url` (`env` for an S3 store), and a
/// client of it.
pub async fn start_core(store_url: &str, env: &[(String, String)]) -> (ServerProcess, Client) {
    let mut opts = ServerOptions::default()
        .arg("--object-store")
        .arg(store_url);
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    let core = ServerProcess::start_leader(opts).await;
    let c = client(&core.url());
    (core, c)
}

pub async fn post_changes(client: &Client, work: &mut Workload, total: usize) {
    let mut posted = 0;
    while posted < total {
        let batch = work.batch((total - posted).min(500));
        posted += batch.len();
        client.post_batch(&batch).await.expect("post a batch");
    }
}

pub async fn health(api: &Api) -> Value {
    api.get("/health").await.ok_json()
}

pub fn checkpointer(core: &str, objects: &str, extra: &[&str]) -> ServerOptions {
    let mut opts = ServerOptions::default()
        .bin(Binary::named("changeagent-checkpointer"))
        .arg("--core")
        .arg(core)
        .arg("--object-store")
        .arg(objects);
    for a in extra {
        opts = opts.arg(*a);
    }
    opts
}

/// Waits until the core keeps a checkpoint past `after`; returns the newest.
pub async fn wait_checkpoint_past(api: &Api, after: u64) -> Value {
    wait_until(DEADLINE, &format!("a checkpoint past {after}"), || async {
        let list = api.get("/checkpoints").await.ok_json();
        match list.get(0) {
            Some(m) if m["index"].as_u64().unwrap_or(0) > after => Ok(m.clone()),
            _ => Err(list),
        }
    })
    .await
    .unwrap()
}

/// A core holding 2,000 changes, checkpointed once and truncated before the checkpoint's
/// index + 1 - `retain`; returns the core, the checkpoint's manifest and the workload.
pub async fn core_with_a_checkpoint(
    objects: &std::path::Path,
    retain: &str,
) -> (ServerProcess, Value, Workload) {
    let store_url = format!("file://{}", objects.display());
    let (core, c) = start_core(&store_url, &[]).await;
    let mut work = Workload::create(&c, 3, &[("acme", "flags")], 100).await;
    post_changes(&c, &mut work, 2_000).await;
    let mut once = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &["--once", "--retain", retain],
    ))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    let manifest = core.api().get("/checkpoints/latest").await.ok_json();
    (core, manifest, work)
}

/// A `changeagent-edge` following `upstream`, with `extra` flags.
pub fn edge(upstream: &str, extra: &[&str]) -> ServerOptions {
    let mut opts = ServerOptions::default()
        .bin(Binary::named("changeagent-edge"))
        .arg("--upstream")
        .arg(upstream);
    for a in extra {
        opts = opts.arg(*a);
    }
    opts
}

/// What a `changeagent-bench` run left: its exit status, stdout, the last lines of its
/// stderr, and its JSON summary (the last stdout line that is a JSON object), if any.
pub struct BenchRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr_tail: String,
    pub summary: Option<Value>,
}

impl BenchRun {
    /// The JSON summary; panics with the run's output when there is none.
    pub fn summary(&self) -> &Value {
        self.summary.as_ref().unwrap_or_else(|| {
            panic!(
                "no JSON summary ({}):\n{}\n{}",
                self.status, self.stdout, self.stderr_tail
            )
        })
    }
}

/// Runs `changeagent-bench` with `args` (found like the servers: `CHANGEAGENT_BENCH_BIN`,
/// else beside the test executable) within `deadline`; panics when it does not end in time.
pub async fn run_bench(args: &[std::ffi::OsString], deadline: Duration) -> BenchRun {
    let bench = Binary::named("changeagent-bench")
        .locate()
        .unwrap_or_else(|err| panic!("{err}"));
    let run = tokio::process::Command::new(bench)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(deadline, run)
        .await
        .unwrap_or_else(|_| panic!("changeagent-bench {args:?} did not end within {deadline:?}"))
        .expect("run changeagent-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let stderr_tail = lines[lines.len().saturating_sub(30)..].join("\n");
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("the summary is JSON"));
    BenchRun {
        status: output.status,
        stdout,
        stderr_tail,
        summary,
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it); returns
/// the limit.
pub fn raise_open_files() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    hard
}

/// The sum of a metric's samples in `/metrics` (0 when absent).
pub async fn metric_sum(api: &Api, name: &str) -> u64 {
    let text = api.get("/metrics").await.text();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A TCP connection to `to` from the local address `from` (a loopback IP of a cluster
/// member, or any other).
pub async fn connect_from(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Reads from `stream` until the server closes it (or resets it), at most `within`;
/// returns what arrived, or `None` when it was still open then.
pub async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| got)
}
