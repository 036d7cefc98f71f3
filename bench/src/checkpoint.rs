//! `checkpoint`: how long one checkpoint of a large log takes to write and to
//! restore, how well it compresses, and how much memory each side needs. A
//! fresh core node is loaded with `--changes` changes over `--keys` keys;
//! `changeagent-checkpointer --once` catches up and writes one checkpoint to
//! the object store (`file://` and/or a local Garage over S3); a new node
//! then restores from it with `--restore-from`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use tokio::time::{Interval, MissedTickBehavior};

use changeagent_testkit::garage::{self, GarageServer};
use changeagent_testkit::health::node_health;
use changeagent_testkit::process::LOG_TAIL_LINES;
use changeagent_testkit::{Binary, ServerOptions, ServerProcess, LEADER_DEADLINE};

use crate::cluster;
use crate::load::{self, Load};
use crate::logline::{Fields, LogTail};
use crate::memory::{self, Memory, Window};
use crate::report::{self, Progress};
use crate::server::{self, Server};

/// Target: a checkpoint of 1M changes written (exported, compressed,
/// uploaded, read back) within this on a 2-core machine (the issue's).
const CHECKPOINT_TARGET: Duration = Duration::from_secs(10);

/// Target: a checkpoint of 1M changes imported within this (the issue's).
const IMPORT_TARGET: Duration = Duration::from_secs(10);

/// Target: either side needs at most this much memory (bytes) above what it
/// held when the checkpoint started (the issue's 100 MB).
const EXTRA_RSS_TARGET: u64 = 100_000_000;

/// Gap between two memory samples (and log reads) of a working process:
/// a round lasts seconds, so this gives hundreds of samples; reading
/// `/proc/PID/status` costs tens of microseconds, nothing next to it. A
/// polling period, never a synchronisation delay.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// How long the checkpointer may take to tail the whole log before its
/// round starts: 6 to 8 s for 1M changes on a 2-core machine; a slow disk
/// or a loaded machine should measure slow rather than fail, so the run is
/// declared stuck only after far longer.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(600);

/// How long the round may take from `checkpoint started` to the exit:
/// about 1 s for 1M changes, 10 s the target; stuck long after that.
const ROUND_DEADLINE: Duration = Duration::from_secs(600);

/// How long a restoring node may take from its launch to `listening on`:
/// about 1.5 s for 1M changes; stuck long after that.
const RESTORE_DEADLINE: Duration = Duration::from_secs(600);

/// Largest batch the server accepts (its `MAX_BATCH`).
const MAX_LOAD_BATCH: usize = 10_000;

/// The tenant of the keyed changes.
const TENANT: &str = "bench";
/// The collection of the keyed changes.
const COLLECTION: &str = "items";

/// The object-store prefix in Garage's bucket.
const S3_PREFIX: &str = "changeagent-bench";

/// What the checkpointer logs when the core has recorded its start: the
/// export writes from here on.
const CHECKPOINT_STARTED: &str = "checkpoint started";
/// What the checkpointer logs once the checkpoint is uploaded, read back and
/// recorded, with its figures.
const CHECKPOINT_WRITTEN: &str = "checkpoint written";
/// What a restoring node logs before it downloads the checkpoint.
const RESTORING: &str = "restoring from a checkpoint";
/// What a restoring node logs once the import is done, with its figures.
const IMPORTED: &str = "imported a checkpoint";
/// What every node logs once it serves.
const LISTENING: &str = "listening on ";

/// Words for the varied change data, so that it compresses like real data
/// (repeated field names and vocabularies, varying values), not like copies.
const EVENTS: [&str; 8] = [
    "page_view",
    "click",
    "signup",
    "purchase",
    "logout",
    "search",
    "share",
    "rate",
];
/// Paths for the varied change data, like [`EVENTS`].
const PATHS: [&str; 6] = [
    "/home",
    "/products",
    "/cart",
    "/checkout",
    "/account",
    "/search",
];

/// Which object stores the run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreChoice {
    /// A directory (`file://`) in the run's directory.
    File,
    /// A local Garage server over S3 (installed by scripts/install-garage).
    S3,
    /// `file`, then `s3`.
    Both,
}

