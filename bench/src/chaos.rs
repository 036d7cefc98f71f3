//! `chaos`: faults across the containers of a running compose topology
//! (`deploy/docker-compose.yml`, started by `deploy/compose up`) while its fleet simulator
//! and a writer of this run post changes. After each fault it waits until the system is
//! healthy again and writes flow; then it stops the fleet, which checks every consumer, and
//! checks that cores and edges hold the same bytes, that every checkpoint verifies and that
//! each acknowledged write of its own is in exactly once. One JSON summary on stdout,
//! progress on stderr; exit status 0 only when everything held.
//!
//! # Layout
//!
//! - `topology`: the containers by service, the servers' URLs, health, "settled", healing.
//! - `steps`: the five faults.
//! - `writer`: the run's own writer and what it saw acknowledged.
//! - `verify`: the fleet's verdict, replicas, checkpoints and the writer's writes.

mod steps;
mod topology;
mod verify;
mod writer;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use changeagent_testkit::wait_until;

use crate::report::Progress;
use topology::Topology;
use verify::Check;
use writer::Writer;

/// Every step, in the order a full run takes them.
const ALL_STEPS: &str = "kill-leader,partition,pause-edge,restart-checkpointer,restart-s3";

/// How often a wait looks again: soon enough to time recoveries to a fraction of a second,
/// seldom enough that its `docker` and HTTP probes cost the host little. A polling pace,
/// never a synchronisation delay.
const WATCH_PACE: Duration = Duration::from_millis(250);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Step {
    /// SIGKILL the leader core; a new leader, writes; start it; it catches up.
    KillLeader,
    /// Cut a follower core off the network; writes go on; reconnect; it catches up.
    Partition,
    /// Freeze edge1 until the cores truncated past it; it bootstraps again after a 410.
    PauseEdge,
    /// SIGKILL the checkpointer inside a checkpoint round (the object store frozen
    /// meanwhile, so the round cannot end first); start it; a newer checkpoint.
    RestartCheckpointer,
    /// Restart the S3 store; a checkpoint lands after it.
    RestartS3,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

impl Step {
    /// The services whose logs explain a failure of this step.
    fn look_at(self, t: &Topology) -> Vec<String> {
        let cores = t.cores.iter().map(|n| n.service().to_string());
        match self {
            Step::KillLeader | Step::Partition => cores.collect(),
            Step::PauseEdge => {
                let mut s: Vec<String> = t
                    .edges
                    .iter()
                    .take(1)
                    .map(|n| n.service().to_string())
                    .collect();
                s.push(topology::CHECKPOINTER.to_string());
                s
            }
            Step::RestartCheckpointer | Step::RestartS3 => {
                vec![topology::CHECKPOINTER.to_string(), topology::S3.to_string()]
            }
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Compose project of the running topology.
    #[arg(long, env = "CHANGEAGENT_BENCH_PROJECT")]
    pub project: String,
    /// The cores' published URLs, comma-separated, in service order (core1, core2, …).
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_CORES",
        value_delimiter = ',',
        required = true
    )]
    pub cores: Vec<String>,
    /// The edges' published URLs, comma-separated, in service order (edge1, edge2, …).
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_EDGES",
        value_delimiter = ',',
        required = true
    )]
    pub edges: Vec<String>,
    /// The checkpointer's status URL (it serves /health and /metrics there).
    #[arg(long, env = "CHANGEAGENT_BENCH_CHECKPOINTER")]
    pub checkpointer: String,
    /// The steps to run, comma-separated, in this order.
    #[arg(
        long,
        env = "CHANGEAGENT_BENCH_STEPS",
        value_enum,
        value_delimiter = ',',
        default_value = ALL_STEPS
    )]
    pub steps: Vec<Step>,
    /// Longest each wait may take: for the system to settle after a fault, for a
    /// truncation, for a checkpoint.
    #[arg(long, env = "CHANGEAGENT_BENCH_SETTLE_SECS", default_value_t = 180)]
    pub settle_secs: u64,
    /// Changes per second this run posts through the cores itself (besides the fleet's).
    #[arg(long, env = "CHANGEAGENT_BENCH_WRITE_RATE", default_value_t = 20)]
    pub write_rate: u32,
    /// How long the fleet may take to converge and check after SIGTERM.
    #[arg(long, env = "CHANGEAGENT_BENCH_FLEET_STOP_SECS", default_value_t = 600)]
    pub fleet_stop_secs: u64,
    /// The CA to trust for `https://` URLs (a topology started with `deploy/compose up --tls`).
    #[command(flatten)]
    pub ca: changeagent_client::CaFlags,
}

