//! Write, ops and admin handlers of the core. A write is checked against the local state
//! first (its idempotency key's answer, or a clear 4xx without touching the log; see
//! [`write`]), then proposed through the [`Proposer`] and answered with the state machine's
//! outcome.
//!
//! [`Proposer`]: crate::proposer::Proposer

use openraft::async_runtime::WatchReceiver;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_api::auth::Access;
use changeagent_api::body::json_body;
use changeagent_api::handlers::{collection_for, json_response, tenant_for};
use changeagent_api::metrics::gauge;
use changeagent_api::ApiError;
use changeagent_proto::types::{Health, NameRequest};
use changeagent_proto::Scope;
use changeagent_store::record::{compact_raw, validate_name};
use changeagent_store::{parse_post_body, ChangeInput, Error as StoreError, PostBody, Store};
use openraft::ServerState;
use serde_json::value::RawValue;

use super::forward::LostLeadership;
use super::AppState;
use crate::proposer::ProposeError;
use crate::raft::network::VOTES_SENT;
use crate::raft::peer_stream::RECEIVED;
use crate::raft::types::{Op, Outcome, Request};
use crate::stages::{Stage, STAGES};

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

/// Checks one request before proposing it, proposes it and turns the outcome into an answer.
///
/// Rules:
/// 1. A request whose `Idempotency-Key` was answered already gets that first answer, before
///    any other check: a retry after a 503 ("may still be applied") of a DELETE or a create
///    must not turn into a 404 or 409 because its first attempt succeeded.
/// 2. Otherwise the checks the state machine will make run against the local state on a
///    throwaway transaction, so a bad request is a 4xx without a log entry; both answer the
///    store's one typed [`changeagent_store::Rejection`], which the api crate maps.
/// 3. When those checks refuse a request with a key, the key's first attempt may be committed
///    but not applied here yet (a new leader): this node catches up with the cluster (a read
///    barrier) and checks once more before it answers the refusal.
/// 4. The state machine answers from the key again, so a retry racing its first attempt is
///    never applied twice.
pub(crate) async fn write(
    app: &AppState,
    access: &Access,
    idempotency_key: Option<String>,
    op: Op,
) -> Result<Response, ApiError> {
    authorize(&app.store, access, &op)?;
    let started = Instant::now();
    let request = Request {
        idempotency_key,
        op,
    };
    let request = match precheck(app, request).await? {
        Checked::Answered(body) => return Ok(json_response(body)),
        Checked::Propose(request) => request,
    };
    let answer = propose(app, request).await;
    STAGES.since(Stage::Write, started);
    answer
}

async fn propose(app: &AppState, request: Request) -> Result<Response, ApiError> {
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

/// 403 unless `access` may make `op`: a token limited to tenants writes only changes, keys,
/// collections and scoped checkpoints of those tenants. Checked before the idempotency key's
/// answer, so another token's key tells nothing.
fn authorize(store: &Store, access: &Access, op: &Op) -> Result<(), ApiError> {
    if access.all_tenants() {
        return Ok(());
    }
    match op {
        Op::Append { changes, .. } => changes
            .iter()
            .try_for_each(|c| authorize_change(store, access, c)),
        Op::CreateTenant { name } => access.check_tenant(name),
        Op::CreateCollection { tenant, .. } => access.check_tenant(tenant),
        Op::CheckpointStart { start, .. } => authorize_scope(access, &start.scope),
        Op::CheckpointEnd { end } => authorize_scope(access, &end.manifest.scope),
        Op::Truncate { .. } | Op::SetClusterId { .. } => access.check_all_tenants("this request"),
    }
}

fn authorize_scope(access: &Access, scope: &Scope) -> Result<(), ApiError> {
    match scope {
        Scope::All => access.check_all_tenants("a full checkpoint"),
        Scope::Tenant(t) => access.check_tenant(t),
    }
}

/// A change's tenant: the one it names (by name or id), else its collection's.
fn authorize_change(store: &Store, access: &Access, c: &ChangeInput) -> Result<(), ApiError> {
    match (&c.tenant, &c.collection) {
        (Some(t), _) => tenant_for(access, store, t)
            .map(drop)
            .or_else(not_found_is_ok),
        (None, Some(col)) => collection_for(access, store, col)
            .map(drop)
            .or_else(not_found_is_ok),
        (None, None) => access.check_all_tenants("a change that names no tenant"),
    }
}

/// An allowed reference that does not resolve is the write's own 404 to answer (after its
/// idempotency key), not an authorization failure.
fn not_found_is_ok(e: ApiError) -> Result<(), ApiError> {
    match e {
        ApiError::NotFound(_) => Ok(()),
        other => Err(other),
    }
}

/// What the check before proposing found.
enum Checked {
    /// The idempotency key's first answer.
    Answered(Vec<u8>),
    /// Nothing against it: propose it.
    Propose(Request),
}

/// Rules 1-3 of [`write`]; store reads run on the blocking pool, never on the workers. A
/// request without a key and without references has nothing to check and takes no hop.
async fn precheck(app: &AppState, request: Request) -> Result<Checked, ApiError> {
    if request.idempotency_key.is_none() && !references_state(&request.op) {
        return Ok(Checked::Propose(request));
    }
    let started = Instant::now();
    let (request, verdict) = dry_run_blocking(app, request).await?;
    let (request, verdict) = match verdict {
        Err(StoreError::Rejected(_)) if request.idempotency_key.is_some() => {
            let timeout = app.config.write_timeout();
            match tokio::time::timeout(
                timeout,
                app.raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
            )
            .await
            {
                Ok(Ok(_)) => dry_run_blocking(app, request).await?,
                // Not the leader any more, or no quorum: the refusal may be stale.
                _ => {
                    return Err(ApiError::Unavailable {
                        message: "cannot confirm the state this request was checked against \
                                  (leader change?); retry with the same Idempotency-Key"
                            .into(),
                        retry_after_secs: 1,
                    })
                }
            }
        }
        other => (request, other),
    };
    STAGES.since(Stage::Precheck, started);
    match verdict {
        Ok(Some(answer)) => Ok(Checked::Answered(answer)),
        Ok(None) => Ok(Checked::Propose(request)),
        Err(e) => Err(e.into()),
    }
}

/// Whether the state machine may refuse `op` for what the state holds.
fn references_state(op: &Op) -> bool {
    match op {
        Op::Append { changes, .. } => changes
            .iter()
            .any(|c| c.tenant.is_some() || c.collection.is_some()),
        Op::CreateTenant { .. } | Op::CreateCollection { .. } => true,
        _ => false,
    }
}

type Verdict = (Request, Result<Option<Vec<u8>>, StoreError>);

async fn dry_run_blocking(app: &AppState, request: Request) -> Result<Verdict, ApiError> {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        let verdict = dry_run(&store, &request);
        (request, verdict)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("check task failed: {e}")))
}

