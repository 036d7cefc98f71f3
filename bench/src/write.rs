//! `write`: N clients each post single changes to `POST /changes` in a closed
//! loop for a fixed time; reports throughput, latency and errors, and compares
//! them with the targets (single client near one fsync, 64 clients ≥ 20,000/s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::report::{self, Latency, Progress};
use crate::server::{self, Server};

/// Single-client target: p50 at most one fsync plus this much.
const SINGLE_CLIENT_OVERHEAD: Duration = Duration::from_micros(500);

/// Client count of the throughput target.
const THROUGHPUT_CLIENTS: usize = 64;

/// Throughput target with [`THROUGHPUT_CLIENTS`] clients, changes per second.
const THROUGHPUT_TARGET: f64 = 20_000.0;

/// Pause after a failed post so a down server does not make the loop spin.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Args)]
pub struct WriteArgs {
    /// Concurrent clients; a comma-separated list runs once per value.
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_CLIENTS",
        value_delimiter = ',',
        default_values_t = [1usize, 64]
    )]
    pub clients: Vec<usize>,
    /// Seconds each run posts for.
    #[arg(long, env = "CHANGEAGENT_BENCH_DURATION", default_value_t = 10)]
    pub duration: u64,
}

/// The outcome of one run with a fixed number of clients.
#[derive(Debug)]
pub struct WriteRun {
    pub clients: usize,
    pub changes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Latency,
}

/// Counters shared by the clients of one run and its progress line.
#[derive(Default)]
struct Counters {
    /// Next value of `n` in the posted data, unique across clients.
    next_n: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// What one client saw.
struct ClientOutcome {
    hist: Histogram<u64>,
    first_error: Option<String>,
}

/// Runs once per client count, printing each run's figures.
pub async fn run(server: &Server, args: &WriteArgs) -> Result<Vec<WriteRun>> {
    let mut runs = Vec::with_capacity(args.clients.len());
    for &clients in &args.clients {
        runs.push(run_one(server, clients, Duration::from_secs(args.duration)).await?);
    }
    Ok(runs)
}

async fn run_one(server: &Server, clients: usize, duration: Duration) -> Result<WriteRun> {
    report::header(&format!(
        "write: {clients} client(s) posting single changes for {} s to {}/changes",
        duration.as_secs(),
        server.base()
    ));
    let counters = Arc::new(Counters::default());
    let _progress = {
        let counters = Arc::clone(&counters);
        Progress::start(move |elapsed| {
            let ok = counters.ok.load(Ordering::Relaxed);
            format!(
                "write: {} changes, {} changes/s, {} errors",
                report::count(ok),
                report::rate(ok, elapsed),
                report::count(counters.errors.load(Ordering::Relaxed))
            )
        })
    };

    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(client_loop(server.clone(), deadline, Arc::clone(&counters)));
    }
    let mut hist = report::histogram()?;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.context("a write client panicked")??;
        hist.add(&outcome.hist)
            .context("merging latency histograms")?;
        first_error = first_error.or(outcome.first_error);
    }
    let elapsed = started.elapsed();

    let run = WriteRun {
        clients,
        changes: counters.ok.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        elapsed,
        latency: Latency::of(&hist),
    };
    println!(
        "{} client(s): {} changes in {:.1} s = {} changes/s, {} errors",
        clients,
        report::count(run.changes),
        elapsed.as_secs_f64(),
        report::rate(run.changes, elapsed),
        report::count(run.errors)
    );
    println!("latency {}", run.latency.summary());
    if let Some(err) = first_error {
        println!("first error: {err}");
    }
    if run.changes == 0 {
        bail!(
            "no post to {}/changes succeeded in {} s",
            server.base(),
            duration.as_secs()
        );
    }
    Ok(run)
}

/// Posts one change after another until `deadline`, timing each.
async fn client_loop(
    server: Server,
    deadline: Instant,
    counters: Arc<Counters>,
) -> Result<ClientOutcome> {
    let url = server.url("/changes");
    let mut hist = report::histogram()?;
    let mut first_error = None;
    while Instant::now() < deadline {
        let n = counters.next_n.fetch_add(1, Ordering::Relaxed);
        let body = format!(r#"{{"data":{{"bench":true,"n":{n}}}}}"#);
        let started = Instant::now();
        let result = async {
            let resp = server
                .client()
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body)
                .timeout(server::REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!(server::describe(&e)))?;
            server::ok_body(resp).await
        }
        .await;
        match result {
            Ok(_) => {
                report::record(&mut hist, started.elapsed());
                counters.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                first_error.get_or_insert_with(|| format!("POST {url}: {err:#}"));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    Ok(ClientOutcome { hist, first_error })
}

/// Prints the comparison of the runs with the write targets.
pub fn print_targets(runs: &[WriteRun], fsync: Option<&Latency>) {
    report::header("write targets");
    match (runs.iter().find(|r| r.clients == 1), fsync) {
        (Some(single), Some(fsync)) => {
            let met = single.latency.p50 <= fsync.p50 + SINGLE_CLIENT_OVERHEAD;
            println!(
                "single-client p50 {} vs fsync p50 {} + {} target: {}",
                report::ms(single.latency.p50),
                report::ms(fsync.p50),
                report::ms(SINGLE_CLIENT_OVERHEAD),
                report::verdict(met)
            );
        }
        (Some(single), None) => println!(
            "single-client p50 {} (pass --fsync-dir <server data dir> to compare it with the \
             fsync p50 + {} target)",
            report::ms(single.latency.p50),
            report::ms(SINGLE_CLIENT_OVERHEAD)
        ),
        (None, _) => println!("single-client target: not measured (add 1 to --clients)"),
    }
    match runs.iter().find(|r| r.clients == THROUGHPUT_CLIENTS) {
        Some(run) => {
            let rate = report::per_sec(run.changes, run.elapsed);
            println!(
                "{THROUGHPUT_CLIENTS} clients: {} changes/s vs {} target: {}",
                report::rate(run.changes, run.elapsed),
                THROUGHPUT_TARGET,
                report::verdict(rate >= THROUGHPUT_TARGET)
            );
        }
        None => println!(
            "{THROUGHPUT_CLIENTS}-client target: not measured (add {THROUGHPUT_CLIENTS} to --clients)"
        ),
    }
}