impl ChaosArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        let needs_quorum = self
            .steps
            .iter()
            .any(|s| matches!(s, Step::KillLeader | Step::Partition));
        if needs_quorum && self.cores.len() < 3 {
            bail!("kill-leader and partition need at least 3 --cores: two must go on without one");
        }
        if self.cores.is_empty() || self.edges.is_empty() {
            bail!("--cores and --edges need at least one URL each");
        }
        if self.settle_secs == 0 || self.write_rate == 0 || self.fleet_stop_secs == 0 {
            bail!("--settle-secs, --write-rate and --fleet-stop-secs must be at least 1");
        }
        Ok(())
    }
}

/// Finds the topology, runs the steps and checks, prints the summary; `Ok(true)` when all
/// held. Ctrl-C puts every container back (started, unpaused, reconnected) before it exits.
pub async fn main(args: &ChaosArgs) -> Result<bool> {
    args.validate()?;
    let t = Topology::discover(args).await?;
    let services: Vec<String> = t.containers().iter().map(|c| c.service.clone()).collect();
    eprintln!(
        "chaos: project {} (network {}): {}; fleet {}; steps {}",
        t.project,
        t.network,
        services.join(", "),
        if t.fleet.is_some() {
            "present"
        } else {
            "absent"
        },
        args.steps
            .iter()
            .map(Step::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let run = drive(&t, args);
    tokio::pin!(run);
    let summary = tokio::select! {
        summary = &mut run => summary,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("chaos: interrupted; putting every container back");
            t.heal().await;
            bail!("interrupted");
        }
    };
    println!("{}", summary.to_json());
    summary.explain(&t);
    Ok(summary.ok())
}

/// How one step went.
struct StepOutcome {
    name: String,
    /// `Err` holds why it failed, or why it was not run.
    result: std::result::Result<Value, String>,
    secs: Option<f64>,
    look_at: Vec<String>,
}

impl StepOutcome {
    fn to_json(&self) -> Value {
        let mut v = json!({"step": self.name, "ok": self.result.is_ok(), "secs": self.secs});
        match &self.result {
            Ok(detail) => v["detail"] = detail.clone(),
            Err(why) => v["error"] = json!(why),
        }
        v
    }
}

/// Everything the run found.
struct Summary {
    project: String,
    steps: Vec<StepOutcome>,
    writer: Value,
    fleet_report: Option<Value>,
    checks: Vec<Check>,
    total: Duration,
}

impl Summary {
    fn ok(&self) -> bool {
        self.steps.iter().all(|s| s.result.is_ok()) && self.checks.iter().all(|c| c.ok)
    }

    fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "project": self.project,
            "totalSecs": secs(self.total),
            "steps": self.steps.iter().map(StepOutcome::to_json).collect::<Vec<_>>(),
            "writer": self.writer,
            "fleet": self.fleet_report,
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }

    /// On stderr: each step's time, and for a failed run what failed and which logs to read.
    fn explain(&self, t: &Topology) {
        eprintln!("chaos: steps");
        for s in &self.steps {
            let time = s.secs.map_or_else(String::new, |x| format!(" in {x:.1} s"));
            let verdict = if s.result.is_ok() { "ok" } else { "FAILED" };
            eprintln!("  {:<22} {verdict}{time}", s.name);
        }
        if self.ok() {
            eprintln!("chaos: every step recovered and every check held");
            return;
        }
        eprintln!("chaos: FAILED");
        let mut look_at: Vec<String> = Vec::new();
        for s in self.steps.iter().filter(|s| s.result.is_err()) {
            if let Err(why) = &s.result {
                eprintln!("  step {}: {why}", s.name);
            }
            look_at.extend(s.look_at.iter().cloned());
        }
        for c in self.checks.iter().filter(|c| !c.ok) {
            eprintln!("  check {}: {}", c.name, c.detail);
            look_at.extend(c.look_at.iter().cloned());
        }
        look_at.sort();
        look_at.dedup();
        if !look_at.is_empty() {
            eprintln!(
                "  look at: CHANGEAGENT_COMPOSE_PROJECT={} deploy/compose logs {}",
                t.project,
                look_at.join(" ")
            );
        }
    }
}

