//! Prometheus metrics of the HTTP layer (requests by route and status, latency histograms,
//! open long-polls, connections and what the operator limits refused) and the text renderer
//! the owner adds its own gauges to.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use std::sync::Arc;

/// Upper bounds of the latency buckets, in seconds: sub-millisecond writes up to 5-minute
/// long-polls.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 60.0,
    300.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// One route's requests: its latency histogram and its counts by method and status (a
/// route sees a handful of these, so a list searched in place, with no allocation once a
/// pair was seen).
#[derive(Default)]
struct RouteStats {
    latency: Histogram,
    answers: Vec<(String, u16, u64)>,
}

/// Counters and histograms of the HTTP layer.
#[derive(Default)]
pub struct HttpMetrics {
    /// By route; looked up by `&str`, so a request allocates nothing here.
    routes: Mutex<BTreeMap<String, RouteStats>>,
    long_polls: AtomicI64,
    /// Long-polls answered 503 over `--max-long-polls`.
    long_polls_refused: AtomicU64,
    /// Connections open on the listener.
    connections: AtomicI64,
    /// Connections closed at accept over `--max-connections`.
    connections_refused: AtomicU64,
    /// Connections closed because their request head did not arrive in time.
    header_timeouts: AtomicU64,
    /// Pages of changes built from the store's tail cache, and read from RocksDB.
    pages_from_cache: AtomicU64,
    pages_from_store: AtomicU64,
}

/// Where a page of changes was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    TailCache,
    Store,
}

