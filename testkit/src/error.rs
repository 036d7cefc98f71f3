//! What can go wrong while starting, stopping and watching processes. Every
//! message says which process, what was expected, and (for a process that
//! failed) the end of its log, so a failed run explains itself.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// The marker every binary logs once it has bound its listener.
pub(crate) const LISTENING_MARKER: &str = "listening on ";

/// How to get the binaries the harness starts: the packages that use it do
/// not depend on the server crates, so cargo does not build them on its own.
pub const BUILD_HINT: &str = "build the binaries first with `cargo build --workspace --bins` \
     (`cargo build --release --workspace --bins` for the benchmark)";

/// Everything the harness reports instead of panicking (its panicking helpers
/// turn these into panic messages).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary is in none of the places it was looked for.
    #[error(
        "{name} binary not found (looked at {}): {BUILD_HINT}, or set {env} to its path",
        paths(.looked)
    )]
    BinaryNotFound {
        name: String,
        /// Every path tried, in order.
        looked: Vec<PathBuf>,
        /// The environment variable that overrides the lookup.
        env: String,
    },

    /// A file system or process operation failed. (The cause is part of
    /// the message, not a `source()`, so a test's panic shows it too.)
    #[error("{action} {}: {cause}", .path.display())]
    Io {
        /// What the harness was doing, e.g. `"creating"`.
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The process exited before it logged its listen address.
    #[error(
        "{process} exited with {status} before logging `{LISTENING_MARKER}ADDR`; \
         the end of its log {}:\n{tail}",
        .log.display()
    )]
    ExitedEarly {
        process: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },

    /// The process did not log its listen address in time.
    #[error(
        "{process} did not log `{LISTENING_MARKER}ADDR` within {deadline:?}; \
         the end of its log {}:\n{tail}",
        .log.display()
    )]
    StartTimeout {
        process: String,
        deadline: Duration,
        log: PathBuf,
        tail: String,
    },

    /// The process was still running when it should have exited (after
    /// SIGTERM, or on its own); SIGTERM timeouts SIGKILL it first.
    #[error(
        "{process} still running {waited:?} after it should have exited; \
         the end of its log {}:\n{tail}",
        .log.display()
    )]
    DidNotExit {
        process: String,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },

    /// An operation that needs a running process found none.
    #[error("{process} is not running")]
    NotRunning { process: String },

    /// An operation that starts the process found it still running.
    #[error("{process} is still running: kill or terminate it first")]
    StillRunning { process: String },

    /// Starting a cluster failed; `kept` is where its data and logs stay
    /// when the options asked to keep them on error.
    #[error(
        "starting a {nodes}-node cluster failed{}: {cause}",
        .kept.as_ref().map(|d| format!("; its data and logs are kept in {}", d.display())).unwrap_or_default()
    )]
    ClusterStart {
        nodes: usize,
        kept: Option<PathBuf>,
        cause: Box<Error>,
    },

    /// A `docker` command failed, could not be run, or took too long.
    #[error("`docker {command}` failed ({outcome}): {stderr}")]
    Docker {
        /// The arguments after `docker`, joined by spaces.
        command: String,
        /// `exit status: 1`, `could not run it: …` or `timed out after …`.
        outcome: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },

    /// A wait on observable state passed its deadline.
    #[error(
        "timed out after {waited:?} ({polls} polls) waiting until {what}; last state seen: {last}"
    )]
    Timeout {
        what: String,
        waited: Duration,
        polls: u64,
        /// The probe's description of the last state it saw.
        last: String,
    },
}

/// `Result` of the harness's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Paths joined for a message.
fn paths(list: &[PathBuf]) -> String {
    let shown: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

impl Error {
    /// An [`Error::Io`] for `action` on `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io {
            action,
            path,
            cause,
        }
    }
}

/// How the harness's panicking helpers fail: with the error's message, at
/// the caller's line where the helper is not async.
pub(crate) trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for Result<T> {
    #[track_caller]
    fn or_panic(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }
}
