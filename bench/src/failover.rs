//! `failover`: with a local cluster running and one writer posting
//! continuously, SIGKILLs the leader (or, with `--signal term`, stops it with
//! SIGTERM, a planned restart), measures the time from the signal to the next
//! acknowledged write, restarts the node, waits until it has caught up, and
//! repeats; then checks the log holds each acknowledged write once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use changeagent_testkit::cluster::{Cluster, CLUSTER_DEADLINE};
use changeagent_testkit::POLL_INTERVAL;

use crate::cluster::{self, NodeArgs};
use crate::report::{self, Latency};
use crate::server::{self, Server};

/// Acknowledged writes the writer must have made before the first kill and
/// after each catch-up: proof that it is writing through the current leader.
const WARMUP_ACKS: u64 = 20;

/// How long the writer may take to reach [`WARMUP_ACKS`].
const WARMUP_DEADLINE: Duration = Duration::from_secs(30);

/// How long after a kill a write must be acknowledged before the run fails.
const ACK_DEADLINE: Duration = Duration::from_secs(60);

/// How long a restarted node may take to catch up with the leader.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(120);

/// Pause before retrying a failed attempt on the next node: short next to
/// an election (hundreds of ms), so it barely adds to the measured time,
/// long enough that a node without a leader is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// How long the writer may take to finish its last write once told to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Nodes in the local cluster (at least 3, so one can be killed).
    #[arg(long, env = "CHANGEAGENT_BENCH_CLUSTER", default_value_t = 3)]
    pub cluster: usize,
    /// Leader kills to measure.
    #[arg(long, env = "CHANGEAGENT_BENCH_ROUNDS", default_value_t = 20)]
    pub rounds: usize,
    /// Longest single write attempt; one that takes longer is retried on the
    /// next node with the same Idempotency-Key.
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_ATTEMPT_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub attempt_timeout_ms: u64,
    /// How the leader is stopped: `kill` (SIGKILL, a crash) or `term` (SIGTERM, a planned
    /// restart: the leader hands over first).
    #[arg(
        long,
        value_enum,
        env = "CHANGEAGENT_BENCH_SIGNAL",
        default_value_t = Signal::Kill
    )]
    pub signal: Signal,
    #[command(flatten)]
    pub nodes: NodeArgs,
}

/// How a round stops the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Signal {
    /// SIGKILL: the leader vanishes; the others elect after the leader lease.
    Kill,
    /// SIGTERM: the leader hands leadership over, then drains and exits.
    Term,
}

impl Signal {
    fn label(self) -> &'static str {
        match self {
            Signal::Kill => "kill -9",
            Signal::Term => "SIGTERM",
        }
    }
}

impl FailoverArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if !(3..=cluster::MAX_NODES).contains(&self.cluster) {
            bail!(
                "--cluster must be within 3..={} for failover: a smaller cluster has no \
                 quorum once its leader is killed",
                cluster::MAX_NODES
            );
        }
        if self.rounds == 0 || self.attempt_timeout_ms == 0 {
            bail!("--rounds and --attempt-timeout-ms must be at least 1");
        }
        self.nodes.validate()
    }
}

/// The first acknowledged write after a kill.
struct Ack {
    acked: Instant,
    /// Index of the node that answered.
    node: usize,
}

/// A measurement in progress: the first write sent at or after `dead` that
/// is acknowledged goes to `tx`.
struct Armed {
    /// After a kill: when the killed leader had been reaped (a write sent
    /// after this cannot have been acknowledged by it). After SIGTERM: when
    /// the signal was sent (the writer's pause is what is measured).
    dead: Instant,
    tx: oneshot::Sender<Ack>,
}

/// State shared by the writer task and the driver.
#[derive(Default)]
struct Shared {
    /// Set by the driver; the writer stops after its current write is
    /// acknowledged.
    stop: AtomicBool,
    acked: AtomicU64,
    /// Attempts that failed and were retried (5xx, timeouts, refused
    /// connections).
    retries: AtomicU64,
    /// Armed by the driver after each kill, taken by the writer at the
    /// first qualifying ack. Never held across an await.
    armed: Mutex<Option<Armed>>,
    /// The latest retried failure, for error messages.
    last_failure: Mutex<Option<String>>,
}

impl Shared {
    fn arm(&self, dead: Instant, tx: oneshot::Sender<Ack>) {
        if let Ok(mut armed) = self.armed.lock() {
            *armed = Some(Armed { dead, tx });
        }
    }

    /// Called by the writer for each acknowledged write.
    fn acked(&self, sent: Instant, node: usize) {
        let acked = Instant::now();
        self.acked.fetch_add(1, Ordering::Relaxed);
        let Ok(mut armed) = self.armed.lock() else {
            return;
        };
        if armed.as_ref().is_some_and(|a| sent >= a.dead) {
            if let Some(a) = armed.take() {
                // The driver may have given up waiting; nothing to do then.
                let _ = a.tx.send(Ack { acked, node });
            }
        }
    }

    fn failed(&self, message: String) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(message);
        }
    }

    fn last_failure(&self) -> String {
        self.last_failure
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_else(|| "none".to_string())
    }
}

