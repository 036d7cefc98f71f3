//! `storm`: thousands of long-polls woken again and again while writers
//! post, against a cluster that is already running (it starts nothing);
//! reports whether Raft stayed healthy under the load: no new term, no
//! leader change, every write answered 200 within the server's write
//! timeout.
//!
//! The rules:
//!
//! - `--polls` long-polls are spread round-robin over `--nodes` (every core
//!   node's base URL), each on its own keep-alive connection of the minimal
//!   HTTP/1.1 client. They open `--ramp` at a time; after each batch the run
//!   waits, up to a minute, until the `changeagent_long_polls_open` gauges
//!   summed over the nodes show them (above what the gauges read, settled,
//!   before). Every node must export the gauge.
//! - Each long-poll loops `GET /changes?since=S&block=B&limit=100`. S starts
//!   at its node's `lastIndex` and becomes the last `_id` of every answer
//!   that held changes (not the answer's `lastIndex`); the next poll goes out
//!   at once, so every write wakes every long-poll. A failed poll (no
//!   connection, no answer within `block` + 30 s, a status other than 200, a
//!   body that is no change list) is counted, and the poller asks again
//!   after a short pause, on a fresh connection when the old one broke; it
//!   never ends the run.
//! - With `--preload N`, N small changes are posted first (arrays of 1,000), and
//!   `--readers` readers (round-robin over the nodes, a connection each) page
//!   through that history with `GET /changes?since=S&limit=100`, from the
//!   start again whenever they reach its end: reads behind the nodes' tail
//!   caches, which go to RocksDB on the nodes' blocking threads, the way a
//!   fleet catching up after an outage reads. Pages are counted while the
//!   writers run, failures over the whole run (a failed read starts over).
//! - Once the long-polls are open, every node's `/health` must name one
//!   leader in one term within 10 s: the term and leader before. While the
//!   writers run, a watcher reads every node's `/health` every 100 ms and
//!   records each change of term or leader a node reports, with the time
//!   since the writers started.
//! - `--writers` writers post `{"data":{"storm":true,"n":i}}`, `--rate` posts
//!   per second in all, for `--duration` seconds; post i goes to node
//!   i mod N (followers forward to the leader). Each writer keeps its own
//!   schedule (a tokio interval, missed ticks skipped: a writer held up by a
//!   slow post does not catch up in a burst). Each post times out after
//!   `--write-timeout-ms` + 5 s. A post without an answer is a write error;
//!   an answer other than 200, or one that took longer than
//!   `--write-timeout-ms` (the server's write timeout), is a write over the
//!   timeout. Latency percentiles are over every post, answered or not.
//! - Then the writers stop (each finishes the post it has in flight), then
//!   the watcher, and the long-polls are dropped. Answers are counted while
//!   the writers run, poll errors over the whole run.
//! - The run is `ok` when there was no write error and no write over the
//!   timeout, the term after (the highest term the watcher last saw) is the
//!   term before, and no node named a leader other than the one it named
//!   before (a node that loses its leader counts too).
//!
//! It prints a progress line on stderr every 5 s (writes, answers per
//! second, the slowest write so far, each node's term), then a table, and
//! as the last line of stdout one JSON object with every figure. Exit
//! status: 0 when ok, 1 when the run finished but was not ok, 2 when it
//! could not be carried out (a node unreachable, no agreed leader, the
//! long-polls never showed open, interrupted).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::future::join_all;
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::longpoll::{self, BLOCK_GRACE, GAUGE, OPEN_DEADLINE, SCRAPE_INTERVAL};
use crate::open_files;
use crate::poll_client::{self, ClientKind, PollClient, PollConn};
use crate::report::{self, Latency, Progress};
use crate::server::{self, Page, Server};

/// `limit` of every long-poll: a burst of writes is read in few answers.
const POLL_LIMIT: u32 = 100;

/// Pause of a poller after a failed poll, so a node that refuses
/// connections does not make ten thousand pollers spin.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How often the watcher reads every node's `/health`.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Timeout of one `/health` read: a live node answers in microseconds; a
/// slower answer is counted as a failed probe.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Timeout of the first request to each node.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the nodes may take to agree on one leader before the writers
/// start.
const AGREE_DEADLINE: Duration = Duration::from_secs(10);

/// A post times out this long after the server's write timeout: the server
/// answers 503 at its timeout, so only a node that does not answer at all
/// reaches this one.
const WRITE_GRACE: Duration = Duration::from_secs(5);

/// How often the progress line is printed: the run lasts tens of seconds.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Exit status of a run that finished but was not ok.
const EXIT_NOT_OK: u8 = 1;

/// Exit status of a run that could not be carried out.
const EXIT_SETUP: u8 = 2;

