//! `changeagent-bench`: load generator for a running ChangeAgent node. It
//! measures what the design promises — durable write latency and throughput,
//! catch-up read throughput, and the memory and wake-up latency of many idle
//! long-polls — and prints human-readable figures next to the targets.
//!
//! It talks plain HTTP/1.1 (one shared keep-alive `reqwest` client) to an
//! already running node given by `--server` (env `CHANGEAGENT_SERVER`,
//! default `http://127.0.0.1:9000`) and exits non-zero with a hint how to
//! start one when that node cannot be reached. Results go to stdout, progress
//! lines (every 2 s during long work) to stderr.
//!
//! Build it in release mode; a debug build measures the benchmark itself:
//!
//! ```text
//! cargo build --release -p changeagent-server -p changeagent-bench
//! ./target/release/changeagent-server --listen 127.0.0.1:9000 --data-dir /var/tmp/ca-data &
//! ```
//!
//! # Subcommands
//!
//! - `fsync [--dir DIR] [--samples 1000] [--bytes 512]` — appends 512 B to a
//!   temporary file in DIR (default: the current directory) and
//!   `fdatasync`s it, 1000 times; prints p50/p90/p99/max. Point DIR at the
//!   server's data dir: this is the floor under any durable write there.
//!   Needs no server.
//! - `write [--clients 1,64] [--duration 10] [--fsync-dir DIR]` — for each
//!   client count, that many clients post `{"data":{"bench":true,"n":i}}` to
//!   `POST /changes` back to back for the duration; prints changes/s,
//!   p50/p90/p99/max latency and the error count. With `--fsync-dir` it first
//!   measures fsync there and prints the targets
//!   `single-client p50 X ms vs fsync p50 Y ms + 0.5 ms target: met|not met`
//!   and `64 clients: Z changes/s vs 20000 target: met|not met`.
//! - `read [--changes 1000000] [--page 1000] [--readers 1,2]` — if the
//!   server holds fewer changes than `--changes` (from `firstIndex` and
//!   `lastIndex` of `GET /changes?limit=1`), first tops it up with atomic
//!   batch posts (`--load-batch 1000` changes per JSON array, from
//!   `--load-posters 8` concurrent posters, each batch with an
//!   `Idempotency-Key` so retries never append twice). Then each reader pages
//!   through all of them with `GET /changes?since=S&limit=PAGE`, one page
//!   after the other; prints changes/s, MB/s and page latency against the
//!   300,000 changes/s target. Loading is a one-off: later runs find the
//!   changes already there.
//! - `longpoll [--count 10000] [--pid PID] [--block 60] [--ramp 500]` —
//!   reads the server's RSS (`VmRSS` in `/proc/PID/status`, so the server
//!   must run on this machine), opens `count` idle long-polls
//!   `GET /changes?since=<lastIndex>&block=60`, each on its own connection,
//!   `ramp` at a time, waiting after each batch until the server's
//!   `changeagent_long_polls_open` gauge in `/metrics` shows them; reads RSS
//!   again and prints the growth in MB and KB per long-poll against the
//!   100 MB per 10,000 target. Then it posts one change and reports how long
//!   every long-poll took to return (p50/p99/max, measured from the post)
//!   and whether every one returned that change. Without `--pid` memory is
//!   not measured. Each long-poll is a socket in this process and in the
//!   server: raise the open-file limit first (`ulimit -n 65536`, in both
//!   shells); the command checks its own limit and says so when too low.
//! - `all [--fsync-dir DIR] [--pid PID] …` — fsync in DIR (default the current
//!   directory), write with 1 and 64 clients, read, then longpoll (skipped
//!   without `--pid`). Takes every flag of the phases above.
//!
//! Every flag also reads an environment variable, `CHANGEAGENT_BENCH_<FLAG>`
//! (e.g. `CHANGEAGENT_BENCH_PID`), except `--server` (`CHANGEAGENT_SERVER`).
//!
//! # Examples
//!
//! ```text
//! changeagent-bench fsync --dir /var/tmp/ca-data
//! changeagent-bench write --fsync-dir /var/tmp/ca-data
//! changeagent-bench write --clients 1,8,64 --duration 30
//! changeagent-bench read --changes 1000000 --page 1000 --readers 1,2
//! ulimit -n 65536 && changeagent-bench longpoll --count 10000 --pid "$(pgrep -n changeagent-serv)"
//! changeagent-bench --server http://10.0.0.5:9000 all --fsync-dir /var/tmp/ca-data --pid 4242
//! ```
//!
//! # Layout
//!
//! - `fsync`: the fdatasync floor.
//! - `write`: closed-loop single-change posters and the write targets.
//! - `read`: batch loader and sequential pagers.
//! - `longpoll`: idle long-poll memory and wake-up latency.
//! - `server`: the shared HTTP client and the node's index range and metrics.
//! - `report`: histograms, number formats, target verdicts, progress lines.

mod fsync;
mod longpoll;
mod read;
mod report;
mod server;
mod write;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::fsync::{FsyncArgs, FsyncSampling};
use crate::longpoll::LongpollArgs;
use crate::read::ReadArgs;
use crate::server::Server;
use crate::write::WriteArgs;

