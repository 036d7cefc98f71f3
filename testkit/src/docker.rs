//! Containers from the outside, through the `docker` CLI: the container of a compose service
//! found by its labels (compose v1 and v2 set the same ones), its state, networks and
//! environment, files copied out of it, and the faults a chaos run drives (kill, start,
//! pause, network disconnect and connect, restart, stop), done the way an operator would.
//! Only the fallible `try_…` forms exist: a run that injects faults must put them back
//! after a failure rather than panic.

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::error::{Error, Result};

/// Longest an ordinary `docker` command may take: the daemon answers in well under a
/// second, a loaded host within seconds; one that takes this long is hung.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `docker ARGS` within `timeout` and returns its output when it exits 0; the process
/// is killed when the timeout passes.
async fn run(args: &[&str], timeout: Duration) -> Result<Output> {
    let command = args.join(" ");
    let failed = |outcome: String| Error::Docker {
        command: command.clone(),
        outcome,
        stderr: String::new(),
    };
    let child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropped by the timeout below: the process must not outlive the wait.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(format!("could not run it: {e}")))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => return Err(failed(format!("timed out after {timeout:?}"))),
        Ok(Err(e)) => return Err(failed(format!("could not run it: {e}"))),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Docker {
            command,
            outcome: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `docker ARGS` within [`DOCKER_TIMEOUT`]; its stdout, trimmed.
pub async fn try_docker(args: &[&str]) -> Result<String> {
    let out = run(args, DOCKER_TIMEOUT).await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The Docker daemon's version when `docker info` answers; otherwise why not, for a
/// "skipped" line.
pub async fn daemon_version() -> std::result::Result<String, String> {
    try_docker(&["info", "--format", "{{.ServerVersion}}"])
        .await
        .map_err(|e| e.to_string())
}

/// The compose command installed here: `docker compose` (v2) or `docker-compose` (v1);
/// `None` when neither answers `version`.
pub async fn compose_command() -> Option<Vec<String>> {
    let candidates: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    for candidate in candidates {
        let answered = Command::new(candidate[0])
            .args(&candidate[1..])
            .arg("version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if answered {
            return Some(candidate.iter().map(|s| s.to_string()).collect());
        }
    }
    None
}

/// The id of the container of compose service `service` in project `project`, running or
/// not (`docker ps -a` by the labels every compose version sets, one-off `run` containers
/// left out); `None` when there is none.
pub async fn try_compose_container(project: &str, service: &str) -> Result<Option<String>> {
    let project = format!("label=com.docker.compose.project={project}");
    let service = format!("label=com.docker.compose.service={service}");
    let ids = try_docker(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &project,
        "--filter",
        &service,
        "--filter",
        "label=com.docker.compose.oneoff=False",
        "-q",
    ])
    .await?;
    Ok(ids.lines().next().map(str::to_string))
}

/// What `docker inspect` says of a container's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    /// `created`, `running`, `paused`, `restarting`, `exited` or `dead`.
    pub status: String,
    pub running: bool,
    pub paused: bool,
    /// The exit code of its last run (0 while it runs).
    pub exit_code: i64,
    /// Its health check's verdict; `None` without a health check.
    #[serde(default)]
    pub health: Option<HealthState>,
}

/// The health part of [`ContainerState`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthState {
    /// `starting`, `healthy` or `unhealthy`.
    pub status: String,
}

impl ContainerState {
    /// Running, not paused, and healthy when it has a health check.
    pub fn is_healthy(&self) -> bool {
        self.running && !self.paused && self.health.as_ref().is_none_or(|h| h.status == "healthy")
    }

    /// `running/healthy`, `paused`, `exited (137)`.
    pub fn describe(&self) -> String {
        match (&self.status[..], &self.health) {
            ("exited" | "dead", _) => format!("{} ({})", self.status, self.exit_code),
            ("running", Some(h)) => format!("running/{}", h.status),
            (status, _) => status.to_string(),
        }
    }
}

/// The state of container `id`.
pub async fn try_state(id: &str) -> Result<ContainerState> {
    let json = try_docker(&["inspect", "-f", "{{json .State}}", id]).await?;
    serde_json::from_str(&json).map_err(|e| not_understood("inspect .State", id, &json, e))
}

