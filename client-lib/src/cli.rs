//! The `changeagent` command line: its arguments (clap derive), what each
//! command does, and the one-line error report. The binary only parses,
//! calls [`run`] and prints [`describe`]'s line.

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use changeagent_proto::{Manifest, Scope};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::client::{Client, DEFAULT_FOLLOW_LIMIT};
use crate::error::Error;
use crate::follow::FollowEvent;
use crate::outbox::{FlushReport, Outbox};
use crate::query::Query;
use crate::types::{Change, NewChange};

/// Post, read and follow ChangeAgent changes.
#[derive(Debug, Parser)]
#[command(name = "changeagent", version)]
pub struct Cli {
    /// Server URL (core node or edge); repeat, or separate with commas, for
    /// failover.
    #[arg(
        long = "server",
        short = 's',
        env = "CHANGEAGENT_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9000",
        global = true
    )]
    pub servers: Vec<String>,

    /// Seconds allowed per request (a long poll gets its block time on top).
    #[arg(
        long,
        env = "CHANGEAGENT_TIMEOUT_SECS",
        default_value_t = 10,
        global = true
    )]
    pub timeout_secs: u64,

    #[command(flatten)]
    pub token: crate::TokenFlags,

    #[command(flatten)]
    pub ca: crate::CaFlags,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Post one change and print its `{"_id":N}`.
    Post(PostArgs),
    /// Print one change by id, or the server's JSON page of changes.
    Get(GetArgs),
    /// Print changes one JSON per line; with -f keep following new ones.
    Tail(TailArgs),
    /// Print the server's health (a core node, an edge or a checkpointer).
    Health {
        /// Exit with an error unless the server is ready to serve: a core node must know a
        /// leader and still be a member; an edge or a checkpointer only has to answer. For
        /// container health checks.
        #[arg(long)]
        ready: bool,
    },
    /// Print the cluster's members, roles and leader (`GET /cluster`).
    Cluster,
    /// Queue changes on disk while no server answers and send them later,
    /// each applied once.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// List, show and download checkpoints.
    #[command(subcommand)]
    Checkpoints(CheckpointsCommand),
}

/// The subcommands of `checkpoints`.
#[derive(Debug, Subcommand)]
pub enum CheckpointsCommand {
    /// Print the manifests of the checkpoints the server keeps, newest
    /// first, one JSON per line.
    List {
        /// Only this scope: `all` or `tenant=NAME` (default: every scope).
        #[arg(long)]
        scope: Option<Scope>,
    },
    /// Print one checkpoint's manifest.
    Show(CheckpointArgs),
    /// Download a checkpoint's compressed data to a file, checking its size
    /// and sha256 against the manifest (`zstd -dc FILE` reads it).
    Download {
        /// Which checkpoint.
        #[command(flatten)]
        which: CheckpointArgs,
        /// The file to write; it only appears once the data checked out.
        #[arg(short = 'o', long)]
        output: PathBuf,
    },
}

/// The subcommands of `outbox`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Queue one change (on disk, with its own Idempotency-Key), print its
    /// `{"seq":N}`, then try to send everything pending once; what stays
    /// pending is sent by a later `outbox post` or `outbox flush`.
    Post {
        /// The outbox.
        #[command(flatten)]
        dir: OutboxDir,
        /// The change.
        #[command(flatten)]
        change: ChangeArgs,
    },
    /// Send the pending changes in order, printing `{"seq":N,"_id":M}` for
    /// each; fails when some stay pending because no server took them.
    Flush(OutboxDir),
    /// Print how many changes are pending and how many were refused.
    Status(OutboxDir),
}

/// Where an outbox lives.
#[derive(Debug, Clone, Args)]
pub struct OutboxDir {
    /// The outbox's directory (created if missing); one process at a time.
    #[arg(long = "dir", env = "CHANGEAGENT_OUTBOX_DIR")]
    pub dir: PathBuf,
}

/// Which checkpoint a `checkpoints` subcommand is about.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// The checkpoint's index, or `latest`.
    #[arg(default_value = "latest")]
    pub checkpoint: CheckpointRef,
    /// The checkpoint's scope: `all` or `tenant=NAME`.
    #[arg(long, default_value = "all")]
    pub scope: Scope,
}

