//! Where a write's time goes: one latency histogram per stage of the write path, kept on
//! every node (leader and followers) and exported in `/metrics` as
//! `changeagent_write_stage_seconds{stage="…"}`. `changeagent-bench write` reads them before
//! and after a run and prints each stage's share.
//!
//! The stages, in the order a write passes them:
//! - `precheck`: the leader's handler checks the request against its state (idempotency key,
//!   references) off the async workers;
//! - `queue`: waiting in the proposer until its entry is proposed;
//! - `log_append`: writing an entry batch to the Raft log with the WAL synced (every node);
//! - `replicate`: one AppendEntries round trip carrying entries, leader side;
//! - `follower_append`: a follower's handling of such a request (decode, log append, answer);
//! - `apply`: applying committed entries to the change store (every node);
//! - `commit`: from proposing an entry to its state machine answer on the leader (holds
//!   `log_append`, `replicate` and `apply`);
//! - `write`: the whole handler, from the parsed body to the answer.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A stage of the write path (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Precheck,
    Queue,
    LogAppend,
    Replicate,
    FollowerAppend,
    Apply,
    Commit,
    Write,
}

impl Stage {
    const ALL: [Stage; 8] = [
        Stage::Precheck,
        Stage::Queue,
        Stage::LogAppend,
        Stage::Replicate,
        Stage::FollowerAppend,
        Stage::Apply,
        Stage::Commit,
        Stage::Write,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Precheck => "precheck",
            Stage::Queue => "queue",
            Stage::LogAppend => "log_append",
            Stage::Replicate => "replicate",
            Stage::FollowerAppend => "follower_append",
            Stage::Apply => "apply",
            Stage::Commit => "commit",
            Stage::Write => "write",
        }
    }
}

/// Bucket upper bounds are `FIRST_BOUND_US * 2^i` microseconds: 16 µs to about 16 s.
const FIRST_BOUND_US: u64 = 16;
const BUCKETS: usize = 21;

struct Histogram {
    /// Observations per bucket (not cumulative); the last one also holds larger values.
    counts: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut i = 0;
        while i + 1 < BUCKETS && us > FIRST_BOUND_US << i {
            i += 1;
        }
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The write-path histograms of this process.
pub struct Stages {
    histograms: [Histogram; Stage::ALL.len()],
}

/// This process's write-path histograms.
pub static STAGES: Stages = Stages {
    histograms: [const { Histogram::new() }; Stage::ALL.len()],
};

impl Stages {
    /// Records one observation of `stage`.
    pub fn record(&self, stage: Stage, d: Duration) {
        self.histograms[stage as usize].record(d);
    }

    /// Records the time since `started`.
    pub fn since(&self, stage: Stage, started: Instant) {
        self.record(stage, started.elapsed());
    }

    /// Writes the histograms in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        const NAME: &str = "changeagent_write_stage_seconds";
        let _ = writeln!(
            out,
            "# HELP {NAME} Time spent in each stage of the write path on this node.\n\
             # TYPE {NAME} histogram"
        );
        for stage in Stage::ALL {
            let h = &self.histograms[stage as usize];
            let name = stage.name();
            let mut cumulative = 0;
            for (i, c) in h.counts.iter().enumerate().take(BUCKETS - 1) {
                cumulative += c.load(Ordering::Relaxed);
                let le = (FIRST_BOUND_US << i) as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "{NAME}_bucket{{stage=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "{NAME}_bucket{{stage=\"{name}\",le=\"+Inf\"}} {count}\n\
                 {NAME}_sum{{stage=\"{name}\"}} {sum}\n\
                 {NAME}_count{{stage=\"{name}\"}} {count}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_render_cumulatively() {
        let s = Stages {
            histograms: [const { Histogram::new() }; Stage::ALL.len()],
        };
        s.record(Stage::Commit, Duration::from_micros(10));
        s.record(Stage::Commit, Duration::from_micros(16));
        s.record(Stage::Commit, Duration::from_micros(17));
        s.record(Stage::Commit, Duration::from_secs(100));
        let mut out = String::new();
        s.render(&mut out);
        let line = |le: &str| {
            let prefix =
                format!("changeagent_write_stage_seconds_bucket{{stage=\"commit\",le=\"{le}\"}} ");
            out.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in\n{out}"))
                .to_owned()
        };
        assert_eq!(line("0.000016"), "2");
        assert_eq!(line("0.000032"), "3");
        assert_eq!(line("+Inf"), "4");
        assert!(out.contains("changeagent_write_stage_seconds_count{stage=\"commit\"} 4"));
        assert!(out.contains("changeagent_write_stage_seconds_count{stage=\"apply\"} 0"));
    }
}
