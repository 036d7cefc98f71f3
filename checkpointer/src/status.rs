//! What the checkpointer reports: `/health` (JSON) and `/metrics` (Prometheus text), from
//! counters the workers update.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use changeagent_api::HttpMetrics;
use changeagent_proto::{Manifest, Scope};
use changeagent_store::Store;
use serde_json::json;

/// Shared by the tail and checkpoint workers and the HTTP handlers.
pub struct Status {
    pub id: String,
    pub scope: Scope,
    pub core: Vec<String>,
    /// The core's newest `_id`, from the last page it answered.
    pub upstream_index: AtomicU64,
    /// The last request to the core got an answer.
    pub connected: AtomicBool,
    pub last_checkpoint: Mutex<Option<Manifest>>,
    pub checkpoints_total: AtomicU64,
    pub skipped_total: AtomicU64,
    pub failures_total: AtomicU64,
    pub bootstraps_total: AtomicU64,
    pub truncations_total: AtomicU64,
    pub deleted_objects_total: AtomicU64,
    pub last_duration_ms: AtomicU64,
}

impl Status {
    pub fn new(id: String, scope: Scope, core: Vec<String>) -> Status {
        Status {
            id,
            scope,
            core,
            upstream_index: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            last_checkpoint: Mutex::new(None),
            checkpoints_total: AtomicU64::new(0),
            skipped_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            bootstraps_total: AtomicU64::new(0),
            truncations_total: AtomicU64::new(0),
            deleted_objects_total: AtomicU64::new(0),
            last_duration_ms: AtomicU64::new(0),
        }
    }

    /// The newest checkpoint this checkpointer wrote.
    pub fn last_checkpoint(&self) -> Option<Manifest> {
        self.last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shared {
    status: Arc<Status>,
    store: Arc<Store>,
    /// The listener's connections.
    http: Arc<HttpMetrics>,
}

/// `/health` and `/metrics`.
pub fn router(status: Arc<Status>, store: Arc<Store>, http: Arc<HttpMetrics>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(Arc::new(Shared {
            status,
            store,
            http,
        }))
}

async fn health(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let st = &s.status;
    let applied = s.store.last_id();
    let upstream = st.upstream_index.load(Ordering::Relaxed);
    Json(json!({
        "role": "checkpointer",
        "id": st.id,
        "scope": st.scope,
        "core": st.core,
        "connected": st.connected.load(Ordering::Relaxed),
        "appliedIndex": applied,
        "upstreamIndex": upstream,
        "lag": upstream.saturating_sub(applied),
        "clusterId": s.store.cluster_id(),
        "lastCheckpoint": st.last_checkpoint(),
    }))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let st = &s.status;
    let mut out = String::with_capacity(2048);
    let applied = s.store.last_id();
    let upstream = st.upstream_index.load(Ordering::Relaxed);
    let last = st.last_checkpoint().map_or(0, |m| m.index);
    let gauges: [(&str, &str, u64); 5] = [
        (
            "changeagent_checkpointer_applied_index",
            "Newest _id in the checkpointer's copy.",
            applied,
        ),
        (
            "changeagent_checkpointer_upstream_index",
            "The core's newest _id, as last seen.",
            upstream,
        ),
        (
            "changeagent_checkpointer_lag",
            "Changes the copy is behind the core.",
            upstream.saturating_sub(applied),
        ),
        (
            "changeagent_checkpointer_last_checkpoint_index",
            "Index of the newest checkpoint written.",
            last,
        ),
        (
            "changeagent_checkpointer_last_duration_ms",
            "Duration of the last checkpoint (export to end record).",
            st.last_duration_ms.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let counters: [(&str, &str, &AtomicU64); 6] = [
        (
            "changeagent_checkpointer_checkpoints_total",
            "Checkpoints written and recorded.",
            &st.checkpoints_total,
        ),
        (
            "changeagent_checkpointer_skipped_total",
            "Rounds skipped (another checkpointer, nothing new).",
            &st.skipped_total,
        ),
        (
            "changeagent_checkpointer_failures_total",
            "Rounds that failed.",
            &st.failures_total,
        ),
        (
            "changeagent_checkpointer_bootstraps_total",
            "Imports of a checkpoint into the copy.",
            &st.bootstraps_total,
        ),
        (
            "changeagent_checkpointer_truncations_total",
            "Truncations asked of the core.",
            &st.truncations_total,
        ),
        (
            "changeagent_checkpointer_deleted_objects_total",
            "Old checkpoint objects deleted.",
            &st.deleted_objects_total,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    s.http.render_connections(&mut out);
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
