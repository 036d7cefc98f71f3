//! The open-file limit: each long-poll is a socket in this process and one in
//! the server. The benchmark raises its own soft limit to the hard one (the
//! servers it starts inherit it), then checks that it suffices and that a
//! given server's does.

use anyhow::{bail, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Files this process needs besides one socket per long-poll (stdio, the
/// runtime, the metrics and post connections, the logs of the processes it
/// starts).
pub const HEADROOM: u64 = 64;

/// Raises this process's soft open-file limit to its hard limit; returns the
/// soft limit now in force (`None` when it cannot be read). Processes
/// started afterwards inherit it.
pub fn raise() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// Raises this process's limit, then fails, with the fix, when it cannot
/// open `sockets` sockets; warns when the server's limit (if `pid` is given)
/// looks too low.
pub fn ensure(sockets: u64, pid: Option<u32>) -> Result<()> {
    let needed = sockets + HEADROOM;
    raise();
    let ours = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| max_open_files(&text));
    if let Some(Some(soft)) = ours {
        if soft < needed {
            bail!(
                "this process may open {soft} files (its hard limit) but {sockets} long-polls \
                 need about {needed}: raise the hard limit (`ulimit -Hn 65536` as root, or \
                 `LimitNOFILE=` of the service) in this shell and in the server's, or lower \
                 --count / --pollers"
            );
        }
    }
    if let Some(pid) = pid {
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/limits"))
            .ok()
            .and_then(|text| max_open_files(&text));
        if let Some(Some(soft)) = theirs {
            if soft < needed {
                println!(
                    "warning: the server (pid {pid}) may open only {soft} files, fewer than \
                     {sockets} long-polls need; restart it after `ulimit -n 65536`"
                );
            }
        }
    }
    Ok(())
}

/// The soft "Max open files" limit in a /proc/PID/limits text: `Some(None)`
/// when unlimited, `None` when the line is missing.
fn max_open_files(limits: &str) -> Option<Option<u64>> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let soft = line.split_whitespace().next()?;
    if soft == "unlimited" {
        Some(None)
    } else {
        soft.parse().ok().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(Some(1024)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), Some(None));
        assert_eq!(max_open_files("Max processes 1 1 processes\n"), None);
        let own = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(max_open_files(&own).is_some());
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let soft = raise().unwrap();
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        assert!(ensure(10, None).is_ok());
    }
}