/// The networks container `id` is connected to, by name.
pub async fn try_networks(id: &str) -> Result<Vec<String>> {
    let json = try_docker(&["inspect", "-f", "{{json .NetworkSettings.Networks}}", id]).await?;
    let map: Option<BTreeMap<String, serde_json::Value>> = serde_json::from_str(&json)
        .map_err(|e| not_understood("inspect .NetworkSettings.Networks", id, &json, e))?;
    Ok(map.unwrap_or_default().into_keys().collect())
}

/// The value of environment variable `name` in container `id`'s configuration.
pub async fn try_env(id: &str, name: &str) -> Result<Option<String>> {
    let json = try_docker(&["inspect", "-f", "{{json .Config.Env}}", id]).await?;
    let vars: Option<Vec<String>> = serde_json::from_str(&json)
        .map_err(|e| not_understood("inspect .Config.Env", id, &json, e))?;
    let prefix = format!("{name}=");
    Ok(vars
        .unwrap_or_default()
        .iter()
        .find_map(|v| v.strip_prefix(&prefix).map(str::to_string)))
}

/// An [`Error::Docker`] for an answer that is not the JSON expected.
fn not_understood(what: &str, id: &str, answer: &str, e: serde_json::Error) -> Error {
    Error::Docker {
        command: format!("{what} {id}"),
        outcome: format!("unexpected answer ({e})"),
        stderr: answer.chars().take(300).collect(),
    }
}

/// `docker kill` (SIGKILL).
pub async fn try_kill(id: &str) -> Result<()> {
    try_docker(&["kill", id]).await.map(drop)
}

/// `docker start`; a running container is left as it is.
pub async fn try_start(id: &str) -> Result<()> {
    try_docker(&["start", id]).await.map(drop)
}

/// How often [`try_pause`] asks again after the freezer gave up.
const PAUSE_ATTEMPTS: u32 = 5;