/// Starts the cluster, measures, and stops it (keeping its files on error).
pub async fn run(args: &FailoverArgs) -> Result<()> {
    let mut cluster = cluster::start(args.cluster, &args.nodes).await?;
    let result = measure(&mut cluster, args).await;
    cluster.keep_on_error(result)
}

async fn measure(cluster: &mut Cluster, args: &FailoverArgs) -> Result<()> {
    report::header(&format!(
        "failover: {} × {} of the leader of a {}-node cluster under one writer",
        args.rounds,
        args.signal.label(),
        cluster.len()
    ));
    println!("cluster: {}", cluster.describe());
    println!(
        "writer: single changes with an Idempotency-Key each; a 5xx, a refused connection or \
         an attempt over {} ms is retried on the next node after {}",
        args.attempt_timeout_ms,
        report::ms(RETRY_PAUSE)
    );

    let leader = cluster.try_wait_leader(CLUSTER_DEADLINE).await?;
    let base = cluster.healths().await[leader]
        .as_ref()
        .map(|h| h.last_index)
        .with_context(|| format!("{} did not answer GET /health", cluster.label(leader)))?;
    let shared = Arc::new(Shared::default());
    let mut writer = tokio::spawn(write_loop(
        cluster::servers(cluster)?,
        Arc::clone(&shared),
        Duration::from_millis(args.attempt_timeout_ms),
    ));
    let result = rounds(cluster, args, &shared, &mut writer).await;
    // `rounds` stopped and joined the writer unless it failed; a failed run
    // may leave it retrying against a dead cluster.
    writer.abort();
    let Rounds {
        failover,
        elections,
        catch_up,
        writer_done,
    } = result?;

    let end = cluster
        .healths()
        .await
        .iter()
        .flatten()
        .map(|h| h.last_index)
        .max()
        .context("no node answered GET /health after the last round")?;
    let acked = shared.acked.load(Ordering::Relaxed);
    let grown = end.saturating_sub(base);

    report::header("failover results");
    println!(
        "{} leader stops: time from {} to the next acknowledged write (sent after it{})",
        args.rounds,
        args.signal.label(),
        match args.signal {
            Signal::Kill => ", once the old leader was gone",
            Signal::Term => "",
        }
    );
    println!("failover {}", Latency::of(&failover).summary());
    println!(
        "new leader named by every survivor in /health (polled every {}) {}",
        report::ms(POLL_INTERVAL),
        Latency::of(&elections).summary()
    );
    println!(
        "restart to caught up (process start, log replay, catch-up) {}",
        Latency::of(&catch_up).summary()
    );
    println!(
        "writer: {} writes acknowledged, {} attempts retried{}",
        report::count(acked),
        report::count(shared.retries.load(Ordering::Relaxed)),
        if writer_done {
            ""
        } else {
            " (its last write did not finish)"
        }
    );
    let verdict = match grown.cmp(&acked) {
        std::cmp::Ordering::Equal => "each acknowledged write is in the log exactly once".into(),
        std::cmp::Ordering::Greater => format!(
            "{} more changes than acknowledged writes (a retry appended twice?)",
            grown - acked
        ),
        std::cmp::Ordering::Less => format!(
            "{} FEWER changes than acknowledged writes: acknowledged writes were lost",
            acked - grown
        ),
    };
    println!(
        "log grew by {} changes for {} acknowledged writes: {verdict}",
        report::count(grown),
        report::count(acked)
    );
    Ok(())
}

/// What the rounds measured.
struct Rounds {
    /// Kill to the next acknowledged write.
    failover: Histogram<u64>,
    /// Kill to every surviving node naming the same new leader in `/health`.
    elections: Histogram<u64>,
    /// Restart of the killed node to it having caught up.
    catch_up: Histogram<u64>,
    /// The writer finished its last write when told to stop.
    writer_done: bool,
}

