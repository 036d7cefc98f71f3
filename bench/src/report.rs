//! Latency histograms, number formatting, target verdicts and the periodic
//! progress lines shared by every phase. Results go to stdout, progress to
//! stderr, so `changeagent-bench … > results.txt` keeps only the figures.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

/// How often long-running work prints a progress line: often enough to show
/// it is alive, rarely enough not to drown the results.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Largest latency a histogram holds (one hour, in nanoseconds); anything
/// slower is clamped, which no sane benchmark run reaches.
const HIGHEST_NANOS: u64 = 3_600 * 1_000_000_000;

/// Three significant figures: 1 µs resolution at 1 ms, 1 ms at 1 s.
const SIGNIFICANT_FIGURES: u8 = 3;

/// A latency histogram in nanoseconds.
pub fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIGHEST_NANOS, SIGNIFICANT_FIGURES)
        .context("creating a latency histogram")
}

/// Records one latency, clamped to the histogram's range.
pub fn record(hist: &mut Histogram<u64>, latency: Duration) {
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(nanos.max(1));
}

/// The usual percentiles of a histogram.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub count: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(hist: &Histogram<u64>) -> Self {
        let at = |q: f64| Duration::from_nanos(hist.value_at_quantile(q));
        Self {
            count: hist.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: Duration::from_nanos(hist.max()),
        }
    }

    /// `p50 … p90 … p99 … max …`, or a note when nothing was recorded.
    pub fn summary(&self) -> String {
        if self.count == 0 {
            return "no samples".to_string();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  max {}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        )
    }
}

impl Latency {
    /// `{"p50_ms":…,"p90_ms":…,"p99_ms":…,"max_ms":…,"count":…}` for a
    /// JSON summary line.
    pub fn to_json(self) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        serde_json::json!({
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        })
    }
}

/// A duration in milliseconds with microsecond precision: `1.234 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// An integer with thousands separators: `1,234,567`.
pub fn count(n: u64) -> String {
    let mut groups = Vec::new();
    let mut rest = n;
    while rest >= 1000 {
        groups.push(format!("{:03}", rest % 1000));
        rest /= 1000;
    }
    groups.push(rest.to_string());
    groups.reverse();
    groups.join(",")
}

/// Events per second over `elapsed` (0 when nothing elapsed).
pub fn per_sec(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// A rate rounded to a whole number with separators: `23,456`.
pub fn rate(n: u64, elapsed: Duration) -> String {
    count(per_sec(n, elapsed).round() as u64)
}

/// Bytes as megabytes (10^6), one decimal.
pub fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// The word printed after a target comparison.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

/// `x` rounded to `digits` significant digits (0 stays 0), for figures
/// whose magnitude varies from microseconds to seconds.
pub fn round_sig(x: f64, digits: u32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits as i32 - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// `x` with three significant digits and no exponent: `0.0123`, `1.23`,
/// `123`, `1230`.
pub fn sig3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let x = round_sig(x, 3);
    let decimals = (2 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

/// Prints a section header.
pub fn header(title: &str) {
    println!();
    println!("== {title}");
}

/// A background task printing a progress line every [`PROGRESS_INTERVAL`]
/// until dropped.
pub struct Progress {
    /// The printing task; only this struct holds it, and dropping the struct
    /// aborts it, so no line is printed after the phase has finished.
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts printing `line(elapsed)` to stderr every [`PROGRESS_INTERVAL`].
    pub fn start<F>(line: F) -> Self
    where
        F: Fn(Duration) -> String + Send + 'static,
    {
        Self::every(PROGRESS_INTERVAL, line)
    }

    /// Starts printing `line(elapsed)` to stderr every `interval`, for
    /// phases long enough that every two seconds would drown the results.
    pub fn every<F>(interval: Duration, line: F) -> Self
    where
        F: Fn(Duration) -> String + Send + 'static,
    {
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            // The first tick fires at once; nothing has happened yet.
            ticks.tick().await;
            loop {
                ticks.tick().await;
                eprintln!("  … {}", line(started.elapsed()));
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_groups_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(123_456), "123,456");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn latency_percentiles() {
        let mut h = histogram().unwrap();
        for i in 1..=100u64 {
            record(&mut h, Duration::from_millis(i));
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 100);
        let p50 = l.p50.as_secs_f64() * 1e3;
        assert!((49.5..=50.5).contains(&p50), "{p50}");
        let max = l.max.as_secs_f64() * 1e3;
        assert!((99.5..=100.5).contains(&max), "{max}");
        assert!(l.p90 <= l.p99 && l.p99 <= l.max);
    }

    #[test]
    fn rates_and_units() {
        assert_eq!(rate(30_000, Duration::from_secs(2)), "15,000");
        assert_eq!(rate(5, Duration::ZERO), "0");
        assert_eq!(ms(Duration::from_micros(1_234)), "1.234 ms");
        assert_eq!(mb(45_600_000.0), "45.6 MB");
    }

    #[test]
    fn three_significant_digits() {
        assert_eq!(sig3(0.0), "0");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(1.2345), "1.23");
        assert_eq!(sig3(12.0), "12.0");
        assert_eq!(sig3(123.45), "123");
        assert_eq!(sig3(1234.5), "1230");
        assert_eq!(sig3(0.99951), "1.00");
        assert_eq!(round_sig(0.00012345, 3), 0.000123);
        assert_eq!(round_sig(98765.0, 3), 98800.0);
    }
}
