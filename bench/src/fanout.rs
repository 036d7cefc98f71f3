//! `fanout`: starts a single core node and an edge tailing it, then measures
//! on the edge what fleets of consumers need — the RSS of idle long-polls,
//! how fast one post on the core reaches all of them, long-poll answers per
//! second — and the same on the core alone to compare. Prints a table and
//! one JSON summary line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use changeagent_testkit::process::LOG_TAIL_LINES;
use changeagent_testkit::{Binary, ServerOptions, ServerProcess, LEADER_DEADLINE};

use crate::answers::{self, AnswersArgs, AnswersRun, ANSWERS_TARGET};
use crate::cluster;
use crate::longpoll::{
    self, LongpollRun, Role, Target, WaitersArgs, CORE_KB_PER_POLL, EDGE_KB_PER_POLL,
    TARGET_WAITERS, WAKE_P99_TARGET,
};
use crate::open_files;
use crate::poll_client::ClientArgs;
use crate::report;
use crate::server::Server;

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub waiters: WaitersArgs,
    #[command(flatten)]
    pub answers: AnswersArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Measure the edge only, not the core after it.
    #[arg(long, env = "CHANGEAGENT_BENCH_EDGE_ONLY")]
    pub edge_only: bool,
    /// Directory in which the run's temporary directory (data dirs and logs
    /// of the core and the edge) is created. It is removed afterwards unless
    /// --keep-dir is given or the run failed.
    #[arg(long, env = "CHANGEAGENT_BENCH_DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Keep the run's directory (data, logs) after a successful run.
    #[arg(long, env = "CHANGEAGENT_BENCH_KEEP_DIR")]
    pub keep_dir: bool,
    /// The changeagent-server binary (default: the one next to this
    /// executable, i.e. target/release/changeagent-server).
    #[arg(long, env = "CHANGEAGENT_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// The changeagent-edge binary (default: the one next to this
    /// executable).
    #[arg(long, env = "CHANGEAGENT_EDGE_BIN")]
    pub edge_bin: Option<PathBuf>,
    /// Extra flags for the edge, split at spaces, repeatable, e.g.
    /// `--edge-arg "--max-block-secs 120"`.
    #[arg(
        long = "edge-arg",
        env = "CHANGEAGENT_BENCH_EDGE_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub edge_args: Vec<String>,
}

impl FanoutArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        self.waiters.validate()?;
        self.answers.validate()
    }
}

/// The binaries a run starts, located once.
struct Binaries {
    server: PathBuf,
    edge: PathBuf,
}

/// What was measured on one node.
struct NodeRun {
    longpoll: LongpollRun,
    answers: AnswersRun,
}

impl NodeRun {
    fn to_json(&self) -> Value {
        json!({
            "longpoll": self.longpoll.to_json(),
            "answers": self.answers.to_json(),
        })
    }

    fn check(&self) -> Result<()> {
        self.longpoll.check()?;
        self.answers.check()
    }
}

pub async fn run(args: &FanoutArgs) -> Result<()> {
    let bins = Binaries {
        server: cluster::locate(args.server_bin.as_ref(), "changeagent-server")?,
        edge: cluster::locate(args.edge_bin.as_ref(), "changeagent-edge")?,
    };
    // Before anything starts, so that the core and the edge inherit it.
    let sockets = args
        .waiters
        .count
        .max(args.answers.pollers + args.answers.writers);
    open_files::ensure(sockets as u64, None)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating --dir {}", args.dir.display()))?;
    let mut temp = tempfile::Builder::new()
        .prefix("changeagent-bench-fanout-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a directory in --dir {}", args.dir.display()))?;
    // Absolute, so the printed paths can be used from anywhere.
    let dir = temp
        .path()
        .canonicalize()
        .with_context(|| format!("resolving {}", temp.path().display()))?;
    eprintln!("  … working in {}", dir.display());
    let result = run_in(args, &bins, &dir).await;
    if result.is_err() || args.keep_dir {
        temp.disable_cleanup(true);
        eprintln!("  … kept {} (data dirs, logs)", dir.display());
    }
    result
}

