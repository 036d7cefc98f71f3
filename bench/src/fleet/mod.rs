//! `fleet`: a long-running simulation of ChangeAgent's users against any
//! running cluster — always-online writers and occasionally connected ones
//! with an on-disk outbox, and a thousand viewers following the list
//! through the edges, some of them going offline for longer than the core
//! retains changes — that checks, as it goes and at the end, that everyone
//! saw the same list and that every acknowledged write is in it once. It
//! runs on its own (`--duration`) or as a docker-compose service until
//! SIGTERM, and prints one JSON summary on stdout; exit status 0 when no
//! violation was found, 1 otherwise.
//!
//! # What runs
//!
//! - Setup: the tenants `fleet-t{T}` and two collections each, created
//!   idempotently (a `409` is fine) and retried with backoff while the
//!   cluster has no leader yet, for up to [`setup::SETUP_DEADLINE`].
//! - `--writers` always-online writers post through `--cores` (see
//!   [`writer`]); `--outbox-writers` occasionally connected ones queue into
//!   an outbox under `--data-dir`, flushing while online. Together they
//!   write `--rate` changes a second, each its share.
//! - `--consumers` viewers follow the list from 0 through `--edges`
//!   (round-robin; one shared client per edge, failing over to the other
//!   edges), or the cores when no edge is given. A `--offline-share` of
//!   them alternate online periods (`--online-secs`) and offline ones
//!   (`--offline-secs`, no request at all), then resume from their
//!   position; when it was truncated meanwhile the client library reloads
//!   the newest checkpoint. Every viewer checks its view as it goes (dense
//!   `_id`s, reloads that move forward, see [`check`]) and keeps its state
//!   as a `StateDigest` of the test kit: a few kilobytes of hashes instead
//!   of every change. At most `--catch-up` viewers catch up at once.
//! - A reference consumer follows a core from 0 the same way and notes at
//!   which `_id` every write appears ([`verify`]).
//! - A progress line on stderr every 2 s.
//!
//! # The end
//!
//! After `--duration` seconds, or at the first SIGTERM or SIGINT (a second
//! one stops waiting): 1. writers stop (a write in flight is retried until
//! answered); 2. outbox writers come online and flush until empty; 3. every
//! viewer comes online and catches up; 4. every consumer freezes and
//! reports its position; 5. the final index `P` is the highest of those,
//! of the cores' `lastIndex` and of the acknowledged `_id`s; 6. every
//! consumer goes on to exactly `P` and ends there; 7. each viewer's digest
//! is compared with the reference's, and every writer's log is checked
//! against the reference's notes ([`verify`] says how, and why that is
//! sound). Steps 1–6 share one deadline, `--settle-secs`; whatever has not
//! happened by then is a violation. As a compose service, give it a
//! `stop_grace_period` above `--settle-secs`: compose SIGKILLs a service
//! 10 s after its SIGTERM by default.
//!
//! One fleet per cluster: the final check takes every write to the fleet's
//! keys to be its own (another run's writes are told apart by their
//! markers, but a concurrent run's deletes would look like lost writes).
//!
//! # Figures
//!
//! Latency is commit-to-consumer: the time a viewer got a change minus the
//! change's `_ts` (nanoseconds since the epoch, stamped by the leader when
//! it proposed the change, so it includes the commit), for changes that
//! reached a viewer by its live long-polls: only once the viewer has caught
//! up with the core's `lastIndex` as of the moment it came online, so the
//! catch-up after an offline period (or the start) is not counted, and only
//! until the run ends (the end's freeze holds changes back on purpose).
//! Both clocks must agree: run the fleet on a cluster machine or under NTP.
//! On a machine that also runs the cluster, it includes the time the
//! fleet's own thousand viewers wait for a CPU.
//!
//! Transient errors (refused connections, `502`–`504`, timeouts, `408`,
//! `429`) that writers, outboxes and setup met and retried are counted,
//! never violations; the follows retry theirs inside the client library.
//! A follow that ends on a `404` for the checkpoint its `410` named (pruned
//! meanwhile, or not yet on the edge that named it) is started again from
//! the same position and counted (`follows_restarted`); any other end of a
//! follow is a violation.
//!
//! # Bounds
//!
//! Memory per viewer is its digest (about 30 bytes per live key, 24 for
//! all unkeyed changes) and its follow's current page; writers log 16
//! bytes per write and the reference 8 per write, plus one entry per key.
//! Checkpoint downloads go to temp files under `--data-dir`, at most
//! `--catch-up` at once. Violation messages kept: 50, each under 400 bytes.
//!
//! # Layout
//!
//! - [`setup`]: the tenants and collections, created while the cluster
//!   comes up.
//! - [`launch`]: every task of the fleet, and the handles the end needs.
//! - [`end`]: the settling (steps 1–6) and the judging (step 7).
//! - [`schedule`]: second ranges, pacing, the seeded generator, who is
//!   occasionally connected.
//! - [`names`]: tenants, collections, keys and write markers.
//! - [`writer`]: the writers, their logs and outcomes.
//! - [`consumer`]: the consumers, their phases and digests.
//! - [`check`]: the dense check of each view, and the violations.
//! - [`verify`]: where each write appears, and the check of every write.
//! - [`stats`]: counters, latency and the progress line.
//! - [`summary`]: the JSON summary and its verdict.

