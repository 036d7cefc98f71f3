//! What every task of the fleet counts, in one place the progress lines and
//! the summary read: counters, the latency histogram, the core's last index
//! and the violations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;

use crate::fleet::check::Violations;
use crate::report::{self, Latency};

/// The fleet's counters, shared by every task.
#[derive(Debug)]
pub struct Stats {
    /// Changes consumers got from a follow (checkpoint records not counted).
    pub delivered: AtomicU64,
    /// Writes of the always-online writers the cluster acknowledged.
    pub acked: AtomicU64,
    /// Posts the outbox writers queued.
    pub outbox_posts: AtomicU64,
    /// Outbox posts a flush got acknowledged.
    pub outbox_acked: AtomicU64,
    /// Checkpoints consumers reloaded after a `410`.
    pub reloads: AtomicU64,
    /// Failures that may pass (refused connections, `503`, timeouts), each
    /// retried: not violations.
    pub transient: AtomicU64,
    /// Consumers following right now.
    pub online: AtomicU64,
    /// Consumers waiting for a catch-up slot (`--catch-up`) to come online.
    pub waiting: AtomicU64,
    /// Consumers that caught up since they last came online.
    pub live: AtomicU64,
    /// Highest `lastIndex` the cores reported.
    pub core_last: AtomicU64,
    /// Commit-to-consumer latency in nanoseconds (see the module docs of
    /// `fleet`). Held only to record one value or read percentiles.
    pub latency: Mutex<Histogram<u64>>,
    pub violations: Violations,
    /// Follows that failed in a way a restart heals (see
    /// `consumer::restart_heals`): restarted, counted, not violations.
    pub follow_failures: Violations,
}

impl Stats {
    pub fn new() -> Result<Self> {
        Ok(Self {
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            outbox_posts: AtomicU64::new(0),
            outbox_acked: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            transient: AtomicU64::new(0),
            online: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            live: AtomicU64::new(0),
            core_last: AtomicU64::new(0),
            latency: Mutex::new(report::histogram()?),
            violations: Violations::default(),
            follow_failures: Violations::default(),
        })
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_latency(&self, latency: Duration) {
        if let Ok(mut hist) = self.latency.lock() {
            report::record(&mut hist, latency);
        }
    }

    pub fn latency(&self) -> Option<Latency> {
        self.latency.lock().ok().map(|h| Latency::of(&h))
    }

    /// The progress line while the fleet runs: `pending` is what the
    /// outboxes hold, `consumers` how many there are.
    pub fn line(&self, elapsed: Duration, consumers: u64, pending: u64) -> String {
        let online = Self::get(&self.online);
        let waiting = Self::get(&self.waiting);
        let p99 = match self.latency() {
            Some(l) if l.count > 0 => report::ms(l.p99),
            _ => "-".to_owned(),
        };
        format!(
            "{:>4}s: consumers {} online ({} live), {} waiting to catch up, {} offline; \
             delivered {}; writes acked {}; outbox posts {} ({} pending); core index {}; \
             reloads {}; transient errors {}; follows restarted {}; latency p99 {p99}; \
             violations {}",
            elapsed.as_secs(),
            online,
            Self::get(&self.live),
            waiting,
            consumers.saturating_sub(online + waiting),
            report::count(Self::get(&self.delivered)),
            report::count(Self::get(&self.acked)),
            report::count(Self::get(&self.outbox_posts)),
            pending,
            report::count(Self::get(&self.core_last)),
            Self::get(&self.reloads),
            Self::get(&self.transient),
            self.follow_failures.total(),
            self.violations.total(),
        )
    }
}
