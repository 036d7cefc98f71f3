//! `longpoll`: opens many idle long-polls (`GET /changes?since=<last>&block=S`,
//! one connection each) on a target node (the core itself, or an edge that
//! tails it), measures how much the target's RSS grew, then posts one change
//! to the core and measures how fast every long-poll returns with it: from
//! the moment the core's answer to the post arrives, and from the post's send.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::memory;
use crate::open_files;
use crate::poll_client::{self, ClientArgs, PollClient, PollConn};
use crate::report::{self, Latency};
use crate::server::{self, Page, Server};

/// The gauge of open long-polls, exported by core and edge alike.
pub const GAUGE: &str = "changeagent_long_polls_open";

/// Memory target of an edge (the issue's): at most 5 KB of extra RSS per
/// idle long-poll, i.e. +50 MB for 10,000. Edges exist to hold the fleets.
pub const EDGE_KB_PER_POLL: f64 = 5.0;

/// Memory target of a core node: 100 MB per 10,000 idle long-polls (10 KB
/// each), the target from before edges took the fleets; kept to compare.
pub const CORE_KB_PER_POLL: f64 = 10.0;

/// Wake-up target (the issue's, for an edge): one post on the core reaches
/// 10,000 long-polls waiting on an edge with p99 at most this, counted from
/// the core's answer to the post. Printed for the core too, to compare.
pub const WAKE_P99_TARGET: Duration = Duration::from_millis(200);

/// The number of waiters the targets are stated for.
pub const TARGET_WAITERS: usize = 10_000;

/// How long the server may take to report a batch of long-polls as open.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// How long every long-poll may take to return after the change is posted.
const WAKE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a target that is not the core may take to catch up with it
/// before the long-polls open (it tails the core; seconds at most).
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);

/// Gap between two looks at `/metrics` or at the target's last index while
/// waiting for them.
pub const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);

/// Extra time a long-poll request may take beyond its `block`.
pub const BLOCK_GRACE: Duration = Duration::from_secs(30);

/// The gauge counts as settled before a run when it has not changed for
/// this long (long-polls of a run that just ended close within milliseconds).
const SETTLE_QUIET: Duration = Duration::from_secs(1);

/// At most this long is spent waiting for the gauge to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);

/// Used without the gauge: time given to a batch of long-polls to arrive.
const NO_GAUGE_SETTLE: Duration = Duration::from_secs(1);

/// How many idle long-polls, how long each blocks, how fast they open:
/// shared by `longpoll`, `all` and `fanout`.
#[derive(Debug, Clone, Args)]
pub struct WaitersArgs {
    /// Concurrent idle long-polls to open.
    #[arg(long, env = "CHANGEAGENT_BENCH_COUNT", default_value_t = 10_000)]
    pub count: usize,
    /// `block` seconds of each long-poll (1..=300); one that times out before
    /// the change is posted is reissued.
    #[arg(long, env = "CHANGEAGENT_BENCH_BLOCK", default_value_t = 60)]
    pub block: u64,
    /// Long-polls opened at once before waiting for the server to report
    /// them, so the connection burst stays under the listen backlog.
    #[arg(long, env = "CHANGEAGENT_BENCH_RAMP", default_value_t = 500)]
    pub ramp: usize,
}

impl WaitersArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 || self.ramp == 0 {
            bail!("--count and --ramp must be at least 1");
        }
        if !(1..=300).contains(&self.block) {
            bail!("--block must be within 1..=300 seconds");
        }
        Ok(())
    }
}

/// The `longpoll` subcommand's flags (also `all`'s longpoll phase).
#[derive(Debug, Clone, Args)]
pub struct LongpollArgs {
    #[command(flatten)]
    pub waiters: WaitersArgs,
    /// Process id of the target node, to read its RSS from /proc/PID/status
    /// (same machine only); without it memory is not measured.
    #[arg(long, env = "CHANGEAGENT_BENCH_PID")]
    pub pid: Option<u32>,
    /// Node the long-polls go to, e.g. an edge tailing --server (default:
    /// --server itself). The wake-up change is always posted to --server.
    #[arg(long, env = "CHANGEAGENT_BENCH_TARGET")]
    pub target: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl LongpollArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        self.waiters.validate()
    }
}

