//! One process of a ChangeAgent binary (server, checkpointer, edge: each
//! takes `--listen` and `--data-dir` and logs `listening on ADDR` once bound):
//! its output in a log file, its address read from that line, SIGKILL,
//! SIGTERM and restarts on the same data dir, and a kill on drop.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::binary::Binary;
use crate::error::{Error, OrPanic, Result};
use crate::health::{wait_leader_where, Probe};
use crate::http::Api;
use crate::wait::POLL_INTERVAL;

/// How long a process may take from spawn to logging its listen address. A
/// debug build opening RocksDB on a loaded 2-core machine takes seconds; a
/// node replaying a long benchmark log takes longer; a cluster member logs
/// it only once the cluster has a leader.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long a SIGTERMed process may take to drain and exit.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// How long a fresh single node may take to elect itself leader.
pub const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// Log lines quoted in an error about a process: enough for the error that
/// stopped it and what led there, few enough to read in a terminal.
pub const LOG_TAIL_LINES: usize = 20;

/// How much of a process's log a panicking test prints when it drops the
/// process: the end of a busy debug-build log, not megabytes of it.
const PANIC_LOG_BYTES: usize = 16 * 1024;

pub(crate) use crate::error::LISTENING_MARKER;

/// How to start a process beyond the fixed `--listen … --data-dir …`.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The binary; the core node `changeagent-server` by default.
    pub bin: Binary,
    /// `--listen` address; `None` is `127.0.0.1:0` (a new port on each start).
    /// A fixed address keeps the node reachable at the same place across
    /// restarts, as cluster peers need.
    pub listen: Option<SocketAddr>,
    /// Extra command-line arguments, appended after the fixed ones.
    pub args: Vec<String>,
    /// Extra environment variables for the child.
    pub env: Vec<(String, String)>,
    /// Directory for `data/` (the `--data-dir`) and the log; created if
    /// missing and left in place. `None`: a new temp dir, removed on drop.
    pub dir: Option<PathBuf>,
    /// What messages call the process (e.g. a cluster's `n0`).
    pub name: Option<String>,
    /// The process serves HTTPS with a certificate of this CA: [`ServerProcess::url`] is
    /// `https://` and [`ServerProcess::api`] trusts it.
    pub ca: Option<PathBuf>,
}

impl ServerOptions {
    /// Starts `bin` instead of `changeagent-server`.
    pub fn bin(mut self, bin: Binary) -> Self {
        self.bin = bin;
        self
    }

    /// Listens on `addr` (fixed across restarts) instead of `127.0.0.1:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Appends one command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets one environment variable for the child.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Keeps data and log in `dir` (which outlives the process).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Names the process in messages.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Serves HTTPS with `pair` (`--tls-cert`, `--tls-key`), signed by the CA in `ca`.
    pub fn tls(mut self, pair: &crate::tls::CertPair, ca: impl Into<PathBuf>) -> Self {
        self.args.extend(pair.flags());
        self.ca = Some(ca.into());
        self
    }
}

/// One running (or stopped) process with its own directory (data dir + log
/// file), which outlives restarts, so a restart reuses the same data.
/// Dropping it SIGKILLs the process.
///
/// Methods named `try_…` return an [`Error`] (with the end of the log where
/// it helps); the others panic with the same message, for tests.
pub struct ServerProcess {
    /// The running child; `None` after a kill, a SIGTERM or an exit the
    /// harness noticed, until the next start.
    child: Option<Child>,
    /// The temp dir when the harness made one, held only so that it is
    /// removed (after the kill in `drop`) when this is dropped. `None` when
    /// [`ServerOptions::dir`] named a directory.
    _temp: Option<TempDir>,
    /// Holds `data/` and the log.
    dir: PathBuf,
    addr: SocketAddr,
    opts: ServerOptions,
    /// The located binary.
    bin: PathBuf,
    /// Number of times the binary was spawned (1 after `start`).
    starts: u32,
    /// Length of the log file when the current process was spawned: the
    /// listen line is looked for after it.
    log_offset: u64,
}

impl ServerProcess {
    /// Spawns the binary without waiting for it to log its listen address;
    /// call [`try_wait_started`](Self::try_wait_started) next. Cluster
    /// members need this: each logs `listening on` only once the cluster has
    /// a leader, which needs the other members running too.
    pub fn try_launch(opts: ServerOptions) -> Result<ServerProcess> {
        let bin = opts.bin.locate()?;
        let (temp, dir) = match &opts.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("changeagent-testkit-")
                    .tempdir()
                    .map_err(Error::io("creating a temp dir in", std::env::temp_dir()))?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let addr = opts
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut server = ServerProcess {
            child: None,
            _temp: temp,
            dir,
            addr,
            opts,
            bin,
            starts: 0,
            log_offset: 0,
        };
        server.spawn_child()?;
        Ok(server)
    }