pub mod check;
pub mod consumer;
pub mod end;
pub mod launch;
pub mod names;
pub mod schedule;
pub mod setup;
pub mod stats;
pub mod summary;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::launch::{pending, Access, Setting};
use crate::fleet::names::{KeySpace, COLLECTIONS_PER_TENANT, MAX_KEYS};
use crate::fleet::schedule::{Rng, SecsRange};
use crate::fleet::stats::Stats;
use crate::fleet::summary::{verdict, LatencyMs, Summary};
use crate::open_files;
use crate::report::Progress;

#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Core nodes the writers post through, comma-separated; the client
    /// fails over between them.
    #[arg(
        long,
        env = "CHANGEAGENT_FLEET_CORES",
        value_delimiter = ',',
        required = true
    )]
    pub cores: Vec<String>,
    /// Edges the viewers follow through, comma-separated, round-robin;
    /// none: the viewers follow the cores.
    #[arg(long, env = "CHANGEAGENT_FLEET_EDGES", value_delimiter = ',')]
    pub edges: Vec<String>,
    /// Viewers.
    #[arg(long, env = "CHANGEAGENT_FLEET_CONSUMERS", default_value_t = 1000)]
    pub consumers: usize,
    /// Always-online writers.
    #[arg(long, env = "CHANGEAGENT_FLEET_WRITERS", default_value_t = 4)]
    pub writers: u32,
    /// Occasionally connected writers, each with an outbox.
    #[arg(long, env = "CHANGEAGENT_FLEET_OUTBOX_WRITERS", default_value_t = 2)]
    pub outbox_writers: u32,
    /// Tenants (two collections each).
    #[arg(long, env = "CHANGEAGENT_FLEET_TENANTS", default_value_t = 3)]
    pub tenants: u32,
    /// Keys per collection.
    #[arg(long, env = "CHANGEAGENT_FLEET_KEYS", default_value_t = 200)]
    pub keys: u32,
    /// Changes a second, all writers together.
    #[arg(long, env = "CHANGEAGENT_FLEET_RATE", default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds to run; 0: until SIGTERM or SIGINT.
    #[arg(long, env = "CHANGEAGENT_FLEET_DURATION", default_value_t = 0)]
    pub duration: u64,
    /// Share of the viewers that are occasionally connected (0 to 1).
    #[arg(long, env = "CHANGEAGENT_FLEET_OFFLINE_SHARE", default_value_t = 0.2)]
    pub offline_share: f64,
    /// Seconds of an offline period, MIN..MAX: some should outlast the
    /// core's retention, so the viewer reloads a checkpoint.
    #[arg(long, env = "CHANGEAGENT_FLEET_OFFLINE_SECS", default_value = "5..120")]
    pub offline_secs: SecsRange,
    /// Seconds of an online period of occasionally connected viewers and
    /// outbox writers, MIN..MAX.
    #[arg(long, env = "CHANGEAGENT_FLEET_ONLINE_SECS", default_value = "10..60")]
    pub online_secs: SecsRange,
    /// Directory for the outboxes and checkpoint downloads; default: a
    /// temporary directory, removed at the end.
    #[arg(long, env = "CHANGEAGENT_FLEET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds the end may take to flush, catch up and converge.
    #[arg(long, env = "CHANGEAGENT_FLEET_SETTLE_SECS", default_value_t = 300)]
    pub settle_secs: u64,
    /// Also write the JSON summary to this file.
    #[arg(long, env = "CHANGEAGENT_FLEET_REPORT")]
    pub report: Option<PathBuf>,
    /// The cluster's secret, sent with the writers' requests.
    #[arg(long, env = "CHANGEAGENT_FLEET_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// A file holding the cluster's secret.
    #[arg(
        long,
        env = "CHANGEAGENT_FLEET_CLUSTER_SECRET_FILE",
        conflicts_with = "cluster_secret"
    )]
    pub cluster_secret_file: Option<PathBuf>,
    /// Seed of the fleet's choices (keys, kinds of writes, periods);
    /// default: from the clock. The summary says which.
    #[arg(long, env = "CHANGEAGENT_FLEET_SEED")]
    pub seed: Option<u64>,
    /// Viewers that may catch up at once (after starting or coming back
    /// online): bounds checkpoint downloads and catch-up pages in flight.
    #[arg(long, env = "CHANGEAGENT_FLEET_CATCH_UP", default_value_t = 64)]
    pub catch_up: usize,
    /// Seconds each long poll waits on the server.
    #[arg(long, env = "CHANGEAGENT_FLEET_BLOCK_SECS", default_value_t = 30)]
    pub block_secs: u32,
    /// The CA to trust for `https://` cores and edges.
    #[command(flatten)]
    pub ca: changeagent_client::CaFlags,
}