/// A checkpoint by index, or the newest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointRef {
    /// The newest checkpoint of the scope.
    Latest,
    /// The checkpoint at this index.
    Index(u64),
}

impl FromStr for CheckpointRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            return Ok(CheckpointRef::Latest);
        }
        s.parse()
            .map(CheckpointRef::Index)
            .map_err(|_| format!("invalid checkpoint {s:?}: expected an index or \"latest\""))
    }
}

/// Which changes to show.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only changes with this tag (repeat to match any of several).
    #[arg(long = "tag", short = 't')]
    pub tags: Vec<String>,
    /// Only changes of this type.
    #[arg(long = "type", allow_negative_numbers = true)]
    pub change_type: Option<i32>,
    /// Only changes of this tenant (name or id).
    #[arg(long)]
    pub tenant: Option<String>,
}

impl FilterArgs {
    fn query(&self) -> Query {
        let mut query = Query::new().tags(self.tags.iter().cloned());
        query.change_type = self.change_type;
        query.tenant = self.tenant.clone();
        query
    }
}

/// Arguments of `post`.
#[derive(Debug, Args)]
pub struct PostArgs {
    /// The change.
    #[command(flatten)]
    pub change: ChangeArgs,
    /// Posting again with the same key returns the first answer and
    /// appends nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// A change to post.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// The change's data as JSON; `-` or nothing reads it from stdin.
    pub data: Option<String>,
    /// A tag of the change (repeatable).
    #[arg(long = "tag", short = 't')]
    pub tags: Vec<String>,
    /// The change's type (0 or more).
    #[arg(long = "type", default_value_t = 0)]
    pub change_type: i32,
    /// Tenant of the change (name).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Collection of a keyed write (with --key).
    #[arg(long, requires = "key")]
    pub collection: Option<String>,
    /// Key of a keyed write (with --collection).
    #[arg(long, requires = "collection")]
    pub key: Option<String>,
    /// Delete the key instead of writing data.
    #[arg(long, requires = "key")]
    pub deleted: bool,
}

impl ChangeArgs {
    /// The change: DATA parsed as JSON (read from stdin when absent or
    /// `-`, except for a delete).
    fn new_change(self) -> anyhow::Result<NewChange> {
        let data = match self.data.as_deref() {
            None if self.deleted => None,
            Some("-") | None => Some(read_stdin()?),
            Some(text) => Some(text.to_owned()),
        };
        let data = data
            .map(|text| serde_json::from_str::<Value>(&text))
            .transpose()
            .context("DATA is not valid JSON (quote it for the shell, e.g. '{\"on\":true}')")?;
        Ok(NewChange {
            data,
            tags: self.tags,
            change_type: self.change_type,
            tenant: self.tenant,
            collection: self.collection,
            key: self.key,
            deleted: self.deleted,
        })
    }
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Print only the change with this `_id`.
    #[arg(conflicts_with_all = ["since", "limit", "block", "since_time"])]
    pub id: Option<u64>,
    /// Changes with `_id` greater than this.
    #[arg(long)]
    pub since: Option<u64>,
    /// At most this many changes (server default 100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Wait up to this many seconds for a first matching change.
    #[arg(long)]
    pub block: Option<u32>,
    /// Start at the first change at or after this time (RFC 3339 or
    /// nanoseconds since the epoch).
    #[arg(long)]
    pub since_time: Option<String>,
    /// Which changes.
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Arguments of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Keep following new changes until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start this many changes before the newest one (ignoring filters).
    #[arg(short = 'n', long, default_value_t = 10)]
    pub lines: u64,
    /// Start after this `_id` instead.
    #[arg(long)]
    pub since: Option<u64>,
    /// Which changes.
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Runs one command, printing its results to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = cli.token.token()?;
    let mut builder = Client::builder(&cli.servers)
        .timeout(Duration::from_secs(cli.timeout_secs))
        .token(token)
        .root_certificates(cli.ca.certificates()?);
    if matches!(cli.command, Command::Outbox(OutboxCommand::Post { .. })) {
        // Queued already: try each server once rather than wait out the
        // retries; a later flush sends what stays pending.
        builder = builder.max_attempts(u32::try_from(cli.servers.len()).unwrap_or(u32::MAX));
    }
    let client = builder.build()?;
    match cli.command {
        Command::Post(args) => post(&client, args).await,
        Command::Get(args) => get(&client, args).await,
        Command::Tail(args) => tail(&client, args, &mut io::stdout(), &mut io::stderr()).await,
        Command::Health { ready } => {
            let health = client.health_json().await?;
            emit(&serde_json::to_string_pretty(&health)?)?;
            match not_ready(&health) {
                Some(why) if ready => anyhow::bail!("not ready: {why}"),
                _ => Ok(()),
            }
        }
        Command::Cluster => {
            let cluster = client.cluster_json().await?;
            emit(&serde_json::to_string_pretty(&cluster)?)
        }
        Command::Outbox(command) => outbox(client, command).await,
        Command::Checkpoints(command) => checkpoints(&client, command).await,
    }
}