/// One object store kind the run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    File,
    S3,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::S3 => "s3",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// Changes to load before the checkpoint: half keyed writes cycling
    /// over --keys keys, half unkeyed changes.
    #[arg(long, env = "CHANGEAGENT_BENCH_CHANGES", default_value_t = 1_000_000)]
    pub changes: u64,
    /// Keys the keyed half of the changes cycles over.
    #[arg(long, env = "CHANGEAGENT_BENCH_KEYS", default_value_t = 100_000)]
    pub keys: u64,
    /// Object store to measure: file (a directory), s3 (a local Garage
    /// server, see scripts/install-garage) or both.
    #[arg(long, env = "CHANGEAGENT_BENCH_STORE", value_enum, default_value_t = StoreChoice::File)]
    pub store: StoreChoice,
    /// Shorthand for --store both.
    #[arg(long, env = "CHANGEAGENT_BENCH_S3", conflicts_with = "store")]
    pub s3: bool,
    /// Changes per batch post when loading (1..=10000).
    #[arg(long, env = "CHANGEAGENT_BENCH_LOAD_BATCH", default_value_t = 1000)]
    pub load_batch: usize,
    /// Concurrent batch posters when loading.
    #[arg(long, env = "CHANGEAGENT_BENCH_LOAD_POSTERS", default_value_t = 4)]
    pub load_posters: usize,
    /// Directory in which the run's temporary directory (data dirs, logs,
    /// the file:// store) is created; put it on the disk to measure. It is
    /// removed afterwards unless --keep-dir is given or the run failed.
    #[arg(long, env = "CHANGEAGENT_BENCH_DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Keep the run's directory (data, logs, checkpoints) after a successful run.
    #[arg(long, env = "CHANGEAGENT_BENCH_KEEP_DIR")]
    pub keep_dir: bool,
    /// The changeagent-server binary (default: the one next to this
    /// executable, i.e. target/release/changeagent-server).
    #[arg(long, env = "CHANGEAGENT_SERVER_BIN")]
    pub server_bin: Option<PathBuf>,
    /// The changeagent-checkpointer binary (default: the one next to this
    /// executable).
    #[arg(long, env = "CHANGEAGENT_CHECKPOINTER_BIN")]
    pub checkpointer_bin: Option<PathBuf>,
}

impl CheckpointArgs {
    /// Checks the flags once, before any work.
    pub fn validate(&self) -> Result<()> {
        if self.changes < 2 || self.keys == 0 {
            bail!("--changes must be at least 2 and --keys at least 1");
        }
        if !(1..=MAX_LOAD_BATCH).contains(&self.load_batch) || self.load_posters == 0 {
            bail!("--load-batch must be within 1..={MAX_LOAD_BATCH} and --load-posters at least 1");
        }
        Ok(())
    }

    /// The stores to measure, in order.
    fn stores(&self) -> Vec<StoreKind> {
        match (self.s3, self.store) {
            (true, _) | (false, StoreChoice::Both) => vec![StoreKind::File, StoreKind::S3],
            (false, StoreChoice::File) => vec![StoreKind::File],
            (false, StoreChoice::S3) => vec![StoreKind::S3],
        }
    }
}

/// The binaries a run starts, located once.
struct Binaries {
    server: PathBuf,
    checkpointer: PathBuf,
}

/// Runs the benchmark for every store asked for, prints a table per store
/// and one JSON summary line at the end.
pub async fn run(args: &CheckpointArgs) -> Result<()> {
    let bins = Binaries {
        server: cluster::locate(args.server_bin.as_ref(), "changeagent-server")?,
        checkpointer: cluster::locate(args.checkpointer_bin.as_ref(), "changeagent-checkpointer")?,
    };
    let stores = args.stores();
    if stores.contains(&StoreKind::S3) {
        check_garage()?;
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating --dir {}", args.dir.display()))?;
    let mut temp = tempfile::Builder::new()
        .prefix("changeagent-bench-checkpoint-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a directory in --dir {}", args.dir.display()))?;
    // Absolute, so the printed paths can be used from anywhere.
    let dir = temp
        .path()
        .canonicalize()
        .with_context(|| format!("resolving {}", temp.path().display()))?;
    eprintln!("  … working in {}", dir.display());
    let result = run_stores(args, &bins, &stores, &dir).await;
    if result.is_err() || args.keep_dir {
        temp.disable_cleanup(true);
        eprintln!("  … kept {} (data dirs, logs, checkpoints)", dir.display());
    }
    result
}