/// What the target node is, by the `role` of its `/health`: the targets differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Core,
    Edge,
}

impl Role {
    /// The role `server` reports; a node without `/health` counts as core.
    pub async fn of(server: &Server) -> Result<Role> {
        let role = server
            .role()
            .await
            .with_context(|| format!("asking {} for its role", server.base()))?;
        Ok(match role.as_deref() {
            Some("edge") => Role::Edge,
            _ => Role::Core,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Core => "core",
            Role::Edge => "edge",
        }
    }

    /// The memory target per idle long-poll, in KB (10^3 bytes).
    pub fn kb_per_poll_target(self) -> f64 {
        match self {
            Role::Core => CORE_KB_PER_POLL,
            Role::Edge => EDGE_KB_PER_POLL,
        }
    }
}

/// The node the long-polls go to, and how they reach it.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: Server,
    pub role: Role,
    /// For its RSS (and CPU time); same machine only.
    pub pid: Option<u32>,
    pub client: PollClient,
}

impl Target {
    /// `server` with its role asked, reached through a client of `kind`.
    pub async fn new(
        server: Server,
        pid: Option<u32>,
        kind: poll_client::ClientKind,
    ) -> Result<Target> {
        let role = Role::of(&server).await?;
        let client = PollClient::new(kind, &server).await?;
        Ok(Target {
            server,
            role,
            pid,
            client,
        })
    }

    /// `edge http://…` for headers.
    pub fn describe(&self) -> String {
        format!("{} {}", self.role.name(), self.server.base())
    }

    /// Whether this is the node at `core`'s address.
    pub fn is(&self, core: &Server) -> bool {
        self.server.base() == core.base()
    }
}

/// The target's RSS before and after the long-polls opened, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct RssGrowth {
    pub before: u64,
    pub after: u64,
}

impl RssGrowth {
    pub fn extra(&self) -> u64 {
        self.after.saturating_sub(self.before)
    }

    /// Extra KB (10^3 bytes) per long-poll.
    pub fn kb_per_poll(&self, count: usize) -> f64 {
        self.extra() as f64 / 1e3 / count as f64
    }
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct LongpollRun {
    pub role: Role,
    pub count: usize,
    pub client: &'static str,
    /// `None` without a pid.
    pub rss: Option<RssGrowth>,
    /// The wake-up change.
    pub change: u64,
    /// The post, from its send to the core's answer.
    pub post: Duration,
    /// From the core's answer to each long-poll's answer (0 for the ones
    /// that arrived before it, see `before_answer`).
    pub from_answer: Latency,
    /// From the post's send to each long-poll's answer.
    pub from_send: Latency,
    /// Long-polls answered before the core's answer to the post arrived.
    pub before_answer: u64,
    /// Long-polls that returned within the deadline, and those of them that
    /// held the change.
    pub returned: usize,
    pub with_change: usize,
}

impl LongpollRun {
    pub fn kb_per_poll(&self) -> Option<f64> {
        self.rss.map(|r| r.kb_per_poll(self.count))
    }

    pub fn rss_met(&self) -> Option<bool> {
        self.kb_per_poll()
            .map(|kb| kb <= self.role.kb_per_poll_target())
    }

    pub fn wake_met(&self) -> bool {
        self.all_woke() && self.from_answer.p99 <= WAKE_P99_TARGET
    }

    pub fn all_woke(&self) -> bool {
        self.returned == self.count && self.with_change == self.count
    }

    /// An error unless every long-poll returned the change.
    pub fn check(&self) -> Result<()> {
        if !self.all_woke() {
            bail!(
                "{} long-poll(s) on the {} did not return change {} within {} s",
                self.count - self.with_change,
                self.role.name(),
                self.change,
                WAKE_DEADLINE.as_secs()
            );
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "role": self.role.name(),
            "count": self.count,
            "client": self.client,
            "rss_before_bytes": self.rss.map(|r| r.before),
            "rss_after_bytes": self.rss.map(|r| r.after),
            "kb_per_poll": self.kb_per_poll().map(|kb| (kb * 100.0).round() / 100.0),
            "kb_per_poll_target": self.role.kb_per_poll_target(),
            "rss_met": self.rss_met(),
            "change": self.change,
            "post_ms": (self.post.as_secs_f64() * 1e6).round() / 1e3,
            "wake_from_answer": self.from_answer.to_json(),
            "wake_from_send": self.from_send.to_json(),
            "wake_p99_target_ms": WAKE_P99_TARGET.as_millis() as u64,
            "wake_met": self.wake_met(),
            "before_answer": self.before_answer,
            "returned": self.returned,
            "with_change": self.with_change,
        })
    }
}

