//! `answers`: how many long-poll answers per second one node gives when each
//! answer carries one change. `--pollers` pollers, one connection each, loop
//! `GET /changes?since=<their last>&block=30&limit=1` on the target while
//! writers post batches to the core, keeping the log at most `--lead`
//! changes ahead of the slowest poller; every poller checks that it sees
//! dense increasing ids. The CPU time of the client, the target and the core
//! over the measured span says which side the rate is bound by.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::cpu;
use crate::longpoll::{Role, Target};
use crate::open_files;
use crate::poll_client::{self, ClientArgs, PollClient, PollConn};
use crate::report::{self, Progress};
use crate::server::{self, Page, Server};

/// Target (the issue's, for one edge on a 2-core machine): at least this
/// many long-poll answers per second when each poller reads one change.
pub const ANSWERS_TARGET: f64 = 50_000.0;

/// `block` of every poll: an idle poller is answered at once when a change
/// arrives, so this only bounds how long one waits with nothing to read.
const BLOCK_SECS: u64 = 30;

/// Extra time a poll may take beyond its `block` before it counts as failed.
const BLOCK_GRACE: Duration = Duration::from_secs(30);

/// How long every poller may take to get its first answer.
const WARM_UP_DEADLINE: Duration = Duration::from_secs(60);

/// How often a writer looks whether the slowest poller needs more changes:
/// a poller that reads one change per answer needs milliseconds per change.
const WRITER_TICK: Duration = Duration::from_millis(2);

/// Largest batch the server accepts in one post (its `MAX_BATCH`).
const MAX_BATCH: u64 = 10_000;

/// Pause after a failed request before the next, so a broken server is not
/// hammered and the error counts stay readable.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How many pollers, for how long, and how the writers keep them fed:
/// shared by `answers` and `fanout`.
#[derive(Debug, Clone, Args)]
pub struct AnswersArgs {
    /// Concurrent pollers, one connection each, each reading one change per
    /// answer (`limit=1`).
    #[arg(long, env = "CHANGEAGENT_BENCH_POLLERS", default_value_t = 1_000)]
    pub pollers: usize,
    /// Seconds over which answers are counted, once every poller has had
    /// its first answer.
    #[arg(long, env = "CHANGEAGENT_BENCH_DURATION", default_value_t = 10)]
    pub duration: u64,
    /// Concurrent writers posting batches to the core (--server).
    #[arg(long, env = "CHANGEAGENT_BENCH_WRITERS", default_value_t = 1)]
    pub writers: usize,
    /// The writers keep the log at most this many changes ahead of the
    /// slowest poller, topping it up once it is half used: pollers ahead of
    /// the others wait for new changes, none falls behind for good.
    #[arg(long, env = "CHANGEAGENT_BENCH_LEAD", default_value_t = 100)]
    pub lead: u64,
}

impl AnswersArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.pollers == 0 || self.duration == 0 || self.writers == 0 {
            bail!("--pollers, --duration and --writers must be at least 1");
        }
        if !(2..=MAX_BATCH).contains(&self.lead) {
            bail!("--lead must be within 2..={MAX_BATCH}");
        }
        Ok(())
    }
}

/// The `answers` subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct AnswersCmd {
    #[command(flatten)]
    pub answers: AnswersArgs,
    /// Node the pollers read from, e.g. an edge tailing --server (default:
    /// --server itself). Changes are always posted to --server.
    #[arg(long, env = "CHANGEAGENT_BENCH_TARGET")]
    pub target: Option<String>,
    /// Process id of the target node, for its CPU time (same machine only).
    #[arg(long, env = "CHANGEAGENT_BENCH_PID")]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Failed requests and wrong answers, by kind.
#[derive(Debug, Default)]
struct Faults {
    /// A change with an id beyond `since + 1`: one was skipped.
    gaps: AtomicU64,
    /// A change with an id at or below `since`: seen before.
    repeats: AtomicU64,
    /// More than one change in an answer to `limit=1`.
    over_limit: AtomicU64,
    /// Statuses other than 200, bodies that are not change lists.
    bad_answers: AtomicU64,
    /// No answer: connection errors and timeouts.
    transport: AtomicU64,
    /// Failed posts of the writers.
    posts: AtomicU64,
    out_of_files: AtomicBool,
    first: Mutex<Option<String>>,
}

impl Faults {
    fn record(&self, kind: &AtomicU64, message: impl FnOnce() -> String) {
        kind.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock() {
            if first.is_none() {
                *first = Some(message());
            }
        }
    }

