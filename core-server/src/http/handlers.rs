//! Write, ops and admin handlers of the core. A write is checked against the local state
//! first (a clear 4xx without touching the log), then proposed through the [`Proposer`] and
//! answered with the state machine's outcome.
//!
//! [`Proposer`]: crate::proposer::Proposer

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_api::body::json_body;
use changeagent_api::handlers::{json_response, tenant_or_404};
use changeagent_api::metrics::gauge;
use changeagent_api::ApiError;
use changeagent_proto::types::{Health, NameRequest};
use changeagent_store::record::{compact_raw, validate_name};
use changeagent_store::{parse_post_body, ChangeInput, PostBody};
use openraft::ServerState;
use serde_json::value::RawValue;

use super::forward::LostLeadership;
use super::AppState;
use crate::proposer::ProposeError;
use crate::raft::types::{Op, Outcome, Request};

use changeagent_proto::limits::MAX_IDEMPOTENCY_KEY;

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(changeagent_proto::headers::IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= MAX_IDEMPOTENCY_KEY => Ok(Some(s.to_owned())),
        _ => Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))),
    }
}

fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

/// Parses a body that must be a JSON object (serde would also accept an array for a struct).
pub(crate) fn parse_object<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    }
    parse_json(bytes)
}

/// Proposes one request and turns the outcome into an answer.
pub(crate) async fn write(
    app: &AppState,
    idempotency_key: Option<String>,
    op: Op,
) -> Result<Response, ApiError> {
    let request = Request {
        idempotency_key,
        op,
    };
    let timeout = app.config.write_timeout();
    match tokio::time::timeout(timeout, app.proposer.propose(request)).await {
        Err(_) => Err(ApiError::Unavailable {
            message: format!(
                "the write was not committed within {} ms and may still be applied; retry with \
                 the same Idempotency-Key",
                timeout.as_millis()
            ),
            retry_after_secs: 1,
        }),
        Ok(Err(ProposeError::NotLeader { leader })) => {
            // Raft appended nothing (or truncated it uncommitted): the forwarding middleware
            // sends the request on to the new leader, seeing the marker.
            let mut resp = ApiError::Unavailable {
                message: match leader {
                    Some(l) => format!("this node is not the leader any more; node {l} is"),
                    None => "no leader is elected right now; retry shortly".into(),
                },
                retry_after_secs: 1,
            }
            .into_response();
            resp.extensions_mut().insert(LostLeadership);
            Ok(resp)
        }
        Ok(Err(ProposeError::Stopped(why))) => Err(ApiError::Unavailable {
            message: format!("this node is shutting down ({why}); retry on another node"),
            retry_after_secs: 1,
        }),
        Ok(Ok(Outcome::Ok { body })) => Ok(json_response(body.into_bytes())),
        Ok(Ok(Outcome::Rejected { rejection })) => Err(rejection.into()),
    }
}

/// Dry-runs changes that reference tenants, collections or keys against the local state, so
/// a bad reference is a 4xx before anything reaches the log. The state machine checks again.
fn precheck(app: &AppState, changes: &[ChangeInput]) -> Result<(), ApiError> {
    if changes
        .iter()
        .all(|c| c.tenant.is_none() && c.collection.is_none())
    {
        return Ok(());
    }
    let mut txn = app.store.begin();
    txn.append(0, changes)?;
    Ok(())
}

async fn append(
    app: &AppState,
    headers: &HeaderMap,
    body: PostBody,
    tenant: Option<String>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let batch = matches!(body, PostBody::Batch(_));
    let mut changes = body.into_changes();
    if let Some(t) = tenant {
        let tenant = tenant_or_404(&app.store, &t)?;
        for c in &mut changes {
            match &c.tenant {
                Some(other) if *other != tenant.name && *other != tenant.id.to_string() => {
                    return Err(ApiError::BadRequest(format!(
                        "change names tenant {other:?} but was posted to tenant {:?}",
                        tenant.name
                    )))
                }
                _ => c.tenant = Some(tenant.name.clone()),
            }
        }
    }
    precheck(app, &changes)?;
    write(app, key, Op::Append { changes, batch }).await
}

/// `POST /changes`.
pub async fn post_changes(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let parsed = parse_post_body(&bytes)?;
    append(&app, &headers, parsed, None).await
}

/// `POST /tenants/{t}/changes`.
pub async fn post_tenant_changes(
    State(app): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let parsed = parse_post_body(&bytes)?;
    append(&app, &headers, parsed, Some(tenant)).await
}

/// `POST /tenants`.
pub async fn create_tenant(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let req: NameRequest = parse_object(&bytes)?;
    validate_name(&req.name)?;
    if app.store.tenant(&req.name).is_some() {
        return Err(ApiError::Conflict(format!(
            "tenant {:?} already exists",
            req.name
        )));
    }
    let key = idempotency_key(&headers)?;
    write(&app, key, Op::CreateTenant { name: req.name }).await
}