async fn outbox(client: Client, command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Post { dir, change } => {
            let change = change.new_change()?;
            let outbox = open_outbox(&dir.dir, client).await?;
            let seq = outbox.queue(&change).await?;
            emit(&json!({ "seq": seq }).to_string())?;
            let report = outbox.flush().await?;
            print_flush(&report)?;
            if let Some(error) = &report.stopped {
                note(&format!(
                    "{} change(s) pending in {}, kept on disk ({}); run \
                     `changeagent outbox flush --dir {}` once a server answers",
                    report.pending,
                    dir.dir.display(),
                    causes(error),
                    dir.dir.display()
                ));
            }
            Ok(())
        }
        OutboxCommand::Flush(dir) => {
            let outbox = open_outbox(&dir.dir, client).await?;
            let report = outbox.flush().await?;
            print_flush(&report)?;
            match report.stopped {
                Some(error) => Err(anyhow::Error::new(error).context(format!(
                    "{} change(s) still pending in {}",
                    report.pending,
                    dir.dir.display()
                ))),
                None => Ok(()),
            }
        }
        OutboxCommand::Status(dir) => {
            let outbox = open_outbox(&dir.dir, client).await?;
            let entries = outbox.entries().await;
            let rejected = outbox.rejected().await?;
            let oldest = entries.first();
            let status = json!({
                "dir": dir.dir,
                "pending": entries.len(),
                "oldestSeq": oldest.map(|e| e.seq),
                "oldestQueuedAtMs": oldest.map(|e| e.queued_at_ms),
                "rejected": rejected.len(),
            });
            emit(&status.to_string())
        }
    }
}

async fn open_outbox(dir: &Path, client: Client) -> anyhow::Result<Outbox> {
    Outbox::open(dir, client)
        .await
        .with_context(|| format!("cannot open the outbox in {}", dir.display()))
}

/// An error and its causes, joined by `: ` (as `{:#}` shows an anyhow
/// error).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One line per entry a flush settled, in queue order: `{"seq","_id"}`
/// when sent, `{"seq","rejected":{"status","error"}}` when refused (also
/// noted on stderr).
fn print_flush(report: &FlushReport) -> anyhow::Result<()> {
    let mut lines = Vec::with_capacity(report.sent.len() + report.rejected.len());
    for sent in &report.sent {
        lines.push((sent.seq, serde_json::to_string(sent)?));
    }
    for rejected in &report.rejected {
        let seq = rejected.entry.seq;
        note(&format!(
            "change {seq} was refused ({}) and moved to {}: fix it and queue it again",
            rejected.error,
            crate::outbox::REJECTED_FILE
        ));
        let error = serde_json::to_string(&rejected.error)?;
        let line = format!(
            r#"{{"seq":{seq},"rejected":{{"status":{},"error":{error}}}}}"#,
            rejected.status
        );
        lines.push((seq, line));
    }
    lines.sort_by_key(|(seq, _)| *seq);
    for (_, line) in lines {
        emit(&line)?;
    }
    Ok(())
}

