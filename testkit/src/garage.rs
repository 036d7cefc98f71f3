//! A real S3-compatible object store for one test: a single-node Garage
//! server (installed by `scripts/install-garage`) in a temp dir, holding one
//! bucket that one access key may read, write and own, with the settings the
//! `object_store` crate, or a child process reading `AWS_*`, needs to reach it.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, OrPanic, Result};
use crate::http::Api;
use crate::process::LOG_TAIL_LINES;
use crate::tools::Tool;
use crate::wait::wait_until;

/// The Garage release `scripts/install-garage` installs and this module
/// speaks to (its config keys and `server --single-node` flags). A test
/// checks that the script pins the same one.
pub const GARAGE_VERSION: &str = "2.5.0";

/// Overrides where the `garage` binary is.
pub const GARAGE_BIN_ENV: &str = "CHANGEAGENT_GARAGE_BIN";

pub use crate::tools::TOOLS_DIR_ENV;

/// Garage as `scripts/install-garage` installs it.
pub const GARAGE: Tool = Tool {
    name: "garage",
    version: GARAGE_VERSION,
    bin_env: GARAGE_BIN_ENV,
    script: "install-garage",
};

/// The S3 region Garage is configured with; requests must be signed for it.
pub const REGION: &str = "garage";

/// The bucket every server starts with.
pub const BUCKET: &str = "changeagent-test";

/// The access key every server starts with (fixed, so a failed test's
/// settings can be reused by hand), shaped like the keys Garage generates
/// (`GK` and 24 hex digits); it imports any of 8 or more characters.
pub const ACCESS_KEY_ID: &str = "GKc4a9e0d5b1f2a3c4d5e6f708";

/// The secret of [`ACCESS_KEY_ID`] (at least 16 characters for Garage).
pub const SECRET_ACCESS_KEY: &str =
    "5ec7e7000000000000000000000000000000000000000000000000000000c4a9";

/// Secret of Garage's internal RPC (32 bytes in hex); no other node ever
/// connects, but Garage requires one.
const RPC_SECRET: &str = "0c4a9e0d5b1f2a3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4";

/// How long a fresh server may take to serve S3 requests: it creates its
/// SQLite metadata, applies the single-node layout, the key and the bucket
/// before it binds; well under a second when idle, seconds on a loaded
/// 2-core machine.
pub const GARAGE_START_DEADLINE: Duration = Duration::from_secs(60);

/// Timeout of one readiness probe request, so a listener that accepts but
/// never answers does not stall the wait past its deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Garage cannot bind port 0 and report the port, so free ports are picked
/// here and released before it binds them; another process may take one in
/// between. A start that loses that race is retried on new ports this many
/// times in all.
const PORT_ATTEMPTS: u32 = 3;

/// What Garage logs when a port it was given is taken: the OS error's text.
const PORT_TAKEN: &str = "Address already in use";

/// How much of the log a panicking test prints when it drops the server.
const PANIC_LOG_BYTES: usize = 16 * 1024;

/// How a start ended, short of an error.
enum Started {
    /// Both APIs answer.
    Serving,
    /// A port picked for the server was taken before it bound it.
    PortTaken,
}

/// One running `garage server` with its config, metadata, data and log in a
/// temp dir. Dropping it SIGKILLs the server and removes the dir.
///
/// [`try_start`](Self::try_start) returns an [`Error`] quoting the end of
/// the log; [`start`](Self::start) panics with it, for tests.
pub struct GarageServer {
    /// The server; killed and reaped in `drop`, before the temp dir goes.
    child: Child,
    /// Holds `garage.toml`, `meta/`, `data/` and `garage.log`; removed when
    /// this is dropped (after the kill in `drop`).
    temp: TempDir,
    /// The located binary.
    bin: PathBuf,
    /// The S3 API.
    s3: SocketAddr,
    /// The admin API (for `GET /health`).
    admin: SocketAddr,
}