/// `POST /tenants/{t}/collections`.
pub async fn create_collection(
    State(app): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let req: NameRequest = parse_object(&bytes)?;
    validate_name(&req.name)?;
    let t = tenant_or_404(&app.store, &tenant)?;
    if app
        .store
        .collections(t.id)
        .iter()
        .any(|c| c.name == req.name)
    {
        return Err(ApiError::Conflict(format!(
            "collection {:?} already exists in tenant {:?}",
            req.name, t.name
        )));
    }
    let key = idempotency_key(&headers)?;
    write(
        &app,
        key,
        Op::CreateCollection {
            tenant: t.name,
            name: req.name,
        },
    )
    .await
}

/// What a keyed write does to its key.
enum KeyedOp {
    Put {
        data: Box<RawValue>,
        tags: Vec<String>,
    },
    Delete,
}

async fn keyed_write(
    app: &AppState,
    headers: &HeaderMap,
    collection: &str,
    key: String,
    op: KeyedOp,
) -> Result<Response, ApiError> {
    let c = app.store.collection(collection)?;
    let (data, tags, deleted) = match op {
        KeyedOp::Put { data, tags } => (Some(data), tags, false),
        KeyedOp::Delete => (None, Vec::new(), true),
    };
    let change = ChangeInput {
        tags,
        tenant: Some(c.tenant),
        collection: Some(c.id.to_string()),
        key: Some(key),
        deleted,
        data,
        ..ChangeInput::default()
    };
    change.validate()?;
    append(app, headers, PostBody::One(change), None).await
}

/// `PUT /collections/{c}/keys/{key}`: the body is the key's new value.
pub async fn put_key(
    State(app): State<Arc<AppState>>,
    Path((collection, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let raw: &RawValue = parse_json(&bytes)?;
    let data = compact_raw(raw)?;
    let op = KeyedOp::Put {
        data,
        tags: Vec::new(),
    };
    keyed_write(&app, &headers, &collection, key, op).await
}

/// `POST /collections/{c}/keys` with `{"key", "data", "tags"?}` (the client's
/// `KeyWrite`).
pub async fn post_key(
    State(app): State<Arc<AppState>>,
    Path(collection): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    /// The client's `KeyWrite`, with `data` kept as the client's bytes (key order included).
    #[derive(serde::Deserialize)]
    struct RawKeyWrite<'a> {
        key: String,
        #[serde(borrow)]
        data: &'a RawValue,
        #[serde(default)]
        tags: Vec<String>,
    }
    let req: RawKeyWrite = parse_object(&bytes)?;
    let op = KeyedOp::Put {
        data: compact_raw(req.data)?,
        tags: req.tags,
    };
    keyed_write(&app, &headers, &collection, req.key, op).await
}

/// `DELETE /collections/{c}/keys/{key}`.
pub async fn delete_key(
    State(app): State<Arc<AppState>>,
    Path((collection, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    keyed_write(&app, &headers, &collection, key, KeyedOp::Delete).await
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner | ServerState::Shutdown => "learner",
    }
}

/// `GET /health`.
pub async fn health(State(app): State<Arc<AppState>>) -> Json<Health> {
    let m = app.raft.metrics().borrow().clone();
    let state = app.store.state();
    let applied = m.last_applied.map(|l| l.index);
    let membership = m.membership_config.membership();
    let removed =
        membership.nodes().next().is_some() && membership.get_node(&app.node_id).is_none();
    Json(Health {
        role: if removed { "removed" } else { role(m.state) }.to_owned(),
        node_id: Some(app.node_id),
        leader: m.current_leader,
        term: m.current_term,
        cluster_id: state.cluster_id,
        first_index: state.first_index,
        last_index: state.last_id,
        applied_log_index: applied,
        lag: m
            .last_log_index
            .unwrap_or(0)
            .saturating_sub(applied.unwrap_or(0)),
    })
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut out = String::with_capacity(4096);
    app.metrics.render(&mut out);
    let m = app.raft.metrics().borrow().clone();
    let s = app.store.state();
    gauge(
        &mut out,
        "changeagent_applied_index",
        "Newest applied change _id.",
        s.last_id,
    );
    gauge(
        &mut out,
        "changeagent_first_index",
        "Oldest retained change _id.",
        s.first_index,
    );
    gauge(
        &mut out,
        "changeagent_raft_term",
        "Current Raft term.",
        m.current_term,
    );
    gauge(
        &mut out,
        "changeagent_raft_is_leader",
        "1 when this node is the Raft leader.",
        u8::from(m.state == ServerState::Leader),
    );
    gauge(
        &mut out,
        "changeagent_raft_last_log_index",
        "Index of the last Raft log entry.",
        m.last_log_index.unwrap_or(0),
    );
    gauge(
        &mut out,
        "changeagent_raft_applied_log_index",
        "Index of the last Raft log entry applied.",
        m.last_applied.map_or(0, |l| l.index),
    );
    let stats = app.proposer.stats();
    let entries = stats.entries.load(std::sync::atomic::Ordering::Relaxed);
    let requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP changeagent_proposed_entries_total Raft entries proposed by this node.\n\
         # TYPE changeagent_proposed_entries_total counter\n\
         changeagent_proposed_entries_total {entries}\n\
         # HELP changeagent_proposed_requests_total Client requests carried by those entries.\n\
         # TYPE changeagent_proposed_requests_total counter\n\
         changeagent_proposed_requests_total {requests}"
    );
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
