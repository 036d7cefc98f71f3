//! Writes on any node: a follower forwards a write to the leader and returns the leader's
//! answer unchanged; with no leader it answers 503 with `Retry-After` once the write timeout
//! has passed.
//!
//! Rules:
//! 1. Only requests that change state are forwarded (not GET/HEAD), and only once: a
//!    forwarded request carries [`FORWARDED_HEADER`] and is handled where it lands (a node
//!    that lost leadership meanwhile answers 503; the client retries).
//! 2. A leader that cannot be reached is given up on only when the cluster has elected
//!    another; until the deadline the request waits for that.
//! 3. A failure after the request reached the leader is a 503 saying the write may have
//!    been applied, so the client retries with the same `Idempotency-Key`.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use changeagent_api::body::body_bytes;
use changeagent_api::ApiError;
use openraft::ServerState;
use tokio::time::Instant;

use super::AppState;
use crate::identity::CLUSTER_ID_HEADER;
use crate::raft::types::NodeId;
use crate::raft::Raft;

use changeagent_proto::headers::FORWARDED as FORWARDED_HEADER;
/// Extra time a forwarded request is given beyond the caller's deadline, so the leader's own
/// answer (which honours the same write timeout) arrives before ours.
const FORWARD_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a forwarded membership change may take (a join waits for the new node to catch
/// up, possibly through a large snapshot).
const MEMBERSHIP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

fn is_membership(path: &str) -> bool {
    path.starts_with("/cluster/")
}

/// Who leads, as this node sees it.
pub enum LeaderIs {
    Me,
    Other { id: NodeId, addr: String },
}

/// Waits until a leader other than `exclude` is known, or `deadline` passes (`None`).
pub async fn leader(
    raft: &Raft,
    me: NodeId,
    deadline: Instant,
    exclude: Option<NodeId>,
) -> Option<LeaderIs> {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            match m.current_leader {
                Some(l) if Some(l) == exclude => {}
                Some(l) if l == me && m.state == ServerState::Leader => return Some(LeaderIs::Me),
                Some(l) if l == me => {}
                Some(l) => {
                    let node = m.membership_config.membership().get_node(&l);
                    if let Some(node) = node {
                        return Some(LeaderIs::Other {
                            id: l,
                            addr: node.addr.clone(),
                        });
                    }
                }
                None => {}
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// The answer when no leader could be found in time.
pub fn no_leader(app: &AppState) -> ApiError {
    ApiError::Unavailable {
        message: format!(
            "no leader was available within {} ms (an election is running or a quorum of \
             nodes is down); retry shortly",
            app.config.write_timeout_ms
        ),
        retry_after_secs: 1,
    }
}

/// Marks an answer of this node's handlers meaning "not the leader (any more); nothing was
/// appended": the middleware then sends the request to the new leader.
#[derive(Debug, Clone, Copy)]
pub struct LostLeadership;

/// Middleware on write and membership routes: runs the request here on the leader, forwards
/// it from a follower. First, with `--peer-ca`, `POST /cluster/join` needs a peer
/// certificate (checked on the node the joiner reached, before a follower forwards it).
pub async fn to_leader(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/cluster/join" {
        if let Err(e) = app.identity.check_certificate(req.extensions()) {
            tracing::warn!(error = %e, "refused a join");
            return ApiError::from(e).into_response();
        }
    }
    if matches!(*req.method(), Method::GET | Method::HEAD)
        || req.headers().contains_key(FORWARDED_HEADER)
    {
        return next.run(req).await;
    }
    let deadline = Instant::now() + app.config.write_timeout();
    let mut current = leader(&app.raft, app.node_id, deadline, None).await;
    if is_membership(req.uri().path()) && matches!(current, Some(LeaderIs::Me)) {
        // Membership changes are not retried elsewhere: run them here as they stream in.
        return next.run(req).await;
    }
    // The body is kept so the request can go to a new leader if this one loses leadership.
    let (parts, body) = req.into_parts();
    let bytes = match body_bytes(&parts.headers, body, app.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    loop {
        let exclude = match current {
            None => return no_leader(&app).into_response(),
            Some(LeaderIs::Me) => {
                let req = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
                let resp = run_here(&app, next.clone(), req, deadline).await;
                if resp.extensions().get::<LostLeadership>().is_none() {
                    return resp;
                }
                app.node_id
            }
            Some(LeaderIs::Other { id, addr }) => {
                match send(&app, &parts, bytes.clone(), &addr, deadline).await {
                    Ok(resp) => return resp,
                    Err(Failed::Unknown(why)) => {
                        return ApiError::Unavailable {
                            message: format!(
                                "forwarding to the leader at {addr} failed ({why}); the write \
                                 may have been applied: retry with the same Idempotency-Key"
                            ),
                            retry_after_secs: 1,
                        }
                        .into_response()
                    }
                    Err(Failed::NotSent(why)) => {
                        tracing::debug!(leader = id, %addr, %why, "leader unreachable; waiting for a new one");
                        id
                    }
                }
            }
        };
        current = leader(&app.raft, app.node_id, deadline, Some(exclude)).await;
    }
}

/// Runs the request on this node (the leader), answering 503 if the deadline passes first:
/// waiting for a leader and committing share one write timeout.
async fn run_here(app: &AppState, next: Next, req: Request, deadline: Instant) -> Response {
    if is_membership(req.uri().path()) {
        // A join waits for the new node to catch up; it is not bound by the write timeout.
        return next.run(req).await;
    }
    match tokio::time::timeout_at(deadline, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Unavailable {
            message: format!(
                "the write was not committed within {} ms and may still be applied; retry \
                 with the same Idempotency-Key",
                app.config.write_timeout_ms
            ),
            retry_after_secs: 1,
        }
        .into_response(),
    }
}

/// Why forwarding gave no answer.
enum Failed {
    /// The request never reached the leader (connection refused): safe to send elsewhere.
    NotSent(String),
    /// It may have reached the leader.
    Unknown(String),
}

fn hop_by_hop(name: &HeaderName) -> bool {
    changeagent_proto::headers::is_hop_by_hop(name.as_str())
}

/// Sends one request to the leader and turns its answer into ours, unchanged.
async fn send(
    app: &AppState,
    parts: &axum::http::request::Parts,
    body: Bytes,
    addr: &str,
    deadline: Instant,
) -> Result<Response, Failed> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let timeout = if is_membership(parts.uri.path()) {
        MEMBERSHIP_TIMEOUT
    } else {
        deadline.saturating_duration_since(Instant::now()) + FORWARD_GRACE
    };
    let mut builder = app
        .client
        .request(
            parts.method.clone(),
            format!("{}{path}", app.identity.base_url(addr)),
        )
        .timeout(timeout)
        .header(FORWARDED_HEADER, app.node_id.to_string())
        .body(body);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            builder = builder.header(name, value);
        }
    }
    let resp = builder.send().await.map_err(|e| {
        if e.is_connect() {
            Failed::NotSent(e.to_string())
        } else {
            Failed::Unknown(e.to_string())
        }
    })?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Failed::Unknown(e.to_string()))?;
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    for (name, value) in &headers {
        if !hop_by_hop(name) && name.as_str() != CLUSTER_ID_HEADER {
            out.headers_mut().append(name, value.clone());
        }
    }
    Ok(out)
}