impl FleetArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.cores().is_empty() {
            bail!("--cores needs at least one URL");
        }
        if self.tenants == 0 || self.keys == 0 {
            bail!("--tenants and --keys must be at least 1");
        }
        let keys =
            u64::from(self.tenants) * u64::from(COLLECTIONS_PER_TENANT) * u64::from(self.keys);
        if keys > MAX_KEYS {
            bail!("--tenants × 2 collections × --keys is {keys} keys, more than {MAX_KEYS}");
        }
        if self.writers + self.outbox_writers > 0 && !(self.rate > 0.0 && self.rate <= 1e6) {
            bail!("--rate must be above 0 (and at most 1,000,000) when there are writers");
        }
        if !(0.0..=1.0).contains(&self.offline_share) {
            bail!("--offline-share must be within 0..1");
        }
        if self.online_secs.max <= 0.0 {
            bail!("--online-secs must allow some time online");
        }
        if self.settle_secs == 0 || self.catch_up == 0 {
            bail!("--settle-secs and --catch-up must be at least 1");
        }
        if !(1..=300).contains(&self.block_secs) {
            bail!("--block-secs must be within 1..=300");
        }
        Ok(())
    }

    fn cores(&self) -> Vec<String> {
        non_empty(&self.cores)
    }

    fn edges(&self) -> Vec<String> {
        non_empty(&self.edges)
    }

    /// The occasionally connected viewers.
    fn occasional(&self) -> usize {
        (self.offline_share * self.consumers as f64).round() as usize
    }

    fn key_space(&self) -> KeySpace {
        KeySpace {
            tenants: self.tenants,
            keys: self.keys,
        }
    }
}