impl GarageServer {
    /// Starts a server and waits (up to [`GARAGE_START_DEADLINE`]) until it
    /// serves S3 requests, with [`BUCKET`] and [`ACCESS_KEY_ID`] in place.
    /// Fails when the binary is missing (saying how to install it), when the
    /// server exits or when it does not answer in time (quoting its log,
    /// and leaving its dir in place).
    pub async fn try_start() -> Result<GarageServer> {
        let bin = locate(std::env::var_os(GARAGE_BIN_ENV), &default_bin())?;
        let mut attempt = 1;
        loop {
            let mut server = Self::launch(bin.clone())?;
            let failed = match server.wait_ready().await {
                Ok(Started::Serving) => return Ok(server),
                Ok(Started::PortTaken) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    continue;
                }
                Ok(Started::PortTaken) => Error::Io {
                    action: "starting garage: a port picked for it was taken on every attempt; see",
                    path: server.log_path(),
                    cause: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("the end of the log:\n{}", server.log_tail(LOG_TAIL_LINES)),
                    ),
                },
                Err(e) => e,
            };
            // The error names the log: keep it, and the config, for a look.
            server.temp.disable_cleanup(true);
            return Err(failed);
        }
    }

    /// Writes the config and spawns `garage server` on new free ports.
    fn launch(bin: PathBuf) -> Result<GarageServer> {
        let temp = tempfile::Builder::new()
            .prefix("changeagent-garage-")
            .tempdir()
            .map_err(Error::io("creating a temp dir in", std::env::temp_dir()))?;
        let [s3, admin, rpc] = free_ports()?;
        let config = config_text(temp.path(), s3, admin, rpc);
        let config_path = temp.path().join("garage.toml");
        std::fs::write(&config_path, config).map_err(Error::io("writing", &config_path))?;

        let log_path = temp.path().join("garage.log");
        let log = File::create(&log_path).map_err(Error::io("creating", &log_path))?;
        let stderr = log
            .try_clone()
            .map_err(Error::io("duplicating the handle of", &log_path))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config_path)
            .args(["server", "--single-node", "--default-bucket"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        // Garage reads secrets, its config path and the RPC host from GARAGE_*
        // variables; only the config written here may apply.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GARAGE_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY_ID)
            .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_ACCESS_KEY)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=info")
            .env("NO_COLOR", "1");
        let child = cmd.spawn().map_err(Error::io("starting", &bin))?;
        Ok(GarageServer {
            child,
            temp,
            bin,
            s3: SocketAddr::from((Ipv4Addr::LOCALHOST, s3)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, admin)),
        })
    }

    /// Waits until the admin API reports the cluster healthy and the S3 API
    /// answers HTTP. Garage sets up the layout, key and bucket before it
    /// starts either API, so both answering means all three are in place.
    /// An API that cannot bind its port does not stop Garage (it logs the
    /// error and runs on without it), so the log is watched for that too.
    async fn wait_ready(&mut self) -> Result<Started> {
        /// What one poll saw.
        enum Seen {
            Started(Started),
            Exited(ExitStatus),
        }
        let admin = Api::with_timeout(format!("http://{}", self.admin), PROBE_TIMEOUT);
        let s3 = Api::with_timeout(self.endpoint(), PROBE_TIMEOUT);
        let what = format!(
            "{} answers GET /health on its admin API with 200, and S3 requests",
            self.label()
        );
        let log_path = self.log_path();
        let child = &mut self.child;
        let seen = wait_until(GARAGE_START_DEADLINE, &what, || {
            let exited = child.try_wait();
            let port_taken = crate::process::read_from(&log_path, 0).contains(PORT_TAKEN);
            let (admin, s3) = (admin.clone(), s3.clone());
            async move {
                match exited {
                    Ok(Some(status)) => return Ok(Seen::Exited(status)),
                    Ok(None) => {}
                    Err(e) => return Err(format!("checking on the process: {e}")),
                }
                if port_taken {
                    return Ok(Seen::Started(Started::PortTaken));
                }
                let health = match admin.try_get("/health").await {
                    Ok(reply) if reply.status == 200 => None,
                    Ok(reply) => Some(format!("/health {}: {}", reply.status, reply.text().trim())),
                    Err(e) => Some(format!("/health: {}", causes(&e))),
                };
                // Unsigned, so 403 is the expected answer: any answer will do.
                let s3 = s3
                    .try_get("/")
                    .await
                    .err()
                    .map(|e| format!("S3: {}", causes(&e)));
                match (health, s3) {
                    (None, None) => Ok(Seen::Started(Started::Serving)),
                    (h, s) => Err(h.into_iter().chain(s).collect::<Vec<_>>().join("; ")),
                }
            }
        })
        .await;
        match seen {
            // Another process on a picked port may have answered just before
            // Garage logged that it could not bind it.
            Ok(Seen::Started(Started::Serving)) if self.log().contains(PORT_TAKEN) => {
                Ok(Started::PortTaken)
            }
            Ok(Seen::Started(started)) => Ok(started),
            Ok(Seen::Exited(status)) => Err(Error::ExitedEarly {
                process: self.label(),
                status,
                log: self.log_path(),
                tail: self.log_tail(LOG_TAIL_LINES),
            }),
            Err(Error::Timeout {
                what,
                waited,
                polls,
                last,
            }) => Err(Error::Timeout {
                what,
                waited,
                polls,
                last: format!(
                    "{last}; the end of its log {}:\n{}",
                    self.log_path().display(),
                    self.log_tail(LOG_TAIL_LINES)
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// What messages call this server.
    pub fn label(&self) -> String {
        format!("garage (S3 on {})", self.s3)
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT` (path-style requests).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3)
    }

    /// The S3 API's address.
    pub fn s3_addr(&self) -> SocketAddr {
        self.s3
    }

    /// The region requests must be signed for, [`REGION`].
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// [`ACCESS_KEY_ID`], which may read, write and own [`bucket`](Self::bucket).
    pub fn access_key_id(&self) -> &'static str {
        ACCESS_KEY_ID
    }

    /// [`SECRET_ACCESS_KEY`].
    pub fn secret_access_key(&self) -> &'static str {
        SECRET_ACCESS_KEY
    }

    /// The bucket, [`BUCKET`], empty at start.
    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    /// `s3://BUCKET/PREFIX`, the form object stores are named by (a leading
    /// `/` of `prefix` is dropped).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{}", prefix.trim_start_matches('/'))
    }

    /// The variables a process needs for `object_store`'s
    /// `AmazonS3Builder::from_env()` to reach this server: key, region,
    /// endpoint, plain HTTP, path-style requests and the bucket. Other
    /// `AWS_*` variables a child inherits (a session token, a profile) would
    /// apply too; a child that must not see them should not inherit them.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            // Path-style (`http://127.0.0.1:PORT/BUCKET/KEY`): the bucket
            // cannot be a subdomain of an IP address.
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".to_string()),
            ("AWS_BUCKET", BUCKET.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The located binary this server runs.
    pub fn bin_path(&self) -> &Path {
        &self.bin
    }

    /// The directory holding config, metadata, data and log.
    pub fn dir(&self) -> &Path {
        self.temp.path()
    }

    /// The log file: the server's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("garage.log")
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        crate::process::read_from(&self.log_path(), 0)
    }

    /// The last `lines` lines of the log, indented, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::tail_of(&self.log(), lines)
    }
}

/// The panicking face of [`GarageServer`], for tests.
impl GarageServer {
    /// See [`try_start`](Self::try_start).
    pub async fn start() -> GarageServer {
        Self::try_start().await.or_panic()
    }
}

impl Drop for GarageServer {
    fn drop(&mut self) {
        // Best effort: the process may already have exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(PANIC_LOG_BYTES);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "---- {} log ({}) ----\n{}\n---- end of log ----",
                self.label(),
                self.log_path().display(),
                &log[start..]
            );
        }
    }
}

/// An error with its causes, as `reqwest`'s own message leaves them out
/// (`error sending request …: connection refused`).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Where `scripts/install-garage` puts the binary (see [`Tool::default_bin`]).
pub fn default_bin() -> PathBuf {
    GARAGE.default_bin()
}

/// The binary to run: `from_env` (the value of [`GARAGE_BIN_ENV`]) when set,
/// else `default`; an error saying how to install it when that file is
/// missing.
fn locate(from_env: Option<OsString>, default: &Path) -> Result<PathBuf> {
    GARAGE
        .locate_in(from_env, default)
        .map_err(|how| Error::Io {
            action: "finding",
            path: PathBuf::from("the garage binary"),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, how),
        })
}