/// Measures each store in turn; the processes of one are gone before the next starts.
async fn run_stores(
    args: &CheckpointArgs,
    bins: &Binaries,
    stores: &[StoreKind],
    dir: &Path,
) -> Result<()> {
    let mut runs = Vec::new();
    for &kind in stores {
        let run = run_store(args, bins, kind, &dir.join(kind.name())).await?;
        run.print(args);
        runs.push(run);
    }
    let summary = json!({
        "bench": "checkpoint",
        "changes": args.changes,
        "keys": args.keys,
        "targets": {
            "checkpoint_secs": CHECKPOINT_TARGET.as_secs_f64(),
            "import_secs": IMPORT_TARGET.as_secs_f64(),
            "extra_rss_bytes": EXTRA_RSS_TARGET,
        },
        "runs": runs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
    });
    println!();
    println!("{summary}");
    // Checked last, so that the figures are printed even when it fails.
    for run in &runs {
        run.check_restored()?;
    }
    Ok(())
}

/// Fails early, before any loading, when the S3 run cannot find Garage.
fn check_garage() -> Result<()> {
    let bin =
        std::env::var_os(garage::GARAGE_BIN_ENV).map_or_else(garage::default_bin, PathBuf::from);
    if !bin.is_file() {
        bail!(
            "the S3 run needs garage {} and there is none at {}: run scripts/install-garage, \
             or set {} to a garage binary (or measure --store file only)",
            garage::GARAGE_VERSION,
            bin.display(),
            garage::GARAGE_BIN_ENV
        );
    }
    Ok(())
}

/// Everything measured against one store.
struct StoreRun {
    kind: StoreKind,
    url: String,
    loaded: u64,
    load_time: Duration,
    /// `lastIndex` of the core after the load.
    last_index: u64,
    export: ExportSide,
    import: ImportSide,
}

/// The figures of the checkpointer's `checkpoint written` line.
#[derive(Debug, Clone, PartialEq)]
struct Written {
    index: u64,
    records: u64,
    /// The compressed object.
    bytes: u64,
    /// The export before compression.
    raw_bytes: u64,
    export_secs: f64,
    upload_secs: f64,
    verify_secs: f64,
    /// The whole round, start record to end record and `latest.json`.
    seconds: f64,
}

impl Written {
    fn parse(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            index: f.get("index")?,
            records: f.get("records")?,
            bytes: f.get("bytes")?,
            raw_bytes: f.get("raw_bytes")?,
            export_secs: f.get("export_secs")?,
            upload_secs: f.get("upload_secs")?,
            verify_secs: f.get("verify_secs")?,
            seconds: f.get("seconds")?,
        })
    }

    /// Raw bytes per object byte.
    fn ratio(&self) -> f64 {
        if self.bytes == 0 {
            0.0
        } else {
            self.raw_bytes as f64 / self.bytes as f64
        }
    }
}

/// The figures of a restoring node's `imported a checkpoint` line.
#[derive(Debug, Clone, PartialEq)]
struct Imported {
    index: u64,
    records: u64,
    seconds: f64,
}

impl Imported {
    fn parse(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            index: f.get("index")?,
            records: f.get("records")?,
            seconds: f.get("seconds")?,
        })
    }
}

/// The checkpointer's side.
struct ExportSide {
    written: Written,
    /// From `listening on` to `checkpoint started`: tailing the whole log.
    catch_up: Duration,
    /// From `checkpoint started` to the exit.
    round: Duration,
    memory: Window,
}

/// The restoring node's side.
struct ImportSide {
    imported: Imported,
    /// From `restoring from a checkpoint` to `imported a checkpoint`:
    /// download, check and import.
    restore: Duration,
    /// From `imported a checkpoint` to `listening on`: Raft start, the
    /// snapshot of the restored state and the log purge.
    seal: Duration,
    /// From the launch to `listening on`.
    to_serving: Duration,
    /// Sampled up to and including one look once serving.
    memory: Window,
    /// `/health` once serving.
    first_index: u64,
    last_index: u64,
}