async fn checkpoints(client: &Client, command: CheckpointsCommand) -> anyhow::Result<()> {
    match command {
        CheckpointsCommand::List { scope } => {
            for manifest in client.checkpoints(scope.as_ref()).await? {
                emit(&serde_json::to_string(&manifest)?)?;
            }
            Ok(())
        }
        CheckpointsCommand::Show(which) => {
            let manifest = find_checkpoint(client, &which).await?;
            emit(&serde_json::to_string_pretty(&manifest)?)
        }
        CheckpointsCommand::Download { which, output } => {
            let manifest = find_checkpoint(client, &which).await?;
            client
                .download_checkpoint_to(&manifest, &output)
                .await
                .with_context(|| format!("cannot download checkpoint {}", manifest.index))?;
            emit(&format!(
                "checkpoint {} ({}) saved to {}: {} bytes, sha256 {}; size and sha256 match the manifest",
                manifest.index,
                manifest.scope,
                output.display(),
                manifest.size,
                manifest.sha256
            ))
        }
    }
}

/// The manifest of the checkpoint `which` names.
async fn find_checkpoint(client: &Client, which: &CheckpointArgs) -> anyhow::Result<Manifest> {
    let scope = &which.scope;
    match which.checkpoint {
        CheckpointRef::Latest => client.latest_checkpoint(scope).await?.with_context(|| {
            format!("the server has no checkpoint of scope {scope} yet")
        }),
        CheckpointRef::Index(index) => client.checkpoint(index, scope).await?.with_context(|| {
            format!(
                "the server keeps no checkpoint {index} of scope {scope} (see `changeagent checkpoints list`)"
            )
        }),
    }
}

async fn post(client: &Client, args: PostArgs) -> anyhow::Result<()> {
    let change = args.change.new_change()?;
    let posted = match &args.idempotency_key {
        Some(key) => client.post_change_idempotent(key, &change).await?,
        None => client.post_change(&change).await?,
    };
    emit(&serde_json::to_string(&posted)?)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut stdin = io::stdin();
    if stdin.is_terminal() {
        anyhow::bail!("no DATA given: pass the JSON as an argument or pipe it on stdin");
    }
    let mut text = String::new();
    stdin
        .read_to_string(&mut text)
        .context("cannot read DATA from stdin")?;
    Ok(text)
}

async fn get(client: &Client, args: GetArgs) -> anyhow::Result<()> {
    if let Some(id) = args.id {
        let change = client.get_change(id).await?;
        return emit(&serde_json::to_string(&change)?);
    }
    let mut query = args.filter.query();
    query.since = args.since;
    query.limit = args.limit;
    query.block = args.block;
    query.since_time = args.since_time;
    let (status, headers, body) = client.get_changes_raw(&query).await?;
    if !status.is_success() {
        return Err(Error::from_response(status, &headers, &body).into());
    }
    emit(String::from_utf8_lossy(&body).trim_end())
}

/// `tail`: prints changes as JSON lines on `out`, notes on `err`. With
/// `-f` it follows forever through [`Client::follow`], which rides out
/// server restarts; when the changes it needs were truncated it notes which
/// on `err` and prints the checkpoint's records on `out` (they are the state
/// as of the checkpoint), then the changes after it.
async fn tail<O, E>(client: &Client, args: TailArgs, out: &mut O, err: &mut E) -> anyhow::Result<()>
where
    O: Write,
    E: Write,
{
    let since = match args.since {
        Some(since) => since,
        None => {
            // The server's retained range; `/health` answers even when everything before
            // the range was truncated (a list from 0 would be a 410).
            let health = client.health().await?;
            health
                .last_index
                .saturating_sub(args.lines)
                .max(health.first_index.saturating_sub(1))
        }
    };
    let filter = args.filter.query();
    if args.follow {
        // The position the stream has reached: after the last change
        // printed, or the last checkpoint loaded.
        let mut position = since;
        let mut events = Box::pin(client.follow(since, filter));
        while let Some(event) = events.next().await {
            match event? {
                FollowEvent::Change(change) => {
                    position = change.id;
                    emit_change_to(out, &change)?;
                }
                FollowEvent::Record(change) => emit_change_to(out, &change)?,
                FollowEvent::Reset {
                    checkpoint,
                    first_index,
                } => {
                    note_to(err, &reset_note(position, first_index, &checkpoint));
                }
                FollowEvent::ResetEnd { index } => position = index,
            }
        }
        return Ok(());
    }
    let mut query = filter.since(since).limit(DEFAULT_FOLLOW_LIMIT);
    loop {
        let (page, next) = client.changes_page(&["changes"], &query).await?;
        let mut since = query.since.unwrap_or(0);
        for change in &page.changes {
            emit_change_to(out, change)?;
            since = since.max(change.id);
        }
        if page.at_end {
            return Ok(());
        }
        match next {
            Some(next) if next > since => since = next,
            _ if since > query.since.unwrap_or(0) => {}
            // Neither a change nor a next link: nothing more to read.
            _ => return Ok(()),
        }
        query.since = Some(since);
    }
}