/// State shared by the long-poll tasks and the driver.
#[derive(Default)]
struct Shared {
    /// Set just before the wake-up change is posted; an answer that arrives
    /// earlier (a `block` timeout, someone else's change) is polled again.
    armed: AtomicBool,
    /// Long-polls that ended with an error.
    errors: AtomicU64,
    /// Some long-poll could not get a socket (EMFILE / ENFILE).
    out_of_files: AtomicBool,
    /// The first error seen, for the report.
    first_error: Mutex<Option<String>>,
    /// Long-polls reissued before the wake-up (block timeouts, foreign changes).
    reissued: AtomicU64,
}

impl Shared {
    fn fail(&self, message: String, out_of_files: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if out_of_files {
            self.out_of_files.store(true, Ordering::Relaxed);
        }
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(message);
        }
    }

    /// An error describing the failed long-polls, if any failed.
    fn check(&self, count: usize) -> Result<()> {
        let errors = self.errors.load(Ordering::Relaxed);
        if errors == 0 {
            return Ok(());
        }
        let first = self
            .first_error
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        if self.out_of_files.load(Ordering::Relaxed) {
            bail!(
                "{errors} long-poll(s) could not open a connection: too many open files ({first}).\n\
                 Raise the limit in this shell and in the server's shell, e.g. `ulimit -n 65536`, \
                 and restart the server (or lower --count below {count})"
            );
        }
        bail!("{errors} long-poll(s) failed; first error: {first}");
    }
}

/// When a long-poll returned after the wake-up post was armed, and with what.
struct Woken {
    at: Instant,
    ids: Vec<u64>,
}