/// The `storm` subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Base URLs of every core node of the running cluster, comma separated
    /// (plain http).
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_NODES",
        value_delimiter = ',',
        required = true
    )]
    pub nodes: Vec<String>,
    /// Long-polls to hold, spread round-robin over the nodes, one connection
    /// each.
    #[arg(long, env = "CHANGEAGENT_BENCH_POLLS", default_value_t = 10_000)]
    pub polls: usize,
    /// Long-polls opened at once before waiting for the nodes to report
    /// them, so the connection burst stays under the listen backlog.
    #[arg(long, env = "CHANGEAGENT_BENCH_RAMP", default_value_t = 500)]
    pub ramp: usize,
    /// `block` seconds of each long-poll (1..=300).
    #[arg(long, env = "CHANGEAGENT_BENCH_BLOCK", default_value_t = 30)]
    pub block: u64,
    /// Concurrent writers.
    #[arg(long, env = "CHANGEAGENT_BENCH_WRITERS", default_value_t = 4)]
    pub writers: usize,
    /// Posts per second of all writers together.
    #[arg(long, env = "CHANGEAGENT_BENCH_RATE", default_value_t = 20.0)]
    pub rate: f64,
    /// Seconds of writing.
    #[arg(long, env = "CHANGEAGENT_BENCH_DURATION", default_value_t = 20)]
    pub duration: u64,
    /// The server's write timeout in ms: an answer slower than this, or not
    /// 200, is a write over the timeout.
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_WRITE_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub write_timeout_ms: u64,
    /// Small changes posted before the storm, so the readers have history to read behind
    /// the nodes' tail caches (which hold the newest 65,536 changes).
    #[arg(long, env = "CHANGEAGENT_BENCH_PRELOAD", default_value_t = 0)]
    pub preload: u64,
    /// Readers paging through the preloaded history again and again during the storm.
    #[arg(long, env = "CHANGEAGENT_BENCH_READERS", default_value_t = 0)]
    pub readers: usize,
}

impl StormArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.iter().all(|n| n.trim().is_empty()) {
            bail!("--nodes must list the base URL of every core node, e.g. http://10.0.0.1:9000,http://10.0.0.2:9000");
        }
        for node in self.node_urls() {
            if !node.starts_with("http://") {
                bail!(
                    "--nodes {node:?}: the long-polls speak plain http only; give http://host:port"
                );
            }
        }
        if self.polls == 0 || self.ramp == 0 || self.writers == 0 {
            bail!("--polls, --ramp and --writers must be at least 1");
        }
        if !(1..=300).contains(&self.block) {
            bail!("--block must be within 1..=300 seconds");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of posts per second");
        }
        if self.readers > 0 && self.preload == 0 {
            bail!("--readers page through preloaded history: give --preload too");
        }
        if self.duration == 0 || self.write_timeout_ms == 0 {
            bail!("--duration and --write-timeout-ms must be at least 1");
        }
        Ok(())
    }

    /// The node URLs given, empty entries (a trailing comma) left out.
    fn node_urls(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// Time between two posts of one writer: each writes its share of the
    /// rate.
    fn writer_period(&self) -> Duration {
        Duration::from_secs_f64(self.writers as f64 / self.rate)
    }
}

/// Runs the storm, prints its figures and returns the exit status (see the
/// module docs); Ctrl-C ends it as a run that could not be carried out.
pub async fn main(args: &StormArgs) -> ExitCode {
    let outcome = tokio::select! {
        outcome = run(args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(storm) if storm.ok() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_NOT_OK),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

/// One node of the cluster: its client, its long-polls' client and the
/// `lastIndex` its long-polls start from.
struct Node {
    server: Server,
    polls: PollClient,
    since: u64,
}

/// Sets up, runs the writers while the long-polls are woken and the
/// watcher reads `/health`, then prints and returns the figures. An error
/// means the run could not be carried out.
async fn run(args: &StormArgs) -> Result<StormRun> {
    args.validate()?;
    let mut nodes = connect(args).await?;
    report::header(&format!(
        "storm: {} long-polls (block={} s) on {} nodes, {} writers posting {}/s for {} s",
        report::count(args.polls as u64),
        args.block,
        nodes.len(),
        args.writers,
        args.rate,
        args.duration
    ));
    open_files::ensure((args.polls + args.readers) as u64, None)?;
    let history = preload(&nodes, args.preload).await?;
    if args.preload > 0 {
        // The long-polls start after the history.
        for node in &mut nodes {
            node.since = first_page(&node.server).await?.last_index;
        }
    }
    let setup = wait_agreed(&nodes).await?;
    let baseline = baseline_open(&nodes).await?;

    let polls = Arc::new(PollStats::default());
    let mut pollers = JoinSet::new();
    let polls_open = open_polls(&nodes, args, baseline, &polls, &mut pollers).await?;
    let reads = Arc::new(PollStats::default());
    for i in 0..args.readers {
        let node = &nodes[i % nodes.len()];
        pollers.spawn(read_loop(
            node.polls.connection(),
            history,
            Arc::clone(&reads),
        ));
    }
    let before = wait_agreed(&nodes).await?;
    if before.term != setup.term || before.leader != setup.leader {
        println!(
            "note: while the long-polls opened, the cluster went from term {} (leader {}) to \
             term {} (leader {})",
            setup.term, setup.leader, before.term, before.leader
        );
    }
    println!(
        "before the writes: term {}, leader {}, agreed by all {} nodes",
        before.term,
        before.leader,
        nodes.len()
    );

    let started = Instant::now();
    let watch = Arc::new(WatchState::new(started, &before.seen));
    let watcher = Watcher::start(&nodes, &watch);
    let answers_before = polls.counts();
    let reads_before = reads.counts().0;
    let writes = write_storm(&nodes, args, started, &polls, &watch).await?;
    let window = started.elapsed();
    let answers_after = polls.counts();
    let reads_after = reads.counts().0;
    watcher.stop().await;
    pollers.shutdown().await;

    let storm = StormRun {
        polls: args.polls,
        polls_open,
        write_timeout: args.write_timeout(),
        writes,
        answers: answers_after.0 - answers_before.0,
        answers_with_changes: answers_after.1 - answers_before.1,
        window,
        poll_errors: polls.errors.load(Ordering::Relaxed),
        readers: args.readers,
        reads: reads_after - reads_before,
        read_errors: reads.errors.load(Ordering::Relaxed),
        first_poll_error: polls.first_error(),
        term_before: before.term,
        leader_before: before.leader,
        watch: watch.outcome(),
    };
    storm.print();
    println!("{}", storm.to_json());
    Ok(storm)
}

/// Changes posted per request by [`preload`].
const PRELOAD_BATCH: u64 = 1000;

/// Posts `n` small changes to the first node in arrays of [`PRELOAD_BATCH`]; returns the
/// last `_id` of the history the readers page through.
async fn preload(nodes: &[Node], n: u64) -> Result<u64> {
    let Some(first) = nodes.first() else {
        bail!("--nodes lists no node");
    };
    let mut posted = 0;
    let started = Instant::now();
    while posted < n {
        let batch = PRELOAD_BATCH.min(n - posted);
        let body: Vec<Value> = (posted..posted + batch)
            .map(|k| json!({"data": {"preload": k}}))
            .collect();
        let resp = first
            .server
            .client()
            .post(first.server.url("/changes"))
            .timeout(REACH_TIMEOUT * 6)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("preloading {}", first.server.base()))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("preloading {}: {status}: {text}", first.server.base());
        }
        posted += batch;
    }
    if n > 0 {
        println!(
            "preloaded {} changes in {:.1} s",
            report::count(n),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(first_page(&first.server).await?.last_index)
}

/// A client for every node, checked to answer, with its `lastIndex`.
async fn connect(args: &StormArgs) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for url in args.node_urls() {
        let server = Server::new(url).with_context(|| format!("--nodes {url}"))?;
        let page = first_page(&server).await?;
        let polls = PollClient::new(ClientKind::Raw, &server).await?;
        println!(
            "node {}: changes {}..={}",
            server.base(),
            page.first_index,
            page.last_index
        );
        nodes.push(Node {
            server,
            polls,
            since: page.last_index,
        });
    }
    Ok(nodes)
}

/// `GET /changes?limit=1` of a node, which says it is there and where its
/// log ends.
async fn first_page(server: &Server) -> Result<Page> {
    let body = server
        .get_ok("/changes?limit=1", REACH_TIMEOUT)
        .await
        .with_context(|| {
            format!(
                "cannot reach {} of --nodes: is the cluster up, and is every URL a core node's \
                 base URL (http://host:port)?",
                server.base()
            )
        })?;
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "{}/changes?limit=1 is not a change list: is it a ChangeAgent core node?",
            server.base()
        )
    })
}

