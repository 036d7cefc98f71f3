//! Admin routes the checkpointers call: checkpoint start and end records and truncation.
//! They need the cluster secret when one is set, or, with an auth file, an `admin` token
//! (limited to tenants: only their scoped checkpoints); followers forward them to the leader
//! like writes. A retried call with the same `Idempotency-Key` gets the first answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use changeagent_api::auth::Access;
use changeagent_api::body::json_body;
use changeagent_api::ApiError;
use changeagent_proto::types::{EndRequest, StartRecord, TruncateRequest};

use super::handlers::{idempotency_key, parse_object, write};
use super::AppState;
use crate::raft::types::Op;

/// Checks the credentials, reads the body and proposes the op it makes.
async fn admin<T: serde::de::DeserializeOwned>(
    app: &AppState,
    access: &Access,
    headers: &HeaderMap,
    body: Body,
    op: impl FnOnce(T) -> Op,
) -> Result<Response, ApiError> {
    if let Access::Open = access {
        // No auth file: the cluster secret, when one is set, as before tokens existed.
        app.identity.check_secret(headers)?;
    }
    let key = idempotency_key(headers)?;
    let bytes = json_body(headers, body, app.config.max_body_bytes).await?;
    let request: T = parse_object(&bytes)?;
    write(app, access, key, op(request)).await
}

/// `POST /admin/checkpoints/start {"index","by","scope"?}`: appends a checkpoint-start
/// record; 409 while another checkpointer's start of the scope is open and fresh.
pub async fn checkpoint_start(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let stale_after_nanos =
        i64::try_from(app.config.checkpoint_stale_after.as_nanos()).unwrap_or(i64::MAX);
    admin(&app, &access, &headers, body, |start: StartRecord| {
        Op::CheckpointStart {
            start,
            stale_after_nanos,
        }
    })
    .await
}

/// `POST /admin/checkpoints/end {"manifest","by","keep"}`: appends a checkpoint-end record
/// and keeps the scope's newest `keep` manifests; 409 without the matching open start.
pub async fn checkpoint_end(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&app, &access, &headers, body, |end: EndRequest| {
        Op::CheckpointEnd { end }
    })
    .await
}

/// `POST /admin/truncate {"before"}`: removes changes before `before` from the list; 409
/// when `before - 1` is past the newest full checkpoint.
pub async fn truncate(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admin(&app, &access, &headers, body, |t: TruncateRequest| {
        Op::Truncate { before: t.before }
    })
    .await
}
