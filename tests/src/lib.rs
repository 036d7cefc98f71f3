//! System-test harness: runs the real `changeagent-server` binary as a child
//! process on `127.0.0.1:0` in a temp dir, reads the bound address from its
//! log, and talks raw HTTP to it so tests can check exact bytes, statuses and
//! headers. Nothing here sleeps to synchronise: every wait polls observable
//! state against a deadline and reports the last state seen on timeout.
//!
//! # Layout
//! - [`ServerProcess`]: start, SIGKILL, SIGTERM and restart one server on a
//!   data dir that outlives its restarts; kills the process on drop.
//! - [`wait_until`] / [`wait_until_some`]: poll an async probe until it is
//!   satisfied or a deadline passes.
//! - [`Api`] and [`Reply`]: a thin reqwest wrapper that keeps the raw body.
//! - [`raw_changes`], [`change_ids`] and friends: read a `GET /changes` body
//!   without re-serialising the changes (so field order stays visible).
//! - [`cluster`]: several servers on their own loopback IPs forming one Raft
//!   cluster (by peers file or by join), with leader, kill and convergence
//!   helpers.
//! - [`proxy`]: a TCP proxy in front of a node that can cut traffic by source
//!   IP, so tests can partition a cluster.
//! - [`history`]: records what clients wrote and read, and checks the final
//!   lists of every node against it (no lost, duplicated or reordered write).

pub mod cluster;
pub mod history;
pub mod proxy;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tempfile::TempDir;

/// How long a server may take from spawn to logging its listen address. Debug
/// builds opening RocksDB on a loaded 2-core CI machine can take seconds.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long a SIGTERMed server may take to drain and exit.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// How long a fresh single node may take to elect itself leader.
pub const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// Interval between two looks at observable state while waiting. Short, so
/// waits end promptly; it is a polling period, never a synchronisation delay.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Upper bound on any single HTTP request from a test. Long-polls in the tests
/// block for at most 30 s, so anything longer is a hang worth failing on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The marker the server logs once it has bound its listener.
const LISTENING_MARKER: &str = "listening on ";

/// Environment variable overriding where the server binary is.
pub const SERVER_BIN_ENV: &str = "CHANGEAGENT_SERVER_BIN";

/// Path of the `changeagent-server` binary: `$CHANGEAGENT_SERVER_BIN`, else
/// next to the directory holding the test executable
/// (`target/debug/deps/<test>-<hash>` → `target/debug/changeagent-server`).
///
/// Panics if it does not exist: the test package does not depend on the
/// server crate, so cargo does not build it for us.
pub fn server_bin() -> PathBuf {
    let path = match std::env::var_os(SERVER_BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test executable has a parent dir");
            let profile = deps.parent().expect("deps dir has a parent dir");
            profile.join("changeagent-server")
        }
    };
    assert!(
        path.is_file(),
        "changeagent-server binary not found at {}: run `cargo build --workspace --bins` first \
         (or set {SERVER_BIN_ENV})",
        path.display()
    );
    path
}

/// How to start a server beyond the fixed `--listen 127.0.0.1:0 --data-dir …`.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `--listen` address; `None` is `127.0.0.1:0` (a new port on each start).
    /// A fixed address keeps the node reachable at the same place across
    /// restarts, as cluster peers need.
    pub listen: Option<SocketAddr>,
    /// Extra command-line arguments, appended after the fixed ones.
    pub args: Vec<String>,
    /// Extra environment variables for the child.
    pub env: Vec<(String, String)>,
}

impl ServerOptions {
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
}

/// One running (or stopped) `changeagent-server` process with its own temp
/// dir. The temp dir (data dir + log file) lives as long as this value, so a
/// restart reuses the same data. Dropping it SIGKILLs the process.
pub struct ServerProcess {
    /// The running child; `None` after [`kill9`](Self::kill9) or
    /// [`terminate`](Self::terminate) until [`restart`](Self::restart).
    child: Option<Child>,
    /// Owns `data/` and `server.log`; deleted when the harness is dropped.
    dir: TempDir,
    addr: SocketAddr,
    opts: ServerOptions,
    bin: PathBuf,
    /// Number of times the binary was spawned (1 after `start`).
    starts: u32,
    /// Length of the log file when the current process was spawned: the
    /// listen line is looked for after it.
    log_offset: u64,
}

impl ServerProcess {
    /// Starts the server in a new temp dir and waits (up to
    /// [`START_DEADLINE`]) until it logs its listen address.
    pub async fn start(opts: ServerOptions) -> ServerProcess {
        let mut server = Self::launch(opts);
        server.wait_started().await;
        server
    }