// ---------------------------------------------------------------------------
// Health: one leader before, every change of term or leader during.

/// The fields of `GET /health` the run decides by.
#[derive(Debug, Clone, Deserialize)]
struct Health {
    /// `leader`, `follower`, `candidate`, …
    #[serde(default)]
    role: Option<String>,
    /// Node id of the leader the node knows of.
    #[serde(default)]
    leader: Option<u64>,
    #[serde(default)]
    term: u64,
}

impl Health {
    fn seen(&self) -> Seen {
        Seen {
            term: self.term,
            leader: self.leader,
        }
    }
}

/// The term and leader one node reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    term: u64,
    leader: Option<u64>,
}

/// One leader in one term, named by every node.
#[derive(Debug, Clone)]
struct Agreed {
    term: u64,
    leader: u64,
    /// What each node said, in node order.
    seen: Vec<Seen>,
}

/// `GET /health` of `server`, or what went wrong.
async fn health(server: &Server) -> std::result::Result<Health, String> {
    let body = server
        .get_ok("/health", HEALTH_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    serde_json::from_slice(&body)
        .map_err(|e| format!("GET {}/health: not a health document: {e}", server.base()))
}

/// The leader and term every node names, when every node answered and they
/// all name the same ones.
fn agreement(answers: &[std::result::Result<Health, String>]) -> Option<Agreed> {
    let healths: Vec<&Health> = answers
        .iter()
        .map(|a| a.as_ref().ok())
        .collect::<Option<_>>()?;
    let first = healths.first()?;
    let leader = first.leader?;
    let agreed = healths
        .iter()
        .all(|h| h.leader == Some(leader) && h.term == first.term);
    agreed.then(|| Agreed {
        term: first.term,
        leader,
        seen: healths.iter().map(|h| h.seen()).collect(),
    })
}

/// One line per node with what it said, for the error of a failed wait.
fn health_table(nodes: &[Node], answers: &[std::result::Result<Health, String>]) -> String {
    nodes
        .iter()
        .zip(answers)
        .map(|(node, answer)| match answer {
            Ok(h) => format!(
                "  {}: {}, leader {}, term {}",
                node.server.base(),
                h.role.as_deref().unwrap_or("no role"),
                h.leader.map_or("none".to_string(), |l| l.to_string()),
                h.term
            ),
            Err(err) => format!("  {}: no answer: {err}", node.server.base()),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until every node names one leader in one term, for at most
/// [`AGREE_DEADLINE`].
async fn wait_agreed(nodes: &[Node]) -> Result<Agreed> {
    let deadline = Instant::now() + AGREE_DEADLINE;
    loop {
        let answers = join_all(nodes.iter().map(|n| health(&n.server))).await;
        if let Some(agreed) = agreement(&answers) {
            return Ok(agreed);
        }
        if Instant::now() >= deadline {
            bail!(
                "the nodes did not agree on one leader in one term within {} s; they said:\n{}\n\
                 Is every core node of the cluster in --nodes, and is the cluster up?",
                AGREE_DEADLINE.as_secs(),
                health_table(nodes, &answers)
            );
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// A change of term or leader one node reported while the writers ran.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChangeSeen {
    /// Since the writers started.
    at_ms: u64,
    node: String,
    term: u64,
    leader: Option<u64>,
    /// The node named another leader than before (or none).
    leader_changed: bool,
}

impl ChangeSeen {
    fn to_json(&self) -> Value {
        json!({
            "at_ms": self.at_ms,
            "node": self.node,
            "term": self.term,
            "leader": self.leader,
        })
    }
}

/// What the watcher saw, shared by its tasks and the progress line.
struct WatchState {
    started: Instant,
    /// The last term and leader of each node, in node order.
    last: Mutex<Vec<Seen>>,
    changes: Mutex<Vec<ChangeSeen>>,
    /// `/health` reads that failed or took longer than [`HEALTH_TIMEOUT`].
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// The watcher's figures once it stopped.
#[derive(Debug, Clone)]
struct WatchOutcome {
    /// The highest term the nodes last reported.
    term_after: u64,
    changes: Vec<ChangeSeen>,
    errors: u64,
    first_error: Option<String>,
}

impl WatchState {
    fn new(started: Instant, seen: &[Seen]) -> Self {
        Self {
            started,
            last: Mutex::new(seen.to_vec()),
            changes: Mutex::default(),
            errors: AtomicU64::new(0),
            first_error: Mutex::default(),
        }
    }

    /// Records what node `index` (at `url`) said, if it differs from what
    /// it said last.
    fn see(&self, index: usize, url: &str, now: Seen) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let before = last[index];
        if before == now {
            return;
        }
        last[index] = now;
        let change = ChangeSeen {
            at_ms: self.started.elapsed().as_millis() as u64,
            node: url.to_string(),
            term: now.term,
            leader: now.leader,
            leader_changed: now.leader != before.leader,
        };
        self.changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(change);
    }

    fn fail(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(message);
    }

    /// `5/5/6`: each node's last term, for the progress line.
    fn terms(&self) -> String {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.iter()
            .map(|s| s.term.to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    fn outcome(&self) -> WatchOutcome {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        WatchOutcome {
            term_after: last.iter().map(|s| s.term).max().unwrap_or(0),
            changes: self
                .changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            errors: self.errors.load(Ordering::Relaxed),
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// One task per node reading its `/health` every [`WATCH_INTERVAL`].
struct Watcher {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Watcher {
    fn start(nodes: &[Node], state: &Arc<WatchState>) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (index, node) in nodes.iter().enumerate() {
            tasks.spawn(watch_node(
                node.server.clone(),
                index,
                Arc::clone(state),
                stop.clone(),
            ));
        }
        Self { stop, tasks }
    }

    /// Stops every task; returns once none reads any more.
    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn watch_node(server: Server, index: usize, state: Arc<WatchState>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(WATCH_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = health(&server) => answer,
        };
        match answer {
            Ok(h) => state.see(index, server.base(), h.seen()),
            Err(err) => state.fail(err),
        }
    }
}

// ---------------------------------------------------------------------------
// Long-polls.

/// Counters of every poller.
#[derive(Default)]
struct PollStats {
    /// Answers with status 200, and those of them that held changes.
    answers: AtomicU64,
    with_changes: AtomicU64,
    /// Failed polls.
    errors: AtomicU64,
    /// Some poller could not get a socket (EMFILE / ENFILE).
    out_of_files: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl PollStats {
    /// Answers and answers with changes so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.answers.load(Ordering::Relaxed),
            self.with_changes.load(Ordering::Relaxed),
        )
    }

    fn fail(&self, message: String, out_of_files: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if out_of_files {
            self.out_of_files.store(true, Ordering::Relaxed);
        }
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(message);
    }

    fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The long-polls the nodes hold, summed; `None` when no node exports the
/// gauge.
async fn open_sum(nodes: &[Node]) -> Result<Option<f64>> {
    let reads = join_all(nodes.iter().map(|n| n.server.metric(GAUGE))).await;
    let mut total = None;
    for read in reads {
        if let Some(open) = read? {
            total = Some(total.unwrap_or(0.0) + open);
        }
    }
    Ok(total)
}

/// The settled sum of the gauges before the run's long-polls open; an error
/// when a node does not export the gauge.
async fn baseline_open(nodes: &[Node]) -> Result<f64> {
    for node in nodes {
        if node.server.metric(GAUGE).await?.is_none() {
            bail!(
                "{} exports no {GAUGE} gauge in /metrics; the run needs it on every node to \
                 see the long-polls open: run it against core nodes of this version",
                node.server.base()
            );
        }
    }
    Ok(longpoll::settle(|| open_sum(nodes)).await?.unwrap_or(0.0))
}

/// Opens the long-polls `args.ramp` at a time, poll i on node i mod N,
/// waiting after each batch until the gauges show them; returns how many
/// more the gauges show than before.
async fn open_polls(
    nodes: &[Node],
    args: &StormArgs,
    baseline: f64,
    stats: &Arc<PollStats>,
    pollers: &mut JoinSet<()>,
) -> Result<u64> {
    let opening = Instant::now();
    let mut opened = 0;
    let mut seen = baseline;
    while opened < args.polls {
        let batch = args.ramp.min(args.polls - opened);
        for i in opened..opened + batch {
            let node = &nodes[i % nodes.len()];
            pollers.spawn(poll_loop(
                node.polls.connection(),
                node.since,
                args.block,
                Arc::clone(stats),
            ));
        }
        opened += batch;
        seen = wait_open(nodes, baseline + opened as f64, stats).await?;
        eprintln!(
            "  … storm: opened {} / {} long-polls, the nodes report {} open",
            report::count(opened as u64),
            report::count(args.polls as u64),
            seen
        );
    }
    println!(
        "{} long-polls open after {:.1} s",
        report::count(args.polls as u64),
        opening.elapsed().as_secs_f64()
    );
    Ok((seen - baseline).max(0.0).round() as u64)
}

/// Waits until the gauges sum to `target`, for at most [`OPEN_DEADLINE`];
/// fails at once when a poller ran out of file descriptors.
async fn wait_open(nodes: &[Node], target: f64, stats: &PollStats) -> Result<f64> {
    let deadline = Instant::now() + OPEN_DEADLINE;
    loop {
        if stats.out_of_files.load(Ordering::Relaxed) {
            bail!(
                "a long-poll could not open a connection: too many open files ({}).\n\
                 Raise the limit in this shell and in the nodes' (`ulimit -n 65536`, or \
                 `LimitNOFILE=` of the service), restart them, or lower --polls",
                stats.first_error().unwrap_or_default()
            );
        }
        let seen = open_sum(nodes).await?.unwrap_or(0.0);
        if seen >= target {
            return Ok(seen);
        }
        if Instant::now() >= deadline {
            let errors = stats.errors.load(Ordering::Relaxed);
            let first = stats
                .first_error()
                .map(|e| format!("; first poll error: {e}"))
                .unwrap_or_default();
            bail!(
                "the nodes report {seen} long-polls open in all, not {target}, after {} s \
                 ({errors} poll errors{first}); check the nodes' open-file limit and logs",
                OPEN_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
    }
}

/// One long-poll, asked again as soon as it answers, until it is dropped.
async fn poll_loop(mut conn: PollConn, mut since: u64, block: u64, stats: Arc<PollStats>) {
    let timeout = Duration::from_secs(block) + BLOCK_GRACE;
    loop {
        let path = poll_path(since, block);
        match poll_once(&mut conn, &path, timeout).await {
            Ok(last) => {
                stats.answers.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = last {
                    stats.with_changes.fetch_add(1, Ordering::Relaxed);
                    since = id;
                }
            }
            Err(err) => {
                stats.fail(
                    format!("GET {path}: {err:#}"),
                    poll_client::is_out_of_files(&err),
                );
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// One reader: pages from the start of the history to `end`, then again, until dropped.
async fn read_loop(mut conn: PollConn, end: u64, stats: Arc<PollStats>) {
    let timeout = Duration::from_secs(30);
    let mut since = 0;
    loop {
        let path = format!("/changes?since={since}&limit={POLL_LIMIT}");
        match poll_once(&mut conn, &path, timeout).await {
            Ok(last) => {
                stats.answers.fetch_add(1, Ordering::Relaxed);
                since = match last {
                    Some(id) if id < end => id,
                    _ => 0,
                };
            }
            Err(err) => {
                stats.fail(
                    format!("GET {path}: {err:#}"),
                    poll_client::is_out_of_files(&err),
                );
                since = 0;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// `/changes?since=S&block=B&limit=100`.
fn poll_path(since: u64, block: u64) -> String {
    format!("/changes?since={since}&block={block}&limit={POLL_LIMIT}")
}

/// One poll: the last `_id` of the answer, `None` when it held no change.
async fn poll_once(conn: &mut PollConn, path: &str, timeout: Duration) -> Result<Option<u64>> {
    let answer = conn.get(path, timeout).await?;
    if answer.status != 200 {
        bail!(
            "status {}: {}",
            answer.status,
            poll_client::snippet(&answer.body)
        );
    }
    last_id(&answer.body)
}

/// The `_id` of the last change of a `GET /changes` answer, `None` when it
/// holds none.
fn last_id(body: &[u8]) -> Result<Option<u64>> {
    let page: Page = serde_json::from_slice(body).context("the answer is not a change list")?;
    Ok(page.changes.last().map(|c| c.id))
}

// ---------------------------------------------------------------------------
// Writers.

/// Counters of every writer, for the progress line.
#[derive(Default)]
struct WriteCounters {
    /// Next value of `n` in the posted data; post n goes to node n mod N.
    next_n: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    over_timeout: AtomicU64,
    max_nanos: AtomicU64,
}

/// What the writers saw.
#[derive(Debug)]
struct WriteOutcome {
    hist: Histogram<u64>,
    /// Answers by status.
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    over_timeout: u64,
    /// The first post without an answer, or not 200, or too slow.
    first_problem: Option<String>,
}

impl WriteOutcome {
    fn new() -> Result<Self> {
        Ok(Self {
            hist: report::histogram()?,
            statuses: BTreeMap::new(),
            errors: 0,
            over_timeout: 0,
            first_problem: None,
        })
    }

    fn merge(&mut self, other: WriteOutcome) -> Result<()> {
        self.hist
            .add(&other.hist)
            .context("merging latency histograms")?;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        self.over_timeout += other.over_timeout;
        self.first_problem = self.first_problem.take().or(other.first_problem);
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.hist.len()
    }
}

/// How one post ended.
enum Posted {
    /// An answer: its status and the start of its body.
    Answer { status: u16, body: String },
    /// No answer: what went wrong.
    Failed(String),
}

/// Runs the writers for `args.duration` from `started`, with a progress
/// line every [`PROGRESS_EVERY`]; returns once every writer has finished
/// its last post.
async fn write_storm(
    nodes: &[Node],
    args: &StormArgs,
    started: Instant,
    polls: &Arc<PollStats>,
    watch: &Arc<WatchState>,
) -> Result<WriteOutcome> {
    let client = reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .timeout(args.write_timeout() + WRITE_GRACE)
        .build()
        .context("building the writers' HTTP client")?;
    let urls: Arc<[String]> = nodes.iter().map(|n| n.server.url("/changes")).collect();
    let counters = Arc::new(WriteCounters::default());
    let _progress = progress(&counters, polls, watch);

    let period = args.writer_period();
    let deadline = tokio::time::Instant::from_std(started + Duration::from_secs(args.duration));
    let mut writers = JoinSet::new();
    for w in 0..args.writers {
        // Writer w starts w posts' worth of time after the first: the posts
        // of all writers interleave evenly.
        let first = started + period.mul_f64(w as f64 / args.writers as f64);
        writers.spawn(writer(
            client.clone(),
            Arc::clone(&urls),
            tokio::time::Instant::from_std(first),
            period,
            deadline,
            args.write_timeout(),
            Arc::clone(&counters),
        ));
    }
    let mut outcome = WriteOutcome::new()?;
    while let Some(joined) = writers.join_next().await {
        outcome.merge(joined.context("a writer panicked")??)?;
    }
    Ok(outcome)
}

/// The progress line of the writing phase.
fn progress(
    counters: &Arc<WriteCounters>,
    polls: &Arc<PollStats>,
    watch: &Arc<WatchState>,
) -> Progress {
    let (counters, polls, watch) = (Arc::clone(counters), Arc::clone(polls), Arc::clone(watch));
    let answers_before = polls.counts().0;
    Progress::every(PROGRESS_EVERY, move |elapsed| {
        let answers = polls.counts().0 - answers_before;
        format!(
            "storm: {} writes ({} errors, {} over the timeout), {} answers/s, slowest write {}, \
             terms {}, {} poll errors",
            report::count(counters.done.load(Ordering::Relaxed)),
            report::count(counters.errors.load(Ordering::Relaxed)),
            report::count(counters.over_timeout.load(Ordering::Relaxed)),
            report::rate(answers, elapsed),
            report::ms(Duration::from_nanos(
                counters.max_nanos.load(Ordering::Relaxed)
            )),
            watch.terms(),
            report::count(polls.errors.load(Ordering::Relaxed))
        )
    })
}

/// One writer: a post at every tick of its own interval until `deadline`.
async fn writer(
    client: reqwest::Client,
    urls: Arc<[String]>,
    first: tokio::time::Instant,
    period: Duration,
    deadline: tokio::time::Instant,
    write_timeout: Duration,
    counters: Arc<WriteCounters>,
) -> Result<WriteOutcome> {
    let mut outcome = WriteOutcome::new()?;
    let mut ticks = tokio::time::interval_at(first, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // A tick due at the deadline itself is not taken.
    while let Ok(at) = tokio::time::timeout_at(deadline, ticks.tick()).await {
        if at >= deadline {
            break;
        }
        let n = counters.next_n.fetch_add(1, Ordering::Relaxed);
        let url = &urls[(n % urls.len() as u64) as usize];
        let sent = Instant::now();
        let posted = post(&client, url, n).await;
        let latency = sent.elapsed();
        report::record(&mut outcome.hist, latency);
        counters.done.fetch_add(1, Ordering::Relaxed);
        counters.max_nanos.fetch_max(
            u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let problem = match posted {
            Posted::Failed(err) => {
                outcome.errors += 1;
                counters.errors.fetch_add(1, Ordering::Relaxed);
                Some(format!(
                    "POST {url}: no answer after {}: {err}",
                    report::ms(latency)
                ))
            }
            Posted::Answer { status, body } => {
                *outcome.statuses.entry(status).or_default() += 1;
                if over_timeout(status, latency, write_timeout) {
                    outcome.over_timeout += 1;
                    counters.over_timeout.fetch_add(1, Ordering::Relaxed);
                    Some(format!(
                        "POST {url}: status {status} after {}: {body}",
                        report::ms(latency)
                    ))
                } else {
                    None
                }
            }
        };
        if outcome.first_problem.is_none() {
            outcome.first_problem = problem;
        }
    }
    Ok(outcome)
}

/// An answered write counts as over the timeout when it is not 200 or took
/// longer than the server's write timeout.
fn over_timeout(status: u16, latency: Duration, write_timeout: Duration) -> bool {
    status != 200 || latency > write_timeout
}

/// `POST url` of change n; the answer's status and the start of its body.
async fn post(client: &reqwest::Client, url: &str, n: u64) -> Posted {
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(format!(r#"{{"data":{{"storm":true,"n":{n}}}}}"#))
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(err) => return Posted::Failed(server::describe(&err)),
    };
    let status = resp.status().as_u16();
    match resp.bytes().await {
        Ok(body) => Posted::Answer {
            status,
            body: poll_client::snippet(&body),
        },
        Err(err) => Posted::Failed(format!(
            "status {status}, then reading the answer: {}",
            server::describe(&err)
        )),
    }
}

// ---------------------------------------------------------------------------
// The result.

/// Everything one storm measured.
#[derive(Debug)]
struct StormRun {
    polls: usize,
    /// How many more long-polls the gauges showed once all had opened.
    polls_open: u64,
    write_timeout: Duration,
    writes: WriteOutcome,
    /// Answers while the writers ran, and those that held changes.
    answers: u64,
    answers_with_changes: u64,
    /// From the writers' start until the last of them finished.
    window: Duration,
    /// Failed polls over the whole run.
    poll_errors: u64,
    first_poll_error: Option<String>,
    /// Readers of the preloaded history, their pages while the writers ran, and failed
    /// reads over the whole run.
    readers: usize,
    reads: u64,
    read_errors: u64,
    term_before: u64,
    leader_before: u64,
    watch: WatchOutcome,
}

impl StormRun {
    /// How many times a node named another leader than before (a node that
    /// loses its leader counts).
    fn leader_changes(&self) -> usize {
        self.watch
            .changes
            .iter()
            .filter(|c| c.leader_changed)
            .count()
    }

    fn ok(&self) -> bool {
        self.writes.errors == 0
            && self.writes.over_timeout == 0
            && self.watch.term_after == self.term_before
            && self.leader_changes() == 0
    }

    /// Why the run is not ok, in words; empty when it is.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.writes.errors > 0 {
            failures.push(format!("{} writes got no answer", self.writes.errors));
        }
        if self.writes.over_timeout > 0 {
            failures.push(format!(
                "{} writes were over the write timeout or not 200",
                self.writes.over_timeout
            ));
        }
        if self.watch.term_after != self.term_before {
            failures.push(format!(
                "the term went from {} to {}",
                self.term_before, self.watch.term_after
            ));
        }
        let changes = self.leader_changes();
        if changes > 0 {
            failures.push(format!("{changes} leader changes seen by the nodes"));
        }
        failures
    }

    fn latency(&self) -> Latency {
        Latency::of(&self.writes.hist)
    }

    fn answers_per_s(&self) -> f64 {
        report::per_sec(self.answers, self.window)
    }

    fn print(&self) {
        let writes = self.writes.writes();
        let latency = self.latency();
        report::header("storm: results");
        println!(
            "long-polls      {} held, {} more open on the nodes' gauges once all had opened",
            report::count(self.polls as u64),
            report::count(self.polls_open)
        );
        println!(
            "writes          {} in {:.1} s ({:.1}/s); answers {}",
            report::count(writes),
            self.window.as_secs_f64(),
            report::per_sec(writes, self.window),
            self.statuses()
        );
        println!(
            "write problems  {} without an answer, {} over the {} ms write timeout or not 200",
            report::count(self.writes.errors),
            report::count(self.writes.over_timeout),
            report::count(self.write_timeout.as_millis() as u64)
        );
        println!("write latency   {}", latency.summary());
        if let Some(problem) = &self.writes.first_problem {
            println!("  first: {problem}");
        }
        println!(
            "answers         {} while writing ({} with changes) = {} /s",
            report::count(self.answers),
            report::count(self.answers_with_changes),
            report::rate(self.answers, self.window)
        );
        println!("poll errors     {}", report::count(self.poll_errors));
        if let Some(err) = &self.first_poll_error {
            println!("  first: {err}");
        }
        println!(
            "raft            term {} before, {} after; leader {} before; {} leader changes",
            self.term_before,
            self.watch.term_after,
            self.leader_before,
            self.leader_changes()
        );
        for change in &self.watch.changes {
            println!(
                "  at {} ms {}: term {}, leader {}",
                change.at_ms,
                change.node,
                change.term,
                change.leader.map_or("none".to_string(), |l| l.to_string())
            );
        }
        if self.watch.errors > 0 {
            println!(
                "health probes   {} failed or slower than {} ms; first: {}",
                report::count(self.watch.errors),
                HEALTH_TIMEOUT.as_millis(),
                self.watch.first_error.as_deref().unwrap_or_default()
            );
        }
        let failures = self.failures();
        if failures.is_empty() {
            println!("verdict         ok");
        } else {
            println!("verdict         NOT ok: {}", failures.join("; "));
        }
    }

    /// `200: 400, 503: 2`, or `none`.
    fn statuses(&self) -> String {
        if self.writes.statuses.is_empty() {
            return "none".to_string();
        }
        self.writes
            .statuses
            .iter()
            .map(|(status, n)| format!("{status}: {}", report::count(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn to_json(&self) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let latency = self.latency();
        let statuses: serde_json::Map<String, Value> = self
            .writes
            .statuses
            .iter()
            .map(|(status, n)| (status.to_string(), json!(n)))
            .collect();
        json!({
            "polls": self.polls,
            "polls_open": self.polls_open,
            "writes": self.writes.writes(),
            "write_errors": self.writes.errors,
            "writes_over_timeout": self.writes.over_timeout,
            "write_p50_ms": ms(latency.p50),
            "write_p99_ms": ms(latency.p99),
            "write_max_ms": ms(latency.max),
            "write_statuses": statuses,
            "answers": self.answers,
            "answers_with_changes": self.answers_with_changes,
            "answers_per_s": (self.answers_per_s() * 10.0).round() / 10.0,
            "poll_errors": self.poll_errors,
            "readers": self.readers,
            "reads": self.reads,
            "reads_per_s": ((self.reads as f64 / self.window.as_secs_f64().max(1e-9)) * 10.0).round() / 10.0,
            "read_errors": self.read_errors,
            "term_before": self.term_before,
            "term_after": self.watch.term_after,
            "leader_before": self.leader_before,
            "leader_changes": self.leader_changes(),
            "changes_seen": self.watch.changes.iter().map(ChangeSeen::to_json).collect::<Vec<_>>(),
            "health_errors": self.watch.errors,
            "ok": self.ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        storm: StormArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<StormArgs, clap::Error> {
        let mut argv = vec!["storm"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.storm)
    }

    fn health(role: &str, leader: Option<u64>, term: u64) -> std::result::Result<Health, String> {
        Ok(Health {
            role: Some(role.to_string()),
            leader,
            term,
        })
    }

    #[test]
    fn flags_have_their_defaults_and_are_checked() {
        let args = parse(&["--nodes", "http://127.0.0.1:9000,http://127.0.0.1:9001,"]).unwrap();
        assert_eq!(args.node_urls().count(), 2);
        assert_eq!((args.polls, args.ramp, args.block), (10_000, 500, 30));
        assert_eq!((args.writers, args.rate, args.duration), (4, 20.0, 20));
        assert_eq!(args.write_timeout(), Duration::from_secs(5));
        assert_eq!(args.writer_period(), Duration::from_millis(200));
        assert!(args.validate().is_ok());
        assert!(parse(&[]).is_err(), "--nodes is required");
        for bad in [
            &["--nodes", ","][..],
            &["--nodes", "https://x:9000"],
            &["--nodes", "http://x:9000", "--polls", "0"],
            &["--nodes", "http://x:9000", "--block", "301"],
            &["--nodes", "http://x:9000", "--rate", "0"],
            &["--nodes", "http://x:9000", "--duration", "0"],
            &["--nodes", "http://x:9000", "--writers", "0"],
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agreement_needs_every_node_on_one_leader_and_term() {
        let agreed = agreement(&[
            health("leader", Some(1), 4),
            health("follower", Some(1), 4),
            health("follower", Some(1), 4),
        ])
        .unwrap();
        assert_eq!((agreed.term, agreed.leader, agreed.seen.len()), (4, 1, 3));
        for split in [
            vec![health("leader", Some(1), 4), health("follower", Some(2), 4)],
            vec![health("leader", Some(1), 4), health("follower", Some(1), 3)],
            vec![health("candidate", None, 5), health("candidate", None, 5)],
            vec![health("leader", Some(1), 4), Err("refused".to_string())],
            vec![],
        ] {
            assert!(agreement(&split).is_none(), "{split:?}");
        }
    }

    #[test]
    fn the_watch_records_changes_of_term_and_leader_only() {
        let before = Seen {
            term: 4,
            leader: Some(1),
        };
        let state = WatchState::new(Instant::now(), &[before, before]);
        state.see(0, "http://a", before);
        assert!(state.outcome().changes.is_empty());
        let lost = Seen {
            term: 5,
            leader: None,
        };
        let new = Seen {
            term: 5,
            leader: Some(2),
        };
        state.see(1, "http://b", lost);
        state.see(1, "http://b", lost);
        state.see(1, "http://b", new);
        let outcome = state.outcome();
        assert_eq!(outcome.term_after, 5);
        let seen: Vec<_> = outcome
            .changes
            .iter()
            .map(|c| (c.node.as_str(), c.term, c.leader, c.leader_changed))
            .collect();
        assert_eq!(
            seen,
            [("http://b", 5, None, true), ("http://b", 5, Some(2), true)]
        );
        assert_eq!(state.terms(), "4/5");
        // A new term under the same leader is recorded, but is no leader change.
        state.see(
            0,
            "http://a",
            Seen {
                term: 6,
                leader: Some(1),
            },
        );
        assert!(!state.outcome().changes[2].leader_changed);
    }

    #[test]
    fn polls_follow_the_last_returned_id() {
        assert_eq!(poll_path(7, 30), "/changes?since=7&block=30&limit=100");
        let body = br#"{"changes":[{"_id":8,"data":{}},{"_id":9,"data":{}}],
                        "firstIndex":1,"lastIndex":12}"#;
        assert_eq!(last_id(body).unwrap(), Some(9), "not lastIndex");
        let empty = br#"{"changes":[],"firstIndex":1,"lastIndex":7}"#;
        assert_eq!(last_id(empty).unwrap(), None);
        assert!(last_id(b"<html>").is_err());
    }

    #[test]
    fn a_write_is_over_the_timeout_when_slow_or_not_200() {
        let timeout = Duration::from_secs(5);
        assert!(!over_timeout(200, Duration::from_millis(10), timeout));
        assert!(!over_timeout(200, timeout, timeout));
        assert!(over_timeout(
            200,
            timeout + Duration::from_millis(1),
            timeout
        ));
        assert!(over_timeout(503, Duration::from_millis(10), timeout));
    }

    #[test]
    fn ok_means_no_write_problem_and_a_steady_leader() {
        let mut run = StormRun {
            polls: 10,
            polls_open: 10,
            write_timeout: Duration::from_secs(5),
            writes: WriteOutcome::new().unwrap(),
            answers: 100,
            answers_with_changes: 90,
            window: Duration::from_secs(10),
            poll_errors: 0,
            first_poll_error: None,
            readers: 0,
            reads: 0,
            read_errors: 0,
            term_before: 4,
            leader_before: 1,
            watch: WatchOutcome {
                term_after: 4,
                changes: Vec::new(),
                errors: 0,
                first_error: None,
            },
        };
        report::record(&mut run.writes.hist, Duration::from_millis(3));
        run.writes.statuses.insert(200, 1);
        assert!(run.ok() && run.failures().is_empty());
        let json = run.to_json();
        assert_eq!(json["ok"], true);
        assert_eq!(json["writes"], 1);
        assert_eq!(json["answers_per_s"], 10.0);
        assert_eq!(json["write_statuses"]["200"], 1);
        assert_eq!(json["changes_seen"], json!([]));

        run.watch.term_after = 5;
        run.watch.changes.push(ChangeSeen {
            at_ms: 1200,
            node: "http://b".to_string(),
            term: 5,
            leader: Some(2),
            leader_changed: true,
        });
        assert!(!run.ok());
        assert_eq!(run.failures().len(), 2);
        let json = run.to_json();
        assert_eq!(json["leader_changes"], 1);
        assert_eq!(
            json["changes_seen"],
            json!([{"at_ms": 1200, "node": "http://b", "term": 5, "leader": 2}])
        );

        run.watch = WatchOutcome {
            term_after: 4,
            changes: Vec::new(),
            errors: 3,
            first_error: None,
        };
        assert!(run.ok(), "failed health probes alone do not fail the run");
        run.writes.over_timeout = 1;
        assert!(!run.ok());
    }
}
