//! `longpoll`: opens many idle long-polls (`GET /changes?since=<last>&block=S`,
//! one connection each), measures how much the server's RSS grew, then posts
//! one change and measures how fast every long-poll returns with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::task::JoinSet;

use crate::memory;
use crate::report::{self, Latency};
use crate::server::{self, Page, Server};

/// The server's gauge of open long-polls.
const GAUGE: &str = "changeagent_long_polls_open";

/// Memory target: at most this much extra RSS …
const RSS_TARGET_MB: f64 = 100.0;
/// … for this many idle long-polls (scaled linearly for other counts).
const RSS_TARGET_POLLS: f64 = 10_000.0;

/// Files this process needs besides one socket per long-poll (stdio, the
/// runtime, the metrics and post connections).
const FD_HEADROOM: u64 = 64;

/// How long the server may take to report a batch of long-polls as open.
const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// How long every long-poll may take to return after the change is posted.
const WAKE_DEADLINE: Duration = Duration::from_secs(30);

/// Gap between two scrapes of `/metrics` while waiting for the gauge.
const SCRAPE_INTERVAL: Duration = Duration::from_millis(100);

/// Extra time a long-poll request may take beyond its `block`.
const BLOCK_GRACE: Duration = Duration::from_secs(30);

/// Used without the gauge: time given to a batch of long-polls to arrive.
const NO_GAUGE_SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct LongpollArgs {
    /// Concurrent idle long-polls to open.
    #[arg(long, env = "CHANGEAGENT_BENCH_COUNT", default_value_t = 10_000)]
    pub count: usize,
    /// Process id of the server, to read its RSS from /proc/PID/status (same
    /// machine only); without it memory is not measured.
    #[arg(long, env = "CHANGEAGENT_BENCH_PID")]
    pub pid: Option<u32>,
    /// `block` seconds of each long-poll (1..=300); one that times out before
    /// the change is posted is reissued.
    #[arg(long, env = "CHANGEAGENT_BENCH_BLOCK", default_value_t = 60)]
    pub block: u64,
    /// Long-polls opened at once before waiting for the server to report
    /// them, so the connection burst stays under the listen backlog.
    #[arg(long, env = "CHANGEAGENT_BENCH_RAMP", default_value_t = 500)]
    pub ramp: usize,
}

impl LongpollArgs {
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

/// When a long-poll returned after the wake-up post, and with what.
struct Woken {
    at: Instant,
    ids: Vec<u64>,
}

pub async fn run(server: &Server, args: &LongpollArgs) -> Result<()> {
    report::header(&format!(
        "longpoll: {} idle long-polls (block={} s) on {}",
        report::count(args.count as u64),
        args.block,
        server.base()
    ));
    check_open_files(args)?;

    let since = server.range().await?.last;
    let baseline = server.metric(GAUGE).await?;
    if baseline.is_none() {
        println!(
            "warning: the server exports no {GAUGE} gauge; waiting {} per batch instead of \
             observing the long-polls open (RSS may be undercounted)",
            report::ms(NO_GAUGE_SETTLE)
        );
    }
    let rss_before = match args.pid {
        Some(pid) => Some(read_rss_kb(pid)?),
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
                server.clone(),
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
            seen.map(|open| format!(", server reports {open} open"))
                .unwrap_or_default()
        );
    }
    println!(
        "{} long-polls open after {:.1} s",
        report::count(args.count as u64),
        opening.elapsed().as_secs_f64()
    );

    // 2. Memory held by the idle long-polls.
    match (args.pid, rss_before) {
        (Some(pid), Some(before)) => {
            let after = read_rss_kb(pid)?;
            print_memory(args.count, before, after);
        }
        _ => println!("server RSS not measured (pass --pid <server pid>)"),
    }

    // 3. Wake them all with one change.
    let posted_at = Instant::now();
    shared.armed.store(true, Ordering::SeqCst);
    let id = post_wake_change(server).await?;
    let post_latency = posted_at.elapsed();

    let mut hist = report::histogram()?;
    let (mut returned, mut with_change) = (0usize, 0usize);
    let wake_deadline = tokio::time::Instant::now() + WAKE_DEADLINE;
    loop {
        let next = tokio::time::timeout_at(wake_deadline, polls.join_next()).await;
        let Ok(Some(joined)) = next else { break };
        if let Ok(Some(woken)) = joined {
            returned += 1;
            report::record(&mut hist, woken.at.saturating_duration_since(posted_at));
            if woken.ids.contains(&id) {
                with_change += 1;
            }
        }
    }
    let latency = Latency::of(&hist);
    println!(
        "wake-up: posted change {id} ({} to commit); {} / {} long-polls returned within {} s, \
         {} of them with change {id}",
        report::ms(post_latency),
        report::count(returned as u64),
        report::count(args.count as u64),
        WAKE_DEADLINE.as_secs(),
        report::count(with_change as u64)
    );
    println!("wake-up latency from post {}", latency.summary());
    let reissued = shared.reissued.load(Ordering::Relaxed);
    if reissued > 0 {
        println!(
            "note: {} long-poll(s) returned before the post and were reissued (block timeouts \
             or changes from other writers)",
            report::count(reissued)
        );
    }
    let all_woke = returned == args.count && with_change == args.count;
    println!(
        "every long-poll returned change {id}: {}",
        if all_woke { "yes" } else { "NO" }
    );
    shared.check(args.count)?;
    if !all_woke {
        bail!(
            "{} long-poll(s) did not return change {id} within {} s",
            args.count - with_change,
            WAKE_DEADLINE.as_secs()
        );
    }
    Ok(())
}