/// The URLs given, without empty ones (`CHANGEAGENT_FLEET_EDGES=` is none).
fn non_empty(urls: &[String]) -> Vec<String> {
    urls.iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Runs the fleet; the exit status says whether it found no violation.
pub async fn main(args: FleetArgs) -> ExitCode {
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build of the benchmark; its consumers cost several times \
             the CPU of a release build (cargo build --release -p changeagent-bench)"
        );
    }
    match run(args).await {
        Ok(summary) if summary.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the fleet, prints the summary (and writes `--report`), returns it.
pub async fn run(args: FleetArgs) -> Result<Summary> {
    args.validate()?;
    let started = Instant::now();
    let cores = args.cores();
    let edges = args.edges();
    let secret = match &args.cluster_secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the cluster secret from {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => args.cluster_secret.clone(),
    };
    let access = Access {
        secret,
        roots: args.ca.certificates()?,
    };
    let sockets = args.consumers as u64 + u64::from(args.writers + args.outbox_writers) * 2;
    open_files::ensure(sockets + 2 * cores.len() as u64 + 16, None)?;

    let seed = args.seed.unwrap_or_else(clock_seed);
    let mut rng = Rng::new(seed);
    // The run's name tells its markers from every other run's, also with
    // the same seed on the same cluster.
    let run = format!("{:016x}", Rng::new(seed ^ clock_seed()).next_u64());
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("changeagent-fleet-")
                .tempdir()
                .context("creating a temporary data directory")?;
            temp.path().to_owned()
        }
    };
    let spool = data_dir.join("spool");
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let stats = Arc::new(Stats::new()?);
    let ending = CancellationToken::new();
    let hurry = CancellationToken::new();
    let _signals = watch_signals(ending.clone(), hurry.clone())?;
    eprintln!(
        "fleet {run}: {} consumers ({} occasionally connected) via {}, {} writers + {} outbox \
         writers at {}/s over {} keys, seed {seed}, data in {}",
        args.consumers,
        args.occasional(),
        if edges.is_empty() {
            "the cores".to_owned()
        } else {
            format!("{} edges", edges.len())
        },
        args.writers,
        args.outbox_writers,
        args.rate,
        args.key_space().len(),
        data_dir.display()
    );
    let setup_client = launch::cores_client(&cores, &access)?;
    setup::setup(&setup_client, args.key_space(), &stats, &ending).await?;
    let setting = Setting {
        cores: &cores,
        edges: &edges,
        run: &run,
        data_dir: &data_dir,
        spool: &spool,
        access,
        stats: &stats,
    };
    let fleet = launch::launch(&args, setting, &mut rng).await?;
    let occasional = fleet.occasional as u64;

    // The run.
    let consumers = args.consumers as u64;
    let outboxes = fleet.outboxes.clone();
    let progress = {
        let stats = Arc::clone(&stats);
        let outboxes = outboxes.clone();
        Progress::start(move |elapsed| stats.line(elapsed, consumers, pending(&outboxes)))
    };
    let duration = (args.duration > 0).then(|| Duration::from_secs(args.duration));
    tokio::select! {
        () = ending.cancelled() => {}
        () = sleep_for(duration) => {}
    }
    drop(progress);
    let ran = started.elapsed();
    eprintln!(
        "fleet: ending after {:.0} s: {}",
        ran.as_secs_f64(),
        stats.line(ran, consumers, pending(&outboxes))
    );

    let ended = end::settle(fleet, &stats, args.settle_secs, &hurry).await?;
    let violations = &stats.violations;
    let judged = end::judge(&ended, violations);
    let writes_acked = Stats::get(&stats.acked);
    if args.writers > 0 && writes_acked == 0 {
        violations.add("no write of the always-online writers was acknowledged");
    }
    if args.outbox_writers > 0 && Stats::get(&stats.outbox_acked) == 0 {
        violations.add("no outbox post was acknowledged");
    }

    let total = violations.total();
    let summary = Summary {
        ok: verdict(total),
        consumers,
        offline_consumers: occasional,
        changes_delivered: Stats::get(&stats.delivered),
        writes_acked,
        outbox_posts: Stats::get(&stats.outbox_posts),
        reloads: Stats::get(&stats.reloads),
        transient_errors: Stats::get(&stats.transient),
        follows_restarted: stats.follow_failures.total(),
        follow_failures: stats.follow_failures.kept().into_iter().take(5).collect(),
        latency_ms: LatencyMs::of(stats.latency()),
        final_index: ended.final_index,
        violations: violations.kept(),
        violations_total: total,
        consumers_compared: judged.compared,
        consumers_equal: judged.equal,
        writes_checked: judged.verified.acked,
        writes_found: judged.verified.found,
        writes_unseen: judged.verified.unseen,
        writes_unknown: judged.verified.unknown,
        outbox_acked: Stats::get(&stats.outbox_acked),
        reference_checkpoint: judged.reference_checkpoint,
        run,
        seed,
        elapsed_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    let json = serde_json::to_string(&summary).context("encoding the summary")?;
    println!("{json}");
    if let Some(path) = &args.report {
        write_report(path, &json).await?;
    }
    eprintln!("{}", summary.message());
    Ok(summary)
}

