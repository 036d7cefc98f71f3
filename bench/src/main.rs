//! `changeagent-bench`: load generator for ChangeAgent. It measures what the
//! design promises — durable write latency and throughput, catch-up read
//! throughput, the memory and wake-up latency of many idle long-polls on a
//! core node or an edge, long-poll answers per second, and how long a
//! cluster is unavailable for writes when its leader dies — and prints
//! human-readable figures next to the targets.
//!
//! It talks plain HTTP/1.1 (one shared keep-alive `reqwest` client; the
//! many long-polls of `longpoll`, `answers` and `fanout` and the posters of
//! `write` use a minimal HTTP/1.1 client of their own, see `--client` and
//! `--write-client`) to an already running node
//! given by `--server` (env `CHANGEAGENT_SERVER`, default
//! `http://127.0.0.1:9000`) and exits non-zero with a hint how to start one
//! when that node cannot be reached. With `--cluster N` (`write`, `all`) and
//! in `failover` it instead starts its own local cluster of the
//! `changeagent-server` binary next to it (see below); `checkpoint` starts
//! its own node, checkpointer and restoring node; `fanout` its own core node
//! and edge. Results go to stdout, progress lines (every 2 s during long
//! work) to stderr.
//!
//! Build it in release mode; a debug build measures the benchmark itself:
//!
//! ```text
//! cargo build --release --workspace --bins
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
//! - `write [--clients 1,64] [--duration 10] [--fsync-dir DIR]
//!   [--batch-posters 8] [--batch-size 1000] [--cluster N]` — for each
//!   client count, that many clients post `{"data":{"bench":true,"n":i}}` to
//!   `POST /changes` back to back for the duration; prints changes/s,
//!   p50/p90/p99/max latency and the error count. Then `--batch-posters`
//!   post arrays of `--batch-size` changes (one atomic write each) for the
//!   same duration (0 posters skips this). With `--fsync-dir` it first
//!   measures fsync there and prints the targets
//!   `single-client p50 X ms vs fsync p50 Y ms + 0.300 ms target: met|not met`
//!   and `64 clients: Z changes/s vs 25000 target: met|not met` (with
//!   `--cluster` of 2 or more nodes: fsync + 0.7 ms and 17,000/s, issue 10's
//!   etcd-relative targets as measured on the machine it was written on).
//!   The posters use the minimal HTTP/1.1 client of the long-polls, one
//!   keep-alive connection each (`--write-client raw`, the default, like
//!   wrk), or the shared reqwest client (`--write-client reqwest`), whose
//!   own work per post took about 40% of the two cores at 64 clients.
//!   With `--cluster N` it starts a local N-node cluster (below), runs all of
//!   that against the leader (fsync measured in the cluster's directory
//!   unless `--fsync-dir` says otherwise), then runs every client count
//!   above 1 again with the clients spread round-robin over all nodes
//!   (followers forward writes to the leader) and prints both side by side.
//!   After each run (each client count, and the batch run) it prints the
//!   run's share of the server's write-stage histograms
//!   (`changeagent_write_stage_seconds` in `/metrics`, scraped before and
//!   after): per stage the count, mean and estimated p50/p99 in ms, one table
//!   for the leader and one for the followers (every node of a `--cluster`,
//!   else `--server` alone; a node without them gets a note). It ends with
//!   one JSON line of every run, each with `"stages"`:
//!   `{node_url: {stage: {count, mean_ms, p50_ms, p99_ms}}}`.
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
//! - `longpoll [--count 10000] [--pid PID] [--target URL] [--block 60]
//!   [--ramp 500] [--client raw|reqwest]` — opens `count` idle long-polls
//!   `GET /changes?since=<lastIndex>&block=60` on `--target` (default
//!   `--server`; e.g. an edge tailing it, which is first given time to catch
//!   up), each on its own connection, `ramp` at a time, waiting after each
//!   batch until the target's `changeagent_long_polls_open` gauge in
//!   `/metrics` shows them. With `--pid` (the target's; `VmRSS` in
//!   `/proc/PID/status`, so it must run on this machine) it prints the RSS
//!   growth in MB and KB per long-poll against the target of the target's
//!   role (by the `role` of its `/health`): 5 KB per long-poll for an edge
//!   (+50 MB per 10,000), 10 KB for a core node (100 MB per 10,000; the
//!   other role's is printed beside it). Then it posts one change to
//!   `--server` (the core) and reports how long every long-poll took to
//!   return it, p50/p90/p99/max from the moment the core's answer to the
//!   post arrived (against the 200 ms p99 target for 10,000 waiters on an
//!   edge) and from the post's send, and whether every one returned that
//!   change (the exit status says so too). Each long-poll is a socket in
//!   this process and in the target: the command raises its own soft
//!   open-file limit to the hard one and fails when that is too low; the
//!   target needs `ulimit -n 65536` in its shell (a warning says so).
//!   `--client` (`CHANGEAGENT_BENCH_CLIENT`) picks the long-polls' HTTP
//!   client: `raw` (default), a minimal HTTP/1.1 client over one keep-alive
//!   TCP connection per poller, or `reqwest`, the shared client; the raw one
//!   costs this process less CPU per answer, so on a 2-core machine more of
//!   it is left to the server being measured.
//! - `answers [--pollers 1000] [--duration 10] [--writers 1] [--lead 100]
//!   [--target URL] [--pid PID] [--client raw|reqwest]` — `pollers` pollers,
//!   one connection each, loop `GET /changes?since=<their last>&block=30&limit=1`
//!   on `--target` (default `--server`) while `writers` post batches of
//!   changes to `--server`, keeping the log at most `lead` changes ahead of
//!   the slowest poller (topped up once half of it is read), so no poller
//!   starves and none falls behind for good. After every poller's first
//!   answer it counts the answers over `duration` seconds and prints
//!   answers/s against the 50,000 /s target of one edge, the share of
//!   answers that had to wait for a new change, and the CPU time of this
//!   process and (with `--pid`) the target over the span, per answer, which
//!   shows which side bounds the rate. Every poller checks that each answer
//!   holds exactly the next id (no gap, no repeat, never two); any such
//!   error, failed request or failed post is reported and fails the run.
//! - `fanout [--count 10000] [--pollers 1000] [--duration 10] [--client …]
//!   [--edge-only] [--dir DIR] [--keep-dir] [--server-bin PATH]
//!   [--edge-bin PATH] [--edge-arg "…"]` — starts its own single core node
//!   (`changeagent-server`) and an edge (`changeagent-edge --upstream
//!   <core>` plus any `--edge-arg`, split at spaces) through the test kit,
//!   then runs `longpoll` (RSS per idle long-poll, wake-up latency of
//!   `count` waiters on the edge for a post on the core) and `answers`
//!   against the edge; then stops the edge and runs both against the core
//!   alone to compare (unless `--edge-only`). Takes the flags of both
//!   (`--block`, `--ramp`, `--writers`, `--lead`). Prints a progress line per
//!   phase, one table of the edge's and the core's figures beside the edge's
//!   targets with met / not met, then one JSON line with every figure. Data
//!   dirs and logs live in a temporary directory under `--dir` (default the
//!   current directory), removed at the end unless `--keep-dir` is given or
//!   the run failed. The binaries are `--server-bin` /
//!   `CHANGEAGENT_SERVER_BIN` and `--edge-bin` / `CHANGEAGENT_EDGE_BIN`,
//!   else the ones next to this executable; the core and the edge inherit
//!   the raised open-file limit.
//! - `all [--fsync-dir DIR] [--pid PID] [--cluster N] …` — fsync in DIR
//!   (default the current directory, or the cluster's directory), write with
//!   1 and 64 clients and the batch run, read, then longpoll (skipped without
//!   `--pid`; with `--cluster` it reads the leader's pid itself). Takes every
//!   flag of the phases above; with `--cluster N` every phase runs against
//!   the leader of a local cluster and write adds the spread runs.
//! - `failover [--cluster 3] [--rounds 20] [--attempt-timeout-ms 1000]
//!   [--signal kill|term]` —
//!   starts a local cluster and one writer that posts single changes back to
//!   back, each with its own `Idempotency-Key`, retrying a 5xx, a refused
//!   connection or an attempt over the timeout on the next node after 5 ms.
//!   Each round finds the leader, `kill -9`s it (with `--signal term`:
//!   stops it with SIGTERM, a planned restart), and measures the time from
//!   the kill to the first acknowledged write that was sent after the old
//!   leader was gone (after SIGTERM: sent after the signal); then restarts the node on its data dir and waits until
//!   it has caught up and every node agrees on a leader. Prints one progress
//!   line per round, then p50/p90/p99/max of the failover and catch-up times,
//!   and checks that the log grew by exactly the number of acknowledged
//!   writes (no retry appended twice, nothing acknowledged was lost).
//! - `fleet --cores URL,… [--edges URL,…] [--consumers 1000] [--writers 4]
//!   [--outbox-writers 2] [--tenants 3] [--keys 200] [--rate 50]
//!   [--duration 0] [--offline-share 0.2] [--offline-secs 5..120]
//!   [--online-secs 10..60] [--data-dir DIR] [--settle-secs 300]
//!   [--report PATH] [--seed N]` — a long-running simulation of the
//!   mission's users against running endpoints (it starts nothing):
//!   always-online writers posting keyed and unkeyed changes through the
//!   cores with idempotency keys, occasionally connected writers with an
//!   on-disk outbox, and `--consumers` viewers following the list from 0
//!   through the edges, a share of them going offline for periods that
//!   outlast the core's retention (then the client library reloads a
//!   checkpoint). Every viewer checks that its view is dense and keeps a
//!   digest of its state. After `--duration` seconds (0: until SIGTERM or
//!   SIGINT, as a docker-compose service) it stops the writers, flushes the
//!   outboxes, brings every viewer to one final index, compares every
//!   viewer's state with a reference consumer's that followed a core, and
//!   checks that every acknowledged write and outbox post is in the list
//!   once. Progress lines every 2 s; one JSON summary on stdout (and in
//!   `--report`): consumers, reloads, writes, transient errors,
//!   commit-to-consumer latency p50/p99/max, violations and `ok`; exit
//!   status 0 when there was no violation, else 1. Its flags read
//!   `CHANGEAGENT_FLEET_<FLAG>` (e.g. `CHANGEAGENT_FLEET_CORES`).
//! - `checkpoint [--changes 1000000] [--keys 100000] [--store file|s3|both]
//!   [--s3] [--dir DIR]` — starts its own core node of the release
//!   `changeagent-server` and loads it with `--changes` changes (half keyed
//!   writes cycling over `--keys` keys of one collection, half unkeyed; about
//!   100 bytes of varied JSON data each) in atomic batch posts
//!   (`--load-batch 1000`, `--load-posters 4`). Then
//!   `changeagent-checkpointer --once` catches up and writes one checkpoint;
//!   from its log come the export, upload, read-back and round times, the
//!   object and raw sizes and their ratio. Its memory (`VmRSS` and `VmHWM`
//!   of `/proc/PID/status`) is sampled every 10 ms from `checkpoint started`
//!   until it exits: the baseline, the peak (`VmHWM` when the round raised
//!   it, exact up to the last sample; else the sampled `VmRSS` maximum: a
//!   process that has exited can no longer be read) and the extra between
//!   them. The core is stopped and a new node started with `--restore-from`:
//!   import time (from its log), time to serving, memory sampled the same
//!   way from `restoring from a checkpoint` to `listening on`, and its
//!   `/health` `lastIndex`, which must be the checkpoint's index. Prints
//!   the figures against the targets (round and import ≤ 10 s, extra RSS ≤
//!   100 MB each side), then one JSON line with all of them. `--store s3`
//!   (or `--s3`, both stores) runs the same against a local Garage server
//!   (`scripts/install-garage`, or `CHANGEAGENT_GARAGE_BIN`). Data dirs,
//!   logs and the `file://` store live in a temporary directory under
//!   `--dir` (default the current directory), removed at the end unless
//!   `--keep-dir` is given or the run failed.
//! - `chaos --project P --cores URLS --edges URLS --checkpointer URL
//!   [--steps …] [--settle-secs 180] [--write-rate 20] [--fleet-stop-secs 600]`
//!   — faults across the containers of a running compose topology
//!   (`deploy/docker-compose.yml`; `deploy/compose chaos` passes the flags),
//!   through the `docker` CLI. The containers are found by their compose
//!   labels (project P, services `core1`… in the order of `--cores`, `edge1`…
//!   in the order of `--edges`, `checkpointer`, `s3`, `fleet`). While the
//!   fleet simulator runs, the command posts `--write-rate` changes per second
//!   of its own through the cores (each with an `Idempotency-Key`, retried on
//!   the next core), then runs the `--steps` (default all, in this order):
//!   `kill-leader` (`docker kill` of the leader core: a new leader among the
//!   others and writes through it; `docker start`; it catches up),
//!   `partition` (`docker network disconnect` of a follower core: the log
//!   grows without it; reconnected under its service name, it catches up),
//!   `pause-edge` (`docker pause` of edge1 until the checkpointer has
//!   truncated the cores past its index; unpaused, it bootstraps again after
//!   the 410 and catches up), `restart-checkpointer` (`docker kill` of the
//!   checkpointer between a round's start record and its end record, then
//!   `docker start`; a newer checkpoint completes; the object store is frozen
//!   with `docker pause` from between two rounds until the kill, so the round
//!   cannot end before the kill lands) and `restart-s3` (`docker
//!   restart` of the object store; a checkpoint lands after it). After each,
//!   it waits (up to `--settle-secs`, a progress line every 2 s) until every
//!   container is running and healthy, the cores agree on a leader, the log
//!   has grown and the edges have caught up. Then it stops the fleet with
//!   SIGTERM (`docker stop -t <fleet-stop-secs>`: the fleet converges, checks
//!   every consumer and exits 0 when its report says `"ok": true`; an absent
//!   or exited fleet fails this check as "fleet not running"), waits until the
//!   cores agree on `firstIndex` and `lastIndex` and the edges reach it, and
//!   checks that every core and edge serves the same bytes for each change
//!   they both retain, that every checkpoint the cores list downloads and
//!   verifies (size, sha256, every line, trailer), and that each of its own
//!   acknowledged writes is in the newest checkpoint or the retained log
//!   exactly once. Prints one JSON summary on stdout (each step with its
//!   durations, the fleet's report, each check), and on failure what failed
//!   and which `deploy/compose logs SERVICE` to read; exits 0 only when every
//!   step recovered and every check held. Ctrl-C puts every container back
//!   (unpaused, started, reconnected) before exiting.
//! - `storm --nodes URL,… [--polls 10000] [--ramp 500] [--block 30]
//!   [--writers 4] [--rate 20] [--duration 20] [--write-timeout-ms 5000]
//!   [--preload 0] [--readers 0]` —
//!   against a running cluster (it starts nothing): holds `polls`
//!   long-polls spread round-robin over every core node in `--nodes` (one
//!   raw keep-alive connection each, opened `ramp` at a time until the nodes'
//!   `changeagent_long_polls_open` gauges show them), each asking again at
//!   once with `since` at the last `_id` it got, so every write wakes them
//!   all; while `writers` post `rate` changes per second in all, round-robin
//!   over the nodes, for `duration` seconds, and a watcher reads every node's
//!   `/health` every 100 ms. Every node must name one leader in one term
//!   before the writes. Prints a progress line every 5 s, a table, and as the
//!   last line one JSON object: polls, writes, write errors (no answer),
//!   writes over the timeout (not 200, or slower than `--write-timeout-ms`,
//!   the server's write timeout), write p50/p99/max, answers (with changes,
//!   per second), poll errors, the term before and after, the leader changes
//!   and each change of term or leader a node reported, and `ok` (no write
//!   problem, same term, no leader change). Exit status 0 when ok, 1 when
//!   not, 2 when the run could not be carried out (a node unreachable, no
//!   agreed leader, the long-polls never showed open). Raises its open-file
//!   limit like `longpoll`; the nodes need theirs raised too. With
//!   `--preload N` it first posts N small changes, and `--readers R` page
//!   through them from the start again and again during the run: reads
//!   behind the nodes' tail caches, which go to RocksDB (reads and read
//!   errors are in the summary).
//!
//! # Local clusters
//!
//! `--cluster N` and `failover` run N (1–9; `failover` needs 3+) nodes of
//! `--server-bin` (env `CHANGEAGENT_SERVER_BIN`, default
//! `changeagent-server` next to this executable, i.e.
//! `target/release/changeagent-server`) on 127.0.0.11, 127.0.0.12, … with a
//! free port each, all started with one `--peers` file, `--heartbeat-ms`
//! (50) and `--election-timeout-ms` (150), plus any `--server-arg "…"`
//! (split at spaces), through the same harness the system tests use
//! (`changeagent-testkit`). The peers file and one directory per node
//! (`nK/data` and the log `nK/changeagent-server.log`, K from 0) live in a
//! temporary directory under `--cluster-dir` (default the current
//! directory; put it on the disk to measure), removed at the end unless
//! `--keep-cluster-dir` is given or the run failed. The exact command line
//! is printed with the results. The nodes are killed when the benchmark
//! ends, also on Ctrl-C.
//!
//! Every flag also reads an environment variable, `CHANGEAGENT_BENCH_<FLAG>`
//! (e.g. `CHANGEAGENT_BENCH_PID`), except those of `fleet`
//! (`CHANGEAGENT_FLEET_<FLAG>`), `--server` (`CHANGEAGENT_SERVER`),
//! `--server-bin` (`CHANGEAGENT_SERVER_BIN`, as in the system tests),
//! `--checkpointer-bin` (`CHANGEAGENT_CHECKPOINTER_BIN`, likewise),
//! `--edge-bin` (`CHANGEAGENT_EDGE_BIN`, likewise), `--server-arg`
//! (`CHANGEAGENT_BENCH_SERVER_ARGS`) and `--edge-arg`
//! (`CHANGEAGENT_BENCH_EDGE_ARGS`).
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
//! changeagent-bench write --cluster 3 --cluster-dir /var/tmp
//! changeagent-bench failover --rounds 20 --cluster-dir /var/tmp
//! changeagent-bench checkpoint --store both --dir /var/tmp
//! changeagent-bench longpoll --target http://127.0.0.1:9100 --pid "$(pgrep -n changeagent-edge)"
//! changeagent-bench answers --target http://127.0.0.1:9100 --pollers 1000 --duration 10
//! changeagent-bench fanout --count 10000 --pollers 1000 --dir /var/tmp
//! changeagent-bench storm --nodes http://10.0.0.1:9000,http://10.0.0.2:9000,http://10.0.0.3:9000
//! deploy/compose chaos --steps kill-leader,pause-edge
//! changeagent-bench fleet --cores http://127.0.0.1:9000 --edges http://127.0.0.1:9100 --duration 60
//! ```
//!
//! # Layout
//!
//! - `fsync`: the fdatasync floor.
//! - `write`: closed-loop single-change posters and the write targets.
//! - `read`: batch loader and sequential pagers.
//! - `longpoll`: idle long-poll memory and wake-up latency on a core or an
//!   edge, the targets of each role.
//! - `answers`: long-poll answers per second with one change each, writers
//!   that keep the pollers fed, the order check of every answer.
//! - `fanout`: a core and an edge started for the run, both measured.
//! - `poll_client`: `--client`, the long-polls' connections (raw or reqwest).
//! - `http1`: the minimal HTTP/1.1 client (GET, Content-Length or chunked).
//! - `open_files`: raising and checking the open-file limit.
//! - `cpu`: CPU time of a process from `/proc/PID/stat`.
//! - `cluster`: the flags of a local N-node cluster and starting it with the
//!   test kit (which finds the leader, kills and restarts nodes); where the
//!   binaries are.
//! - `failover`: leader kills under a retrying writer.
//! - `checkpoint`: one checkpoint of a loaded node written and restored.
//! - `fleet`: the fleet simulator (writers, outboxes, viewers, the
//!   reference consumer and the final check).
//! - `load`: the batch loader `read` and `checkpoint` fill a node with.
//! - `memory`: `VmRSS` and `VmHWM` of a process, and a sampled window.
//! - `logline`: a child's new log lines and the fields of a `tracing` line.
//! - `server`: the shared HTTP client and the node's index range and metrics.
//! - `storm`: long-polls woken by every write while writers post and a
//!   watcher looks for new terms and leaders.
//! - `stages`: the server's write-stage histograms, scraped around each
//!   write run; their per-stage count, mean and estimated quantiles.
//! - `report`: histograms, number formats, target verdicts, progress lines.
//! - `chaos`: faults across the containers of a compose topology, then the
//!   fleet's verdict and the checks of replicas, checkpoints and writes.