    fn counts(&self) -> FaultCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            gaps: n(&self.gaps),
            repeats: n(&self.repeats),
            over_limit: n(&self.over_limit),
            bad_answers: n(&self.bad_answers),
            transport: n(&self.transport),
            posts: n(&self.posts),
            first: self.first.lock().ok().and_then(|f| f.clone()),
        }
    }
}

/// [`Faults`] read once, at the end.
#[derive(Debug, Clone, Default)]
pub struct FaultCounts {
    pub gaps: u64,
    pub repeats: u64,
    pub over_limit: u64,
    pub bad_answers: u64,
    pub transport: u64,
    pub posts: u64,
    pub first: Option<String>,
}

impl FaultCounts {
    /// Answers that broke the order: what the pollers check.
    pub fn order_errors(&self) -> u64 {
        self.gaps + self.repeats + self.over_limit
    }

    pub fn total(&self) -> u64 {
        self.order_errors() + self.bad_answers + self.transport + self.posts
    }
}

/// State shared by the pollers, the writers and the driver.
struct Shared {
    /// The last id each poller read (its next `since`).
    positions: Vec<AtomicU64>,
    /// Answers that carried a change.
    answers: AtomicU64,
    /// Answers that carried none (a `block` timeout).
    empty: AtomicU64,
    /// Answers to requests sent when the poller had read every change the
    /// writers had been acknowledged: it (most likely) waited for one.
    waited: AtomicU64,
    /// The newest id the writers have been acknowledged.
    acked: AtomicU64,
    /// Changes posted (acknowledged) and posts made.
    posted: AtomicU64,
    posts: AtomicU64,
    faults: Faults,
}

impl Shared {
    fn slowest(&self) -> u64 {
        self.positions
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct AnswersRun {
    pub role: Role,
    pub pollers: usize,
    pub client: &'static str,
    /// The measured span.
    pub elapsed: Duration,
    /// Answers with a change within the span.
    pub answers: u64,
    /// The same, over the whole run (warm-up and stop included).
    pub answers_total: u64,
    pub empty: u64,
    pub waited: u64,
    pub posted: u64,
    pub posts: u64,
    pub faults: FaultCounts,
    /// CPU time over the span of this process, the target and the core.
    pub client_cpu: Option<Duration>,
    pub target_cpu: Option<Duration>,
    pub core_cpu: Option<Duration>,
}

impl AnswersRun {
    pub fn rate(&self) -> f64 {
        report::per_sec(self.answers, self.elapsed)
    }

    pub fn met(&self) -> bool {
        self.rate() >= ANSWERS_TARGET && self.faults.order_errors() == 0
    }

    /// An error when a poller saw ids out of order or requests failed.
    pub fn check(&self) -> Result<()> {
        let f = &self.faults;
        if f.total() > 0 {
            bail!(
                "answers on the {}: {} gap(s), {} repeat(s), {} over-limit answer(s), {} bad \
                 answer(s), {} failed request(s), {} failed post(s); first: {}",
                self.role.name(),
                f.gaps,
                f.repeats,
                f.over_limit,
                f.bad_answers,
                f.transport,
                f.posts,
                f.first.as_deref().unwrap_or("-")
            );
        }
        Ok(())
    }

    /// CPU microseconds per answer of one side.
    fn us_per_answer(&self, cpu: Option<Duration>) -> Option<f64> {
        let cpu = cpu?;
        (self.answers > 0).then(|| cpu.as_secs_f64() * 1e6 / self.answers as f64)
    }

    pub fn to_json(&self) -> Value {
        let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e3).round() / 1e3);
        let us = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
        json!({
            "role": self.role.name(),
            "pollers": self.pollers,
            "client": self.client,
            "seconds": (self.elapsed.as_secs_f64() * 1e3).round() / 1e3,
            "answers": self.answers,
            "answers_per_sec": self.rate().round(),
            "target_per_sec": ANSWERS_TARGET,
            "met": self.met(),
            "empty": self.empty,
            "waited": self.waited,
            "changes_posted": self.posted,
            "posts": self.posts,
            "gaps": self.faults.gaps,
            "repeats": self.faults.repeats,
            "over_limit": self.faults.over_limit,
            "bad_answers": self.faults.bad_answers,
            "failed_requests": self.faults.transport,
            "failed_posts": self.faults.posts,
            "client_cpu_secs": secs(self.client_cpu),
            "target_cpu_secs": secs(self.target_cpu),
            "core_cpu_secs": secs(self.core_cpu),
            "client_cpu_us_per_answer": us(self.us_per_answer(self.client_cpu)),
            "target_cpu_us_per_answer": us(self.us_per_answer(self.target_cpu)),
        })
    }
}