/// The steps and the checks; never fails, every failure goes into the summary.
async fn drive(t: &Topology, args: &ChaosArgs) -> Summary {
    let started = Instant::now();
    let within = Duration::from_secs(args.settle_secs);
    let writer = Writer::start(
        t.cores.iter().map(|n| n.api.clone()).collect(),
        args.write_rate,
    );
    let mut outcomes = Vec::new();

    eprintln!("chaos: preflight: waiting until the system is healthy and writes flow");
    let began = Instant::now();
    let preflight = t.wait_settled(within).await;
    let mut healthy = preflight.is_ok();
    outcomes.push(StepOutcome {
        name: "preflight".to_string(),
        result: preflight
            .map(|last| json!({"lastIndex": last}))
            .map_err(|e| format!("{e:#}")),
        secs: Some(secs(began.elapsed())),
        look_at: t.containers().iter().map(|c| c.service.clone()).collect(),
    });

    for &step in &args.steps {
        if !healthy {
            outcomes.push(StepOutcome {
                name: step.to_string(),
                result: Err("not run: the system did not settle before it".to_string()),
                secs: None,
                look_at: Vec::new(),
            });
            continue;
        }
        eprintln!("chaos: step {step}");
        let began = Instant::now();
        let result = match steps::run(step, t, within).await {
            Ok(mut detail) => {
                detail["faultSecs"] = json!(secs(began.elapsed()));
                let settling = Instant::now();
                match t.wait_settled(within).await {
                    Ok(_) => {
                        detail["settleSecs"] = json!(secs(settling.elapsed()));
                        Ok(detail)
                    }
                    Err(e) => Err(anyhow!("{e:#}").context("the system did not settle after it")),
                }
            }
            Err(e) => Err(e),
        };
        let took = secs(began.elapsed());
        let result = result.map_err(|e| {
            eprintln!("chaos: step {step} failed: {e:#}");
            format!("{e:#}")
        });
        if result.is_ok() {
            eprintln!("chaos: step {step} done in {took:.1} s");
        } else {
            // Put back whatever the step left broken, and go on only if that heals it.
            t.heal().await;
            healthy = t.wait_settled(within).await.is_ok();
        }
        outcomes.push(StepOutcome {
            name: step.to_string(),
            result,
            secs: Some(took),
            look_at: step.look_at(t),
        });
    }

    eprintln!(
        "chaos: stopping the run's writer ({} writes acknowledged)",
        writer.acked()
    );
    let log = writer.stop().await;
    let writer_json = json!({
        "runId": log.run_id,
        "sent": log.sent,
        "acknowledged": log.acked.len(),
        "failedAttempts": log.failed_attempts,
        "lastFailure": log.last_failure,
    });

    let (fleet, fleet_report) = verify::fleet(t, Duration::from_secs(args.fleet_stop_secs)).await;
    let mut checks = vec![fleet];
    eprintln!("chaos: checking the replicas, the checkpoints and the writer's writes");
    let core1 = match verify::quiet(t, within).await {
        Ok((_, last)) => {
            let (replicas, core1) = verify::replicas(t, last).await;
            checks.push(replicas);
            core1
        }
        Err(e) => {
            checks.push(Check {
                name: "replicas",
                ok: false,
                detail: json!(format!("{e:#}")),
                look_at: t.containers().iter().map(|c| c.service.clone()).collect(),
            });
            None
        }
    };
    let (checkpoints, marked) = verify::checkpoints(t, &log.run_id).await;
    checks.push(checkpoints);
    checks.push(match (marked, core1) {
        (Some(marked), Some(core1)) => verify::writer(&log, &marked, &core1),
        _ => Check {
            name: "writer",
            ok: false,
            detail: json!(
                "not checked: it needs core1's retained changes and a readable full checkpoint"
            ),
            look_at: Vec::new(),
        },
    });

    Summary {
        project: t.project.clone(),
        steps: outcomes,
        writer: writer_json,
        fleet_report,
        checks,
        total: started.elapsed(),
    }
}