/// The one-line note of a reset: which changes were truncated, which
/// checkpoint replaces them.
fn reset_note(position: u64, first_index: u64, checkpoint: &Manifest) -> String {
    let from = position + 1;
    let truncated = match first_index.checked_sub(1) {
        Some(to) if to > from => format!("changes {from} to {to} were truncated"),
        _ => format!("change {from} was truncated"),
    };
    format!(
        "{truncated}; loading checkpoint {} ({}, {} records): its records follow as the state \
         as of change {}, then the changes after it",
        checkpoint.index, checkpoint.scope, checkpoint.records, checkpoint.index
    )
}

fn emit_change_to<O: Write>(out: &mut O, change: &Change) -> anyhow::Result<()> {
    emit_to(out, &serde_json::to_string(change)?)
}

/// Why a server that answered `health` with this JSON cannot serve yet, if it cannot: a
/// core node that knows no leader (no writes, no consistent reads) or is no longer a member.
fn not_ready(health: &Value) -> Option<String> {
    if health["role"] == "removed" {
        return Some("this node was removed from the cluster".to_owned());
    }
    match health.get("leader") {
        Some(Value::Null) => Some(format!(
            "no leader known yet (role {}, term {})",
            health["role"], health["term"]
        )),
        _ => None,
    }
}

/// Prints a remark for the reader on stderr, apart from the JSON on stdout.
fn note(line: &str) {
    note_to(&mut io::stderr(), line);
}

/// Prints a remark on `err`. A closed stderr is not worth failing for.
fn note_to<E: Write>(err: &mut E, line: &str) {
    let _ = writeln!(err, "changeagent: {line}").and_then(|()| err.flush());
}

/// Prints one line on stdout and flushes it.
fn emit(line: &str) -> anyhow::Result<()> {
    emit_to(&mut io::stdout(), line)
}

