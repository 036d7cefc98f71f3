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

/// Voluntary context switches of all `pid`'s threads so far (a thread blocks: waits for
/// work, a lock or I/O); `None` once it is gone. Threads that ended are not counted.
pub fn context_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        sum += voluntary_switches(&status).unwrap_or(0);
    }
    Some(sum)
}

/// The `voluntary_ctxt_switches` line of a `/proc/PID/task/TID/status` text.
fn voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU time and voluntary context switches of a set of processes over a stretch of work.
#[derive(Debug, Clone)]
pub struct Load {
    start: Vec<(u32, Option<Duration>, Option<u64>)>,
}

/// What [`Load`] measured, summed over its processes.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    pub cpu: Duration,
    pub context_switches: u64,
    pub processes: usize,
}

impl Load {
    pub fn start(pids: impl IntoIterator<Item = u32>) -> Self {
        Self {
            start: pids
                .into_iter()
                .map(|p| (p, time(p), context_switches(p)))
                .collect(),
        }
    }

    /// Used since the start by the processes that could be read both times; `None` when
    /// there were none.
    pub fn used(&self) -> Option<Used> {
        let mut used = Used {
            cpu: Duration::ZERO,
            context_switches: 0,
            processes: 0,
        };
        for &(pid, cpu, switches) in &self.start {
            let (Some(cpu0), Some(sw0), Some(cpu1), Some(sw1)) =
                (cpu, switches, time(pid), context_switches(pid))
            else {
                continue;
            };
            used.cpu += cpu1.saturating_sub(cpu0);
            used.context_switches += sw1.saturating_sub(sw0);
            used.processes += 1;
        }
        (used.processes > 0).then_some(used)
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
    fn counts_voluntary_switches_of_every_thread() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(voluntary_switches(status), Some(17));
        assert_eq!(voluntary_switches("Name:\tx\n"), None);
        let load = Load::start([std::process::id()]);
        // A thread that blocks (here: on its own exit being joined) switches voluntarily.
        std::thread::spawn(|| std::thread::park_timeout(Duration::from_millis(1)))
            .join()
            .unwrap();
        let used = load.used().expect("own process readable");
        assert_eq!(used.processes, 1);
        assert!(used.context_switches >= 1, "{used:?}");
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