/// One long-poll, reissued until it returns something after the wake-up
/// post was armed; `None` when it failed (recorded in `shared`).
async fn long_poll(
    server: Server,
    mut since: u64,
    block: u64,
    shared: Arc<Shared>,
) -> Option<Woken> {
    let timeout = Duration::from_secs(block) + BLOCK_GRACE;
    loop {
        let url = server.url(&format!("/changes?since={since}&block={block}"));
        let resp = match server.client().get(&url).timeout(timeout).send().await {
            Ok(resp) => resp,
            Err(err) => {
                let out_of_files = server::is_out_of_files(&err);
                shared.fail(
                    format!("GET {url}: {}", server::describe(&err)),
                    out_of_files,
                );
                return None;
            }
        };
        let page = match server::ok_body(resp).await.and_then(|body| {
            serde_json::from_slice::<Page>(&body).context("answer is not a change list")
        }) {
            Ok(page) => page,
            Err(err) => {
                shared.fail(format!("GET {url}: {err:#}"), false);
                return None;
            }
        };
        let at = Instant::now();
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

fn print_memory(count: usize, before_kb: u64, after_kb: u64) {
    let extra_kb = after_kb.saturating_sub(before_kb);
    let extra_mb = extra_kb as f64 * 1024.0 / 1e6;
    let per_poll_kb = extra_kb as f64 * 1024.0 / 1e3 / count as f64;
    let target_mb = RSS_TARGET_MB * count as f64 / RSS_TARGET_POLLS;
    println!(
        "server RSS {} before, {} after: +{} for {} long-polls ({per_poll_kb:.2} KB each)",
        report::mb(before_kb as f64 * 1024.0),
        report::mb(after_kb as f64 * 1024.0),
        report::mb(extra_kb as f64 * 1024.0),
        report::count(count as u64)
    );
    let scaled = if count as f64 == RSS_TARGET_POLLS {
        String::new()
    } else {
        format!(
            " ({RSS_TARGET_MB} MB per {} long-polls)",
            report::count(RSS_TARGET_POLLS as u64)
        )
    };
    println!(
        "memory: +{extra_mb:.1} MB vs {target_mb:.1} MB target{scaled}: {}",
        report::verdict(extra_mb <= target_mb)
    );
}

/// Fails early, with the fix, when this process may not open enough sockets;
/// warns when the server's limit (if known) looks too low.
fn check_open_files(args: &LongpollArgs) -> Result<()> {
    let needed = args.count as u64 + FD_HEADROOM;
    let ours = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| max_open_files(&text));
    if let Some(Some(soft)) = ours {
        if soft < needed {
            bail!(
                "this process may open {soft} files but {} long-polls need about {needed}: run \
                 `ulimit -n 65536` in this shell (and in the server's shell, then restart it), \
                 or lower --count",
                args.count
            );
        }
    }
    if let Some(pid) = args.pid {
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|text| max_open_files(&text));
        if let Some(Some(soft)) = theirs {
            if soft < needed {
                println!(
                    "warning: the server (pid {pid}) may open only {soft} files, fewer than \
                     {} long-polls need; restart it after `ulimit -n 65536`",
                    args.count
                );
            }
        }
    }
    Ok(())
}

/// The soft "Max open files" limit in a /proc/PID/limits text: `Some(None)`
/// when unlimited, `None` when the line is missing.
fn max_open_files(limits: &str) -> Option<Option<u64>> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let soft = line.split_whitespace().next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

/// The resident set size of `pid` in kB, from /proc/PID/status.
fn read_rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading {path}: --pid must be the server's process id on this machine")
    })?;
    vm_rss_kb(&text).with_context(|| format!("{path} has no VmRSS line"))
}

/// The `VmRSS:` value (kB) of a /proc/PID/status text.
fn vm_rss_kb(status: &str) -> Option<u64> {
    memory::field_kb(status, "VmRSS:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status =
            "Name:\tchangeagent-server\nVmPeak:\t  99999 kB\nVmRSS:\t   45312 kB\nThreads:\t9\n";
        assert_eq!(vm_rss_kb(status), Some(45_312));
        assert_eq!(vm_rss_kb("Name:\tx\n"), None);
    }

    #[test]
    fn reads_own_rss() {
        assert!(read_rss_kb(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn parses_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(Some(1024)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), Some(None));
        assert_eq!(max_open_files("Max processes 1 1 processes\n"), None);
        let own = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(max_open_files(&own).is_some());
    }
}