mod answers;
mod chaos;
mod checkpoint;
mod cluster;
mod cpu;
mod failover;
mod fanout;
mod fleet;
mod fsync;
mod http1;
mod load;
mod logline;
mod longpoll;
mod memory;
mod open_files;
mod poll_client;
mod read;
mod report;
mod server;
mod stages;
mod storm;
mod write;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand};

use changeagent_testkit::cluster::{Cluster, CLUSTER_DEADLINE};

use crate::answers::AnswersCmd;
use crate::chaos::ChaosArgs;
use crate::checkpoint::CheckpointArgs;
use crate::cluster::ClusterArgs;
use crate::failover::FailoverArgs;
use crate::fanout::FanoutArgs;
use crate::fleet::FleetArgs;
use crate::fsync::{FsyncArgs, FsyncSampling};
use crate::longpoll::{LongpollArgs, Target};
use crate::read::ReadArgs;
use crate::server::Server;
use crate::storm::StormArgs;
use crate::write::WriteArgs;

/// Load generator for a running ChangeAgent node or a local cluster.
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
    /// Write throughput and latency with 1 and 64 clients, then batch posts.
    Write {
        #[command(flatten)]
        write: WriteArgs,
        /// Also measure fsync in this directory (the server's data dir) and
        /// compare single-client latency with it.
        #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_DIR")]
        fsync_dir: Option<PathBuf>,
        #[command(flatten)]
        sampling: FsyncSampling,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Sequential paging throughput over many changes (loads them first).
    Read(ReadArgs),
    /// Memory and wake-up latency of many idle long-polls (on --target, e.g. an edge).
    Longpoll(LongpollArgs),
    /// Long-poll answers per second when each answer carries one change.
    Answers(AnswersCmd),
    /// Starts a core and an edge; longpoll and answers on the edge, then on the core.
    Fanout(FanoutArgs),
    /// Time from kill -9 (or SIGTERM) of a local cluster's leader to the next acknowledged write.
    Failover(FailoverArgs),
    /// Time, size and memory of writing one checkpoint of a loaded node and restoring it.
    Checkpoint(CheckpointArgs),
    /// Faults across the containers of a compose topology, then the fleet's and our checks.
    Chaos(ChaosArgs),
    /// Simulates writers and a fleet of occasionally connected consumers, then checks them.
    Fleet(FleetArgs),
    /// Long-polls woken by every write on a running cluster: does Raft stay healthy?
    Storm(StormArgs),
    /// fsync, write (1 and 64 clients, batch), read, then longpoll (needs --pid).
    All {
        /// Directory for the fsync phase (the server's data dir; default the
        /// current directory, or the cluster's directory with --cluster).
        #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_DIR")]
        fsync_dir: Option<PathBuf>,
        #[command(flatten)]
        sampling: FsyncSampling,
        #[command(flatten)]
        write: WriteArgs,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        longpoll: LongpollArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Chaos(args) = &cli.command {
        // It handles Ctrl-C itself: the containers it broke are put back first.
        return match chaos::main(args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The fleet ends on SIGTERM or SIGINT by itself, checking what it ran.
    if let Command::Fleet(args) = cli.command {
        return fleet::main(args).await;
    }
    // Its exit status tells a failed run (1) from one that could not run (2).
    if let Command::Storm(args) = &cli.command {
        return storm::main(args).await;
    }
    // On Ctrl-C the run is dropped, and with it any local cluster, whose
    // drop kills its nodes.
    let outcome = tokio::select! {
        outcome = run(cli) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build of the benchmark; its own work (the clients) costs \
             several times the CPU of a release build (cargo build --release -p changeagent-bench)"
        );
    }
    match cli.command {
        Command::Fsync(args) => {
            validate_sampling(&args.sampling)?;
            fsync::run(&args.dir, &args.sampling).await?;
        }
        Command::Write {
            write,
            fsync_dir,
            sampling,
            cluster:
                ClusterArgs {
                    cluster: Some(nodes),
                    nodes: node_args,
                },
        } => {
            write.validate()?;
            validate_sampling(&sampling)?;
            node_args.validate()?;
            let mut cluster = cluster::start(nodes, &node_args).await?;
            let phases = Phases {
                fsync_dir: fsync_dir.as_deref(),
                sampling: &sampling,
                write: &write,
                rest: None,
            };
            let result = run_cluster(&cluster, phases).await;
            cluster.keep_on_error(result)?;
        }
        Command::Write {
            write,
            fsync_dir,
            sampling,
            cluster: ClusterArgs { cluster: None, .. },
        } => {
            write.validate()?;
            validate_sampling(&sampling)?;
            let server = connect(&cli.server).await?;
            let floor = match &fsync_dir {
                Some(dir) => Some(fsync::run(dir, &sampling).await?),
                None => None,
            };
            let runs = write::run(&server, std::slice::from_ref(&server), &write).await?;
            write::print_targets(&runs.runs, floor.as_ref(), write::Targets::SINGLE_NODE);
            println!();
            println!("{}", write::summary_json(&runs, &[]));
        }
        Command::Read(args) => {
            args.validate()?;
            let server = connect(&cli.server).await?;
            read::run(&server, &args).await?;
        }
        Command::Longpoll(args) => {
            args.validate()?;
            let server = connect(&cli.server).await?;
            let target = target(&server, &args).await?;
            longpoll::run(&server, &target, &args.waiters)
                .await?
                .check()?;
        }
        Command::Answers(cmd) => {
            cmd.answers.validate()?;
            let server = connect(&cli.server).await?;
            let target = match cmd.target.as_deref() {
                Some(url) => connect(url).await?,
                None => server.clone(),
            };
            let target = Target::new(target, cmd.pid, cmd.client.client).await?;
            let core_pid = if target.is(&server) { cmd.pid } else { None };
            answers::run(&server, core_pid, &target, &cmd.answers)
                .await?
                .check()?;
        }
        Command::Fanout(args) => {
            args.validate()?;
            fanout::run(&args).await?;
        }
        Command::Failover(args) => {
            args.validate()?;
            failover::run(&args).await?;
        }
        Command::Checkpoint(args) => {
            args.validate()?;
            checkpoint::run(&args).await?;
        }
        Command::Chaos(_) => {
            bail!("chaos runs from main, outside the Ctrl-C handling of the others")
        }
        // `main` runs it, outside the Ctrl-C handling above.
        Command::Fleet(_) => bail!("the fleet is run by main"),
        Command::Storm(_) => bail!("storm is run by main"),
        Command::All {
            fsync_dir,
            sampling,
            write,
            read,
            longpoll,
            cluster,
        } => {
            validate_sampling(&sampling)?;
            write.validate()?;
            read.validate()?;
            longpoll.validate()?;
            if let Some(nodes) = cluster.cluster {
                cluster.nodes.validate()?;
                let mut cluster = cluster::start(nodes, &cluster.nodes).await?;
                let phases = Phases {
                    fsync_dir: fsync_dir.as_deref(),
                    sampling: &sampling,
                    write: &write,
                    rest: Some((&read, &longpoll)),
                };
                let result = run_cluster(&cluster, phases).await;
                cluster.keep_on_error(result)?;
                return Ok(());
            }
            let server = connect(&cli.server).await?;
            let fsync_dir = fsync_dir.unwrap_or_else(|| PathBuf::from("."));
            let floor = fsync::run(&fsync_dir, &sampling).await?;
            let runs = write::run(&server, std::slice::from_ref(&server), &write).await?;
            write::print_targets(&runs.runs, Some(&floor), write::Targets::SINGLE_NODE);
            read::run(&server, &read).await?;
            run_longpoll(&server, &longpoll).await?;
        }
    }
    Ok(())
}

/// What `write --cluster` and `all --cluster` run against the cluster.
struct Phases<'a> {
    /// Where to measure fsync; `None` means the cluster's own directory.
    fsync_dir: Option<&'a Path>,
    sampling: &'a FsyncSampling,
    write: &'a WriteArgs,
    /// `all` only: the read and longpoll phases after the writes.
    rest: Option<(&'a ReadArgs, &'a LongpollArgs)>,
}

/// fsync, the write runs against the leader, the same spread over every
/// node, then (for `all`) read and longpoll against the leader.
async fn run_cluster(cluster: &Cluster, phases: Phases<'_>) -> Result<()> {
    let leader = cluster.try_wait_leader(CLUSTER_DEADLINE).await?;
    report::header("cluster");
    println!("{}", cluster.describe());
    println!("leader: {}", cluster.label(leader));
    let server = connect(&cluster.node(leader).url()).await?;
    let fsync_dir = phases.fsync_dir.unwrap_or(cluster.dir());
    let floor = fsync::run(fsync_dir, phases.sampling).await?;
    // Every node's write stages are scraped around every run.
    let nodes = cluster::servers(cluster)?;
    let runs = write::run(&server, &nodes, phases.write).await?;
    // With one node, spreading would repeat the leader-only runs.
    let spread = if cluster.len() > 1 {
        write::run_spread(&nodes, phases.write).await?
    } else {
        Vec::new()
    };
    write::print_targets(
        &runs.runs,
        Some(&floor),
        write::Targets::for_nodes(cluster.len()),
    );
    if !spread.is_empty() {
        write::print_spread(&runs.runs, &spread, cluster.len());
    }
    if let Some((read, longpoll)) = phases.rest {
        read::run(&server, read).await?;
        let mut longpoll = longpoll.clone();
        longpoll.pid = longpoll.pid.or(cluster.pid(leader));
        run_longpoll(&server, &longpoll).await?;
    }
    let now = cluster.try_wait_leader(CLUSTER_DEADLINE).await?;
    if now != leader {
        println!(
            "note: the leader changed during the run, from {} to {}",
            cluster.label(leader),
            cluster.label(now)
        );
    }
    // `write` ends with its JSON line; `all` goes on to other phases.
    if phases.rest.is_none() {
        println!();
        println!("{}", write::summary_json(&runs, &spread));
    }
    Ok(())
}

/// The longpoll phase of `all`, or a note why it is skipped.
async fn run_longpoll(server: &Server, args: &LongpollArgs) -> Result<()> {
    if args.pid.is_some() {
        let target = target(server, args).await?;
        longpoll::run(server, &target, &args.waiters).await?.check()
    } else {
        report::header("longpoll");
        println!("skipped: pass --pid <server pid> (and run `ulimit -n 65536` first)");
        Ok(())
    }
}

/// The node the long-polls go to: `url` (checked to answer) or else the
/// core itself.
async fn target(core: &Server, args: &LongpollArgs) -> Result<Target> {
    let server = match args.target.as_deref() {
        Some(url) => connect(url).await?,
        None => core.clone(),
    };
    Target::new(server, args.pid, args.client.client).await
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
        assert_eq!((longpoll.waiters.count, longpoll.pid), (5, Some(1)));
    }

    #[test]
    fn write_and_all_take_a_cluster_with_timing_flags() {
        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "write",
            "--cluster",
            "3",
            "--heartbeat-ms",
            "80",
            "--server-arg",
            "--write-timeout-ms 2000",
        ])
        .unwrap();
        let Command::Write { write, cluster, .. } = cli.command else {
            panic!("not write")
        };
        assert_eq!(cluster.cluster, Some(3));
        assert_eq!(
            (
                cluster.nodes.heartbeat_ms,
                cluster.nodes.election_timeout_ms
            ),
            (80, 150)
        );
        assert_eq!(cluster.nodes.server_args, ["--write-timeout-ms", "2000"]);
        assert_eq!((write.batch_posters, write.batch_size), (8, 1000));

        let cli = Cli::try_parse_from(["changeagent-bench", "write"]).unwrap();
        let Command::Write { cluster, .. } = cli.command else {
            panic!("not write")
        };
        assert_eq!(cluster.cluster, None);

        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "all",
            "--cluster",
            "5",
            "--cluster-dir",
            "/var/tmp",
            "--keep-cluster-dir",
        ])
        .unwrap();
        let Command::All {
            cluster, fsync_dir, ..
        } = cli.command
        else {
            panic!("not all")
        };
        assert_eq!(cluster.cluster, Some(5));
        assert_eq!(cluster.nodes.cluster_dir, PathBuf::from("/var/tmp"));
        assert!(cluster.nodes.keep_cluster_dir);
        assert_eq!(fsync_dir, None);
    }

    #[test]
    fn failover_defaults_to_twenty_kills_of_a_three_node_leader() {
        let cli = Cli::try_parse_from(["changeagent-bench", "failover"]).unwrap();
        let Command::Failover(args) = cli.command else {
            panic!("not failover")
        };
        assert_eq!((args.cluster, args.rounds), (3, 20));
        assert_eq!(args.signal, crate::failover::Signal::Kill);
        assert_eq!(
            (args.nodes.heartbeat_ms, args.nodes.election_timeout_ms),
            (50, 150)
        );
        assert!(args.validate().is_ok());
        let cli =
            Cli::try_parse_from(["changeagent-bench", "failover", "--signal", "term"]).unwrap();
        let Command::Failover(args) = cli.command else {
            panic!("not failover")
        };
        assert_eq!(args.signal, crate::failover::Signal::Term);
        let cli = Cli::try_parse_from(["changeagent-bench", "failover", "--cluster", "2"]).unwrap();
        let Command::Failover(args) = cli.command else {
            panic!("not failover")
        };
        let err = args.validate().unwrap_err();
        assert!(format!("{err}").contains("quorum"), "{err}");
    }

    #[test]
    fn checkpoint_defaults_to_a_million_changes_to_file_only() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["changeagent-bench", "checkpoint"];
            argv.extend_from_slice(args);
            let Command::Checkpoint(args) = Cli::try_parse_from(argv)?.command else {
                panic!("not checkpoint")
            };
            Ok::<_, clap::Error>(args)
        };
        let args = parse(&[]).unwrap();
        assert_eq!((args.changes, args.keys), (1_000_000, 100_000));
        assert_eq!((args.load_batch, args.load_posters), (1000, 4));
        assert_eq!(args.store, checkpoint::StoreChoice::File);
        assert!(!args.s3 && !args.keep_dir);
        assert!(args.validate().is_ok());

        let args = parse(&["--changes", "20000", "--keys", "2000", "--store", "both"]).unwrap();
        assert_eq!((args.changes, args.keys), (20_000, 2_000));
        assert_eq!(args.store, checkpoint::StoreChoice::Both);
        assert!(parse(&["--s3"]).unwrap().s3);
        assert!(
            parse(&["--s3", "--store", "file"]).is_err(),
            "--s3 is --store both"
        );
        assert!(parse(&["--store", "gcs"]).is_err());

        for bad in [
            &["--changes", "1"][..],
            &["--keys", "0"],
            &["--load-batch", "0"],
            &["--load-batch", "10001"],
            &["--load-posters", "0"],
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn longpoll_answers_and_fanout_take_their_flags() {
        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "longpoll",
            "--target",
            "http://127.0.0.1:9100",
            "--count",
            "1000",
            "--client",
            "reqwest",
        ])
        .unwrap();
        let Command::Longpoll(args) = cli.command else {
            panic!("not longpoll")
        };
        assert_eq!(args.target.as_deref(), Some("http://127.0.0.1:9100"));
        assert_eq!((args.waiters.count, args.waiters.block), (1000, 60));
        assert_eq!(args.client.client, poll_client::ClientKind::Reqwest);

        let cli = Cli::try_parse_from(["changeagent-bench", "answers"]).unwrap();
        let Command::Answers(cmd) = cli.command else {
            panic!("not answers")
        };
        let a = &cmd.answers;
        assert_eq!(
            (a.pollers, a.duration, a.writers, a.lead),
            (1000, 10, 1, 100)
        );
        assert_eq!(cmd.client.client, poll_client::ClientKind::Raw);
        assert_eq!(cmd.target, None);
        assert!(a.validate().is_ok());

        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "fanout",
            "--count",
            "1000",
            "--pollers",
            "200",
            "--duration",
            "3",
            "--edge-bin",
            "/x/changeagent-edge",
            "--edge-arg",
            "--max-block-secs 120",
            "--edge-only",
        ])
        .unwrap();
        let Command::Fanout(args) = cli.command else {
            panic!("not fanout")
        };
        assert_eq!(args.waiters.count, 1000);
        assert_eq!((args.answers.pollers, args.answers.duration), (200, 3));
        assert_eq!(args.edge_bin, Some(PathBuf::from("/x/changeagent-edge")));
        assert_eq!(args.edge_args, ["--max-block-secs", "120"]);
        assert!(args.edge_only && !args.keep_dir);
        assert!(args.validate().is_ok());
        let cli = Cli::try_parse_from(["changeagent-bench", "fanout", "--pollers", "0"]).unwrap();
        let Command::Fanout(args) = cli.command else {
            panic!("not fanout")
        };
        assert!(args.validate().is_err());
    }

    #[test]
    fn storm_needs_the_nodes() {
        assert!(Cli::try_parse_from(["changeagent-bench", "storm"]).is_err());
        let cli = Cli::try_parse_from([
            "changeagent-bench",
            "storm",
            "--nodes",
            "http://127.0.0.11:4000,http://127.0.0.12:4000",
            "--polls",
            "100",
        ])
        .unwrap();
        let Command::Storm(args) = cli.command else {
            panic!("not storm")
        };
        assert_eq!(args.nodes.len(), 2);
        assert_eq!((args.polls, args.block, args.writers), (100, 30, 4));
        assert!(args.validate().is_ok());
    }

    #[test]
    fn write_flags_are_checked() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["changeagent-bench", "write"];
            argv.extend_from_slice(args);
            let Command::Write { write, .. } = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not write")
            };
            write.validate()
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--batch-size", "0"]).is_err());
        assert!(parse(&["--batch-size", "0", "--batch-posters", "0"]).is_ok());
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