/// Load generator for a running ChangeAgent node.
#[derive(Debug, Parser)]
#[command(name = "changeagent-bench", version, about)]
struct Cli {
    /// Base URL of the node under test.
    #[arg(
        long,
        global = true,
        env = "CHANGEAGENT_SERVER",
        default_value = "http://127.0.0.1:9000"
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// fdatasync latency of small appends in a directory (no server needed).
    Fsync(FsyncArgs),
    /// Write throughput and latency with 1 and 64 clients.
    Write {
        #[command(flatten)]
        write: WriteArgs,
        /// Also measure fsync in this directory (the server's data dir) and
        /// compare single-client latency with it.
        #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_DIR")]
        fsync_dir: Option<PathBuf>,
        #[command(flatten)]
        sampling: FsyncSampling,
    },
    /// Sequential paging throughput over many changes (loads them first).
    Read(ReadArgs),
    /// Memory and wake-up latency of many idle long-polls.
    Longpoll(LongpollArgs),
    /// fsync, write (1 and 64 clients), read, then longpoll (needs --pid).
    All {
        /// Directory for the fsync phase (the server's data dir).
        #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_DIR", default_value = ".")]
        fsync_dir: PathBuf,
        #[command(flatten)]
        sampling: FsyncSampling,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        longpoll: LongpollArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fsync(args) => {
            validate_sampling(&args.sampling)?;
            fsync::run(&args.dir, &args.sampling).await?;
        }
        Command::Write {
            write,
            fsync_dir,
            sampling,
        } => {
            validate_write(&write)?;
            validate_sampling(&sampling)?;
            let server = connect(&cli.server).await?;
            let floor = match &fsync_dir {
                Some(dir) => Some(fsync::run(dir, &sampling).await?),
                None => None,
            };
            let runs = write::run(&server, &write).await?;
            write::print_targets(&runs, floor.as_ref());
        }
        Command::Read(args) => {
            args.validate()?;
            let server = connect(&cli.server).await?;
            read::run(&server, &args).await?;
        }
        Command::Longpoll(args) => {
            args.validate()?;
            let server = connect(&cli.server).await?;
            longpoll::run(&server, &args).await?;
        }
        Command::All {
            fsync_dir,
            sampling,
            write,
            read,
            longpoll,
        } => {
            validate_sampling(&sampling)?;
            validate_write(&write)?;
            read.validate()?;
            longpoll.validate()?;
            let server = connect(&cli.server).await?;
            let floor = fsync::run(&fsync_dir, &sampling).await?;
            let runs = write::run(&server, &write).await?;
            write::print_targets(&runs, Some(&floor));
            read::run(&server, &read).await?;
            if longpoll.pid.is_some() {
                longpoll::run(&server, &longpoll).await?;
            } else {
                report::header("longpoll");
                println!("skipped: pass --pid <server pid> (and run `ulimit -n 65536` first)");
            }
        }
    }
    Ok(())
}

/// The node at `url`, after checking it answers.
async fn connect(url: &str) -> Result<Server> {
    let server = Server::new(url)?;
    let range = server.check().await?;
    println!(
        "server {}: changes {}..={} ({} held)",
        server.base(),
        range.first,
        range.last,
        report::count(range.held())
    );
    Ok(server)
}

fn validate_write(args: &WriteArgs) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients must list counts of at least 1");
    }
    if args.duration == 0 {
        bail!("--duration must be at least 1 second");
    }
    Ok(())
}

fn validate_sampling(sampling: &FsyncSampling) -> Result<()> {
    if sampling.samples == 0 || sampling.bytes == 0 {
        bail!("--samples and --bytes must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn write_defaults_to_one_and_sixty_four_clients() {
        let cli = Cli::try_parse_from(["changeagent-bench", "write"]).unwrap();
        let Command::Write { write, .. } = cli.command else {
            panic!("not write")
        };
        assert_eq!(write.clients, [1, 64]);
        let cli = Cli::try_parse_from(["changeagent-bench", "write", "--clients", "1,8"]).unwrap();
        let Command::Write { write, .. } = cli.command else {
            panic!("not write")
        };
        assert_eq!(write.clients, [1, 8]);
    }

    #[test]
    fn all_takes_every_phase_flag() {
        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "all",
            "--fsync-dir",
            "/tmp",
            "--clients",
            "64",
            "--changes",
            "10",
            "--readers",
            "1,2",
            "--count",
            "5",
            "--pid",
            "1",
        ])
        .unwrap();
        let Command::All {
            write,
            read,
            longpoll,
            ..
        } = cli.command
        else {
            panic!("not all")
        };
        assert_eq!(write.clients, [64]);
        assert_eq!(read.readers, [1, 2]);
        assert_eq!((longpoll.count, longpoll.pid), (5, Some(1)));
    }

    #[tokio::test]
    async fn unreachable_server_explains_how_to_start_one() {
        // Port 1 on localhost: nothing listens there.
        let err = connect("http://127.0.0.1:1").await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("cannot reach a ChangeAgent server"), "{text}");
        assert!(text.contains("changeagent-server"), "{text}");
    }
}