async fn run_in(args: &FanoutArgs, bins: &Binaries, dir: &Path) -> Result<()> {
    let phases = if args.edge_only { 2 } else { 4 };
    let phase = |n: usize, what: &str| eprintln!("  … fanout: phase {n}/{phases}: {what}");

    let mut core = ServerProcess::try_start(
        ServerOptions::default()
            .bin(Binary::Path(bins.server.clone()))
            .dir(dir.join("core"))
            .name("core"),
    )
    .await?;
    core.try_wait_leader(LEADER_DEADLINE).await?;
    let core_server = Server::new(&core.url())?;
    let mut edge_opts = ServerOptions::default()
        .bin(Binary::Path(bins.edge.clone()))
        .dir(dir.join("edge"))
        .name("edge")
        .arg("--upstream")
        .arg(core.url());
    for arg in args.edge_args.iter().filter(|a| !a.is_empty()) {
        edge_opts = edge_opts.arg(arg.clone());
    }
    let mut edge = ServerProcess::try_start(edge_opts).await?;
    let edge_server = Server::new(&edge.url())?;
    report::header("fanout");
    println!(
        "core {} ({}), edge {} ({} --upstream {}{})",
        core.url(),
        bins.server.display(),
        edge.url(),
        bins.edge.display(),
        core.url(),
        args.edge_args
            .iter()
            .filter(|a| !a.is_empty())
            .fold(String::new(), |all, a| all + " " + a)
    );

    let edge_target = Target::new(edge_server, edge.running_pid(), args.client.client).await?;
    if edge_target.role != Role::Edge {
        println!(
            "warning: {} does not report \"role\":\"edge\" in /health; measuring it against \
             the edge's targets anyway",
            edge.url()
        );
    }
    let edge_target = Target {
        role: Role::Edge,
        ..edge_target
    };
    phase(
        1,
        "idle long-polls on the edge, woken by a post on the core",
    );
    let longpoll = longpoll::run(&core_server, &edge_target, &args.waiters).await;
    let longpoll = still_running(&mut edge, longpoll)?;
    phase(2, "long-poll answers per second on the edge");
    let answers = answers::run(
        &core_server,
        core.running_pid(),
        &edge_target,
        &args.answers,
    )
    .await;
    let answers = still_running(&mut edge, answers)?;
    let edge_run = NodeRun { longpoll, answers };

    let core_run = if args.edge_only {
        None
    } else {
        // The core alone, as `longpoll` and `answers` measure it.
        let status = edge.try_terminate().await?;
        if !status.success() {
            eprintln!("note: the edge exited with {status} on SIGTERM");
        }
        drop(edge);
        let core_target =
            Target::new(core_server.clone(), core.running_pid(), args.client.client).await?;
        phase(3, "idle long-polls on the core, for comparison");
        let longpoll = longpoll::run(&core_server, &core_target, &args.waiters).await;
        let longpoll = still_running(&mut core, longpoll)?;
        phase(
            4,
            "long-poll answers per second on the core, for comparison",
        );
        let answers = answers::run(
            &core_server,
            core.running_pid(),
            &core_target,
            &args.answers,
        )
        .await;
        let answers = still_running(&mut core, answers)?;
        Some(NodeRun { longpoll, answers })
    };

    print_table(args, &edge_run, core_run.as_ref());
    let summary = json!({
        "bench": "fanout",
        "count": args.waiters.count,
        "pollers": args.answers.pollers,
        "duration_secs": args.answers.duration,
        "writers": args.answers.writers,
        "lead": args.answers.lead,
        "client": args.client.client.name(),
        "debug_build": is_debug(&bins.server) || is_debug(&bins.edge),
        "bench_debug_build": cfg!(debug_assertions),
        "targets": {
            "edge_kb_per_poll": EDGE_KB_PER_POLL,
            "core_kb_per_poll": CORE_KB_PER_POLL,
            "wake_p99_ms": WAKE_P99_TARGET.as_millis() as u64,
            "waiters": TARGET_WAITERS,
            "answers_per_sec": ANSWERS_TARGET,
        },
        "edge": edge_run.to_json(),
        "core": core_run.as_ref().map(NodeRun::to_json),
    });
    println!();
    println!("{summary}");
    // Checked last, so that the figures are printed even when it fails.
    edge_run.check()?;
    if let Some(core_run) = &core_run {
        core_run.check()?;
    }
    Ok(())
}

/// `result`, unless `process` has exited meanwhile: then an error quoting
/// its log, which says more than the failed requests.
fn still_running<T>(process: &mut ServerProcess, result: Result<T>) -> Result<T> {
    if let Some(status) = process.poll_exit()? {
        let during = match &result {
            Ok(_) => String::new(),
            Err(err) => format!(" (the run failed: {err:#})"),
        };
        bail!(
            "{} exited with {status} during the run{during}; the end of its log {}:\n{}",
            process.label(),
            process.log_path().display(),
            process.log_tail(LOG_TAIL_LINES)
        );
    }
    result
}

fn is_debug(bin: &Path) -> bool {
    bin.components().any(|c| c.as_os_str() == "debug")
}

/// One row of the table: what, the edge's and the core's figure, the
/// edge's target and whether the edge met it.
struct Row {
    what: String,
    edge: String,
    core: String,
    target: String,
    verdict: String,
}

