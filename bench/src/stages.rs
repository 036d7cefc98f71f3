//! `stages`: where a write run's writes spent their time on each node, from
//! the write-path stage histograms a core node exports in `GET /metrics`
//! (`changeagent_write_stage_seconds`, one series per `stage` label:
//! precheck, queue, log_append, replicate, follower_append, apply, commit,
//! write), scraped before and after the run.
//!
//! The rules:
//!
//! - A histogram is Prometheus text: `_bucket{stage="…",le="…"}` lines with
//!   cumulative counts (`le` in seconds, doubling from 16 µs, then `+Inf`),
//!   one `_sum{stage="…"}` and one `_count{stage="…"}`. Labels may come in
//!   any order; other metrics, comments and lines without a `stage` label
//!   are skipped. A node that exports none (an older server) has no stages:
//!   a note says so instead of a table, and nothing fails.
//! - A run's share is after − before, per stage. A stage whose count went
//!   down (the node restarted in between), or whose buckets changed, is
//!   taken from the after scrape alone.
//! - Mean = Δsum / Δcount. p50 and p99 are estimated from the bucket deltas
//!   (see [`StageHistogram::quantile`]), so they are good to one bucket: a
//!   factor of 2.
//! - The table groups the nodes by their `/health` role after the run: the
//!   leader, then the followers (their histograms added up), then any other
//!   role. The JSON keeps every node apart, by URL.
//! - A node that cannot be scraped (down, slow) is left out with a note; it
//!   never fails the write run.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use crate::report;
use crate::server::Server;

/// The histogram's name in `/metrics`.
pub const METRIC: &str = "changeagent_write_stage_seconds";

/// The stages in the order a write passes them, the order of the tables;
/// stages the server adds later follow in alphabetical order.
pub const ORDER: [&str; 8] = [
    "precheck",
    "queue",
    "log_append",
    "replicate",
    "follower_append",
    "apply",
    "commit",
    "write",
];

/// Timeout of one `/metrics` or `/health` read around a run: a live node
/// answers in milliseconds, and a run must not wait long on a dead one.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One stage's histogram, or the difference of two.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageHistogram {
    /// Upper bounds of the buckets in seconds, ascending; the last is
    /// usually infinite (`+Inf`).
    pub bounds: Vec<f64>,
    /// Cumulative counts, one per bound.
    pub cumulative: Vec<f64>,
    /// Seconds spent in the stage in all.
    pub sum: f64,
    /// Observations.
    pub count: f64,
}

/// Every stage's histogram in one scrape of one node, by stage.
pub type Scrape = BTreeMap<String, StageHistogram>;

impl StageHistogram {
    /// `self` − `before`: the observations between the two scrapes.
    fn minus(&self, before: &StageHistogram) -> StageHistogram {
        StageHistogram {
            bounds: self.bounds.clone(),
            cumulative: self
                .cumulative
                .iter()
                .zip(&before.cumulative)
                .map(|(after, before)| (after - before).max(0.0))
                .collect(),
            sum: (self.sum - before.sum).max(0.0),
            count: self.count - before.count,
        }
    }

    /// Adds `other`'s observations (the followers' tables); buckets that do
    /// not match are dropped, and with them the quantiles, never the count.
    fn add(&mut self, other: &StageHistogram) {
        if self.bounds.is_empty() && self.count == 0.0 {
            *self = other.clone();
            return;
        }
        if self.bounds == other.bounds {
            for (mine, theirs) in self.cumulative.iter_mut().zip(&other.cumulative) {
                *mine += theirs;
            }
        } else {
            self.bounds.clear();
            self.cumulative.clear();
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// An estimate of quantile `q` (0 < q ≤ 1) in seconds, the way
    /// Prometheus' `histogram_quantile` makes it: find the bucket in which
    /// the q-th observation falls and interpolate linearly between its lower
    /// and upper bound (0 and the first bound for the first bucket). The
    /// true value lies in the same bucket, so the estimate is within one
    /// bucket of it: within a factor of 2, the buckets doubling. In the
    /// `+Inf` bucket the estimate is the highest finite bound, a lower
    /// bound. `None` without observations or buckets.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = *self.cumulative.last()?;
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let i = self.cumulative.iter().position(|&c| c >= rank)?;
        let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
        let upper = self.bounds[i];
        if upper.is_infinite() {
            return Some(lower);
        }
        let below = if i == 0 { 0.0 } else { self.cumulative[i - 1] };
        let inside = self.cumulative[i] - below;
        if inside <= 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below) / inside)
    }

    /// Count, mean, p50 and p99 in milliseconds.
    pub fn summary(&self) -> StageSummary {
        let ms = |s: f64| s * 1e3;
        StageSummary {
            count: self.count.max(0.0).round() as u64,
            mean_ms: if self.count > 0.0 {
                ms(self.sum / self.count)
            } else {
                0.0
            },
            p50_ms: self.quantile(0.50).map(ms),
            p99_ms: self.quantile(0.99).map(ms),
        }
    }
}