/// Prints one line and flushes it, so `tail -f` output is seen at once.
fn emit_to<O: Write>(out: &mut O, line: &str) -> anyhow::Result<()> {
    out.write_all(line.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// The one-line report of a failed command: what went wrong and what to do
/// next. `None` when stdout was closed by the reader (`… | head`), which is
/// not a failure.
pub fn describe(error: &anyhow::Error) -> Option<String> {
    let broken_pipe = error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return None;
    }
    let message = format!("{error:#}").replace('\n', " ");
    Some(
        match error.chain().find_map(|c| c.downcast_ref::<Error>()) {
            Some(client_error) => format!("{message}; {}", hint(client_error)),
            None => message,
        },
    )
}

/// What to do next about a client error.
fn hint(error: &Error) -> &'static str {
    match error {
        Error::NoEndpoints | Error::InvalidEndpoint { .. } | Error::UnsupportedScheme { .. } => {
            "pass --server http://HOST:PORT or set CHANGEAGENT_SERVER"
        }
        Error::Transport(e) if e.is_connect() => {
            "check that the server is running and that --server or CHANGEAGENT_SERVER points at it"
        }
        Error::Transport(e) if e.is_timeout() => {
            "the server did not answer in time; check `changeagent health` or raise --timeout-secs"
        }
        Error::Transport(_) => "check the network and the server's log, then retry",
        Error::Unavailable { .. } => {
            "the cluster has no leader or quorum right now; retry shortly and check `changeagent health` on each node"
        }
        Error::Truncated { .. } => {
            "those changes were truncated: start at the server's firstIndex with --since, follow with `tail -f` (which loads the checkpoint), or fetch it with `changeagent checkpoints download`"
        }
        Error::ChecksumMismatch { .. }
        | Error::SizeMismatch { .. }
        | Error::ManifestMismatch { .. }
        | Error::BadCheckpoint { .. } => {
            "the checkpoint does not match its manifest or is damaged; retry, and if it persists check the object store and the checkpointer's log"
        }
        Error::WrongScope { .. } => {
            "follow with --tenant of that checkpoint's tenant, or ask the server for a full checkpoint"
        }
        Error::TimedOut { .. } => {
            "the transfer stalled; check the network and the server, or raise --timeout-secs"
        }
        Error::Io { .. } | Error::OutboxIo { .. } => {
            "check the path, its permissions and the free space"
        }
        Error::OutboxFull { .. } => {
            "run `changeagent outbox flush` once a server answers, or queue into another --dir"
        }
        Error::EntryTooLarge { .. } => "make the change smaller",
        Error::OutboxLocked { .. } => {
            "wait for the other process using that outbox to finish, or use another --dir"
        }
        Error::OutboxCorrupt { .. } => {
            "the outbox file was damaged or edited: move the directory aside, requeue what it holds, and report it if it was not edited"
        }
        Error::OutboxBroken { .. } => {
            "a write to the outbox failed (disk full or failing?): fix the disk, then run the command again"
        }
        Error::Api { status: 400, .. } => "fix the arguments (see --help)",
        Error::Api { status: 404, .. } => "check the id, tenant, collection or key",
        Error::Api { status: 409, .. } => {
            "that name exists already (or is ambiguous: use the numeric id)"
        }
        Error::Api { status: 413, .. } => {
            "make the change smaller, or raise the server's --max-body-bytes"
        }
        Error::Api { status, .. } if *status >= 500 => {
            "the server failed; check its log and retry"
        }
        Error::InvalidIdempotencyKey { .. } => "use printable ASCII for --idempotency-key",
        Error::Decode { .. } => {
            "the answer is not what this client expects; check that --server points at a ChangeAgent server of a matching version"
        }
        _ => "check the request and the server's log",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use reqwest::header::HeaderMap;
    use reqwest::StatusCode;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ready_needs_a_known_leader_and_membership_on_a_core_only() {
        let core = |role: &str, leader: Value| json!({"role": role, "leader": leader, "term": 3});
        assert_eq!(not_ready(&core("follower", json!(2))), None);
        assert_eq!(not_ready(&core("leader", json!(1))), None);
        let why = not_ready(&core("candidate", Value::Null)).expect("no leader");
        assert!(why.contains("no leader"), "{why}");
        assert!(not_ready(&core("removed", json!(1))).is_some());
        // An edge and a checkpointer have no leader field: answering is enough.
        assert_eq!(not_ready(&json!({"role": "edge", "lastIndex": 4})), None);
        assert_eq!(not_ready(&json!({"role": "checkpointer"})), None);
    }

    #[test]
    fn servers_repeat_and_split_on_commas() {
        let cli = Cli::try_parse_from([
            "changeagent",
            "--server",
            "http://a:1,http://b:2",
            "-s",
            "c:3",
            "health",
        ])
        .expect("parse");
        assert_eq!(cli.servers, ["http://a:1", "http://b:2", "c:3"]);
    }

    #[test]
    fn post_takes_tags_type_and_key() {
        let cli = Cli::try_parse_from([
            "changeagent",
            "post",
            "{\"on\":true}",
            "--tag",
            "a",
            "-t",
            "b",
            "--type",
            "3",
            "--idempotency-key",
            "k1",
        ])
        .expect("parse");
        let Command::Post(args) = cli.command else {
            panic!("not post: {:?}", cli.command)
        };
        assert_eq!(args.change.data.as_deref(), Some("{\"on\":true}"));
        assert_eq!(args.change.tags, ["a", "b"]);
        assert_eq!(args.change.change_type, 3);
        assert_eq!(args.idempotency_key.as_deref(), Some("k1"));
    }

    #[test]
    fn get_builds_a_filtered_query() {
        let cli = Cli::try_parse_from([
            "changeagent",
            "get",
            "--since",
            "5",
            "--tag",
            "x",
            "--tag",
            "y",
            "--type",
            "-2",
        ])
        .expect("parse");
        let Command::Get(args) = cli.command else {
            panic!("not get: {:?}", cli.command)
        };
        assert_eq!(args.since, Some(5));
        assert_eq!(args.filter.query().to_query_string(), "tag=x&tag=y&type=-2");
    }

    #[test]
    fn get_by_id_excludes_paging_flags() {
        assert!(Cli::try_parse_from(["changeagent", "get", "7", "--since", "1"]).is_err());
    }

    #[test]
    fn tail_follow_flag() {
        let cli = Cli::try_parse_from(["changeagent", "tail", "-f", "-n", "3"]).expect("parse");
        let Command::Tail(args) = cli.command else {
            panic!("not tail: {:?}", cli.command)
        };
        assert!(args.follow);
        assert_eq!(args.lines, 3);
    }

    #[test]
    fn checkpoints_subcommands_take_an_index_or_latest_and_a_scope() {
        let cli = Cli::try_parse_from(["changeagent", "checkpoints", "list"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Checkpoints(CheckpointsCommand::List { scope: None })
        ));
        let cli = Cli::try_parse_from(["changeagent", "checkpoints", "show"]).expect("parse");
        let Command::Checkpoints(CheckpointsCommand::Show(which)) = cli.command else {
            panic!("not show: {:?}", cli.command)
        };
        assert_eq!(which.checkpoint, CheckpointRef::Latest);
        assert_eq!(which.scope, Scope::All);
        let cli = Cli::try_parse_from([
            "changeagent",
            "checkpoints",
            "download",
            "120",
            "--scope",
            "tenant=acme",
            "-o",
            "out.zst",
        ])
        .expect("parse");
        let Command::Checkpoints(CheckpointsCommand::Download { which, output }) = cli.command
        else {
            panic!("not download: {:?}", cli.command)
        };
        assert_eq!(which.checkpoint, CheckpointRef::Index(120));
        assert_eq!(which.scope, Scope::Tenant("acme".into()));
        assert_eq!(output, PathBuf::from("out.zst"));
        // -o is required; bad scopes and indices are refused.
        assert!(Cli::try_parse_from(["changeagent", "checkpoints", "download"]).is_err());
        assert!(
            Cli::try_parse_from(["changeagent", "checkpoints", "show", "--scope", "x"]).is_err()
        );
        assert!(Cli::try_parse_from(["changeagent", "checkpoints", "show", "newest"]).is_err());
    }

    #[test]
    fn errors_are_one_line_with_a_next_step() {
        let error: anyhow::Error = Error::from_response(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            b"{\"error\":\"no change 9\"}",
        )
        .into();
        let line = describe(&error).expect("a message");
        assert_eq!(
            line,
            "server answered 404: no change 9; check the id, tenant, collection or key"
        );
        let error: anyhow::Error = Error::from_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            b"{\"error\":\"no leader\"}",
        )
        .into();
        assert!(describe(&error)
            .expect("a message")
            .contains("no leader or quorum"));
    }

    #[test]
    fn broken_pipe_is_not_reported() {
        let error = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("cannot write to stdout");
        assert_eq!(describe(&error), None);
    }
}

