//! The `changeagent` command line: its arguments (clap derive), what each
//! command does, and the one-line error report. The binary only parses,
//! calls [`run`] and prints [`describe`]'s line.

use std::io::{self, IsTerminal, Read, Write};
use std::path::PathBuf;
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
    /// Print the server's health.
    Health,
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
    /// Posting again with the same key returns the first answer and
    /// appends nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
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
    let client = Client::builder(&cli.servers)
        .timeout(Duration::from_secs(cli.timeout_secs))
        .build()?;
    match cli.command {
        Command::Post(args) => post(&client, args).await,
        Command::Get(args) => get(&client, args).await,
        Command::Tail(args) => tail(&client, args).await,
        Command::Health => {
            let health = client.health().await?;
            emit(&serde_json::to_string_pretty(&health)?)
        }
        Command::Checkpoints(command) => checkpoints(&client, command).await,
    }
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
    let data = match args.data.as_deref() {
        None if args.deleted => None,
        Some("-") | None => Some(read_stdin()?),
        Some(text) => Some(text.to_owned()),
    };
    let data = data
        .map(|text| serde_json::from_str::<Value>(&text))
        .transpose()
        .context("DATA is not valid JSON (quote it for the shell, e.g. '{\"on\":true}')")?;
    let change = NewChange {
        data,
        tags: args.tags,
        change_type: args.change_type,
        tenant: args.tenant,
        collection: args.collection,
        key: args.key,
        deleted: args.deleted,
    };
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

async fn tail(client: &Client, args: TailArgs) -> anyhow::Result<()> {
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
        let mut events = Box::pin(client.follow(since, filter));
        while let Some(event) = events.next().await {
            match event? {
                FollowEvent::Change(change) | FollowEvent::Record(change) => emit_change(&change)?,
                FollowEvent::Reset {
                    checkpoint,
                    first_index,
                } => {
                    note(&format!(
                        "changes before {first_index} were truncated: reset to checkpoint {} \
                         ({}, {} records); its records follow",
                        checkpoint.index, checkpoint.scope, checkpoint.records
                    ));
                    let reset =
                        json!({"reset": {"firstIndex": first_index, "checkpoint": checkpoint}});
                    emit(&reset.to_string())?;
                }
                FollowEvent::ResetEnd { index } => {
                    note(&format!(
                        "end of checkpoint {index}'s records; changes after {index} follow"
                    ));
                }
            }
        }
        return Ok(());
    }
    let mut query = filter.since(since).limit(DEFAULT_FOLLOW_LIMIT);
    loop {
        let (page, next) = client.changes_page(&["changes"], &query).await?;
        let mut since = query.since.unwrap_or(0);
        for change in &page.changes {
            emit_change(change)?;
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

fn emit_change(change: &Change) -> anyhow::Result<()> {
    emit(&serde_json::to_string(change)?)
}

/// Prints a remark for the reader on stderr, apart from the JSON on stdout.
/// A closed stderr is not worth failing for.
fn note(line: &str) {
    let _ = writeln!(io::stderr().lock(), "changeagent: {line}");
}

/// Prints one line and flushes it, so `tail -f` output is seen at once.
fn emit(line: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
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
        Error::Io { .. } => "check the path, its permissions and the free space",
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
        assert_eq!(args.data.as_deref(), Some("{\"on\":true}"));
        assert_eq!(args.tags, ["a", "b"]);
        assert_eq!(args.change_type, 3);
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
