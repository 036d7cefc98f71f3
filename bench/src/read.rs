//! `read`: pages through many changes with `GET /changes?since=S&limit=L`,
//! one page after another (as a catching-up consumer does), after topping the
//! server up to the wanted number of changes with concurrent batch posts.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::load::{self, Load};
use crate::report::{self, Latency, Progress};
use crate::server::{self, Page, Server};

/// Sequential read target, changes per second.
const READ_TARGET: f64 = 300_000.0;

/// Largest `limit` the API accepts.
const MAX_PAGE: u32 = 10_000;

#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// Changes to read; the server is first loaded up to this many.
    #[arg(long, env = "CHANGEAGENT_BENCH_CHANGES", default_value_t = 1_000_000)]
    pub changes: u64,
    /// Changes per page (`limit`), 1..=10000.
    #[arg(long, env = "CHANGEAGENT_BENCH_PAGE", default_value_t = 1000)]
    pub page: u32,
    /// Concurrent readers, each doing a full pass; a comma-separated list runs
    /// once per value (e.g. `1,2`).
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_READERS",
        value_delimiter = ',',
        default_values_t = [1usize]
    )]
    pub readers: Vec<usize>,
    /// Changes per batch post when loading.
    #[arg(long, env = "CHANGEAGENT_BENCH_LOAD_BATCH", default_value_t = 1000)]
    pub load_batch: usize,
    /// Concurrent batch posters when loading.
    #[arg(long, env = "CHANGEAGENT_BENCH_LOAD_POSTERS", default_value_t = 8)]
    pub load_posters: usize,
}

impl ReadArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.changes == 0 {
            bail!("--changes must be at least 1");
        }
        if !(1..=MAX_PAGE).contains(&self.page) {
            bail!("--page must be within 1..={MAX_PAGE}");
        }
        if self.readers.is_empty() || self.readers.contains(&0) {
            bail!("--readers must list counts of at least 1");
        }
        if self.load_batch == 0 || self.load_posters == 0 {
            bail!("--load-batch and --load-posters must be at least 1");
        }
        Ok(())
    }
}

/// Counters shared by the workers of one phase and its progress line.
#[derive(Default)]
struct Counters {
    changes: AtomicU64,
    bytes: AtomicU64,
}

/// What one full pass saw.
struct Pass {
    changes: u64,
    bytes: u64,
    pages: Histogram<u64>,
}

/// Loads the server if needed, then reads once per reader count.
pub async fn run(server: &Server, args: &ReadArgs) -> Result<()> {
    let range = server.range().await?;
    if range.held() < args.changes {
        load(server, args.changes - range.held(), args).await?;
    }
    let range = server.range().await?;
    let want = args.changes.min(range.held());
    // `since` is exclusive: start just before the oldest retained change.
    let since = range.first.saturating_sub(1);
    for &readers in &args.readers {
        read(server, readers, since, want, args.page).await?;
    }
    Ok(())
}

/// Posts `missing` changes in batches of `args.load_batch` from
/// `args.load_posters` concurrent posters.
async fn load(server: &Server, missing: u64, args: &ReadArgs) -> Result<()> {
    report::header(&format!(
        "read: loading {} changes ({} per batch post, {} posters)",
        report::count(missing),
        report::count(args.load_batch as u64),
        args.load_posters
    ));
    let load = Load {
        changes: missing,
        batch: args.load_batch,
        posters: args.load_posters,
        change: |n: u64, body: &mut String| {
            // Writing to a String cannot fail.
            let _ = write!(body, r#"{{"data":{{"bench":true,"n":{n}}}}}"#);
        },
    };
    load::run(server, load).await?;
    Ok(())
}

/// `readers` concurrent full passes over `want` changes after `since`.
async fn read(server: &Server, readers: usize, since: u64, want: u64, page: u32) -> Result<()> {
    report::header(&format!(
        "read: {readers} reader(s), each paging through {} changes, {page} per page",
        report::count(want)
    ));
    let counters = Arc::new(Counters::default());
    let _progress = {
        let counters = Arc::clone(&counters);
        let total = want * readers as u64;
        Progress::start(move |elapsed| {
            let done = counters.changes.load(Ordering::Relaxed);
            let bytes = counters.bytes.load(Ordering::Relaxed);
            format!(
                "read: {} / {} changes, {} changes/s, {}/s",
                report::count(done),
                report::count(total),
                report::rate(done, elapsed),
                report::mb(report::per_sec(bytes, elapsed))
            )
        })
    };
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..readers {
        let (server, counters) = (server.clone(), Arc::clone(&counters));
        tasks.spawn(async move { pass(&server, since, want, page, &counters).await });
    }
    let mut pages = report::histogram()?;
    let (mut changes, mut bytes) = (0u64, 0u64);
    while let Some(joined) = tasks.join_next().await {
        let one = joined.context("a reader panicked")??;
        changes += one.changes;
        bytes += one.bytes;
        pages.add(&one.pages).context("merging page histograms")?;
    }
    let elapsed = started.elapsed();

    let rate = report::per_sec(changes, elapsed);
    println!(
        "{readers} reader(s): {} changes in {:.2} s = {} changes/s, {}/s ({} received)",
        report::count(changes),
        elapsed.as_secs_f64(),
        report::rate(changes, elapsed),
        report::mb(report::per_sec(bytes, elapsed)),
        report::mb(bytes as f64)
    );
    println!("page latency {}", Latency::of(&pages).summary());
    if readers > 1 {
        println!(
            "per reader: {} changes/s",
            report::count((rate / readers as f64).round() as u64)
        );
    }
    println!(
        "{readers} reader(s): {} changes/s vs {} target: {}",
        report::rate(changes, elapsed),
        READ_TARGET,
        report::verdict(rate >= READ_TARGET)
    );
    Ok(())
}

/// Reads pages one after another from `since` until `want` changes arrived
/// or the server reports the end.
async fn pass(
    server: &Server,
    mut since: u64,
    want: u64,
    page: u32,
    counters: &Counters,
) -> Result<Pass> {
    let mut pages = report::histogram()?;
    let (mut changes, mut bytes) = (0u64, 0u64);
    while changes < want {
        let limit = u64::from(page).min(want - changes);
        let path = format!("/changes?since={since}&limit={limit}");
        let started = Instant::now();
        let body = server.get_ok(&path, server::REQUEST_TIMEOUT).await?;
        report::record(&mut pages, started.elapsed());
        let parsed: Page = serde_json::from_slice(&body)
            .with_context(|| format!("GET {path}: answer is not a change list"))?;
        let n = parsed.changes.len() as u64;
        changes += n;
        bytes += body.len() as u64;
        counters.changes.fetch_add(n, Ordering::Relaxed);
        counters
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        match parsed.changes.last() {
            Some(last) => since = last.id,
            None => break,
        }
        if parsed.at_end {
            break;
        }
    }
    if changes < want {
        eprintln!(
            "  … reader reached the end after {} of {} changes",
            report::count(changes),
            report::count(want)
        );
    }
    Ok(Pass {
        changes,
        bytes,
        pages,
    })
}
