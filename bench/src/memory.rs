//! A process's memory as Linux reports it in `/proc/PID/status`: the resident
//! set (`VmRSS`) now and its high-water mark (`VmHWM`), and a window that
//! tracks a baseline and the peak of samples taken while some work runs.

use std::time::{Duration, Instant};

/// What `/proc/PID/status` says about a process's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the most ever resident, over the process's whole life.
    pub hwm: u64,
}

/// The `/proc/PID/status` text of `pid`: `None` once the process is gone (or
/// a zombie, which has no memory left to report).
fn status_text(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// The memory of `pid`; `None` when it has exited or was never there.
pub fn read(pid: u32) -> Option<Memory> {
    parse(&status_text(pid)?)
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text.
pub fn parse(status: &str) -> Option<Memory> {
    Some(Memory {
        rss: field_kb(status, "VmRSS:")? * 1024,
        hwm: field_kb(status, "VmHWM:")? * 1024,
    })
}

/// The value in kB of a `Name:   123 kB` line of a `/proc/PID/status` text.
pub fn field_kb(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix(name))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Samples of one process's memory over a stretch of work: the resident set
/// when it began, the largest sampled since, and the high-water mark (exact,
/// but over the whole life of the process) before and at the last sample.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// `VmRSS` at the start of the work.
    pub baseline: u64,
    /// Largest `VmRSS` sampled since (the baseline included); a spike
    /// between two samples is missed.
    pub sampled_peak: u64,
    /// `VmHWM` at the start of the work.
    pub hwm_before: u64,
    /// `VmHWM` at the last sample.
    pub hwm_last: u64,
    /// Samples taken, the first included.
    pub samples: u64,
    /// When the first sample was taken.
    started: Instant,
    /// When the last sample was taken.
    last_at: Instant,
}

impl Window {
    /// A window opened by its first sample.
    pub fn open(first: Memory) -> Self {
        let now = Instant::now();
        Self {
            baseline: first.rss,
            sampled_peak: first.rss,
            hwm_before: first.hwm,
            hwm_last: first.hwm,
            samples: 1,
            started: now,
            last_at: now,
        }
    }

    /// Adds one sample.
    pub fn sample(&mut self, m: Memory) {
        self.sampled_peak = self.sampled_peak.max(m.rss);
        self.hwm_last = m.hwm;
        self.samples += 1;
        self.last_at = Instant::now();
    }

    /// The most the process held during the window, up to the last sample:
    /// the high-water mark when the window raised it (then it is exact,
    /// spikes between samples included), else the sampled peak.
    pub fn peak(&self) -> u64 {
        if self.raised_hwm() {
            self.sampled_peak.max(self.hwm_last)
        } else {
            self.sampled_peak
        }
    }

    /// How much more than the baseline the peak was.
    pub fn extra(&self) -> u64 {
        self.peak().saturating_sub(self.baseline)
    }

    /// Time from the first sample to the last.
    pub fn span(&self) -> Duration {
        self.last_at - self.started
    }

    /// Whether the window raised the process's lifetime high-water mark,
    /// in which case `hwm_last` is the exact peak up to the last sample.
    pub fn raised_hwm(&self) -> bool {
        self.hwm_last > self.hwm_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_high_water_mark() {
        let status = "Name:\tchangeagent-server\nVmPeak:\t  99999 kB\nVmHWM:\t   50000 kB\n\
                      VmRSS:\t   45312 kB\nThreads:\t9\n";
        assert_eq!(
            parse(status),
            Some(Memory {
                rss: 45_312 * 1024,
                hwm: 50_000 * 1024
            })
        );
        assert_eq!(field_kb(status, "VmRSS:"), Some(45_312));
        assert_eq!(parse("Name:\tx\nVmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn reads_own_memory() {
        let m = read(std::process::id()).unwrap();
        assert!(m.rss > 0 && m.hwm >= m.rss, "{m:?}");
    }

    #[test]
    fn a_window_keeps_the_baseline_and_the_peak() {
        let mb = |n: u64| n * 1_000_000;
        let mut w = Window::open(Memory {
            rss: mb(80),
            hwm: mb(90),
        });
        w.sample(Memory {
            rss: mb(150),
            hwm: mb(150),
        });
        w.sample(Memory {
            rss: mb(100),
            hwm: mb(160),
        });
        // A spike to 160 MB between the samples shows in the high-water mark.
        assert_eq!(w.sampled_peak, mb(150));
        assert_eq!((w.baseline, w.peak(), w.extra()), (mb(80), mb(160), mb(80)));
        assert_eq!(w.samples, 3);
        assert!(w.raised_hwm());
        // A high-water mark set before the window says nothing about it.
        let mut w = Window::open(Memory {
            rss: mb(80),
            hwm: mb(300),
        });
        w.sample(Memory {
            rss: mb(120),
            hwm: mb(300),
        });
        assert!(!w.raised_hwm());
        assert_eq!((w.peak(), w.extra()), (mb(120), mb(40)));
    }
}
