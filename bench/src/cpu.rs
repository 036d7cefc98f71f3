//! CPU time (user + system, all threads) of a process, from
//! `/proc/PID/stat`: what the benchmark's own client and the server each
//! spent during a run, so that a rate can be put down to one side or the
//! other on a machine whose cores they share.

use std::time::Duration;

use nix::unistd::{sysconf, SysconfVar};

/// Clock ticks per second when `sysconf` cannot say (Linux's default).
const DEFAULT_CLK_TCK: u64 = 100;

/// CPU time `pid` has used so far; `None` once it is gone.
pub fn time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = user_and_system_ticks(&stat)?;
    let per_sec = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(DEFAULT_CLK_TCK);
    Some(Duration::from_secs_f64(ticks as f64 / per_sec as f64))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` text.
fn user_and_system_ticks(stat: &str) -> Option<u64> {
    // `pid (comm) state …`: comm may hold spaces; fields count after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3, so utime (14) is the 12th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU used by one process over a stretch of work.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pid: u32,
    start: Option<Duration>,
}

impl Span {
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            start: time(pid),
        }
    }

    /// CPU used since the start; `None` when it could not be read.
    pub fn used(&self) -> Option<Duration> {
        Some(time(self.pid)?.saturating_sub(self.start?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks_after_the_command_name() {
        let stat = "4242 (changeagent (x) srv) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 9 0 100 1000000 5000 18446744073709551615";
        assert_eq!(user_and_system_ticks(stat), Some(300));
        assert_eq!(user_and_system_ticks("garbage"), None);
    }

    #[test]
    fn own_time_grows() {
        let span = Span::start(std::process::id());
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(span.used().unwrap() > Duration::ZERO || time(std::process::id()).is_some());
    }
}