/// One stage's figures over a run, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSummary {
    pub count: u64,
    pub mean_ms: f64,
    /// `None` when the node exported no usable buckets.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl StageSummary {
    /// `{"count":…,"mean_ms":…,"p50_ms":…,"p99_ms":…}`, three significant
    /// digits.
    pub fn to_json(self) -> Value {
        let sig = |x: f64| report::round_sig(x, 3);
        json!({
            "count": self.count,
            "mean_ms": sig(self.mean_ms),
            "p50_ms": self.p50_ms.map(sig),
            "p99_ms": self.p99_ms.map(sig),
        })
    }
}

/// The stage histograms in a `/metrics` text; empty when there are none.
pub fn parse(text: &str) -> Scrape {
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut scrape = Scrape::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((kind, labels)) = rest.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = split_labels(labels) else {
            continue;
        };
        let Some(value) = value.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        let Some(stage) = label(&labels, "stage") else {
            continue;
        };
        match kind {
            "_bucket" => {
                if let Some(le) = label(&labels, "le").and_then(parse_value) {
                    buckets
                        .entry(stage.to_string())
                        .or_default()
                        .push((le, value));
                }
            }
            "_sum" => scrape.entry(stage.to_string()).or_default().sum = value,
            "_count" => scrape.entry(stage.to_string()).or_default().count = value,
            _ => {}
        }
    }
    for (stage, mut list) in buckets {
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        let hist = scrape.entry(stage).or_default();
        (hist.bounds, hist.cumulative) = list.into_iter().unzip();
    }
    scrape
}

/// The labels of a series (the text after its `{`) and what follows the
/// closing `}`; `None` when they are malformed.
fn split_labels(mut text: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (name, after) = text.split_once('=')?;
        let quoted = after.trim_start().strip_prefix('"')?;
        let (value, used) = unquote(quoted)?;
        labels.push((name.trim(), value));
        text = &quoted[used..];
    }
}

/// A label value up to its closing quote, unescaped, and the bytes taken
/// (the quote included).
fn unquote(quoted: &str) -> Option<(String, usize)> {
    let mut value = String::new();
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match (escaped, c) {
            (true, 'n') => value.push('\n'),
            (true, c) => value.push(c),
            (false, '\\') => {
                escaped = true;
                continue;
            }
            (false, '"') => return Some((value, i + 1)),
            (false, c) => value.push(c),
        }
        escaped = false;
    }
    None
}