/// Opens `args.count` idle long-polls on `target`, measures its RSS growth,
/// wakes them with one change posted to `core` and measures how fast they
/// return. Prints the figures beside their targets; an error only when the
/// run could not be carried out (a long-poll failed, the target never
/// showed the long-polls open). Whether every long-poll returned the change
/// is in the result ([`LongpollRun::check`]).
pub async fn run(core: &Server, target: &Target, args: &WaitersArgs) -> Result<LongpollRun> {
    let client = match target.client {
        PollClient::Raw(_) => "raw",
        PollClient::Reqwest(_) => "reqwest",
    };
    let wake_via = if target.is(core) {
        String::new()
    } else {
        format!(", wake-up posted to {}", core.base())
    };
    report::header(&format!(
        "longpoll: {} idle long-polls (block={} s, {client} client) on {}{wake_via}",
        report::count(args.count as u64),
        args.block,
        target.describe(),
    ));
    open_files::ensure(args.count as u64, target.pid)?;

    let since = if target.is(core) {
        core.range().await?.last
    } else {
        wait_caught_up(core, &target.server).await?
    };
    let server = &target.server;
    let baseline = settled_gauge(server).await?;
    if baseline.is_none() {
        println!(
            "warning: the {} exports no {GAUGE} gauge; waiting {} per batch instead of \
             observing the long-polls open (RSS may be undercounted)",
            target.role.name(),
            report::ms(NO_GAUGE_SETTLE)
        );
    }
    let rss_before = match target.pid {
        Some(pid) => Some(read_rss(pid)?),
        None => None,
    };

    // 1. Open the long-polls batch by batch, waiting for the server to
    //    report each batch open before starting the next.
    let shared = Arc::new(Shared::default());
    let mut polls = JoinSet::new();
    let opening = Instant::now();
    let mut opened = 0;
    while opened < args.count {
        let batch = args.ramp.min(args.count - opened);
        for _ in 0..batch {
            polls.spawn(long_poll(
                target.client.connection(),
                since,
                args.block,
                Arc::clone(&shared),
            ));
        }
        opened += batch;
        let seen = match baseline {
            Some(base) => wait_for_gauge(server, base + opened as f64, &shared, args.count).await?,
            None => {
                tokio::time::sleep(NO_GAUGE_SETTLE).await;
                shared.check(args.count)?;
                None
            }
        };
        eprintln!(
            "  … longpoll: opened {} / {}{}",
            report::count(opened as u64),
            report::count(args.count as u64),
            seen.map(|open| format!(", the {} reports {open} open", target.role.name()))
                .unwrap_or_default()
        );
    }
    println!(
        "{} long-polls open after {:.1} s",
        report::count(args.count as u64),
        opening.elapsed().as_secs_f64()
    );

    // 2. Memory held by the idle long-polls.
    let rss = match (target.pid, rss_before) {
        (Some(pid), Some(before)) => {
            let growth = RssGrowth {
                before,
                after: read_rss(pid)?,
            };
            print_memory(target.role, args.count, growth);
            Some(growth)
        }
        _ => {
            println!(
                "{} RSS not measured (pass --pid <its pid>)",
                target.role.name()
            );
            None
        }
    };

    // 3. Wake them all with one change posted to the core.
    shared.armed.store(true, Ordering::SeqCst);
    let sent_at = Instant::now();
    let id = post_wake_change(core).await?;
    let answered_at = Instant::now();

    let mut from_answer = report::histogram()?;
    let mut from_send = report::histogram()?;
    let (mut returned, mut with_change, mut before_answer) = (0usize, 0usize, 0u64);
    let wake_deadline = tokio::time::Instant::now() + WAKE_DEADLINE;
    loop {
        let next = tokio::time::timeout_at(wake_deadline, polls.join_next()).await;
        let Ok(Some(joined)) = next else { break };
        if let Ok(Some(woken)) = joined {
            returned += 1;
            if woken.at < answered_at {
                before_answer += 1;
            }
            report::record(
                &mut from_answer,
                woken.at.saturating_duration_since(answered_at),
            );
            report::record(&mut from_send, woken.at.saturating_duration_since(sent_at));
            if woken.ids.contains(&id) {
                with_change += 1;
            }
        }
    }
    // Whatever is still waiting is cut here, before anything else is measured.
    polls.abort_all();
    let run = LongpollRun {
        role: target.role,
        count: args.count,
        client,
        rss,
        change: id,
        post: answered_at - sent_at,
        from_answer: Latency::of(&from_answer),
        from_send: Latency::of(&from_send),
        before_answer,
        returned,
        with_change,
    };
    print_wake(&run);
    let reissued = shared.reissued.load(Ordering::Relaxed);
    if reissued > 0 {
        println!(
            "note: {} long-poll(s) returned before the post and were reissued (block timeouts \
             or changes from other writers)",
            report::count(reissued)
        );
    }
    shared.check(args.count)?;
    Ok(run)
}