/// The key's first answer, or the state machine's checks on a transaction never committed.
fn dry_run(store: &Store, request: &Request) -> Result<Option<Vec<u8>>, StoreError> {
    let mut txn = store.begin();
    if let Some(key) = &request.idempotency_key {
        if let Some(answer) = txn.idempotent_answer(key)? {
            return Ok(Some(answer));
        }
    }
    match &request.op {
        Op::Append { changes, .. } if references_state(&request.op) => {
            txn.append(0, changes)?;
        }
        Op::CreateTenant { name } => {
            txn.create_tenant(0, name)?;
        }
        Op::CreateCollection { tenant, name } => {
            txn.create_collection(0, tenant, name)?;
        }
        _ => {}
    }
    Ok(None)
}

async fn append(
    app: &AppState,
    access: &Access,
    headers: &HeaderMap,
    body: PostBody,
    tenant: Option<String>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let batch = matches!(body, PostBody::Batch(_));
    let mut changes = body.into_changes();
    if let Some(t) = tenant {
        let tenant = tenant_for(access, &app.store, &t)?;
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
    write(app, access, key, Op::Append { changes, batch }).await
}

/// Bodies up to this size are parsed on the async worker; larger ones on the blocking pool.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

/// Parses a posted change or batch, off the async workers when it is large.
async fn parse_changes(bytes: axum::body::Bytes) -> Result<PostBody, ApiError> {
    if bytes.len() <= PARSE_INLINE_BYTES {
        return Ok(parse_post_body(&bytes)?);
    }
    tokio::task::spawn_blocking(move || parse_post_body(&bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("parsing task failed: {e}")))?
        .map_err(ApiError::from)
}

/// `POST /changes`.
pub async fn post_changes(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let parsed = parse_changes(bytes).await?;
    append(&app, &access, &headers, parsed, None).await
}

/// `POST /tenants/{t}/changes`.
pub async fn post_tenant_changes(
    State(app): State<Arc<AppState>>,
    access: Access,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let parsed = parse_changes(bytes).await?;
    append(&app, &access, &headers, parsed, Some(tenant)).await
}

/// `POST /tenants`.
pub async fn create_tenant(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let req: NameRequest = parse_object(&bytes)?;
    validate_name(&req.name)?;
    let key = idempotency_key(&headers)?;
    write(&app, &access, key, Op::CreateTenant { name: req.name }).await
}

/// `POST /tenants/{t}/collections`.
pub async fn create_collection(
    State(app): State<Arc<AppState>>,
    access: Access,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = json_body(&headers, body, app.config.max_body_bytes).await?;
    let req: NameRequest = parse_object(&bytes)?;
    validate_name(&req.name)?;
    let t = tenant_for(&access, &app.store, &tenant)?;
    let key = idempotency_key(&headers)?;
    write(
        &app,
        &access,
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
    access: &Access,
    headers: &HeaderMap,
    collection: &str,
    key: String,
    op: KeyedOp,
) -> Result<Response, ApiError> {
    let c = collection_for(access, &app.store, collection)?;
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
    append(app, access, headers, PostBody::One(change), None).await
}

/// `PUT /collections/{c}/keys/{key}`: the body is the key's new value.
pub async fn put_key(
    State(app): State<Arc<AppState>>,
    access: Access,
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
    keyed_write(&app, &access, &headers, &collection, key, op).await
}

/// `POST /collections/{c}/keys` with `{"key", "data", "tags"?}` (the client's
/// `KeyWrite`).
pub async fn post_key(
    State(app): State<Arc<AppState>>,
    access: Access,
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
    keyed_write(&app, &access, &headers, &collection, req.key, op).await
}

/// `DELETE /collections/{c}/keys/{key}`.
pub async fn delete_key(
    State(app): State<Arc<AppState>>,
    access: Access,
    Path((collection, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    keyed_write(&app, &access, &headers, &collection, key, KeyedOp::Delete).await
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
    let m = app.raft.metrics().borrow_watched().clone();
    let state = app.store.state();
    // What reads see: the store answers a write before openraft's metrics learn of it.
    let applied = app.applied.get();
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
    let mut out = String::with_capacity(16 * 1024);
    app.metrics.render(&mut out);
    STAGES.render(&mut out);
    RECEIVED.render(&mut out);
    VOTES_SENT.render(&mut out);
    let m = app.raft.metrics().borrow_watched().clone();
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