/// Load, checkpoint and restore against one store, in `dir`.
async fn run_store(
    args: &CheckpointArgs,
    bins: &Binaries,
    kind: StoreKind,
    dir: &Path,
) -> Result<StoreRun> {
    report::header(&format!(
        "checkpoint ({} store): {} changes over {} keys",
        kind.name(),
        report::count(args.changes),
        report::count(args.keys)
    ));
    // Held to the end of the run: the restore reads from it. Dropped (killed)
    // after the processes that use it, as locals drop in reverse order.
    let garage = match kind {
        StoreKind::File => None,
        StoreKind::S3 => {
            eprintln!("  … starting garage");
            Some(
                GarageServer::try_start()
                    .await
                    .context("starting garage for the S3 run")?,
            )
        }
    };
    let (url, env) = match &garage {
        None => (
            format!("file://{}", dir.join("objects").display()),
            Vec::new(),
        ),
        Some(garage) => (garage.url(S3_PREFIX), garage.env()),
    };
    let opts = |bin: &Path, sub: &str| {
        let mut opts = ServerOptions::default()
            .bin(Binary::Path(bin.to_path_buf()))
            .dir(dir.join(sub))
            .name(sub)
            .arg("--object-store")
            .arg(&url);
        for (k, v) in &env {
            opts = opts.env(k, v);
        }
        opts
    };

    let mut core = ServerProcess::try_start(opts(&bins.server, "core")).await?;
    core.try_wait_leader(LEADER_DEADLINE).await?;
    let server = Server::new(&core.url())?;
    println!("core {} with --object-store {url}", core.url());
    let load_time = load_core(&server, args).await?;
    let last_index = server.range().await?.last;

    let checkpointer = opts(&bins.checkpointer, "checkpointer")
        .arg("--core")
        .arg(core.url())
        .arg("--once")
        // No truncation after the round: the core's work is not measured.
        .arg("--retain")
        .arg(last_index.saturating_mul(2).to_string());
    let export = export(checkpointer).await?;
    // The import runs alone on the machine, like a restore after a loss.
    let status = core.try_terminate().await?;
    if !status.success() {
        eprintln!("note: the core exited with {status} on SIGTERM");
    }
    drop(core);

    let restoring = opts(&bins.server, "restored")
        .arg("--restore-from")
        .arg(&url);
    let import = import(restoring).await?;
    Ok(StoreRun {
        kind,
        url,
        loaded: args.changes,
        load_time,
        last_index,
        export,
        import,
    })
}

/// Creates the tenant and collection, then posts the changes.
async fn load_core(server: &Server, args: &CheckpointArgs) -> Result<Duration> {
    post_json(server, "/tenants", &json!({ "name": TENANT })).await?;
    post_json(
        server,
        &format!("/tenants/{TENANT}/collections"),
        &json!({ "name": COLLECTION }),
    )
    .await?;
    eprintln!(
        "  … loading {} changes ({} per batch post, {} posters)",
        report::count(args.changes),
        report::count(args.load_batch as u64),
        args.load_posters
    );
    let keys = args.keys;
    let load = Load {
        changes: args.changes,
        batch: args.load_batch,
        posters: args.load_posters,
        change: move |n: u64, body: &mut String| write_change(n, keys, body),
    };
    load::run(server, load).await
}

/// `POST path` with a JSON body; an error with the server's answer unless 2xx.
async fn post_json(server: &Server, path: &str, body: &Value) -> Result<()> {
    let url = server.url(path);
    let resp = server
        .client()
        .post(&url)
        .json(body)
        .timeout(server::REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| anyhow!(server::describe(&e)))
        .with_context(|| format!("POST {url}"))?;
    server::ok_body(resp)
        .await
        .with_context(|| format!("POST {url}"))?;
    Ok(())
}

