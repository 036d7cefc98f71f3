//! Which endpoint a request goes to: one position shared by every clone of a
//! client, moved on round-robin when an endpoint fails, and brought back to
//! the first endpoint once it has been away from it for a while, so a client
//! given `edge1,edge2,core1,…` returns to its edges when they answer again.
//!
//! The rules, kept by `Failover` below:
//!
//! 1. A request's first attempt goes to `Failover::start`: the position,
//!    unless the position left endpoint 0 at least `prefer_first_after` ago;
//!    then the position is reset to 0 and the request starts there.
//! 2. Each further attempt of the request goes to the position as it is
//!    then (`Failover::current`).
//! 3. A failed attempt moves the position from its endpoint to the next
//!    (`Failover::failed`), unless a concurrent request already moved it;
//!    leaving endpoint 0 records the time, so the next reset comes one
//!    interval later. An endpoint 0 that is still down thus costs one failed
//!    attempt per interval, not one per request.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a client stays on a later endpoint after leaving the first one
/// before a request tries the first one again: long enough that a client
/// whose first endpoint is down pays its failed connection attempt rarely,
/// short enough that clients move back to their edges soon after those
/// come back, instead of loading the core for good.
pub const DEFAULT_PREFER_FIRST_AFTER: Duration = Duration::from_secs(30);

/// The failover position of a client (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Failover {
    /// Number of endpoints, at least 1.
    endpoints: usize,
    /// Index of the endpoint the next attempt goes to, below `endpoints`.
    current: AtomicUsize,
    /// When the position last left endpoint 0, in nanoseconds after `epoch`.
    left_first_at: AtomicU64,
    /// Origin of `left_first_at`.
    epoch: Instant,
    /// `None`: stay wherever failover left the position.
    prefer_first_after: Option<Duration>,
}

impl Failover {
    /// The position of a client over `endpoints` endpoints (at least 1),
    /// starting at the first.
    pub(crate) fn new(endpoints: usize, prefer_first_after: Option<Duration>) -> Self {
        Self {
            endpoints: endpoints.max(1),
            current: AtomicUsize::new(0),
            left_first_at: AtomicU64::new(0),
            epoch: Instant::now(),
            prefer_first_after,
        }
    }

    /// The endpoint of a request's first attempt (rule 1).
    pub(crate) fn start(&self) -> usize {
        self.start_at(self.now())
    }

    /// The endpoint of a request's next attempt (rule 2).
    pub(crate) fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints
    }

    /// An attempt on endpoint `index` failed (rule 3).
    pub(crate) fn failed(&self, index: usize) {
        self.failed_at(index, self.now());
    }

    /// Nanoseconds since `epoch` (saturating after 584 years).
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn start_at(&self, now: u64) -> usize {
        let current = self.current();
        if current == 0 {
            return 0;
        }
        let Some(after) = self.prefer_first_after else {
            return current;
        };
        let after = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        let left = self.left_first_at.load(Ordering::Relaxed);
        if now.saturating_sub(left) < after {
            return current;
        }
        // Unless a concurrent failure moved the position meanwhile; this
        // request tries endpoint 0 either way.
        let _ = self
            .current
            .compare_exchange(current, 0, Ordering::Relaxed, Ordering::Relaxed);
        0
    }

    fn failed_at(&self, index: usize, now: u64) {
        let index = index % self.endpoints;
        let next = (index + 1) % self.endpoints;
        if index == 0 && next != 0 {
            // Before the move, so that no request sees the position off
            // endpoint 0 with an old departure time and resets it at once.
            self.left_first_at.store(now, Ordering::Relaxed);
        }
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn failover(endpoints: usize, after_secs: Option<u64>) -> Failover {
        Failover::new(endpoints, after_secs.map(Duration::from_secs))
    }

    #[test]
    fn a_failure_moves_the_position_on_and_it_stays_there_within_the_interval() {
        let f = failover(5, Some(30));
        assert_eq!(f.start_at(0), 0);
        f.failed_at(0, 10 * SEC);
        assert_eq!(f.current(), 1);
        assert_eq!(f.start_at(10 * SEC), 1);
        assert_eq!(f.start_at(39 * SEC), 1);
        assert_eq!(f.current(), 1, "no reset before the interval passed");
    }

    #[test]
    fn after_the_interval_the_next_request_starts_at_the_first_endpoint() {
        let f = failover(5, Some(30));
        f.failed_at(0, 10 * SEC);
        assert_eq!(f.start_at(40 * SEC), 0);
        assert_eq!(f.current(), 0, "the position itself is back at 0");
        assert_eq!(f.start_at(41 * SEC), 0);
    }

    #[test]
    fn the_interval_counts_from_leaving_the_first_endpoint_not_from_later_moves() {
        let f = failover(5, Some(30));
        f.failed_at(0, 10 * SEC);
        f.failed_at(1, 25 * SEC);
        f.failed_at(2, 35 * SEC);
        assert_eq!(f.current(), 3);
        assert_eq!(f.start_at(39 * SEC), 3);
        assert_eq!(f.start_at(40 * SEC), 0);
    }

    #[test]
    fn a_first_endpoint_still_down_costs_one_attempt_per_interval() {
        let f = failover(3, Some(30));
        f.failed_at(0, 0);
        assert_eq!(f.start_at(30 * SEC), 0);
        // It fails again: the clock restarts, later requests skip it.
        f.failed_at(0, 30 * SEC);
        assert_eq!(f.start_at(31 * SEC), 1);
        assert_eq!(f.start_at(59 * SEC), 1);
        assert_eq!(f.start_at(60 * SEC), 0);
    }

    #[test]
    fn without_a_preference_the_position_stays_where_failover_left_it() {
        let f = failover(3, None);
        f.failed_at(0, 0);
        f.failed_at(1, 0);
        assert_eq!(f.start_at(u64::MAX), 2);
        // Failing on the last endpoint wraps around.
        f.failed_at(2, 0);
        assert_eq!(f.start_at(0), 0);
    }

    #[test]
    fn a_failure_already_moved_past_by_another_request_does_not_move_again() {
        let f = failover(4, Some(30));
        f.failed_at(0, 0);
        // A second request that also failed on endpoint 0 reports late.
        f.failed_at(0, SEC);
        assert_eq!(f.current(), 1);
        f.failed_at(1, SEC);
        f.failed_at(1, SEC);
        assert_eq!(f.current(), 2);
    }

    #[test]
    fn one_endpoint_never_moves() {
        let f = failover(1, Some(0));
        f.failed_at(0, 0);
        assert_eq!(f.current(), 0);
        assert_eq!(f.start_at(0), 0);
    }
}