/// Counts one open long-poll while alive.
pub struct LongPollGuard(Arc<HttpMetrics>);

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one open connection while alive.
pub struct ConnectionGuard(Arc<HttpMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpMetrics {
    /// Marks a long-poll as waiting until the guard drops; `None` (counted as refused) when
    /// `max` are waiting already.
    pub fn long_poll(self: &Arc<Self>, max: usize) -> Option<LongPollGuard> {
        let before = self.long_polls.fetch_add(1, Ordering::Relaxed);
        let guard = LongPollGuard(self.clone());
        if at_least(before, max) {
            drop(guard);
            self.long_polls_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(guard)
    }

    /// Counts a new connection as open until the guard drops; `None` (counted as refused)
    /// when `max` are open already and the connection is not `exempt`.
    pub fn connection(self: &Arc<Self>, max: usize, exempt: bool) -> Option<ConnectionGuard> {
        let before = self.connections.fetch_add(1, Ordering::Relaxed);
        let guard = ConnectionGuard(self.clone());
        if !exempt && at_least(before, max) {
            drop(guard);
            self.connections_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(guard)
    }

    /// Counts a connection closed because its request head did not arrive in time.
    pub fn header_timeout(&self) {
        self.header_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections open right now.
    pub fn connections_open(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections refused so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Connections closed so far for a late request head.
    pub fn header_timeouts(&self) -> u64 {
        self.header_timeouts.load(Ordering::Relaxed)
    }

    /// Counts one page of changes read from `source`.
    pub fn page_read(&self, source: PageSource) {
        let counter = match source {
            PageSource::TailCache => &self.pages_from_cache,
            PageSource::Store => &self.pages_from_store,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Long-polls waiting right now.
    pub fn long_polls_open(&self) -> i64 {
        self.long_polls.load(Ordering::Relaxed)
    }

    fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let stats = match routes.get_mut(route) {
            Some(stats) => stats,
            None => routes.entry(route.to_owned()).or_default(),
        };
        match stats
            .answers
            .iter_mut()
            .find(|(m, s, _)| *s == status && m == method)
        {
            Some((_, _, n)) => *n += 1,
            None => stats.answers.push((method.to_owned(), status, 1)),
        }
        let h = &mut stats.latency;
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Writes the HTTP metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str(
            "# HELP changeagent_http_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE changeagent_http_requests_total counter\n");
        for (route, stats) in routes.iter() {
            let mut answers: Vec<&(String, u16, u64)> = stats.answers.iter().collect();
            answers.sort();
            for (method, status, n) in answers {
                let _ = writeln!(
                    out,
                    "changeagent_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP changeagent_http_request_duration_seconds HTTP request latency by route (long-polls include their wait).\n");
        out.push_str("# TYPE changeagent_http_request_duration_seconds histogram\n");
        for (route, stats) in routes.iter() {
            let h = &stats.latency;
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "changeagent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "changeagent_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "changeagent_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "changeagent_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        drop(routes);
        gauge(
            out,
            "changeagent_long_polls_open",
            "Long-polls waiting for changes.",
            self.long_polls_open(),
        );
        counter(
            out,
            "changeagent_long_polls_refused_total",
            "Long-polls answered 503 because --max-long-polls were waiting.",
            self.long_polls_refused.load(Ordering::Relaxed),
        );
        self.render_connections(out);
        out.push_str(
            "# HELP changeagent_change_pages_total Pages of changes answered, by where they \
             were read (a woken long-poll reads the tail cache).\n",
        );
        out.push_str("# TYPE changeagent_change_pages_total counter\n");
        for (source, n) in [
            ("tail_cache", &self.pages_from_cache),
            ("store", &self.pages_from_store),
        ] {
            let _ = writeln!(
                out,
                "changeagent_change_pages_total{{source=\"{source}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }

    /// Writes the listener's metrics only (a server whose requests are not tracked).
    pub fn render_connections(&self, out: &mut String) {
        gauge(
            out,
            "changeagent_connections_open",
            "Connections open on the listener.",
            self.connections_open(),
        );
        counter(
            out,
            "changeagent_connections_refused_total",
            "Connections closed at accept because --max-connections were open.",
            self.connections_refused(),
        );
        counter(
            out,
            "changeagent_header_timeouts_total",
            "Connections closed because a request head did not arrive within \
             --header-read-timeout.",
            self.header_timeouts(),
        );
    }
}

/// Whether a count read before an increment had already reached `max`.
fn at_least(before: i64, max: usize) -> bool {
    usize::try_from(before).is_ok_and(|b| b >= max)
}

/// Writes one counter with its help line.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Writes one gauge with its help line.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// One request being served, recorded by [`Tracked::finish`] once answered.
pub struct Tracked {
    started: Instant,
    route: Option<MatchedPath>,
    method: Method,
}

impl Tracked {
    /// Starts timing `req` (its route, as matched, and method are kept; both are cheap to
    /// clone: an `Arc` and, for the standard methods, a tag).
    pub fn start(req: &Request) -> Tracked {
        Tracked {
            started: Instant::now(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
        }
    }

    /// Records the request with its answer's status.
    pub fn finish(self, metrics: &HttpMetrics, status: u16) {
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        metrics.record(
            route,
            method_label(&self.method),
            status,
            self.started.elapsed().as_secs_f64(),
        );
    }
}

/// A method as a label: the standard ones by name, any other as `other`, so clients cannot
/// grow the metrics without bound.
fn method_label(method: &Method) -> &str {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::OPTIONS
        | Method::CONNECT
        | Method::TRACE => method.as_str(),
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_method_and_status() {
        let m = HttpMetrics::default();
        let request = |method: &str| {
            Request::builder()
                .method(method)
                .uri("/changes")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        for (method, status) in [("POST", 201), ("POST", 201), ("GET", 200), ("POST", 400)] {
            Tracked::start(&request(method)).finish(&m, status);
        }
        // Methods outside the standard ones share one label.
        Tracked::start(&request("FOO")).finish(&m, 404);
        Tracked::start(&request("BAR")).finish(&m, 404);
        let mut out = String::new();
        m.render(&mut out);
        let counts: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("changeagent_http_requests_total{"))
            .collect();
        assert_eq!(
            counts,
            [
                r#"changeagent_http_requests_total{route="unmatched",method="GET",status="200"} 1"#,
                r#"changeagent_http_requests_total{route="unmatched",method="POST",status="201"} 2"#,
                r#"changeagent_http_requests_total{route="unmatched",method="POST",status="400"} 1"#,
                r#"changeagent_http_requests_total{route="unmatched",method="other",status="404"} 2"#,
            ]
        );
        assert!(out.lines().any(
            |l| l == r#"changeagent_http_request_duration_seconds_count{route="unmatched"} 6"#
        ));
    }

    #[test]
    fn limits_count_and_refuse_but_exempt_connections_always_get_in() {
        let m = Arc::new(HttpMetrics::default());
        let a = m.connection(2, false).unwrap();
        let _b = m.connection(2, false).unwrap();
        assert!(m.connection(2, false).is_none());
        let member = m.connection(2, true).unwrap();
        assert_eq!((m.connections_open(), m.connections_refused()), (3, 1));
        drop((a, member));
        assert!(m.connection(2, false).is_some());

        let waiting = m.long_poll(1).unwrap();
        assert!(m.long_poll(1).is_none());
        assert_eq!(m.long_polls_open(), 1);
        drop(waiting);
        assert!(m.long_poll(1).is_some());

        m.header_timeout();
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "changeagent_connections_open 1",
            "changeagent_connections_refused_total 1",
            "changeagent_header_timeouts_total 1",
            "changeagent_long_polls_refused_total 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in {out}");
        }
    }
}