/// Appends change number `n`: even numbers are keyed writes to key
/// `(n / 2) % keys` of the bench collection, odd numbers unkeyed changes.
fn write_change(n: u64, keys: u64, body: &mut String) {
    // Writing to a String cannot fail.
    if n.is_multiple_of(2) {
        let key = (n / 2) % keys;
        let _ = write!(
            body,
            r#"{{"tenant":"{TENANT}","collection":"{COLLECTION}","key":"k{key:07}","data":"#
        );
    } else {
        body.push_str(r#"{"data":"#);
    }
    write_data(n, body);
    body.push('}');
}

/// Appends about 100 bytes of JSON data for change `n`: the same field names
/// every time, values drawn from small vocabularies and from a hash of `n`.
fn write_data(n: u64, body: &mut String) {
    let r = mix(n);
    let event = EVENTS[(r % EVENTS.len() as u64) as usize];
    let path = PATHS[((r >> 8) % PATHS.len() as u64) as usize];
    // Writing to a String cannot fail.
    let _ = write!(
        body,
        r#"{{"seq":{n},"user":"u{:05}","event":"{event}","path":"{path}/{}","ms":{},"ok":{},"score":{:.3}}}"#,
        (r >> 16) % 50_000,
        (r >> 32) % 10_000,
        (r >> 46) % 2_000,
        (r >> 60) != 0,
        ((r >> 20) & 0x3ff) as f64 / 1024.0
    );
}

/// SplitMix64: a fixed, well-spread hash of `n`, so runs load the same data.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One look at a watched process: its memory, then its new log lines.
struct Look {
    at: Instant,
    /// `None` once the process has exited.
    memory: Option<Memory>,
    lines: Vec<String>,
}

/// Looks at one child process every [`SAMPLE_INTERVAL`]: memory first, then
/// the log lines written since, so a marker line is seen no later than the
/// sample that goes with it (give or take one interval).
struct Watch {
    pid: u32,
    tail: LogTail,
    ticks: Interval,
    /// What the progress line shows; written here, read by its task.
    status: Arc<Mutex<String>>,
    /// Prints `status` every few seconds until the watch is dropped.
    _progress: Progress,
}

impl Watch {
    fn new(process: &ServerProcess, what: &'static str) -> Result<Self> {
        let pid = process
            .running_pid()
            .with_context(|| format!("{} is not running", process.label()))?;
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let status = Arc::new(Mutex::new(String::from("starting")));
        let shown = Arc::clone(&status);
        let progress = Progress::start(move |elapsed| {
            let status = shown.lock().map(|s| s.clone()).unwrap_or_default();
            format!("{what}: {status} ({:.0} s)", elapsed.as_secs_f64())
        });
        Ok(Self {
            pid,
            tail: LogTail::new(&process.log_path()),
            ticks,
            status,
            _progress: progress,
        })
    }

    async fn look(&mut self) -> Result<Look> {
        self.ticks.tick().await;
        let memory = memory::read(self.pid);
        let lines = self.tail.poll()?;
        Ok(Look {
            at: Instant::now(),
            memory,
            lines,
        })
    }

    fn show(&self, status: String) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }
}

/// Runs the checkpointer until it exits: from `checkpoint started` on, its
/// memory is sampled; the figures come from its `checkpoint written` line.
async fn export(opts: ServerOptions) -> Result<ExportSide> {
    let mut ckpt = ServerProcess::try_start(opts).await?;
    let listening = Instant::now();
    let mut watch = Watch::new(&ckpt, "checkpointer")?;
    watch.show("catching up with the core".into());
    let mut started: Option<(Instant, Window)> = None;
    let mut written = None;
    let mut last_line = String::new();
    let exit: (Instant, ExitStatus) = loop {
        let look = watch.look().await?;
        if let (Some((_, window)), Some(m)) = (started.as_mut(), look.memory) {
            window.sample(m);
        }
        for line in &look.lines {
            if started.is_none() && line.contains(CHECKPOINT_STARTED) {
                let m = look.memory.with_context(|| {
                    format!(
                        "{} exited right after starting its checkpoint; the end of its log:\n{}",
                        ckpt.label(),
                        ckpt.log_tail(LOG_TAIL_LINES)
                    )
                })?;
                started = Some((look.at, Window::open(m)));
                watch.show("writing the checkpoint".into());
            }
            if let Some(f) = Fields::after(line, CHECKPOINT_WRITTEN) {
                written = Some(Written::parse(&f)?);
                watch.show("written; finishing".into());
            }
            last_line.clone_from(line);
        }
        if let Some(status) = ckpt.poll_exit()? {
            // Lines written between the look and the exit.
            for line in watch.tail.poll()? {
                if let Some(f) = Fields::after(&line, CHECKPOINT_WRITTEN) {
                    written = Some(Written::parse(&f)?);
                }
            }
            break (Instant::now(), status);
        }
        if let Some((at, window)) = &started {
            watch.show(format!(
                "writing the checkpoint, RSS {} (peak {})",
                report::mb(look.memory.map_or(0, |m| m.rss) as f64),
                report::mb(window.peak() as f64)
            ));
            if look.at - *at > ROUND_DEADLINE {
                bail!(
                    "{} did not finish its checkpoint within {ROUND_DEADLINE:?}; last log line: \
                     {last_line}\n(its log: {})",
                    ckpt.label(),
                    ckpt.log_path().display()
                );
            }
        } else if look.at - listening > CATCH_UP_DEADLINE {
            bail!(
                "{} did not start a checkpoint within {CATCH_UP_DEADLINE:?}; last log line: \
                 {last_line}\n(its log: {})",
                ckpt.label(),
                ckpt.log_path().display()
            );
        }
    };
    let (exited_at, status) = exit;
    if !status.success() {
        bail!(
            "{} exited with {status}; the end of its log {}:\n{}",
            ckpt.label(),
            ckpt.log_path().display(),
            ckpt.log_tail(LOG_TAIL_LINES)
        );
    }
    let (Some((started_at, memory)), Some(written)) = (started, written) else {
        bail!(
            "{} exited without logging `{CHECKPOINT_STARTED}` and `{CHECKPOINT_WRITTEN}`; \
             the end of its log {}:\n{}",
            ckpt.label(),
            ckpt.log_path().display(),
            ckpt.log_tail(LOG_TAIL_LINES)
        );
    };
    Ok(ExportSide {
        written,
        catch_up: started_at - listening,
        round: exited_at - started_at,
        memory,
    })
}