#[cfg(test)]
mod tail_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use axum::extract::{Path as UrlPath, RawQuery, State};
    use axum::http::header::CONTENT_TYPE;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};

    use super::*;
    use crate::checkpoint::testing::checkpoint;
    use crate::client::RetryPolicy;

    /// Lines written to it, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().expect("lock").clone();
            String::from_utf8(bytes)
                .expect("utf-8")
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// A server that restarts (answers 503 to its first requests), has
    /// truncated the changes before 5 behind checkpoint 4, and holds
    /// changes 5 and 6.
    struct Fake {
        unavailable: AtomicUsize,
        manifest: Manifest,
        data: Vec<u8>,
    }

    const RECORDS: [&str; 2] = [
        r#"{"_id":2,"_ts":2,"tags":["a"],"data":2}"#,
        r#"{"_id":4,"_ts":4,"data":{"z":1,"a":2}}"#,
    ];
    const CHANGES: [&str; 2] = [
        r#"{"_id":5,"_ts":5,"tags":["a"],"data":5}"#,
        r#"{"_id":6,"_ts":6,"data":6}"#,
    ];

    async fn changes(State(fake): State<Arc<Fake>>, RawQuery(query): RawQuery) -> Response {
        let restarting = fake
            .unavailable
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if restarting {
            let body = json!({"error": "starting"});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
        let since: u64 = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "since")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        if since + 1 < 5 {
            let body = json!({
                "error": "truncated", "message": "gone", "firstIndex": 5,
                "checkpoint": fake.manifest,
            });
            return (StatusCode::GONE, Json(body)).into_response();
        }
        let selected: Vec<&str> = CHANGES
            .iter()
            .filter(|c| changeagent_proto::checkpoint::record_id(c.as_bytes()) > Some(since))
            .copied()
            .collect();
        let body = format!(
            r#"{{"changes":[{}],"atStart":false,"atEnd":true,"firstIndex":5,"lastIndex":6}}"#,
            selected.join(",")
        );
        ([(CONTENT_TYPE, "application/json")], body).into_response()
    }

    async fn data(State(fake): State<Arc<Fake>>, UrlPath(_index): UrlPath<u64>) -> Response {
        fake.data.clone().into_response()
    }

    #[tokio::test]
    async fn tail_f_rides_out_a_restart_and_prints_a_checkpoints_records_after_a_note() {
        let (bytes, manifest) = checkpoint(4, &Scope::All, &RECORDS);
        let fake = Arc::new(Fake {
            unavailable: AtomicUsize::new(5),
            manifest,
            data: bytes,
        });
        let app = Router::new()
            .route("/changes", get(changes))
            .route("/checkpoints/{index}/data", get(data))
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::builder([format!("http://{addr}")])
            .retry(RetryPolicy {
                max_attempts: 2,
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
                ..RetryPolicy::default()
            })
            .follow_block_secs(0)
            .build()
            .expect("client");
        let args = TailArgs {
            follow: true,
            lines: 10,
            since: Some(1),
            filter: FilterArgs::default(),
        };
        let (out, err) = (Captured::default(), Captured::default());
        let task = {
            let (mut out, mut err) = (out.clone(), err.clone());
            tokio::spawn(async move { tail(&client, args, &mut out, &mut err).await })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.lines().len() < 4 {
            assert!(
                Instant::now() < deadline && !task.is_finished(),
                "tail -f printed {:?}, noted {:?}",
                out.lines(),
                err.lines()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert_eq!(
            fake.unavailable.load(Ordering::Relaxed),
            0,
            "it got past the 503s"
        );
        // Only changes on stdout: the checkpoint's records (the state), then
        // the changes after the checkpoint.
        let want: Vec<String> = RECORDS
            .iter()
            .chain(&CHANGES)
            .map(|c| {
                serde_json::to_string(&serde_json::from_str::<Change>(c).expect("change"))
                    .expect("json")
            })
            .collect();
        assert_eq!(out.lines(), want);
        assert_eq!(
            err.lines(),
            ["changeagent: changes 2 to 4 were truncated; loading checkpoint 4 (all, 2 records): \
              its records follow as the state as of change 4, then the changes after it"]
        );
    }

    #[test]
    fn a_reset_note_names_one_change_or_a_range() {
        let (_, manifest) = checkpoint(9, &Scope::All, &RECORDS);
        assert!(reset_note(7, 9, &manifest).starts_with("change 8 was truncated; "));
        assert!(reset_note(0, 9, &manifest).starts_with("changes 1 to 8 were truncated; "));
    }

    #[test]
    fn outbox_subcommands_take_a_dir_and_a_change() {
        let cli = Cli::try_parse_from([
            "changeagent",
            "outbox",
            "post",
            "--dir",
            "/tmp/ob",
            "{\"a\":1}",
            "-t",
            "x",
        ])
        .expect("parse");
        let Command::Outbox(OutboxCommand::Post { dir, change }) = cli.command else {
            panic!("not outbox post: {:?}", cli.command)
        };
        assert_eq!(dir.dir, PathBuf::from("/tmp/ob"));
        assert_eq!(change.tags, ["x"]);
        assert!(matches!(
            Cli::try_parse_from(["changeagent", "outbox", "flush", "--dir", "d"])
                .expect("parse")
                .command,
            Command::Outbox(OutboxCommand::Flush(_))
        ));
        assert!(matches!(
            Cli::try_parse_from(["changeagent", "cluster"])
                .expect("parse")
                .command,
            Command::Cluster
        ));
    }
}
