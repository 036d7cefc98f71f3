//! The run's result: one JSON object on stdout (and in `--report`), its
//! verdict, and the line on stderr that says what failed.

use serde::Serialize;

use crate::report::Latency;

/// The final summary. The first fields are the ones a harness reads; the
/// rest say what the run was and what was checked.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// No violation.
    pub ok: bool,
    /// Viewers (the reference consumer not counted).
    pub consumers: u64,
    /// Occasionally connected viewers.
    pub offline_consumers: u64,
    /// Changes viewers got from their follows (checkpoint records not
    /// counted).
    pub changes_delivered: u64,
    /// Writes of the always-online writers acknowledged.
    pub writes_acked: u64,
    /// Posts the outbox writers queued (each must have been flushed).
    pub outbox_posts: u64,
    /// Checkpoints viewers reloaded after a `410`.
    pub reloads: u64,
    /// Failures that passed when retried: not violations.
    pub transient_errors: u64,
    /// Follows that failed with a `404` for the checkpoint a `410` named
    /// and were started again (not violations: the final comparison judges
    /// the state), and the first of their messages.
    pub follows_restarted: u64,
    pub follow_failures: Vec<String>,
    pub latency_ms: LatencyMs,
    /// The index every consumer ended at (0 when the run never got there).
    pub final_index: u64,
    /// The first violations (see `violations_total` for all).
    pub violations: Vec<String>,
    pub violations_total: u64,
    /// Viewers whose state was compared with the reference's, and found
    /// equal.
    pub consumers_compared: u64,
    pub consumers_equal: u64,
    /// Acknowledged writes (outbox posts included) checked against the
    /// list; of them, found at their `_id`, and keyed ones no longer in any
    /// state (overwritten or deleted before the reference's checkpoint) but
    /// consistent with it; and writes given up without an answer.
    pub writes_checked: u64,
    pub writes_found: u64,
    pub writes_unseen: u64,
    pub writes_unknown: u64,
    /// Outbox posts acknowledged.
    pub outbox_acked: u64,
    /// The checkpoint the reference last reloaded (0: it read the whole
    /// list).
    pub reference_checkpoint: u64,
    pub run: String,
    pub seed: u64,
    pub elapsed_secs: f64,
}

/// Commit-to-consumer latency of live viewers, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyMs {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyMs {
    pub fn of(latency: Option<Latency>) -> Self {
        let Some(l) = latency.filter(|l| l.count > 0) else {
            return Self::default();
        };
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        Self {
            count: l.count,
            p50: ms(l.p50),
            p99: ms(l.p99),
            max: ms(l.max),
        }
    }
}

/// The verdict: a run is ok when it found no violation at all.
pub fn verdict(violations_total: u64) -> bool {
    violations_total == 0
}

impl Summary {
    /// The line for stderr: what failed, or that all held.
    pub fn message(&self) -> String {
        let restarted = match self.follow_failures.first() {
            Some(first) => format!(
                "; {} follows failed with a 404 and were restarted, the first: {first}",
                self.follows_restarted
            ),
            None => String::new(),
        };
        if self.ok {
            return format!(
                "fleet: ok: {} consumers equal to the reference at {}, {} writes and {} outbox \
                 posts found, {} reloads{restarted}",
                self.consumers_equal,
                self.final_index,
                self.writes_acked,
                self.outbox_posts,
                self.reloads
            );
        }
        let first = self
            .violations
            .first()
            .map(String::as_str)
            .unwrap_or("(none kept)");
        format!(
            "fleet: FAILED with {} violation{}; the first: {first}",
            self.violations_total,
            if self.violations_total == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn summary(violations: Vec<String>, total: u64) -> Summary {
        Summary {
            ok: verdict(total),
            consumers: 10,
            offline_consumers: 2,
            changes_delivered: 100,
            writes_acked: 5,
            outbox_posts: 3,
            reloads: 1,
            transient_errors: 0,
            follows_restarted: 0,
            follow_failures: Vec::new(),
            latency_ms: LatencyMs::default(),
            final_index: 42,
            violations,
            violations_total: total,
            consumers_compared: 10,
            consumers_equal: 10,
            writes_checked: 8,
            writes_found: 8,
            writes_unseen: 0,
            writes_unknown: 0,
            outbox_acked: 3,
            reference_checkpoint: 0,
            run: "r".into(),
            seed: 1,
            elapsed_secs: 1.0,
        }
    }

    #[test]
    fn any_violation_fails_the_run() {
        assert!(verdict(0));
        assert!(!verdict(1));
        let ok = summary(Vec::new(), 0);
        assert!(ok.ok);
        assert!(ok.message().starts_with("fleet: ok"), "{}", ok.message());
        // More violations than were kept: the total decides.
        let failed = summary(vec!["consumer 3: at 5 got change 7 next".into()], 120);
        assert!(!failed.ok);
        let text = failed.message();
        assert!(text.contains("120 violations"), "{text}");
        assert!(
            text.contains("consumer 3: at 5 got change 7 next"),
            "{text}"
        );
    }

    #[test]
    fn the_summary_is_one_json_object_with_the_expected_fields() {
        let mut s = summary(vec!["x".into()], 1);
        s.latency_ms = LatencyMs::of(Some(Latency {
            count: 3,
            p50: Duration::from_micros(1_500),
            p90: Duration::from_millis(2),
            p99: Duration::from_millis(3),
            max: Duration::from_millis(4),
        }));
        let json = serde_json::to_value(&s).unwrap();
        for field in [
            "consumers",
            "offline_consumers",
            "changes_delivered",
            "writes_acked",
            "outbox_posts",
            "reloads",
            "transient_errors",
            "final_index",
            "violations",
            "ok",
        ] {
            assert!(json.get(field).is_some(), "{field} missing: {json}");
        }
        assert_eq!(json["ok"], false);
        assert_eq!(json["latency_ms"]["p50"], 1.5);
        assert_eq!(json["latency_ms"]["p99"], 3.0);
        assert_eq!(json["latency_ms"]["max"], 4.0);
        assert_eq!(json["violations"][0], "x");
        let line = serde_json::to_string(&s).unwrap();
        assert!(!line.contains('\n'));
    }
}