/// Launches a node with `--restore-from` and samples its memory from
/// `restoring from a checkpoint` until `listening on`; then checks its
/// `/health` and stops it.
async fn import(opts: ServerOptions) -> Result<ImportSide> {
    let mut node = ServerProcess::try_launch(opts)?;
    let launched = Instant::now();
    let mut watch = Watch::new(&node, "restoring node")?;
    watch.show("starting".into());
    let mut restoring: Option<(Instant, Window)> = None;
    let mut imported: Option<(Instant, Imported)> = None;
    let mut last_line = String::new();
    let serving = 'watch: loop {
        let look = watch.look().await?;
        if let (Some((_, window)), Some(m)) = (restoring.as_mut(), look.memory) {
            window.sample(m);
        }
        for line in &look.lines {
            if restoring.is_none() && line.contains(RESTORING) {
                let m = look.memory.with_context(|| {
                    format!(
                        "{} exited right after it began to restore; the end of its log:\n{}",
                        node.label(),
                        node.log_tail(LOG_TAIL_LINES)
                    )
                })?;
                restoring = Some((look.at, Window::open(m)));
                watch.show("downloading and importing".into());
            }
            if let Some(f) = Fields::after(line, IMPORTED) {
                imported = Some((look.at, Imported::parse(&f)?));
                watch.show("imported; sealing the restored state".into());
            }
            if line.contains(LISTENING) {
                break 'watch look.at;
            }
            last_line.clone_from(line);
        }
        if let Some(status) = node.poll_exit()? {
            bail!(
                "{} exited with {status} before it served; the end of its log {}:\n{}",
                node.label(),
                node.log_path().display(),
                node.log_tail(LOG_TAIL_LINES)
            );
        }
        if look.at - launched > RESTORE_DEADLINE {
            bail!(
                "{} did not serve within {RESTORE_DEADLINE:?}; last log line: {last_line}\n\
                 (its log: {})",
                node.label(),
                node.log_path().display()
            );
        }
    };
    drop(watch);
    // The listen line is there: this only reads the address from it.
    node.try_wait_started().await?;
    let pid = node
        .running_pid()
        .with_context(|| format!("{} is not running", node.label()))?;
    let now = memory::read(pid)
        .with_context(|| format!("{} exited right after it served", node.label()))?;
    let (Some((restoring_at, mut memory)), Some((imported_at, imported))) = (restoring, imported)
    else {
        bail!(
            "{} served without logging `{RESTORING}` and `{IMPORTED}`: it did not restore; \
             the end of its log {}:\n{}",
            node.label(),
            node.log_path().display(),
            node.log_tail(LOG_TAIL_LINES)
        );
    };
    memory.sample(now);
    let health = node_health(&node.api())
        .await
        .map_err(|e| anyhow!("GET /health of {}: {e}", node.label()))?;
    let status = node.try_terminate().await?;
    if !status.success() {
        eprintln!("note: the restored node exited with {status} on SIGTERM");
    }
    Ok(ImportSide {
        imported,
        restore: imported_at - restoring_at,
        seal: serving - imported_at,
        to_serving: serving - launched,
        memory,
        first_index: health.first_index,
        last_index: health.last_index,
    })
}

/// `12.34 s`.
fn secs(s: f64) -> String {
    format!("{s:.2} s")
}