fn label<'a>(labels: &'a [(&str, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

/// A sample value or `le` bound: a number, `+Inf`, `-Inf` or `NaN`.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// after − before for every stage of `after` (see the module docs for
/// restarts).
pub fn delta(before: &Scrape, after: &Scrape) -> Scrape {
    after
        .iter()
        .map(|(stage, now)| {
            let share = match before.get(stage) {
                Some(then) if then.bounds == now.bounds && now.count >= then.count => {
                    now.minus(then)
                }
                _ => now.clone(),
            };
            (stage.clone(), share)
        })
        .collect()
}

/// The stages in table order: [`ORDER`] first, then the rest by name.
fn ordered(scrape: &Scrape) -> Vec<(&str, &StageHistogram)> {
    let mut stages: Vec<(&str, &StageHistogram)> =
        scrape.iter().map(|(s, h)| (s.as_str(), h)).collect();
    let rank = |stage: &str| {
        ORDER
            .iter()
            .position(|s| *s == stage)
            .unwrap_or(ORDER.len())
    };
    stages.sort_by_key(|(stage, _)| (rank(stage), *stage));
    stages
}

/// The stages of every node, scraped before a run.
pub struct Before {
    scrapes: Vec<Result<Scrape, String>>,
}

/// One node's share of a run.
#[derive(Debug, Clone)]
pub struct NodeStages {
    pub url: String,
    /// Its `/health` role after the run; `None` when it did not say.
    pub role: Option<String>,
    /// The stages' deltas, or why there are none.
    pub stages: Result<Scrape, String>,
}

/// Every node's share of one run.
#[derive(Debug, Clone, Default)]
pub struct PhaseStages {
    pub nodes: Vec<NodeStages>,
}

/// The stage histograms of `server`.
async fn scrape(server: &Server) -> Result<Scrape, String> {
    let body = server
        .get_ok("/metrics", SCRAPE_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(parse(&String::from_utf8_lossy(&body)))
}

/// Scrapes every node before a run.
pub async fn before(nodes: &[Server]) -> Before {
    Before {
        scrapes: join_all(nodes.iter().map(scrape)).await,
    }
}

/// Scrapes every node after a run (and asks its role): each node's share.
pub async fn after(nodes: &[Server], before: Before) -> PhaseStages {
    let reads = nodes.iter().map(|server| async move {
        let role = tokio::time::timeout(SCRAPE_TIMEOUT, server.role()).await;
        (
            scrape(server).await,
            role.ok().and_then(|r| r.ok()).flatten(),
        )
    });
    let nodes = nodes
        .iter()
        .zip(join_all(reads).await)
        .zip(before.scrapes)
        .map(|((server, (now, role)), then)| NodeStages {
            url: server.base().to_string(),
            role,
            stages: match (then, now) {
                (Ok(then), Ok(now)) => Ok(delta(&then, &now)),
                (Err(err), _) => Err(format!("not scraped before the run: {err}")),
                (_, Err(err)) => Err(format!("not scraped after the run: {err}")),
            },
        })
        .collect();
    PhaseStages { nodes }
}

/// Order of the role groups in the tables.
fn role_rank(role: &str) -> u8 {
    match role {
        "leader" => 0,
        "follower" => 1,
        _ => 2,
    }
}

impl PhaseStages {
    /// The nodes with stages, grouped by role (leader, followers, others),
    /// each group's deltas added up, with a label.
    fn groups(&self) -> Vec<(String, Scrape)> {
        let mut by_role: BTreeMap<(u8, String), Vec<(&str, &Scrape)>> = BTreeMap::new();
        for node in &self.nodes {
            if let Ok(stages) = &node.stages {
                let role = node.role.clone().unwrap_or_else(|| "unknown role".into());
                by_role
                    .entry((role_rank(&role), role))
                    .or_default()
                    .push((&node.url, stages));
            }
        }
        by_role
            .into_iter()
            .map(|((_, role), members)| {
                let label = match members.as_slice() {
                    [(url, _)] => format!("{role} {url}"),
                    many => format!(
                        "{} {role}s ({})",
                        many.len(),
                        many.iter().map(|(u, _)| *u).collect::<Vec<_>>().join(", ")
                    ),
                };
                let mut total = Scrape::new();
                for (_, stages) in members {
                    for (stage, hist) in stages.iter() {
                        total.entry(stage.clone()).or_default().add(hist);
                    }
                }
                (label, total)
            })
            .collect()
    }

    /// One compact table per role (stages with writes only), and a note for
    /// every node without stages.
    pub fn print(&self) {
        for (label, stages) in self.groups() {
            let active: Vec<_> = ordered(&stages)
                .into_iter()
                .filter(|(_, h)| h.count > 0.0)
                .collect();
            if stages.is_empty() {
                println!("write stages, {label}: none exported (a server without them)");
                continue;
            }
            if active.is_empty() {
                println!("write stages, {label}: no observation in this run");
                continue;
            }
            println!("write stages, {label} (ms):");
            println!(
                "  {:<16} {:>10} {:>9} {:>9} {:>9}",
                "stage", "count", "mean", "p50", "p99"
            );
            for (stage, hist) in active {
                let s = hist.summary();
                let or_dash = |x: Option<f64>| x.map_or("-".to_string(), report::sig3);
                println!(
                    "  {stage:<16} {:>10} {:>9} {:>9} {:>9}",
                    report::count(s.count),
                    report::sig3(s.mean_ms),
                    or_dash(s.p50_ms),
                    or_dash(s.p99_ms)
                );
            }
        }
        for node in &self.nodes {
            if let Err(err) = &node.stages {
                println!("write stages, {}: {err}", node.url);
            }
        }
    }

    /// `{node_url: {stage: {count, mean_ms, p50_ms, p99_ms}}}` for the stages
    /// with observations; a node without stages maps to `{}`.
    pub fn to_json(&self) -> Value {
        let nodes: serde_json::Map<String, Value> = self
            .nodes
            .iter()
            .map(|node| {
                let stages: serde_json::Map<String, Value> = match &node.stages {
                    Ok(stages) => ordered(stages)
                        .into_iter()
                        .filter(|(_, h)| h.count > 0.0)
                        .map(|(stage, h)| (stage.to_string(), h.summary().to_json()))
                        .collect(),
                    Err(_) => serde_json::Map::new(),
                };
                (node.url.clone(), Value::Object(stages))
            })
            .collect();
        Value::Object(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets 16 µs, 32 µs, … 1.024 ms (7 bounds) and +Inf, as the server
    /// writes them, with `count` observations per bucket (not cumulative).
    fn exposition(stage: &str, per_bucket: [u64; 8], sum: f64) -> String {
        let mut text = String::new();
        let mut cumulative = 0;
        for (i, n) in per_bucket.iter().enumerate() {
            cumulative += n;
            let le = if i == 7 {
                "+Inf".to_string()
            } else {
                format!("{:.6}", 0.000016 * f64::from(1u32 << i))
            };
            text.push_str(&format!(
                "{METRIC}_bucket{{stage=\"{stage}\",le=\"{le}\"}} {cumulative}\n"
            ));
        }
        text.push_str(&format!("{METRIC}_sum{{stage=\"{stage}\"}} {sum}\n"));
        text.push_str(&format!(
            "{METRIC}_count{{stage=\"{stage}\"}} {cumulative}\n"
        ));
        text
    }

    #[test]
    fn parses_the_histograms_and_skips_the_rest() {
        let text = format!(
            "# HELP {METRIC} Time per write-path stage.\n\
             # TYPE {METRIC} histogram\n\
             {}\
             {METRIC}_bucket{{le=\"0.000016\",stage=\"queue\"}} 1\n\
             {METRIC}_bucket{{le=\"+Inf\",stage=\"queue\"}} 3 1700000000000\n\
             {METRIC}_sum{{stage=\"queue\"}} 0.25\n\
             {METRIC}_count{{stage=\"queue\"}} 3\n\
             {METRIC}_count 9\n\
             {METRIC}_bucket{{stage=\"odd \\\"one\\\"\",le=\"1\"}} 2\n\
             changeagent_long_polls_open 12\n\
             changeagent_write_stage_seconds_total{{stage=\"queue\"}} 5\n",
            exposition("commit", [1, 2, 0, 0, 0, 0, 1, 0], 0.0123)
        );
        let scrape = parse(&text);
        assert_eq!(
            scrape.keys().collect::<Vec<_>>(),
            ["commit", "odd \"one\"", "queue"]
        );
        let commit = &scrape["commit"];
        assert_eq!(commit.bounds.len(), 8);
        assert_eq!(commit.bounds[0], 0.000016);
        assert_eq!(commit.bounds[6], 0.001024);
        assert!(commit.bounds[7].is_infinite());
        assert_eq!(commit.cumulative, [1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0]);
        assert_eq!((commit.sum, commit.count), (0.0123, 4.0));
        // Labels in the other order, a timestamp after the value.
        let queue = &scrape["queue"];
        assert_eq!(queue.bounds, [0.000016, f64::INFINITY]);
        assert_eq!(queue.cumulative, [1.0, 3.0]);
        assert_eq!((queue.sum, queue.count), (0.25, 3.0));
        assert!(parse("changeagent_long_polls_open 3\n").is_empty());
        assert!(parse("").is_empty());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations: 50 in 0..16 µs, 40 in 16..32 µs, 9 in 32..64 µs,
        // 1 above 1.024 ms.
        let scrape = parse(&exposition("write", [50, 40, 9, 0, 0, 0, 0, 1], 0.01));
        let write = &scrape["write"];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // Rank 50 is the last of the first bucket: its upper bound.
        assert!(close(write.quantile(0.5).unwrap(), 0.000016));
        // Rank 70: 20 of the 40 in 16..32 µs, halfway.
        assert!(close(write.quantile(0.7).unwrap(), 0.000024));
        // Rank 99: the last of the 9 in 32..64 µs.
        assert!(close(write.quantile(0.99).unwrap(), 0.000064));
        // Rank 100 is in +Inf: the highest finite bound.
        assert!(close(write.quantile(1.0).unwrap(), 0.001024));
        // Rank 25: halfway through the first bucket, from 0.
        assert!(close(write.quantile(0.25).unwrap(), 0.000008));
        let s = write.summary();
        assert_eq!(s.count, 100);
        assert!((s.mean_ms - 0.1).abs() < 1e-12);
        assert!((s.p50_ms.unwrap() - 0.016).abs() < 1e-12);
        assert!((s.p99_ms.unwrap() - 0.064).abs() < 1e-12);
        assert_eq!(StageHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn the_delta_is_the_run_share_and_survives_a_restart() {
        let before = parse(&format!(
            "{}{}",
            exposition("commit", [10, 0, 0, 0, 0, 0, 0, 0], 0.0001),
            exposition("queue", [100, 0, 0, 0, 0, 0, 0, 0], 0.001)
        ));
        let after = parse(&format!(
            "{}{}{}",
            exposition("commit", [10, 0, 4, 0, 0, 0, 0, 0], 0.0003),
            exposition("queue", [5, 0, 0, 0, 0, 0, 0, 0], 0.00005),
            exposition("apply", [0, 2, 0, 0, 0, 0, 0, 0], 0.00005)
        ));
        let share = delta(&before, &after);
        let commit = &share["commit"];
        assert_eq!(commit.count, 4.0);
        assert_eq!(commit.cumulative, [0.0, 0.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]);
        assert!((commit.sum - 0.0002).abs() < 1e-12);
        // All four in 32..64 µs: p50 at rank 2, halfway through it.
        assert!((commit.quantile(0.5).unwrap() - 0.000048).abs() < 1e-12);
        // The queue's count went down: a restart; the after scrape alone.
        assert_eq!(share["queue"].count, 5.0);
        // A stage new since the before scrape.
        assert_eq!(share["apply"].count, 2.0);
    }

    #[test]
    fn tables_group_followers_and_json_keeps_nodes_apart() {
        let scrape = |n: u64| {
            Ok(parse(&exposition(
                "follower_append",
                [n, 0, 0, 0, 0, 0, 0, 0],
                0.000008 * n as f64,
            )))
        };
        let phase = PhaseStages {
            nodes: vec![
                NodeStages {
                    url: "http://b".into(),
                    role: Some("follower".into()),
                    stages: scrape(2),
                },
                NodeStages {
                    url: "http://a".into(),
                    role: Some("leader".into()),
                    stages: Ok(parse(&exposition(
                        "commit",
                        [0, 3, 0, 0, 0, 0, 0, 0],
                        0.00006,
                    ))),
                },
                NodeStages {
                    url: "http://c".into(),
                    role: Some("follower".into()),
                    stages: scrape(6),
                },
                NodeStages {
                    url: "http://old".into(),
                    role: Some("follower".into()),
                    stages: Ok(Scrape::new()),
                },
                NodeStages {
                    url: "http://down".into(),
                    role: None,
                    stages: Err("refused".into()),
                },
            ],
        };
        let groups = phase.groups();
        let labels: Vec<&str> = groups.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "leader http://a",
                "3 followers (http://b, http://c, http://old)"
            ]
        );
        assert_eq!(groups[1].1["follower_append"].count, 8.0);
        assert_eq!(groups[1].1["follower_append"].cumulative[0], 8.0);
        let json = phase.to_json();
        assert_eq!(json["http://a"]["commit"]["count"], 3);
        assert_eq!(json["http://a"]["commit"]["mean_ms"], 0.02);
        assert_eq!(json["http://a"]["commit"]["p50_ms"], 0.024);
        assert_eq!(json["http://c"]["follower_append"]["count"], 6);
        assert_eq!(json["http://old"], json!({}));
        assert_eq!(json["http://down"], json!({}));
        phase.print();
    }

    #[test]
    fn stages_keep_the_write_path_order() {
        let mut scrape = Scrape::new();
        for stage in ["write", "zeta", "queue", "alpha", "precheck"] {
            scrape.insert(stage.to_string(), StageHistogram::default());
        }
        let order: Vec<&str> = ordered(&scrape).into_iter().map(|(s, _)| s).collect();
        assert_eq!(order, ["precheck", "queue", "write", "alpha", "zeta"]);
    }
}