/// Three distinct ports free on 127.0.0.1 now (all bound at once, then
/// released): S3, admin and RPC.
fn free_ports() -> Result<[u16; 3]> {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(Error::io("binding port 0 on", "127.0.0.1"))
    };
    let listeners = [bind()?, bind()?, bind()?];
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(Error::io("reading the bound address on", "127.0.0.1"))?
            .port();
    }
    Ok(ports)
}

/// Garage's config: one node, replication factor 1, SQLite metadata, S3
/// and admin APIs on loopback; no web or K2V endpoints.
fn config_text(dir: &Path, s3: u16, admin: u16, rpc: u16) -> String {
    let meta = toml_string(&dir.join("meta"));
    let data = toml_string(&dir.join("data"));
    format!(
        r#"metadata_dir = {meta}
data_dir = {data}
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{RPC_SECRET}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#
    )
}

/// `path` as a TOML basic string (quotes and backslashes escaped).
fn toml_string(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_script_pins_this_version() {
        let script = include_str!("../../scripts/install-garage");
        let pin = format!("GARAGE_VERSION=\"{GARAGE_VERSION}\"");
        assert!(
            script.lines().any(|l| l.trim() == pin),
            "scripts/install-garage must pin {pin}"
        );
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let default = Path::new("/nonexistent/garage-x/bin/garage");
        let text = locate(None, default).unwrap_err().to_string();
        assert!(text.contains("run scripts/install-garage"), "{text}");
        assert!(text.contains(GARAGE_BIN_ENV), "{text}");
        assert!(text.contains("/nonexistent/garage-x/bin/garage"), "{text}");

        let text = locate(Some("/nonexistent/other".into()), default)
            .unwrap_err()
            .to_string();
        assert!(text.contains(GARAGE_BIN_ENV), "{text}");
        assert!(text.contains("/nonexistent/other"), "{text}");
    }

    #[test]
    fn the_default_binary_is_where_the_script_installs_it() {
        let bin = default_bin();
        assert!(
            bin.ends_with(format!("garage-{GARAGE_VERSION}/bin/garage")),
            "{}",
            bin.display()
        );
    }

    #[test]
    fn config_paths_are_quoted_for_toml() {
        assert_eq!(toml_string(Path::new("/a\"b\\c")), r#""/a\"b\\c""#);
        let text = config_text(Path::new("/d"), 1, 2, 3);
        assert!(text.contains("metadata_dir = \"/d/meta\""), "{text}");
        assert!(text.contains("api_bind_addr = \"127.0.0.1:1\""), "{text}");
        assert!(text.contains("rpc_bind_addr = \"127.0.0.1:3\""), "{text}");
    }
}