/// `docker pause`: every process of the container frozen (cgroup freezer). With cgroup v1
/// the freezer gives up on a container whose processes keep it from settling (one busy in
/// the kernel, such as an `fsync` on a loaded disk): runc thaws it again and Docker answers
/// "unable to freeze", leaving it running. That is asked again, up to [`PAUSE_ATTEMPTS`]
/// times in all, as an operator would.
pub async fn try_pause(id: &str) -> Result<()> {
    let mut attempt = 1;
    loop {
        match try_docker(&["pause", id]).await {
            Ok(_) => return Ok(()),
            Err(Error::Docker { ref stderr, .. })
                if stderr.contains("unable to freeze") && attempt < PAUSE_ATTEMPTS =>
            {
                eprintln!("docker pause {id}: the freezer gave up (attempt {attempt}); again");
                attempt += 1;
                // A pace between attempts, not a synchronisation: the load that kept the
                // freezer from settling may pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `docker unpause`.
pub async fn try_unpause(id: &str) -> Result<()> {
    try_docker(&["unpause", id]).await.map(drop)
}

/// `docker restart -t GRACE`: SIGTERM, SIGKILL after `grace`, then start.
pub async fn try_restart(id: &str, grace: Duration) -> Result<()> {
    let secs = grace.as_secs().to_string();
    run(&["restart", "-t", &secs, id], grace + DOCKER_TIMEOUT)
        .await
        .map(drop)
}

/// `docker stop -t GRACE`: SIGTERM, SIGKILL after `grace`; returns once it has exited.
pub async fn try_stop(id: &str, grace: Duration) -> Result<()> {
    let secs = grace.as_secs().to_string();
    run(&["stop", "-t", &secs, id], grace + DOCKER_TIMEOUT)
        .await
        .map(drop)
}

/// `docker network disconnect NET ID`: the container loses every address on that network.
pub async fn try_network_disconnect(network: &str, id: &str) -> Result<()> {
    try_docker(&["network", "disconnect", network, id])
        .await
        .map(drop)
}

/// `docker network connect --alias ALIAS NET ID`. The alias is what other containers
/// resolve (compose gives each container its service name as one), so it must be given
/// again on a reconnect.
pub async fn try_network_connect(network: &str, id: &str, alias: &str) -> Result<()> {
    try_docker(&["network", "connect", "--alias", alias, network, id])
        .await
        .map(drop)
}

/// The last `lines` lines a container printed: (stdout, stderr).
pub async fn try_logs(id: &str, lines: usize) -> Result<(String, String)> {
    let tail = lines.to_string();
    let out = run(&["logs", "--tail", &tail, id], DOCKER_TIMEOUT).await?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The contents of file `path` in container `id` (running or not), by `docker cp ID:PATH -`.
pub async fn try_copy_file_out(id: &str, path: &str) -> Result<Vec<u8>> {
    let from = format!("{id}:{path}");
    let out = run(&["cp", &from, "-"], DOCKER_TIMEOUT).await?;
    first_file_in_tar(&out.stdout).ok_or_else(|| Error::Docker {
        command: format!("cp {from} -"),
        outcome: "unexpected answer".to_string(),
        stderr: format!(
            "no regular file in the {} bytes of tar it wrote",
            out.stdout.len()
        ),
    })
}

/// Size of a tar header and the unit its entries are padded to.
const TAR_BLOCK: usize = 512;

/// The contents of the first regular file in a tar stream (what `docker cp ID:FILE -`
/// writes: the file, perhaps after a PAX header entry); `None` when there is none or the
/// stream is cut short.
pub fn first_file_in_tar(tar: &[u8]) -> Option<Vec<u8>> {
    let mut at = 0;
    while at + TAR_BLOCK <= tar.len() {
        let header = &tar[at..at + TAR_BLOCK];
        if header.iter().all(|&b| b == 0) {
            return None;
        }
        let size = usize::try_from(octal(&header[124..136])?).ok()?;
        let start = at + TAR_BLOCK;
        let end = start.checked_add(size)?;
        if end > tar.len() {
            return None;
        }
        // `0` (or NUL in old archives) is a regular file; anything else is skipped.
        if matches!(header[156], b'0' | 0) {
            return Some(tar[start..end].to_vec());
        }
        at = start + size.div_ceil(TAR_BLOCK) * TAR_BLOCK;
    }
    None
}

/// A tar number field: octal digits, padded with spaces or NULs.
fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry: header with `name`, `size` and `kind`, then the padded contents.
    fn entry(name: &str, kind: u8, contents: &[u8]) -> Vec<u8> {
        let mut header = vec![0u8; TAR_BLOCK];
        header[..name.len()].copy_from_slice(name.as_bytes());
        let size = format!("{:011o}\0", contents.len());
        header[124..136].copy_from_slice(size.as_bytes());
        header[156] = kind;
        let mut out = header;
        out.extend_from_slice(contents);
        out.resize(out.len().div_ceil(TAR_BLOCK) * TAR_BLOCK, 0);
        out
    }

    #[test]
    fn the_first_regular_file_is_found_after_a_pax_header() {
        let report = br#"{"ok":true}"#;
        let mut tar = entry(
            "PaxHeaders/report",
            b'x',
            b"30 mtime=1700000000.123456789\n",
        );
        tar.extend(entry("fleet-report.json", b'0', report));
        tar.extend(vec![0u8; 2 * TAR_BLOCK]);
        assert_eq!(first_file_in_tar(&tar).as_deref(), Some(&report[..]));
    }

    #[test]
    fn a_cut_or_empty_tar_has_no_file() {
        let tar = entry("fleet-report.json", b'0', &[b'x'; 600]);
        assert_eq!(first_file_in_tar(&tar[..TAR_BLOCK + 100]), None);
        assert_eq!(first_file_in_tar(&[0u8; 2 * TAR_BLOCK]), None);
        assert_eq!(first_file_in_tar(&entry("dir", b'5', b"")), None);
        assert_eq!(first_file_in_tar(b"short"), None);
    }

    #[test]
    fn states_read_from_inspect() {
        let json = r#"{"Status":"running","Running":true,"Paused":false,"Restarting":false,
            "OOMKilled":false,"Dead":false,"Pid":42,"ExitCode":0,"Error":"",
            "StartedAt":"2024-01-01T00:00:00Z","FinishedAt":"0001-01-01T00:00:00Z",
            "Health":{"Status":"starting","FailingStreak":0,"Log":[]}}"#;
        let mut s: ContainerState = serde_json::from_str(json).unwrap();
        assert!(!s.is_healthy());
        assert_eq!(s.describe(), "running/starting");
        s.health = Some(HealthState {
            status: "healthy".into(),
        });
        assert!(s.is_healthy());
        s.paused = true;
        s.status = "paused".into();
        assert!(!s.is_healthy());
        assert_eq!(s.describe(), "paused");

        let json = r#"{"Status":"exited","Running":false,"Paused":false,"ExitCode":2}"#;
        let s: ContainerState = serde_json::from_str(json).unwrap();
        assert!(!s.is_healthy());
        assert_eq!(s.describe(), "exited (2)");
    }
}