    /// [`try_launch`](Self::try_launch), then wait (up to
    /// [`START_DEADLINE`]) until it logs its listen address.
    pub async fn try_start(opts: ServerOptions) -> Result<ServerProcess> {
        let mut server = Self::try_launch(opts)?;
        server.try_wait_started().await?;
        Ok(server)
    }

    /// Spawns the binary on the existing data dir; does not wait.
    fn spawn_child(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::StillRunning {
                process: self.label(),
            });
        }
        self.starts += 1;
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io("opening", &log_path))?;
        self.log_offset = log
            .seek(SeekFrom::End(0))
            .map_err(Error::io("seeking to the end of", &log_path))?;
        let stderr = log
            .try_clone()
            .map_err(Error::io("duplicating the handle of", &log_path))?;
        let listen = self
            .opts
            .listen
            .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());

        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.opts.args)
            // Relative defaults (`file://./checkpoints`, …) land in the process's own
            // directory, never in the checkout.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .env("NO_COLOR", "1");
        // Flags also come from CHANGEAGENT_* variables; do not let the
        // environment the harness runs in change what is being run: only
        // the flags given (and printed with benchmark results) apply.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHANGEAGENT_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(Error::io("starting", &self.bin))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits (up to [`START_DEADLINE`]) until the current process logs its
    /// listen address, and takes the address from there. Fails, quoting the
    /// end of the log, if the process exits first or the deadline passes.
    pub async fn try_wait_started(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let offset = self.log_offset;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let fresh = read_from(&log_path, offset);
            if let Some(addr) = parse_listen_addr(&fresh) {
                self.addr = addr;
                return Ok(());
            }
            if let Some(status) = self.poll_exit()? {
                return Err(Error::ExitedEarly {
                    process: self.label(),
                    status,
                    log: log_path,
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    process: self.label(),
                    deadline: START_DEADLINE,
                    log: log_path,
                    tail: self.log_tail(LOG_TAIL_LINES),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// What messages call this process: its name, binary and address.
    pub fn label(&self) -> String {
        let bin = self.opts.bin.name();
        let at = if self.addr.port() == 0 {
            String::new()
        } else {
            format!(" on {}", self.addr)
        };
        match &self.opts.name {
            Some(name) => format!("{name} ({bin}{at})"),
            None => format!("{bin}{at}"),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (changes on restart unless
    /// [`ServerOptions::listen`] fixed the address).
    pub fn url(&self) -> String {
        let scheme = if self.opts.ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The bound address of the current process.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An HTTP client for the current process.
    pub fn api(&self) -> Api {
        let api = Api::new(self.url());
        match &self.opts.ca {
            Some(ca) => api.with_tls(ca, None),
            None => api,
        }
    }

    /// The located binary this process runs.
    pub fn bin_path(&self) -> &Path {
        &self.bin
    }

    /// The directory holding the data dir and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data dir passed as `--data-dir`; kept across restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The log file: stdout and stderr of every start, appended.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.opts.bin.name()))
    }

    /// Everything the process(es) wrote to stdout and stderr so far, across
    /// restarts.
    pub fn log(&self) -> String {
        read_from(&self.log_path(), 0)
    }

    /// Waits up to `timeout` until the log holds one of `any_of`; panics with the log's
    /// last lines otherwise.
    pub async fn wait_for_log(&self, any_of: &[&str], timeout: Duration) {
        let what = format!("{} to log one of {any_of:?}", self.opts.bin.name());
        crate::wait::wait_until(timeout, &what, || async {
            let log = self.log();
            if any_of.iter().any(|s| log.contains(s)) {
                Ok(())
            } else {
                Err(tail_of(&log, 3))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The last `lines` lines of the log, indented, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.log(), lines)
    }

    /// Process id of the running child, if one runs.
    pub fn running_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether a child is running (not yet killed, stopped or seen exiting
    /// by the harness).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is stopped (SIGSTOP, state `T` in `/proc/PID/stat`), as a
    /// process's own test hook leaves it.
    pub fn is_stopped(&self) -> bool {
        let Some(pid) = self.running_pid() else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // `pid (comm) S …`: the state follows the last ')'.
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|st| st == "T")
            })
            .unwrap_or(false)
    }

    /// Waits until the process stopped itself (see [`is_stopped`](Self::is_stopped)).
    pub async fn wait_stopped(&self, timeout: Duration) {
        crate::wait::wait_until(
            timeout,
            &format!("{} to stop itself", self.label()),
            || async {
                if self.is_stopped() {
                    Ok(())
                } else {
                    Err(self.log_tail(5))
                }
            },
        )
        .await
        .or_panic();
    }

    /// SIGSTOP: freezes the process (its sockets stay open, nothing it holds is released)
    /// until [`resume`](Self::resume).
    pub fn pause(&self) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("SIGSTOP {}: {e}", self.label()));
    }

    /// SIGCONT: lets a stopped process go on.
    pub fn resume(&self) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGCONT)
            .unwrap_or_else(|e| panic!("SIGCONT {}: {e}", self.label()));
    }

    /// SIGKILL and reap the process: when this returns it is gone, without
    /// having had a chance to flush anything.
    pub fn try_kill9(&mut self) -> Result<()> {
        let mut child = self.child.take().ok_or_else(|| Error::NotRunning {
            process: self.label(),
        })?;
        // `Child::kill` sends SIGKILL on Unix.
        child.kill().map_err(Error::io("SIGKILL", &self.bin))?;
        child.wait().map_err(Error::io("reaping", &self.bin))?;
        Ok(())
    }

    /// SIGTERM and wait (up to [`STOP_DEADLINE`]) for the process to exit;
    /// returns its exit status. One that does not exit is SIGKILLed and
    /// reported with the end of its log.
    pub async fn try_terminate(&mut self) -> Result<ExitStatus> {
        let pid = self.running_pid().ok_or_else(|| Error::NotRunning {
            process: self.label(),
        })?;
        // Linux pids are at most 2^22; the cast cannot wrap.
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGTERM)
            .map_err(|errno| Error::io("SIGTERM", &self.bin)(errno.into()))?;
        match self.exit_within(STOP_DEADLINE).await? {
            Some(status) => Ok(status),
            None => {
                self.try_kill9()?;
                Err(self.did_not_exit(STOP_DEADLINE))
            }
        }
    }

    /// Polls (up to `timeout`) for the process to exit; its status, or `None`
    /// if it is still running then.
    async fn exit_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        if self.child.is_none() {
            return Err(Error::NotRunning {
                process: self.label(),
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn did_not_exit(&self, waited: Duration) -> Error {
        Error::DidNotExit {
            process: self.label(),
            waited,
            log: self.log_path(),
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Starts the binary again on the same data dir (and address, if fixed)
    /// after a kill or SIGTERM, and waits until it logs its listen address.
    pub async fn try_restart(&mut self) -> Result<()> {
        self.spawn_child()?;
        self.try_wait_started().await
    }

    /// Spawns the binary again on the same data dir after a kill or SIGTERM,
    /// without waiting for it to serve (for a start that is expected to
    /// fail).
    pub fn try_relaunch(&mut self) -> Result<()> {
        self.spawn_child()
    }

    /// Waits (up to `timeout`) for the process to exit on its own and
    /// returns its exit status; fails, quoting its log, if it still runs.
    pub async fn try_wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.exit_within(timeout).await? {
            Some(status) => Ok(status),
            None => Err(self.did_not_exit(timeout)),
        }
    }

    /// The exit status if the process has exited on its own (it is then
    /// reaped and no longer running); `None` while it runs or when none was
    /// started.
    pub fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child
            .try_wait()
            .map_err(Error::io("checking on", &self.bin))?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// Waits (up to `within`) until `GET /health` shows this single node as
    /// the leader, so writes are accepted.
    pub async fn try_wait_leader(&self, within: Duration) -> Result<()> {
        let probe = Probe::new(self.label(), Some(self.api()));
        wait_leader_where(&[probe], within, "a single node becomes leader", |_, _| {
            true
        })
        .await
        .map(drop)
    }
}

/// The panicking face of [`ServerProcess`], for tests: each method is its
/// `try_` twin, panicking with that error's message.
impl ServerProcess {
    /// Starts the process in a new temp dir and waits (up to
    /// [`START_DEADLINE`]) until it logs its listen address.
    pub async fn start(opts: ServerOptions) -> ServerProcess {
        Self::try_start(opts).await.or_panic()
    }

    /// See [`try_launch`](Self::try_launch).
    #[track_caller]
    pub fn launch(opts: ServerOptions) -> ServerProcess {
        Self::try_launch(opts).or_panic()
    }

    /// [`start`](Self::start), then wait until `/health` reports this single
    /// node as leader, so writes are accepted.
    pub async fn start_leader(opts: ServerOptions) -> ServerProcess {
        let server = Self::start(opts).await;
        server.wait_leader().await;
        server
    }

    /// See [`try_wait_started`](Self::try_wait_started).
    pub async fn wait_started(&mut self) {
        self.try_wait_started().await.or_panic();
    }

    /// Process id of the running child; panics when none runs.
    #[track_caller]
    pub fn pid(&self) -> u32 {
        self.running_pid()
            .unwrap_or_else(|| panic!("{} is not running", self.label()))
    }

    /// See [`try_kill9`](Self::try_kill9).
    #[track_caller]
    pub fn kill9(&mut self) {
        self.try_kill9().or_panic();
    }

    /// See [`try_terminate`](Self::try_terminate).
    pub async fn terminate(&mut self) -> ExitStatus {
        self.try_terminate().await.or_panic()
    }

    /// See [`try_restart`](Self::try_restart) (a new port unless the
    /// address is fixed).
    pub async fn restart(&mut self) {
        self.try_restart().await.or_panic();
    }

    /// See [`try_relaunch`](Self::try_relaunch).
    #[track_caller]
    pub fn relaunch(&mut self) {
        self.try_relaunch().or_panic();
    }

    /// See [`try_wait_exit`](Self::try_wait_exit).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.try_wait_exit(timeout).await.or_panic()
    }

    /// See [`poll_exit`](Self::poll_exit).
    #[track_caller]
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.poll_exit().or_panic()
    }

    /// [`restart`](Self::restart), then wait until it is leader again.
    pub async fn restart_leader(&mut self) {
        self.restart().await;
        self.wait_leader().await;
    }

    /// Waits (up to [`LEADER_DEADLINE`]) until `GET /health` shows this
    /// single node as leader.
    pub async fn wait_leader(&self) {
        if let Err(e) = self.try_wait_leader(LEADER_DEADLINE).await {
            panic!(
                "{e}\nthe end of the log of {}:\n{}",
                self.label(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Best effort: the process may already have exited.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail = tail_chars(&log, PANIC_LOG_BYTES);
            eprintln!(
                "---- {} log ({} start(s), {}) ----\n{tail}\n---- end of log ----",
                self.label(),
                self.starts,
                self.log_path().display()
            );
        }
    }
}

/// The last `max` bytes of `s`, cut at a char boundary.
fn tail_chars(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Reads `path` from byte `offset` on, lossily as UTF-8.
/// The last `lines` lines of a log, indented, for error messages.
pub(crate) fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        return "    (empty)".to_string();
    }
    let indented: Vec<String> = tail.iter().map(|l| format!("    {l}")).collect();
    indented.join("\n")
}

/// A log file from `offset` on, as (lossy) text; empty when it cannot be read.
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Removes ANSI escape sequences (`ESC [ … letter`), in case the server
/// colours its logs anyway.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Finds the first complete line containing `listening on ADDR` and parses
/// ADDR (an optional `http://` prefix and trailing punctuation are ignored).
pub fn parse_listen_addr(log: &str) -> Option<SocketAddr> {
    // Only complete lines: a half-written line might hold half a port number.
    let complete = match log.rfind('\n') {
        Some(i) => &log[..=i],
        None => return None,
    };
    for line in complete.lines() {
        let line = strip_ansi(line);
        let Some(pos) = line.find(LISTENING_MARKER) else {
            continue;
        };
        let rest = line[pos + LISTENING_MARKER.len()..].trim_start();
        let rest = rest.strip_prefix("http://").unwrap_or(rest);
        let token: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        if let Ok(addr) = token.parse::<SocketAddr>() {
            return Some(addr);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_line() {
        let log = "2024-06-01T00:00:00Z  INFO changeagent_server: listening on 127.0.0.1:41234\n";
        assert_eq!(
            parse_listen_addr(log),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        let log = "\u{1b}[32m INFO\u{1b}[0m listening on http://127.0.0.1:5, node=1\n";
        assert_eq!(parse_listen_addr(log), Some("127.0.0.1:5".parse().unwrap()));
        let log = "INFO listening on addr=127.0.0.1:41234\n";
        assert_eq!(parse_listen_addr(log), None);
        // A half-written line is not trusted.
        assert_eq!(parse_listen_addr("listening on 127.0.0.1:412"), None);
    }
}