impl StoreRun {
    /// The human-readable table of this run, with the targets.
    fn print(&self, args: &CheckpointArgs) {
        let w = &self.export.written;
        let e = &self.export;
        let i = &self.import;
        let mb = |b: u64| report::mb(b as f64);
        println!(
            "load           {} changes in {} = {} changes/s (lastIndex {})",
            report::count(self.loaded),
            secs(self.load_time.as_secs_f64()),
            report::rate(self.loaded, self.load_time),
            report::count(self.last_index)
        );
        println!(
            "catch-up       {} for the checkpointer to tail the log",
            secs(e.catch_up.as_secs_f64())
        );
        println!(
            "checkpoint     index {}, {} records",
            report::count(w.index),
            report::count(w.records)
        );
        println!(
            "  export       {} (snapshot, encode, zstd, local file, fsync)",
            secs(w.export_secs)
        );
        println!("  upload       {}", secs(w.upload_secs));
        println!(
            "  verify       {} (read back: size, sha256)",
            secs(w.verify_secs)
        );
        println!(
            "  round        {} (start record to latest.json) vs {} target: {}",
            secs(w.seconds),
            secs(CHECKPOINT_TARGET.as_secs_f64()),
            report::verdict(w.seconds <= CHECKPOINT_TARGET.as_secs_f64())
        );
        println!(
            "  to exit      {} from `{CHECKPOINT_STARTED}` to the process exit",
            secs(e.round.as_secs_f64())
        );
        println!(
            "object         {}, raw {}: compression ratio {:.2}",
            mb(w.bytes),
            mb(w.raw_bytes),
            w.ratio()
        );
        print_memory("checkpointer", &e.memory);
        println!(
            "restore        {} from `{RESTORING}` to `{IMPORTED}` (download, check, import)",
            secs(i.restore.as_secs_f64())
        );
        println!(
            "  import       {} ({} records, from its log) vs {} target: {}",
            secs(i.imported.seconds),
            report::count(i.imported.records),
            secs(IMPORT_TARGET.as_secs_f64()),
            report::verdict(i.imported.seconds <= IMPORT_TARGET.as_secs_f64())
        );
        println!(
            "  seal         {} from `{IMPORTED}` to serving (Raft start, snapshot, log purge)",
            secs(i.seal.as_secs_f64())
        );
        println!(
            "  to serving   {} from launch to `{}`",
            secs(i.to_serving.as_secs_f64()),
            LISTENING.trim_end()
        );
        print_memory("restored node", &i.memory);
        println!(
            "restored       /health firstIndex {}, lastIndex {} vs checkpoint index {}: {}",
            report::count(i.first_index),
            report::count(i.last_index),
            report::count(w.index),
            if self.restored_ok() { "ok" } else { "MISMATCH" }
        );
        if args.changes != 1_000_000 {
            println!(
                "note: the targets are for 1,000,000 changes; this run loaded {}",
                report::count(args.changes)
            );
        }
    }

    fn restored_ok(&self) -> bool {
        let i = &self.import;
        let w = &self.export.written;
        i.last_index == w.index && i.imported.index == w.index
    }

    /// An error unless the restored node holds exactly the checkpoint.
    fn check_restored(&self) -> Result<()> {
        if !self.restored_ok() {
            bail!(
                "{} store: the restored node imported index {} and reports lastIndex {}, \
                 but the checkpoint is at index {}; see the logs in the kept directory",
                self.kind.name(),
                self.import.imported.index,
                self.import.last_index,
                self.export.written.index
            );
        }
        Ok(())
    }

    /// This run in the JSON summary.
    fn to_json(&self) -> Value {
        let w = &self.export.written;
        let e = &self.export;
        let i = &self.import;
        let window = |m: &Window| {
            json!({
                "baseline_bytes": m.baseline,
                "peak_bytes": m.peak(),
                "sampled_peak_bytes": m.sampled_peak,
                "extra_bytes": m.extra(),
                "hwm_bytes": m.hwm_last,
                "samples": m.samples,
                "span_secs": m.span().as_secs_f64(),
            })
        };
        json!({
            "store": self.kind.name(),
            "url": self.url,
            "load_secs": self.load_time.as_secs_f64(),
            "load_changes_per_sec": report::per_sec(self.loaded, self.load_time),
            "last_index": self.last_index,
            "export": {
                "catch_up_secs": e.catch_up.as_secs_f64(),
                "index": w.index,
                "records": w.records,
                "object_bytes": w.bytes,
                "raw_bytes": w.raw_bytes,
                "ratio": w.ratio(),
                "export_secs": w.export_secs,
                "upload_secs": w.upload_secs,
                "verify_secs": w.verify_secs,
                "round_secs": w.seconds,
                "to_exit_secs": e.round.as_secs_f64(),
                "rss": window(&e.memory),
                "met": {
                    "time": w.seconds <= CHECKPOINT_TARGET.as_secs_f64(),
                    "extra_rss": e.memory.extra() <= EXTRA_RSS_TARGET,
                },
            },
            "import": {
                "index": i.imported.index,
                "records": i.imported.records,
                "import_secs": i.imported.seconds,
                "restore_secs": i.restore.as_secs_f64(),
                "seal_secs": i.seal.as_secs_f64(),
                "to_serving_secs": i.to_serving.as_secs_f64(),
                "rss": window(&i.memory),
                "first_index": i.first_index,
                "last_index": i.last_index,
                "met": {
                    "time": i.imported.seconds <= IMPORT_TARGET.as_secs_f64(),
                    "extra_rss": i.memory.extra() <= EXTRA_RSS_TARGET,
                    "restored": self.restored_ok(),
                },
            },
        })
    }
}

