//! What the edge reports: `/health` (JSON) and `/metrics` (Prometheus text), from counters
//! the tail worker updates; and the read barrier that makes `consistent=true` wait until the
//! edge applied everything its upstream had when the read began.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_api::{ApiError, BarrierFuture, HttpMetrics, ReadBarrier};
use changeagent_client::{Client, RawPage};
use serde_json::json;

use crate::Context;

/// How long a `consistent=true` read waits for the edge to catch up with its upstream.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared by the tail worker and the handlers.
pub struct Status {
    /// The `--upstream` URLs.
    pub upstream: Vec<String>,
    /// Index into `upstream` of the one that answered last.
    in_use: AtomicUsize,
    /// The upstream's newest `_id`, from the last page it answered.
    upstream_index: AtomicU64,
    /// The last request to the upstream got an answer.
    connected: AtomicBool,
    /// The tail applied something since the last failure (resets its backoff).
    progress: AtomicBool,
    bootstraps_total: AtomicU64,
}

impl Status {
    pub fn new(upstream: Vec<String>) -> Status {
        Status {
            upstream,
            in_use: AtomicUsize::new(0),
            upstream_index: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            progress: AtomicBool::new(false),
            bootstraps_total: AtomicU64::new(0),
        }
    }

    /// Records an answer of the upstream.
    pub fn saw_page(&self, page: &RawPage, client: &Client) {
        self.connected.store(true, Ordering::Relaxed);
        self.upstream_index
            .store(page.last_index, Ordering::Relaxed);
        self.in_use.store(
            page.endpoint.min(client.endpoints().len()),
            Ordering::Relaxed,
        );
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn mark_progress(&self) {
        self.progress.store(true, Ordering::Relaxed);
    }

    pub fn take_progress(&self) -> bool {
        self.progress.swap(false, Ordering::Relaxed)
    }

    pub fn count_bootstrap(&self) {
        self.bootstraps_total.fetch_add(1, Ordering::Relaxed);
    }

    fn upstream_in_use(&self) -> Option<&str> {
        self.upstream
            .get(self.in_use.load(Ordering::Relaxed))
            .map(String::as_str)
    }
}

/// State of `/health` and `/metrics`.
#[derive(Clone)]
pub struct Shared {
    pub ctx: Arc<Context>,
    pub metrics: Arc<HttpMetrics>,
}

/// `GET /health`: the core's fields that apply to an edge, plus where it tails from.
pub async fn health(State(s): State<Shared>) -> Json<serde_json::Value> {
    let st = &s.ctx.status;
    let state = s.ctx.store.state();
    let upstream = st.upstream_index.load(Ordering::Relaxed);
    Json(json!({
        "role": "edge",
        "clusterId": state.cluster_id,
        "firstIndex": state.first_index,
        "lastIndex": state.last_id,
        "appliedIndex": state.last_id,
        "upstream": st.upstream_in_use(),
        "upstreamIndex": upstream,
        "lag": upstream.saturating_sub(state.last_id),
        "connected": st.connected.load(Ordering::Relaxed),
        "term": 0,
    }))
}

/// `GET /metrics`: the HTTP layer's metrics and the edge's gauges.
pub async fn metrics(State(s): State<Shared>) -> Response {
    let st = &s.ctx.status;
    let mut out = String::with_capacity(4096);
    s.metrics.render(&mut out);
    let applied = s.ctx.store.last_id();
    let upstream = st.upstream_index.load(Ordering::Relaxed);
    let values: [(&str, &str, &str, u64); 5] = [
        (
            "changeagent_edge_applied_index",
            "gauge",
            "Newest _id applied on this edge.",
            applied,
        ),
        (
            "changeagent_edge_upstream_index",
            "gauge",
            "The upstream's newest _id, as last seen.",
            upstream,
        ),
        (
            "changeagent_edge_lag",
            "gauge",
            "Changes this edge is behind its upstream.",
            upstream.saturating_sub(applied),
        ),
        (
            "changeagent_edge_connected",
            "gauge",
            "1 when the last request to the upstream got an answer.",
            u64::from(st.connected.load(Ordering::Relaxed)),
        ),
        (
            "changeagent_edge_bootstraps_total",
            "counter",
            "Checkpoints loaded into a fresh copy (at start and after a 410).",
            st.bootstraps_total.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in values {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// `consistent=true` on an edge: asks the upstream for its newest `_id`, then waits until
/// this edge applied that far.
pub struct UpstreamBarrier {
    pub ctx: Arc<Context>,
}

impl ReadBarrier for UpstreamBarrier {
    fn wait(&self) -> BarrierFuture<'_> {
        Box::pin(async move {
            let unavailable = |message: String| ApiError::Unavailable {
                message,
                retry_after_secs: 1,
            };
            let target = self
                .ctx
                .client
                .health()
                .await
                .map_err(|e| {
                    unavailable(format!(
                        "a consistent read needs the upstream, which did not answer ({e}); \
                         retry, or read without consistent=true"
                    ))
                })?
                .last_index;
            let mut applied = self.ctx.store.subscribe();
            let caught_up =
                tokio::time::timeout(BARRIER_TIMEOUT, applied.wait_for(|last| *last >= target))
                    .await;
            match caught_up {
                Ok(Ok(_)) => Ok(()),
                _ => Err(unavailable(format!(
                    "this edge did not apply the upstream's _id {target} within {} s; retry",
                    BARRIER_TIMEOUT.as_secs()
                ))),
            }
        })
    }
}
