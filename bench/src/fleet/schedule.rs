//! Time and chance in the fleet: ranges of seconds from the command line,
//! the pacing of each writer to its share of the total rate, a small seeded
//! random generator, and which consumers are the occasionally connected ones.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Longest a writer may fall behind its schedule (a slow cluster, a
/// failover) before it skips the writes it missed instead of sending them
/// back to back: a cluster that comes back is not hit by a burst of the
/// whole outage's writes at once.
pub const MAX_BEHIND: Duration = Duration::from_secs(1);

/// `MIN..MAX` seconds, both ends included (`5..120`, `0.5..2`), or one
/// number for a fixed time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecsRange {
    pub min: f64,
    pub max: f64,
}

impl SecsRange {
    /// A random duration within the range.
    pub fn pick(&self, rng: &mut Rng) -> Duration {
        let secs = self.min + (self.max - self.min) * rng.unit();
        Duration::from_secs_f64(secs)
    }
}

impl FromStr for SecsRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let secs = |part: &str| -> Result<f64, String> {
            let value: f64 = part
                .trim()
                .parse()
                .map_err(|_| format!("`{part}` is not a number of seconds"))?;
            if !value.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&value) {
                return Err(format!(
                    "`{part}` is not a number of seconds from 0 to a year"
                ));
            }
            Ok(value)
        };
        let (min, max) = match text.split_once("..") {
            Some((min, max)) => (secs(min)?, secs(max)?),
            None => {
                let only = secs(text)?;
                (only, only)
            }
        };
        if min > max {
            return Err(format!("`{text}`: the minimum is above the maximum"));
        }
        Ok(SecsRange { min, max })
    }
}

impl fmt::Display for SecsRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// When a writer's next write is due: one every `interval` from the start
/// (an open schedule, so a slow answer does not lower the rate), except
/// that a writer more than [`MAX_BEHIND`] late starts its schedule again
/// from now.
#[derive(Debug, Clone)]
pub struct Pacer {
    interval: Duration,
    next: Instant,
}

impl Pacer {
    /// `per_sec` writes a second (above 0) from `start` on.
    pub fn new(per_sec: f64, start: Instant) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_sec),
            next: start,
        }
    }

    /// When the next write is due, given that it is `now`; a time in the
    /// past means at once.
    pub fn next_due(&mut self, now: Instant) -> Instant {
        if now.saturating_duration_since(self.next) > MAX_BEHIND {
            self.next = now;
        }
        let due = self.next;
        self.next += self.interval;
        due
    }
}

/// A seeded random generator (SplitMix64): small, fast and the same on
/// every platform, so `--seed` repeats the fleet's choices (not its timing).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` above 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A generator of its own for a task, drawn from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// Whether consumer `i` of `n` is one of the `k` occasionally connected
/// ones: spread evenly, so each edge gets its share of them.
pub fn is_occasional(i: usize, n: usize, k: usize) -> bool {
    n > 0 && (i + 1) * k / n != i * k / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_one_or_two_ends() {
        let r: SecsRange = "5..120".parse().unwrap();
        assert_eq!((r.min, r.max), (5.0, 120.0));
        let r: SecsRange = "0.5..2".parse().unwrap();
        assert_eq!((r.min, r.max), (0.5, 2.0));
        let r: SecsRange = "30".parse().unwrap();
        assert_eq!((r.min, r.max), (30.0, 30.0));
        assert_eq!(r.to_string(), "30..30");
        for bad in [
            "", "..", "5..", "..5", "10..5", "-1..5", "a..b", "1..inf", "nan",
        ] {
            assert!(bad.parse::<SecsRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn picks_stay_within_the_range() {
        let mut rng = Rng::new(1);
        let r: SecsRange = "2..3".parse().unwrap();
        let picks: Vec<Duration> = (0..1000).map(|_| r.pick(&mut rng)).collect();
        assert!(picks.iter().all(|d| (2.0..=3.0).contains(&d.as_secs_f64())));
        let low = picks.iter().filter(|d| d.as_secs_f64() < 2.5).count();
        assert!((400..600).contains(&low), "{low} of 1000 in the lower half");
        let fixed: SecsRange = "7".parse().unwrap();
        assert_eq!(fixed.pick(&mut rng), Duration::from_secs(7));
    }

    #[test]
    fn the_pacer_keeps_the_rate_and_skips_a_long_stall() {
        let start = Instant::now();
        let mut pacer = Pacer::new(10.0, start);
        let ms = |d: Instant| d.duration_since(start).as_millis();
        // On time: every 100 ms, whenever the writer asks.
        assert_eq!(ms(pacer.next_due(start)), 0);
        assert_eq!(ms(pacer.next_due(start)), 100);
        assert_eq!(ms(pacer.next_due(start + Duration::from_millis(150))), 200);
        // A little late: the missed slots are due at once, one by one.
        let late = start + Duration::from_millis(650);
        assert_eq!(ms(pacer.next_due(late)), 300);
        assert_eq!(ms(pacer.next_due(late)), 400);
        // Stalled for seconds: the schedule starts again from now.
        let stalled = start + Duration::from_secs(5);
        assert_eq!(ms(pacer.next_due(stalled)), 5000);
        assert_eq!(ms(pacer.next_due(stalled)), 5100);
    }

    #[test]
    fn the_pacer_gives_the_rate_over_time() {
        let start = Instant::now();
        let mut pacer = Pacer::new(12.5, start);
        let mut now = start;
        let mut writes = 0;
        while now < start + Duration::from_secs(10) {
            now = now.max(pacer.next_due(now));
            writes += 1;
        }
        assert!((125..=126).contains(&writes), "{writes}");
    }

    #[test]
    fn occasional_consumers_are_spread_evenly() {
        let picked: Vec<usize> = (0..10).filter(|&i| is_occasional(i, 10, 3)).collect();
        assert_eq!(picked.len(), 3);
        assert_eq!(picked, [3, 6, 9]);
        assert_eq!(
            (0..1000).filter(|&i| is_occasional(i, 1000, 200)).count(),
            200
        );
        assert_eq!((0..7).filter(|&i| is_occasional(i, 7, 7)).count(), 7);
        assert_eq!((0..7).filter(|&i| is_occasional(i, 7, 0)).count(), 0);
    }

    #[test]
    fn the_generator_is_seeded() {
        let a: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(42);
            (0..5).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        let mut r = Rng::new(42);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert!((0..1000).all(|_| (0.0..1.0).contains(&r.unit())));
    }
}