/// Runs the pollers against `target` and the writers against `core`,
/// counts answers over `args.duration`, prints the figures beside the
/// target and returns them; failed requests and order errors are in the
/// result ([`AnswersRun::check`]).
pub async fn run(
    core: &Server,
    core_pid: Option<u32>,
    target: &Target,
    args: &AnswersArgs,
) -> Result<AnswersRun> {
    let client = match target.client {
        PollClient::Raw(_) => "raw",
        PollClient::Reqwest(_) => "reqwest",
    };
    report::header(&format!(
        "answers: {} pollers (limit=1, block={BLOCK_SECS} s, {client} client) on {}, {} writer(s) \
         posting to {} (lead {})",
        report::count(args.pollers as u64),
        target.describe(),
        args.writers,
        core.base(),
        args.lead
    ));
    open_files::ensure((args.pollers + args.writers) as u64, target.pid)?;

    // Every poller starts after everything the target holds now, once it
    // holds everything the core does.
    let want = core.range().await?.last;
    let start = wait_for_index(&target.server, want).await?;
    let shared = Arc::new(Shared {
        positions: (0..args.pollers).map(|_| AtomicU64::new(start)).collect(),
        answers: AtomicU64::new(0),
        empty: AtomicU64::new(0),
        waited: AtomicU64::new(0),
        acked: AtomicU64::new(start),
        posted: AtomicU64::new(0),
        posts: AtomicU64::new(0),
        faults: Faults::default(),
    });

    let mut tasks = JoinSet::new();
    let reserved = Arc::new(AtomicU64::new(start));
    for _ in 0..args.writers {
        tasks.spawn(writer(
            core.clone(),
            args.lead,
            Arc::clone(&reserved),
            Arc::clone(&shared),
        ));
    }
    for i in 0..args.pollers {
        tasks.spawn(poller(
            i,
            target.client.connection(),
            start,
            Arc::clone(&shared),
        ));
    }
    let _progress = {
        let shared = Arc::clone(&shared);
        let pollers = args.pollers;
        Progress::start(move |elapsed| {
            let answers = shared.answers.load(Ordering::Relaxed);
            let started = shared
                .positions
                .iter()
                .filter(|p| p.load(Ordering::Relaxed) > start)
                .count();
            format!(
                "answers: {} so far ({} /s overall), {} / {} pollers answered, {} fault(s)",
                report::count(answers),
                report::rate(answers, elapsed),
                report::count(started as u64),
                report::count(pollers as u64),
                shared.faults.counts().total()
            )
        })
    };

    // 1. Warm-up: every poller connected and answered once.
    let warm_up = Instant::now();
    loop {
        if shared.slowest() > start {
            break;
        }
        if shared.faults.out_of_files.load(Ordering::Relaxed) {
            bail!(
                "pollers could not open connections: too many open files; raise the limit \
                 (`ulimit -n 65536`) in this shell and the server's, or lower --pollers"
            );
        }
        if warm_up.elapsed() > WARM_UP_DEADLINE {
            let started = shared
                .positions
                .iter()
                .filter(|p| p.load(Ordering::Relaxed) > start)
                .count();
            bail!(
                "only {started} of {} pollers had an answer after {} s; first fault: {}",
                args.pollers,
                WARM_UP_DEADLINE.as_secs(),
                shared.faults.counts().first.as_deref().unwrap_or("-")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 2. The measured span.
    let own_cpu = cpu::Span::start(std::process::id());
    let target_cpu = target.pid.map(cpu::Span::start);
    let core_cpu = core_pid.map(cpu::Span::start);
    let before = shared.answers.load(Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let answers = shared.answers.load(Ordering::Relaxed) - before;
    let elapsed = began.elapsed();
    let client_cpu = own_cpu.used();
    let target_cpu = target_cpu.and_then(|s| s.used());
    let core_cpu = core_cpu.and_then(|s| s.used());

    // 3. Stop every poller and writer where they are.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(_progress);

    let run = AnswersRun {
        role: target.role,
        pollers: args.pollers,
        client,
        elapsed,
        answers,
        answers_total: shared.answers.load(Ordering::Relaxed),
        empty: shared.empty.load(Ordering::Relaxed),
        waited: shared.waited.load(Ordering::Relaxed),
        posted: shared.posted.load(Ordering::Relaxed),
        posts: shared.posts.load(Ordering::Relaxed),
        faults: shared.faults.counts(),
        client_cpu,
        target_cpu,
        core_cpu,
    };
    print(&run);
    Ok(run)
}

/// Waits until `server` holds change `want`; returns its last index then.
async fn wait_for_index(server: &Server, want: u64) -> Result<u64> {
    let deadline = Instant::now() + WARM_UP_DEADLINE;
    loop {
        let have = server.range().await?.last;
        if have >= want {
            return Ok(have);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} holds changes up to {have}, the core up to {want}: not caught up after {} s",
                server.base(),
                WARM_UP_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One poller: reads one change per answer from `start` on, forever (the
/// driver aborts it), checking each answer holds exactly the next id.
async fn poller(i: usize, mut conn: PollConn, start: u64, shared: Arc<Shared>) {
    let timeout = Duration::from_secs(BLOCK_SECS) + BLOCK_GRACE;
    let faults = &shared.faults;
    let mut since = start;
    let mut path = String::with_capacity(64);
    loop {
        path.clear();
        {
            use std::fmt::Write as _;
            // Writing to a String cannot fail.
            let _ = write!(path, "/changes?since={since}&block={BLOCK_SECS}&limit=1");
        }
        let waits = since >= shared.acked.load(Ordering::Relaxed);
        let answer = match conn.get(&path, timeout).await {
            Ok(answer) => answer,
            Err(err) => {
                if poll_client::is_out_of_files(&err) {
                    faults.out_of_files.store(true, Ordering::Relaxed);
                }
                faults.record(&faults.transport, || {
                    format!("poller {i}: GET {path}: {err:#}")
                });
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        if answer.status != 200 {
            faults.record(&faults.bad_answers, || {
                format!(
                    "poller {i}: GET {path}: status {}: {}",
                    answer.status,
                    poll_client::snippet(&answer.body)
                )
            });
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        let page = match serde_json::from_slice::<Page>(&answer.body) {
            Ok(page) => page,
            Err(err) => {
                faults.record(&faults.bad_answers, || {
                    format!("poller {i}: GET {path}: not a change list: {err}")
                });
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(first) = page.changes.first() else {
            shared.empty.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        shared.answers.fetch_add(1, Ordering::Relaxed);
        if waits {
            shared.waited.fetch_add(1, Ordering::Relaxed);
        }
        if page.changes.len() > 1 {
            faults.record(&faults.over_limit, || {
                format!(
                    "poller {i}: GET {path} answered {} changes",
                    page.changes.len()
                )
            });
        }
        let got = first.id;
        match verdict(since, got) {
            Next::Ok => {}
            Next::Gap => faults.record(&faults.gaps, || {
                format!("poller {i}: after {since} came {got}: a gap")
            }),
            Next::Repeat => {
                faults.record(&faults.repeats, || {
                    format!("poller {i}: after {since} came {got}: seen before")
                });
                // Ask again after what it has; do not go backwards.
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            }
        }
        since = got;
        shared.positions[i].store(since, Ordering::Relaxed);
    }
}

/// What the id after `since` says.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Ok,
    Gap,
    Repeat,
}

fn verdict(since: u64, got: u64) -> Next {
    if got == since + 1 {
        Next::Ok
    } else if got > since {
        Next::Gap
    } else {
        Next::Repeat
    }
}

/// One writer: whenever the log holds less than half of `lead` changes
/// past the slowest poller, claims the shortfall (up to `lead` past it) in
/// `reserved` and posts it as one batch to the core.
async fn writer(core: Server, lead: u64, reserved: Arc<AtomicU64>, shared: Arc<Shared>) {
    let url = core.url("/changes");
    let faults = &shared.faults;
    let mut n = 0u64;
    let mut ticks = tokio::time::interval(WRITER_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let end = reserved.load(Ordering::Relaxed);
        let slowest = shared.slowest();
        if end >= slowest + lead / 2 {
            ticks.tick().await;
            continue;
        }
        let count = (slowest + lead - end).min(MAX_BATCH);
        if reserved
            .compare_exchange(end, end + count, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        let mut body = String::with_capacity(count as usize * 40 + 2);
        body.push('[');
        for k in 0..count {
            if k > 0 {
                body.push(',');
            }
            body.push_str(r#"{"data":{"bench":"answers","n":"#);
            body.push_str(&n.to_string());
            body.push_str("}}");
            n += 1;
        }
        body.push(']');
        match post_batch(&core, &url, body).await {
            Ok(last) => {
                shared.acked.fetch_max(last, Ordering::Relaxed);
                shared.posted.fetch_add(count, Ordering::Relaxed);
                shared.posts.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                // Not appended (or unknown): claim it again later.
                reserved.fetch_sub(count, Ordering::Relaxed);
                faults.record(&faults.posts, || format!("POST {url}: {err:#}"));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

/// Posts one batch; returns the largest `_id` of the answer.
async fn post_batch(core: &Server, url: &str, body: String) -> Result<u64> {
    let resp = core
        .client()
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(server::REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(server::describe(&e)))?;
    let body = server::ok_body(resp).await?;
    let posted: Vec<changeagent_client::types::Posted> =
        serde_json::from_slice(&body).context("answer is not a list of ids")?;
    posted
        .iter()
        .map(|p| p.id)
        .max()
        .context("answer lists no id")
}

fn print(run: &AnswersRun) {
    let whose = match run.role {
        Role::Edge => String::new(),
        Role::Core => ", an edge's target, to compare".to_string(),
    };
    println!(
        "answers: {} in {:.1} s = {} /s vs {} /s target (one change per answer{whose}): {}",
        report::count(run.answers),
        run.elapsed.as_secs_f64(),
        report::count(run.rate().round() as u64),
        report::count(ANSWERS_TARGET as u64),
        report::verdict(run.met())
    );
    let waited = if run.answers_total > 0 {
        run.waited as f64 * 100.0 / run.answers_total as f64
    } else {
        0.0
    };
    println!(
        "  {waited:.0}% of the answers waited for a new change; {} empty answer(s) (block \
         timeouts); {} changes posted in {} batch post(s)",
        report::count(run.empty),
        report::count(run.posted),
        report::count(run.posts)
    );
    let f = &run.faults;
    println!(
        "ids: every poller saw dense increasing ids: {} ({} gap(s), {} repeat(s), {} \
         over-limit); {} bad answer(s), {} failed request(s), {} failed post(s)",
        if f.order_errors() == 0 { "yes" } else { "NO" },
        f.gaps,
        f.repeats,
        f.over_limit,
        f.bad_answers,
        f.transport,
        f.posts
    );
    if let Some(first) = &f.first {
        println!("  first fault: {first}");
    }
    let side = |name: &str, cpu: Option<Duration>| match cpu {
        Some(cpu) => format!(
            "{name} {:.2} s ({:.0}% of one core, {:.1} µs per answer)",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 100.0 / run.elapsed.as_secs_f64(),
            run.us_per_answer(Some(cpu)).unwrap_or(0.0)
        ),
        None => format!("{name} not measured"),
    };
    // Against the core, the target is the core.
    let core_side = match run.role {
        Role::Edge => format!("; {}", side("core", run.core_cpu)),
        Role::Core => String::new(),
    };
    println!(
        "cpu over the span: {}; {}{core_side}",
        side(&format!("client ({})", run.client), run.client_cpu),
        side(run.role.name(), run.target_cpu),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_id_must_follow_the_last() {
        assert_eq!(verdict(10, 11), Next::Ok);
        assert_eq!(verdict(10, 12), Next::Gap);
        assert_eq!(verdict(10, 10), Next::Repeat);
        assert_eq!(verdict(10, 3), Next::Repeat);
        assert_eq!(verdict(0, 1), Next::Ok);
    }

    #[test]
    fn order_errors_fail_the_run() {
        let mut run = AnswersRun {
            role: Role::Edge,
            pollers: 1000,
            client: "raw",
            elapsed: Duration::from_secs(10),
            answers: 600_000,
            answers_total: 700_000,
            empty: 0,
            waited: 0,
            posted: 700,
            posts: 14,
            faults: FaultCounts::default(),
            client_cpu: Some(Duration::from_secs(3)),
            target_cpu: None,
            core_cpu: None,
        };
        assert_eq!(run.rate(), 60_000.0);
        assert!(run.met() && run.check().is_ok());
        assert_eq!(run.us_per_answer(run.client_cpu), Some(5.0));
        run.faults.gaps = 1;
        assert!(!run.met() && run.check().is_err());
        run.faults = FaultCounts {
            transport: 2,
            ..FaultCounts::default()
        };
        assert!(run.met(), "a failed request breaks no order");
        assert!(run.check().is_err(), "but fails the run");
        assert_eq!(run.to_json()["failed_requests"], 2);
    }

    #[test]
    fn lead_must_leave_room_for_half_a_lead() {
        let args = AnswersArgs {
            pollers: 1,
            duration: 1,
            writers: 1,
            lead: 1,
        };
        assert!(args.validate().is_err());
        assert!(AnswersArgs { lead: 2, ..args }.validate().is_ok());
    }
}