/// Sleeps for `duration`, or forever.
async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// A seed from the clock, for runs without `--seed`.
fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Cancels `ending` at the first SIGTERM or SIGINT and `hurry` at the
/// second. The task lives as long as the process.
fn watch_signals(ending: CancellationToken, hurry: CancellationToken) -> Result<JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(tokio::spawn(async move {
        for (token, what) in [
            (ending, "ending: stopping the writers, then checking the fleet (signal again to stop waiting)"),
            (hurry, "stopping the wait: whatever has not converged is reported"),
        ] {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("fleet: signal: {what}");
            token.cancel();
        }
    }))
}

/// Writes the summary to `path`.
async fn write_report(path: &Path, json: &str) -> Result<()> {
    tokio::fs::write(path, format!("{json}\n"))
        .await
        .with_context(|| format!("writing the report to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn parse(args: &[&str]) -> Result<FleetArgs, clap::Error> {
        let mut argv = vec!["fleet"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.fleet)
    }

    #[test]
    fn defaults_are_a_thousand_consumers_of_three_tenants() {
        let a = parse(&["--cores", "http://a:1,http://b:2"]).unwrap();
        assert_eq!(a.cores(), ["http://a:1", "http://b:2"]);
        assert!(a.edges().is_empty());
        assert_eq!((a.consumers, a.writers, a.outbox_writers), (1000, 4, 2));
        assert_eq!((a.tenants, a.keys, a.rate, a.duration), (3, 200, 50.0, 0));
        assert_eq!(a.offline_secs, "5..120".parse().unwrap());
        assert_eq!(a.occasional(), 200);
        assert_eq!(a.key_space().len(), 1200);
        assert_eq!(a.settle_secs, 300);
        assert!(a.validate().is_ok());
        assert!(parse(&[]).is_err(), "--cores is required");
    }

    #[test]
    fn bad_flags_are_refused_before_any_work() {
        for bad in [
            &["--cores", ","][..],
            &["--cores", "a", "--tenants", "0"],
            &["--cores", "a", "--rate", "0"],
            &["--cores", "a", "--offline-share", "1.5"],
            &["--cores", "a", "--settle-secs", "0"],
            &["--cores", "a", "--online-secs", "0"],
            &["--cores", "a", "--block-secs", "301"],
            &["--cores", "a", "--keys", "4000000000"],
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad:?}");
        }
        assert!(parse(&["--cores", "a", "--offline-secs", "9..3"]).is_err());
        // No writers: no rate needed.
        let a = parse(&[
            "--cores",
            "a",
            "--writers",
            "0",
            "--outbox-writers",
            "0",
            "--rate",
            "0",
        ])
        .unwrap();
        assert!(a.validate().is_ok());
    }

    #[test]
    fn empty_urls_are_none() {
        assert_eq!(non_empty(&[" x ".into(), "".into()]), ["x"]);
    }
}