/// The kill / measure / restart / catch-up rounds, then stops the writer.
async fn rounds(
    cluster: &mut Cluster,
    args: &FailoverArgs,
    shared: &Shared,
    writer: &mut JoinHandle<Result<()>>,
) -> Result<Rounds> {
    let mut failover = report::histogram()?;
    let mut elections = report::histogram()?;
    let mut catch_up = report::histogram()?;
    wait_acks(shared, writer, WARMUP_ACKS).await?;
    for round in 1..=args.rounds {
        let leader = cluster.try_wait_leader(CLUSTER_DEADLINE).await?;
        let (tx, rx) = oneshot::channel();
        let killed = Instant::now();
        match args.signal {
            Signal::Kill => {
                cluster.try_kill9(leader)?;
                shared.arm(Instant::now(), tx);
            }
            Signal::Term => {
                shared.arm(killed, tx);
                let status = cluster.try_terminate(leader).await?;
                if !status.success() {
                    bail!("{} exited with {status} on SIGTERM", cluster.label(leader));
                }
            }
        }
        let survivors = cluster.running();
        let acked = async {
            tokio::select! {
                ack = rx => ack.map_err(|_| anyhow!("the writer stopped")),
                ended = &mut *writer => Err(writer_ended(ended)),
                () = tokio::time::sleep(ACK_DEADLINE) => Err(anyhow!(
                    "no write acknowledged within {} s of stopping {} (last failure: {}); \
                     health now:\n{}",
                    ACK_DEADLINE.as_secs(),
                    cluster.label(leader),
                    shared.last_failure(),
                    cluster.status().await
                )),
            }
        };
        let elected = async {
            let new = cluster
                .try_wait_new_leader(&survivors, leader, ACK_DEADLINE)
                .await?;
            anyhow::Ok((new, Instant::now()))
        };
        let (ack, elected) = tokio::join!(acked, elected);
        let (ack, (_, elected_at)) = (ack?, elected?);
        let took = ack.acked.duration_since(killed);
        report::record(&mut failover, took);
        let election = elected_at.duration_since(killed);
        report::record(&mut elections, election);

        let restarted = Instant::now();
        cluster.try_restart(leader).await?;
        let survivors = cluster.healths().await;
        let target = survivors
            .iter()
            .flatten()
            .map(|h| h.last_index)
            .max()
            .unwrap_or(0);
        let new_leader = cluster
            .try_wait_caught_up(leader, target, CATCH_UP_DEADLINE)
            .await?;
        let caught_up = restarted.elapsed();
        report::record(&mut catch_up, caught_up);
        eprintln!(
            "  … round {round}/{}: {} of leader {}; new leader in /health after {}, next \
             write acknowledged after {} (by {}); leader now {}; restarted node caught up in {}",
            args.rounds,
            args.signal.label(),
            cluster.label(leader),
            report::ms(election),
            report::ms(took),
            cluster.label(ack.node),
            cluster.label(new_leader),
            report::ms(caught_up)
        );
        let acked = shared.acked.load(Ordering::Relaxed);
        wait_acks(shared, writer, acked + WARMUP_ACKS).await?;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let done = match tokio::time::timeout(STOP_DEADLINE, &mut *writer).await {
        Ok(ended) => {
            ended.context("the writer panicked")??;
            true
        }
        Err(_) => {
            writer.abort();
            false
        }
    };
    Ok(Rounds {
        failover,
        elections,
        catch_up,
        writer_done: done,
    })
}

/// Waits until the writer has `target` acknowledged writes in total.
async fn wait_acks(
    shared: &Shared,
    writer: &mut JoinHandle<Result<()>>,
    target: u64,
) -> Result<()> {
    let deadline = Instant::now() + WARMUP_DEADLINE;
    while shared.acked.load(Ordering::Relaxed) < target {
        if writer.is_finished() {
            return Err(writer_ended(writer.await));
        }
        if Instant::now() >= deadline {
            bail!(
                "the writer reached only {} of {target} acknowledged writes within {} s (last \
                 failure: {})",
                shared.acked.load(Ordering::Relaxed),
                WARMUP_DEADLINE.as_secs(),
                shared.last_failure()
            );
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    Ok(())
}

/// The error explaining why the writer ended before it was told to.
fn writer_ended(ended: std::result::Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match ended {
        Ok(Ok(())) => anyhow!("the writer stopped early"),
        Ok(Err(err)) => err.context("the writer failed"),
        Err(err) => anyhow!("the writer panicked: {err}"),
    }
}

/// What one attempt at a write came to.
enum Attempt {
    Acked,
    /// Worth retrying elsewhere: no leader, a dead node, a timeout.
    Retry(String),
}

/// Posts one change after another until told to stop, each with its own
/// Idempotency-Key, retrying each on the next node until acknowledged.
async fn write_loop(
    nodes: Vec<Server>,
    shared: Arc<Shared>,
    attempt_timeout: Duration,
) -> Result<()> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut node = 0;
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = format!("changeagent-bench-failover-{run_id}-{seq}");
        let body = format!(r#"{{"data":{{"bench":"failover","n":{seq}}}}}"#);
        loop {
            let sent = Instant::now();
            match attempt(&nodes[node], &key, &body, attempt_timeout).await? {
                Attempt::Acked => {
                    shared.acked(sent, node);
                    break;
                }
                Attempt::Retry(why) => {
                    shared.failed(format!("{}: {why}", nodes[node].base()));
                    node = (node + 1) % nodes.len();
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }
    Ok(())
}

/// One `POST /changes` attempt; a 4xx answer is an error (retrying cannot
/// help), a 5xx or a transport failure is worth a retry.
async fn attempt(server: &Server, key: &str, body: &str, timeout: Duration) -> Result<Attempt> {
    let url = server.url("/changes");
    let sent = server
        .client()
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Idempotency-Key", key)
        .body(body.to_string())
        .timeout(timeout)
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(err) => return Ok(Attempt::Retry(server::describe(&err))),
    };
    let status = resp.status();
    match server::ok_body(resp).await {
        Ok(_) => Ok(Attempt::Acked),
        Err(err) if status.is_client_error() => {
            Err(err.context(format!("POST {url} with Idempotency-Key {key}")))
        }
        Err(err) => Ok(Attempt::Retry(format!("{err:#}"))),
    }
}
