//! Prometheus metrics of the HTTP layer (requests by route and status, latency histograms,
//! open long-polls, connections and what the operator limits refused) and the text renderer
//! the owner adds its own gauges to.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
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

/// Counters and histograms of the HTTP layer.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
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
        {
            let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            *r.entry((route.to_owned(), method.to_owned(), status))
                .or_default() += 1;
        }
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry(route.to_owned()).or_default();
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
        out.push_str(
            "# HELP changeagent_http_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE changeagent_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "changeagent_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP changeagent_http_request_duration_seconds HTTP request latency by route (long-polls include their wait).\n");
        out.push_str("# TYPE changeagent_http_request_duration_seconds histogram\n");
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
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

/// Middleware recording every request.
pub async fn track(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    metrics.record(
        &route,
        &method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

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