fn print_table(args: &FanoutArgs, edge: &NodeRun, core: Option<&NodeRun>) {
    report::header(&format!(
        "fanout: {} idle long-polls, {} pollers for {} s ({} client)",
        report::count(args.waiters.count as u64),
        report::count(args.answers.pollers as u64),
        args.answers.duration,
        args.client.client.name()
    ));
    let na = || "-".to_string();
    let both = |f: &dyn Fn(&NodeRun) -> String| (f(edge), core.map_or_else(na, f));
    let mut rows = Vec::new();
    let mut row = |what: &str, (e, c): (String, String), target: String, verdict: String| {
        rows.push(Row {
            what: what.to_string(),
            edge: e,
            core: c,
            target,
            verdict,
        })
    };
    let kb = |r: &NodeRun| {
        r.longpoll
            .kb_per_poll()
            .map_or_else(na, |kb| format!("{kb:.2} KB"))
    };
    row(
        "RSS per idle long-poll",
        both(&kb),
        format!("≤ {EDGE_KB_PER_POLL} KB"),
        edge.longpoll
            .rss_met()
            .map_or_else(na, |m| report::verdict(m).to_string()),
    );
    let extra = |r: &NodeRun| {
        r.longpoll
            .rss
            .map_or_else(na, |g| format!("+{}", report::mb(g.extra() as f64)))
    };
    row(
        &format!(
            "RSS for {} long-polls",
            report::count(args.waiters.count as u64)
        ),
        both(&extra),
        format!(
            "≤ +{:.1} MB",
            EDGE_KB_PER_POLL * args.waiters.count as f64 / 1e3
        ),
        String::new(),
    );
    let lat = |pick: fn(&LongpollRun) -> std::time::Duration| {
        move |r: &NodeRun| report::ms(pick(&r.longpoll))
    };
    row(
        "wake-up p50 from the core's answer",
        both(&lat(|l| l.from_answer.p50)),
        String::new(),
        String::new(),
    );
    row(
        "wake-up p99 from the core's answer",
        both(&lat(|l| l.from_answer.p99)),
        format!("≤ {} ms", WAKE_P99_TARGET.as_millis()),
        report::verdict(edge.longpoll.wake_met()).to_string(),
    );
    row(
        "wake-up max from the core's answer",
        both(&lat(|l| l.from_answer.max)),
        String::new(),
        String::new(),
    );
    row(
        "wake-up p50 from the post's send",
        both(&lat(|l| l.from_send.p50)),
        String::new(),
        String::new(),
    );
    row(
        "wake-up p99 from the post's send",
        both(&lat(|l| l.from_send.p99)),
        String::new(),
        String::new(),
    );
    row(
        "answered before the core's answer",
        both(&|r: &NodeRun| report::count(r.longpoll.before_answer)),
        String::new(),
        String::new(),
    );
    row(
        "long-polls that returned the change",
        both(&|r: &NodeRun| {
            format!(
                "{} / {}",
                report::count(r.longpoll.with_change as u64),
                report::count(r.longpoll.count as u64)
            )
        }),
        "all".to_string(),
        report::verdict(edge.longpoll.all_woke()).to_string(),
    );
    row(
        "answers per second (one change each)",
        both(&|r: &NodeRun| report::count(r.answers.rate().round() as u64)),
        format!("≥ {}", report::count(ANSWERS_TARGET as u64)),
        report::verdict(edge.answers.met()).to_string(),
    );
    row(
        "answers out of order / failed",
        both(&|r: &NodeRun| {
            format!(
                "{} / {}",
                r.answers.faults.order_errors(),
                r.answers.faults.total() - r.answers.faults.order_errors()
            )
        }),
        "0 / 0".to_string(),
        report::verdict(edge.answers.faults.total() == 0).to_string(),
    );
    let cpu = |pick: fn(&AnswersRun) -> Option<std::time::Duration>| {
        move |r: &NodeRun| {
            pick(&r.answers).map_or_else(na, |cpu| {
                format!(
                    "{:.1} µs",
                    cpu.as_secs_f64() * 1e6 / r.answers.answers.max(1) as f64
                )
            })
        }
    };
    row(
        "server CPU per answer",
        both(&cpu(|a| a.target_cpu)),
        String::new(),
        String::new(),
    );
    row(
        "client CPU per answer",
        both(&cpu(|a| a.client_cpu)),
        String::new(),
        String::new(),
    );

    let width = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .chain([title.chars().count()])
            .max()
            .unwrap_or(0)
    };
    let w = [
        width(|r| &r.what, "what"),
        width(|r| &r.edge, "edge"),
        width(|r| &r.core, "core"),
        width(|r| &r.target, "edge target"),
    ];
    let line = |a: &str, b: &str, c: &str, d: &str, e: &str| {
        println!(
            "{a:<w0$}  {b:>w1$}  {c:>w2$}  {d:<w3$}  {e}",
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        )
    };
    line("what", "edge", "core", "edge target", "edge");
    for r in &rows {
        line(&r.what, &r.edge, &r.core, &r.target, &r.verdict);
    }
    if let Some(kb) = core.and_then(|c| c.longpoll.kb_per_poll()) {
        println!(
            "core: {kb:.2} KB per idle long-poll vs its own {CORE_KB_PER_POLL} KB target: {}",
            report::verdict(kb <= CORE_KB_PER_POLL)
        );
    }
    if args.waiters.count != TARGET_WAITERS {
        println!(
            "note: the wake-up target is stated for {} waiters; this run had {}",
            report::count(TARGET_WAITERS as u64),
            report::count(args.waiters.count as u64)
        );
    }
}