/// Seconds with a tenth of a millisecond's precision, for the summary.
pub(crate) fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 1e4
}

/// A probe's last answer, shown as is in a timeout's message.
struct Seen(String);

impl fmt::Debug for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// [`wait_until`] with a progress line on stderr every 2 s saying what the probe saw last:
/// polls `probe` (at most every [`WATCH_PACE`]) until it answers `Ok`, or fails after
/// `within` with the last state seen.
pub(crate) async fn watch<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let last = Arc::new(Mutex::new(String::from("waiting for the first answer")));
    let shown = Arc::clone(&last);
    let label = what.to_string();
    let _progress = Progress::start(move |elapsed| {
        let seen = shown.lock().unwrap_or_else(PoisonError::into_inner).clone();
        format!("{label} ({} s): {seen}", elapsed.as_secs())
    });
    wait_until(within, what, || {
        let answer = probe();
        let last = &last;
        async move {
            let began = Instant::now();
            let answer = answer.await;
            if let Err(state) = &answer {
                *last.lock().unwrap_or_else(PoisonError::into_inner) = state.clone();
                tokio::time::sleep(WATCH_PACE.saturating_sub(began.elapsed())).await;
            }
            answer.map_err(Seen)
        }
    })
    .await
    .map_err(|e| anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ChaosArgs,
    }

    fn parse(extra: &[&str]) -> std::result::Result<ChaosArgs, clap::Error> {
        let mut argv = vec![
            "chaos",
            "--project",
            "p",
            "--cores",
            "http://a:1,http://b:2,http://c:3",
            "--edges",
            "http://e:1,http://f:2",
            "--checkpointer",
            "http://g:1",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn every_step_runs_by_default_in_order() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            args.steps,
            [
                Step::KillLeader,
                Step::Partition,
                Step::PauseEdge,
                Step::RestartCheckpointer,
                Step::RestartS3
            ]
        );
        let names: Vec<String> = args.steps.iter().map(Step::to_string).collect();
        assert_eq!(names.join(","), ALL_STEPS);
        assert_eq!(args.cores.len(), 3);
        assert_eq!(args.edges, ["http://e:1", "http://f:2"]);
        assert_eq!(
            (args.settle_secs, args.write_rate, args.fleet_stop_secs),
            (180, 20, 600)
        );
        assert!(args.validate().is_ok());
    }

    #[test]
    fn steps_are_picked_by_name() {
        let args = parse(&["--steps", "restart-s3,pause-edge"]).unwrap();
        assert_eq!(args.steps, [Step::RestartS3, Step::PauseEdge]);
        assert!(parse(&["--steps", "reboot"]).is_err());
    }

    #[test]
    fn flags_are_checked() {
        let mut args = parse(&[]).unwrap();
        args.cores.truncate(2);
        let err = args.validate().unwrap_err().to_string();
        assert!(err.contains("at least 3"), "{err}");
        args.steps = vec![Step::RestartS3];
        assert!(args.validate().is_ok());
        args.write_rate = 0;
        assert!(args.validate().is_err());
    }

    #[tokio::test]
    async fn a_watch_times_out_with_the_last_state() {
        let mut n = 0;
        let err = watch("it is done", Duration::from_millis(600), || {
            n += 1;
            let seen = format!("poll {n}");
            async move { Err::<(), _>(seen) }
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("waiting until it is done"), "{err}");
        assert!(err.contains("last state seen: poll "), "{err}");
        // Paced: a few polls in 600 ms, not dozens.
        assert!(n <= 4, "{n} polls");
        let got = watch("it answers", Duration::from_secs(5), || async {
            Ok::<_, String>(7)
        })
        .await
        .unwrap();
        assert_eq!(got, 7);
    }
}