/// Waits until `target` holds every change `core` holds; returns the
/// target's last index then.
async fn wait_caught_up(core: &Server, target: &Server) -> Result<u64> {
    let want = core.range().await?.last;
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    let mut last_progress = Instant::now();
    loop {
        let have = target.range().await?.last;
        if have >= want {
            return Ok(have);
        }
        if Instant::now() >= deadline {
            bail!(
                "{} holds changes up to {have}, the core up to {want}: not caught up after {} s",
                target.base(),
                CATCH_UP_DEADLINE.as_secs()
            );
        }
        if last_progress.elapsed() >= report::PROGRESS_INTERVAL {
            last_progress = Instant::now();
            eprintln!(
                "  … longpoll: waiting for {} to catch up: {have} / {want}",
                target.base()
            );
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
    }
}

/// One long-poll, reissued until it returns something after the wake-up
/// post was armed; `None` when it failed (recorded in `shared`).
async fn long_poll(
    mut conn: PollConn,
    mut since: u64,
    block: u64,
    shared: Arc<Shared>,
) -> Option<Woken> {
    let timeout = Duration::from_secs(block) + BLOCK_GRACE;
    loop {
        let path = format!("/changes?since={since}&block={block}");
        let answer = match conn.get(&path, timeout).await {
            Ok(answer) => answer,
            Err(err) => {
                let out_of_files = poll_client::is_out_of_files(&err);
                shared.fail(format!("GET {path}: {err:#}"), out_of_files);
                return None;
            }
        };
        // The moment the whole answer is here, before any parsing.
        let at = Instant::now();
        if answer.status != 200 {
            shared.fail(
                format!(
                    "GET {path}: status {}: {}",
                    answer.status,
                    poll_client::snippet(&answer.body)
                ),
                false,
            );
            return None;
        }
        let page = match serde_json::from_slice::<Page>(&answer.body) {
            Ok(page) => page,
            Err(err) => {
                shared.fail(format!("GET {path}: not a change list: {err}"), false);
                return None;
            }
        };
        if shared.armed.load(Ordering::SeqCst) && !page.changes.is_empty() {
            return Some(Woken {
                at,
                ids: page.changes.iter().map(|c| c.id).collect(),
            });
        }
        if let Some(last) = page.changes.last() {
            since = last.id;
        }
        shared.reissued.fetch_add(1, Ordering::Relaxed);
    }
}

/// The gauge once no long-poll of an earlier run (or of a consumer that
/// just left) is still being closed: when it reads 0, or the same value for
/// [`SETTLE_QUIET`]; `None` when the server exports none.
async fn settled_gauge(server: &Server) -> Result<Option<f64>> {
    settle(|| server.metric(GAUGE)).await
}

/// What `read` (a count of open long-polls) says once it has settled: when
/// it reads 0, or the same value for [`SETTLE_QUIET`], or whatever it reads
/// after [`SETTLE_DEADLINE`]; `None` when its first read is `None` (the
/// gauge is not exported).
pub async fn settle<F, Fut>(mut read: F) -> Result<Option<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<f64>>>,
{
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let Some(mut last) = read().await? else {
        return Ok(None);
    };
    let mut since = Instant::now();
    loop {
        if last == 0.0 || since.elapsed() >= SETTLE_QUIET {
            return Ok(Some(last));
        }
        if Instant::now() >= deadline {
            // Others come and go: take what is there now.
            return Ok(Some(last));
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
        let seen = read().await?.unwrap_or(0.0);
        if seen != last {
            (last, since) = (seen, Instant::now());
        }
    }
}

/// Waits until the gauge reaches `target`, failing early if long-polls fail.
async fn wait_for_gauge(
    server: &Server,
    target: f64,
    shared: &Shared,
    count: usize,
) -> Result<Option<f64>> {
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut last_progress = Instant::now();
    loop {
        shared.check(count)?;
        let seen = server.metric(GAUGE).await?.unwrap_or(0.0);
        if seen >= target {
            return Ok(Some(seen));
        }
        if Instant::now() >= deadline {
            bail!(
                "the server reported {seen} long-polls open, not {target}, after {} s",
                OPEN_DEADLINE.as_secs()
            );
        }
        if last_progress.elapsed() >= report::PROGRESS_INTERVAL {
            last_progress = Instant::now();
            eprintln!("  … longpoll: waiting for the server to report {target} open, now {seen}");
        }
        tokio::time::sleep(SCRAPE_INTERVAL).await;
    }
}

/// Posts the change that wakes every long-poll; returns its `_id`.
async fn post_wake_change(server: &Server) -> Result<u64> {
    let url = server.url("/changes");
    let resp = server
        .client()
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(r#"{"data":{"bench":"longpoll-wake"}}"#)
        .timeout(server::REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!(server::describe(&e)))
        .with_context(|| format!("POST {url}"))?;
    let body = server::ok_body(resp)
        .await
        .with_context(|| format!("POST {url}"))?;
    let posted: changeagent_client::types::Posted =
        serde_json::from_slice(&body).with_context(|| format!("POST {url}: answer has no _id"))?;
    Ok(posted.id)
}

fn print_memory(role: Role, count: usize, rss: RssGrowth) {
    let kb = rss.kb_per_poll(count);
    let target_kb = role.kb_per_poll_target();
    println!(
        "{} RSS {} before, {} after: +{} for {} long-polls ({kb:.2} KB each)",
        role.name(),
        report::mb(rss.before as f64),
        report::mb(rss.after as f64),
        report::mb(rss.extra() as f64),
        report::count(count as u64)
    );
    let other = match role {
        Role::Edge => format!("; a core's is {CORE_KB_PER_POLL} KB"),
        Role::Core => format!("; an edge's is {EDGE_KB_PER_POLL} KB"),
    };
    println!(
        "memory: {kb:.2} KB per idle long-poll vs {target_kb} KB target ({}: +{:.0} MB per {}{other}): {}",
        role.name(),
        target_kb * TARGET_WAITERS as f64 / 1e3,
        report::count(TARGET_WAITERS as u64),
        report::verdict(kb <= target_kb)
    );
}

fn print_wake(run: &LongpollRun) {
    println!(
        "wake-up: posted change {} to the core ({} from send to answer); {} / {} long-polls \
         returned within {} s, {} of them with change {}",
        run.change,
        report::ms(run.post),
        report::count(run.returned as u64),
        report::count(run.count as u64),
        WAKE_DEADLINE.as_secs(),
        report::count(run.with_change as u64),
        run.change
    );
    println!(
        "wake-up latency from the core's answer {}",
        run.from_answer.summary()
    );
    println!(
        "wake-up latency from the post's send   {}",
        run.from_send.summary()
    );
    if run.before_answer > 0 {
        println!(
            "note: {} long-poll(s) answered before the core's answer to the post arrived \
             (counted as 0 ms from it)",
            report::count(run.before_answer)
        );
    }
    let scaled = if run.count == TARGET_WAITERS {
        String::new()
    } else {
        format!(
            "; the target is for {} waiters",
            report::count(TARGET_WAITERS as u64)
        )
    };
    let whose = match run.role {
        Role::Edge => "",
        Role::Core => ", an edge's target, to compare",
    };
    println!(
        "wake-up p99 from the core's answer: {} vs {} ms target ({}{whose}{scaled}): {}",
        report::ms(run.from_answer.p99),
        WAKE_P99_TARGET.as_millis(),
        role_waiters(run),
        report::verdict(run.wake_met())
    );
    println!(
        "every long-poll returned change {}: {}",
        run.change,
        if run.all_woke() { "yes" } else { "NO" }
    );
}

fn role_waiters(run: &LongpollRun) -> String {
    format!(
        "{} waiters on the {}",
        report::count(run.count as u64),
        run.role.name()
    )
}

/// The resident set size of `pid` in bytes, from /proc/PID/status.
fn read_rss(pid: u32) -> Result<u64> {
    let m = memory::read(pid).with_context(|| {
        format!("reading /proc/{pid}/status: --pid must be the target's process id on this machine")
    })?;
    Ok(m.rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        assert!(read_rss(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn targets_follow_the_role() {
        assert_eq!(Role::Edge.kb_per_poll_target(), 5.0);
        assert_eq!(Role::Core.kb_per_poll_target(), 10.0);
        let growth = RssGrowth {
            before: 30_000_000,
            after: 70_000_000,
        };
        assert_eq!(growth.extra(), 40_000_000);
        assert!((growth.kb_per_poll(10_000) - 4.0).abs() < 1e-9);
        let hist = report::histogram().unwrap();
        let mut run = LongpollRun {
            role: Role::Edge,
            count: 10_000,
            client: "raw",
            rss: Some(growth),
            change: 7,
            post: Duration::from_millis(1),
            from_answer: Latency::of(&hist),
            from_send: Latency::of(&hist),
            before_answer: 0,
            returned: 10_000,
            with_change: 10_000,
        };
        assert_eq!(run.rss_met(), Some(true));
        assert!(run.wake_met() && run.check().is_ok());
        run.rss = Some(RssGrowth {
            before: 30_000_000,
            after: 90_000_000,
        });
        assert_eq!(run.rss_met(), Some(false), "6 KB each misses the edge's 5");
        run.role = Role::Core;
        assert_eq!(run.rss_met(), Some(true), "but meets the core's 10");
        run.with_change = 9_999;
        assert!(!run.wake_met() && run.check().is_err());
        let json = run.to_json();
        assert_eq!(json["kb_per_poll"], 6.0);
        assert_eq!(json["role"], "core");
    }
}