    /// Spawns the server in a new temp dir without waiting for it to log its
    /// listen address; call [`wait_started`](Self::wait_started) next. Cluster
    /// members need this: each logs `listening on` only once the cluster has
    /// a leader, which needs the other members running too.
    pub fn launch(opts: ServerOptions) -> ServerProcess {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("changeagent-systest-")
            .tempdir()
            .expect("create temp dir");
        let addr = opts
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut server = ServerProcess {
            child: None,
            dir,
            addr,
            opts,
            bin,
            starts: 0,
            log_offset: 0,
        };
        server.spawn_child();
        server
    }

    /// [`start`](Self::start), then wait until `/health` reports this single
    /// node as leader, so writes are accepted.
    pub async fn start_leader(opts: ServerOptions) -> ServerProcess {
        let server = Self::start(opts).await;
        server.wait_leader().await;
        server
    }

    /// Spawns the binary on the existing data dir and waits for its address.
    async fn spawn(&mut self) {
        self.spawn_child();
        self.wait_started().await;
    }

    /// Spawns the binary on the existing data dir; does not wait.
    fn spawn_child(&mut self) {
        assert!(self.child.is_none(), "server is still running");
        self.starts += 1;
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open server log");
        self.log_offset = log.seek(SeekFrom::End(0)).expect("seek server log");
        let stderr = log.try_clone().expect("clone log handle");
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
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .env("NO_COLOR", "1");
        // Flags also come from CHANGEAGENT_* variables; do not let the
        // environment the tests run in change what is being tested.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHANGEAGENT_") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Waits (up to [`START_DEADLINE`]) until the current process logs its
    /// listen address, and takes the address from there. Panics with the log
    /// if the process exits first or the deadline passes.
    pub async fn wait_started(&mut self) {
        let log_path = self.log_path();
        let offset = self.log_offset;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let fresh = read_from(&log_path, offset);
            if let Some(addr) = parse_listen_addr(&fresh) {
                self.addr = addr;
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "changeagent-server exited with {status} before logging `{LISTENING_MARKER}ADDR`; log:\n{}",
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "changeagent-server did not log `{LISTENING_MARKER}ADDR` within {START_DEADLINE:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (changes on restart unless
    /// [`ServerOptions::listen`] fixed the address).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address of the current process.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An HTTP client for the current process.
    pub fn api(&self) -> Api {
        Api::new(self.url())
    }

    /// The data dir passed as `--data-dir`; kept across restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Everything the process(es) wrote to stdout and stderr so far, across
    /// restarts.
    pub fn log(&self) -> String {
        read_from(&self.log_path(), 0)
    }

    /// Process id of the running child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is not running").id()
    }

    /// Whether a child is running (not yet killed or stopped by the harness).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL and reap the process. No chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("server is not running");
        // `Child::kill` sends SIGKILL on Unix.
        child.kill().expect("SIGKILL changeagent-server");
        child.wait().expect("reap changeagent-server");
    }

    /// SIGTERM and wait (up to [`STOP_DEADLINE`]) for the process to exit;
    /// returns its exit status. Panics with the log if it does not exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"));
        kill(pid, Signal::SIGTERM).expect("send SIGTERM");
        match self.exit_within(STOP_DEADLINE).await {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "changeagent-server did not exit within {STOP_DEADLINE:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Polls (up to `timeout`) for the process to exit; its status, or `None`
    /// if it is still running then.
    async fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        assert!(self.child.is_some(), "server is not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Starts the binary again on the same data dir (new port) after
    /// [`kill9`](Self::kill9) or [`terminate`](Self::terminate).
    pub async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs a stopped server: call kill9() or terminate() first"
        );
        self.spawn().await;
    }

    /// Spawns the binary again on the same data dir after [`kill9`](Self::kill9)
    /// or [`terminate`](Self::terminate), without waiting for it to serve (for
    /// a start that is expected to fail).
    pub fn relaunch(&mut self) {
        self.spawn_child();
    }

    /// Waits (up to `timeout`) for the process to exit on its own and returns
    /// its exit status; panics with the log if it is still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.exit_within(timeout).await {
            Some(status) => status,
            None => panic!(
                "changeagent-server still running {timeout:?} after it should have exited; log:\n{}",
                self.log()
            ),
        }
    }

    /// The exit status if the process has exited on its own (it is then
    /// reaped and no longer running); `None` while it runs.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// [`restart`](Self::restart), then wait until it is leader again.
    pub async fn restart_leader(&mut self) {
        self.restart().await;
        self.wait_leader().await;
    }

    /// Waits until `GET /health` answers 200 with `"role":"leader"`.
    pub async fn wait_leader(&self) {
        let api = self.api();
        wait_until(LEADER_DEADLINE, "single node becomes leader", || {
            let api = api.clone();
            async move {
                match api.try_get("/health").await {
                    Ok(r) if r.status == 200 => {
                        let v: Value = serde_json::from_slice(&r.body)
                            .map_err(|e| format!("/health is not JSON ({e}): {}", r.text()))?;
                        if v["role"] == "leader" {
                            Ok(())
                        } else {
                            Err(format!("/health: {v}"))
                        }
                    }
                    Ok(r) => Err(format!("/health: {} {}", r.status, r.text())),
                    Err(e) => Err(format!("/health: {e}")),
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.log()));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail = tail_chars(&log, 16 * 1024);
            eprintln!(
                "---- changeagent-server {} log ({} start(s), {}) ----\n{tail}\n---- end of log ----",
                self.addr,
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
fn read_from(path: &Path, offset: u64) -> String {
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

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Ok(value)` or
/// `timeout` passes. `Err(state)` means "not yet" and carries the state seen,
/// so a timeout reports what the system looked like last:
///
/// ```ignore
/// let n = wait_until(Duration::from_secs(10), "lastIndex reaches 5", || async {
///     let n = api.last_index().await;
///     if n >= 5 { Ok(n) } else { Err(format!("lastIndex {n}")) }
/// }).await.unwrap();
/// ```
pub async fn wait_until<T, S, F, Fut>(
    timeout: Duration,
    what: &str,
    mut probe: F,
) -> Result<T, String>
where
    S: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut polls = 0u64;
    loop {
        polls += 1;
        match probe().await {
            Ok(v) => return Ok(v),
            Err(state) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "timed out after {:?} ({polls} polls) waiting until {what}; last state seen: {state:?}",
                        start.elapsed()
                    ));
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`wait_until`] for probes answering `Option<T>`: `None` means "not yet".
/// Panics on timeout (there is no richer state to report than `None`; use
/// [`wait_until`] when there is).
pub async fn wait_until_some<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until(timeout, what, || {
        let fut = probe();
        async move { fut.await.ok_or("None") }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// One HTTP answer with its raw body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Panics unless the status is `want`, showing the body.
    #[track_caller]
    pub fn expect_status(&self, want: u16) -> &Self {
        assert_eq!(
            self.status,
            want,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }

    /// Asserts status 200 and returns the JSON body.
    #[track_caller]
    pub fn ok_json(&self) -> Value {
        self.expect_status(200);
        self.json()
    }

    /// The URL in a `Link: <URL>; rel="next"` header, if any.
    pub fn link_next(&self) -> Option<String> {
        let link = self.header("link")?;
        for part in link.split(',') {
            let part = part.trim();
            if !part.contains("rel=\"next\"") && !part.contains("rel=next") {
                continue;
            }
            let start = part.find('<')?;
            let end = part[start..].find('>')? + start;
            return Some(part[start + 1..end].to_string());
        }
        None
    }
}

/// A small HTTP client bound to one server URL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    /// A client for `base` (`http://host:port`), ignoring any proxy settings.
    pub fn new(base: impl Into<String>) -> Api {
        Self::with_timeout(base, REQUEST_TIMEOUT)
    }

    /// [`new`](Self::new) with a shorter per-request timeout, for clients that
    /// must notice a hung node and try another (fault tests).
    pub fn with_timeout(base: impl Into<String>, timeout: Duration) -> Api {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .expect("build reqwest client");
        Api {
            client,
            base: base.into(),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Resolves `path_or_url`: absolute URLs are kept, paths are appended to
    /// the base URL.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    /// Sends any request; transport errors are returned, not panicked on.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = self.client.request(method, self.url(path));
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends any request; panics on transport errors.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_request(method, path, content_type, body, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET`, returning transport errors.
    pub async fn try_get(&self, path: &str) -> Result<Reply, reqwest::Error> {
        self.try_request("GET", path, None, None, &[]).await
    }

    /// `GET`; panics on transport errors.
    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None, None, &[]).await
    }

    /// `POST` a JSON body (given as text, sent byte for byte) with
    /// `Content-Type: application/json`, returning transport errors.
    pub async fn try_post_json(&self, path: &str, body: &str) -> Result<Reply, reqwest::Error> {
        self.try_request(
            "POST",
            path,
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &[],
        )
        .await
    }

    /// `POST` a JSON body with `Content-Type: application/json`.
    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        self.request(
            "POST",
            path,
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &[],
        )
        .await
    }

    /// `PUT` a JSON body with `Content-Type: application/json`.
    pub async fn put_json(&self, path: &str, body: &str) -> Reply {
        self.request(
            "PUT",
            path,
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &[],
        )
        .await
    }

    /// `DELETE`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.request("DELETE", path, None, None, &[]).await
    }

    /// `POST /changes` with `body`; asserts 200 and returns the new `_id`.
    pub async fn post_change(&self, body: &str) -> u64 {
        let r = self.post_json("/changes", body).await;
        assert_eq!(r.status, 200, "POST /changes {body}: {}", r.text());
        posted_id(&r.json())
    }

    /// `lastIndex` as reported by `GET /changes`.
    pub async fn last_index(&self) -> u64 {
        let r = self.get("/changes?limit=1").await;
        let v = r.ok_json();
        v["lastIndex"]
            .as_u64()
            .unwrap_or_else(|| panic!("no numeric lastIndex in {v}"))
    }

    /// Every change matching `query` (e.g. `"tag=x"`, may be empty), read in
    /// pages of 1000 by following `since`. Returns the raw JSON text of each.
    pub async fn all_raw_changes(&self, query: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut since = 0u64;
        loop {
            let sep = if query.is_empty() { "" } else { "&" };
            let r = self
                .get(&format!("/changes?since={since}&limit=1000{sep}{query}"))
                .await;
            r.expect_status(200);
            let page = raw_changes(&r.body);
            let at_end = r.json()["atEnd"].as_bool().expect("atEnd is a bool");
            if let Some(last) = page.last() {
                since = change_id(last);
            }
            let empty = page.is_empty();
            out.extend(page);
            if at_end || empty {
                return out;
            }
        }
    }
}

/// The `_id` in a `{"_id": N}` answer.
#[track_caller]
pub fn posted_id(v: &Value) -> u64 {
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric _id in {v}"))
}

#[derive(Deserialize)]
struct RawChangeList<'a> {
    #[serde(borrow)]
    changes: Vec<&'a RawValue>,
}

/// The changes of a `GET /changes` body, each as the exact JSON text the
/// server sent (no re-serialisation, so field order and spacing are kept).
#[track_caller]
pub fn raw_changes(body: &[u8]) -> Vec<String> {
    let list: RawChangeList<'_> = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not a change list ({e}): {}", String::from_utf8_lossy(body)));
    list.changes.iter().map(|c| c.get().to_string()).collect()
}

/// The `_id` of one change given as JSON text.
#[track_caller]
pub fn change_id(raw: &str) -> u64 {
    let v: Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("bad change JSON ({e}): {raw}"));
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("change without numeric _id: {raw}"))
}

/// The `_ts` of one change given as JSON text.
#[track_caller]
pub fn change_ts(raw: &str) -> i64 {
    let v: Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("bad change JSON ({e}): {raw}"));
    v["_ts"]
        .as_i64()
        .unwrap_or_else(|| panic!("change without numeric _ts: {raw}"))
}

/// The `_id`s of the changes in a `GET /changes` body.
#[track_caller]
pub fn change_ids(body: &[u8]) -> Vec<u64> {
    raw_changes(body).iter().map(|c| change_id(c)).collect()
}

/// The `data` of each change (parsed) keyed by `_id`.
pub fn data_by_id(raws: &[String]) -> BTreeMap<u64, Value> {
    raws.iter()
        .map(|raw| {
            let v: Value = serde_json::from_str(raw).expect("change JSON");
            (
                change_id(raw),
                v.get("data").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Formats nanoseconds since the epoch as RFC 3339 in UTC with full
/// sub-second precision, e.g. `2024-06-01T12:00:41.291100178Z`.
pub fn rfc3339_from_nanos(nanos: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .expect("timestamp in range");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format RFC 3339")
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

    #[test]
    fn link_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "link",
            "</changes?since=10&limit=10&tag=x>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        let r = Reply {
            status: 200,
            headers,
            body: Vec::new(),
        };
        assert_eq!(
            r.link_next().as_deref(),
            Some("/changes?since=10&limit=10&tag=x")
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            rfc3339_from_nanos(1_464_805_241_291_100_178),
            "2016-06-01T18:20:41.291100178Z"
        );
    }

    #[test]
    fn raw_changes_keep_bytes() {
        let body = br#"{"changes":[{"_id":1,"_ts":5,"data":{"b":1,"a":[1,2]}}],"atStart":true}"#;
        assert_eq!(
            raw_changes(body),
            vec![r#"{"_id":1,"_ts":5,"data":{"b":1,"a":[1,2]}}"#.to_string()]
        );
    }
}