/// `NAME RSS baseline …, peak …, extra … vs 100 MB target: met`, and how
/// the peak was found.
fn print_memory(name: &str, m: &Window) {
    let mb = |b: u64| report::mb(b as f64);
    println!(
        "{:<15}RSS baseline {}, peak {}, extra {} vs {} target: {}",
        name,
        mb(m.baseline),
        mb(m.peak()),
        mb(m.extra()),
        mb(EXTRA_RSS_TARGET),
        report::verdict(m.extra() <= EXTRA_RSS_TARGET)
    );
    let how = if m.raised_hwm() {
        "the peak is VmHWM, raised during the window"
    } else {
        "VmHWM was set before the window; the peak is the sampled one"
    };
    println!(
        "               ({how}; sampled VmRSS max {} in {} samples over {}; VmHWM {})",
        mb(m.sampled_peak),
        report::count(m.samples),
        secs(m.span().as_secs_f64()),
        mb(m.hwm_last)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_checkpointer_and_import_lines() {
        let line = "2025-01-01T00:00:00.000001Z  INFO changeagent_checkpointer::cycle: \
                    checkpoint written index=1000002 records=1000002 bytes=40000000 \
                    raw_bytes=200000000 export_secs=3.25 upload_secs=0.5 verify_secs=0.25 \
                    seconds=4.5 object=c/checkpoints/all/1000002.zst";
        let w = Written::parse(&Fields::after(line, CHECKPOINT_WRITTEN).unwrap()).unwrap();
        assert_eq!(
            w,
            Written {
                index: 1_000_002,
                records: 1_000_002,
                bytes: 40_000_000,
                raw_bytes: 200_000_000,
                export_secs: 3.25,
                upload_secs: 0.5,
                verify_secs: 0.25,
                seconds: 4.5,
            }
        );
        assert_eq!(w.ratio(), 5.0);
        let line = "INFO changeagent_store::import: imported a checkpoint index=7 records=9 \
                    seconds=0.125";
        let i = Imported::parse(&Fields::after(line, IMPORTED).unwrap()).unwrap();
        assert_eq!((i.index, i.records, i.seconds), (7, 9, 0.125));
        // A progress line is not the end of the import.
        let progress = "INFO x: importing a checkpoint records=5 records_per_sec=9";
        assert!(Fields::after(progress, IMPORTED).is_none());
        let short = "INFO x: checkpoint written index=5 records=5";
        let err = Written::parse(&Fields::after(short, CHECKPOINT_WRITTEN).unwrap()).unwrap_err();
        assert!(err.to_string().contains("no field bytes="), "{err}");
    }

    #[test]
    fn changes_are_valid_json_half_keyed_and_varied() {
        let mut body = String::from("[");
        for n in 0..1000 {
            if n > 0 {
                body.push(',');
            }
            write_change(n, 10, &mut body);
        }
        body.push(']');
        let changes: Vec<Value> = serde_json::from_str(&body).unwrap();
        let keyed: Vec<&Value> = changes.iter().filter(|c| c.get("key").is_some()).collect();
        assert_eq!(keyed.len(), 500);
        assert_eq!(keyed[0]["key"], "k0000000");
        assert_eq!(keyed[11]["key"], "k0000001");
        assert_eq!(keyed[11]["collection"], COLLECTION);
        assert!(changes[1].get("tenant").is_none());
        let sizes: Vec<usize> = changes
            .iter()
            .map(|c| c["data"].to_string().len())
            .collect();
        assert!(sizes.iter().all(|s| (80..=130).contains(s)), "{sizes:?}");
        let distinct: std::collections::HashSet<String> = changes
            .iter()
            .map(|c| c["data"]["event"].to_string() + &c["data"]["user"].to_string())
            .collect();
        assert!(distinct.len() > 900, "{}", distinct.len());
    }
}
