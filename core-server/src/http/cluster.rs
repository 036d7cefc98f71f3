//! Membership routes: `GET /cluster`, `POST /cluster/join`, `POST /cluster/leave`,
//! `DELETE /cluster/members/{id}`.
//!
//! Joining follows openraft's rule: add the node as a learner, wait until it has caught up
//! (from the log or a snapshot), then change the membership to make it a voter. Changes run
//! on the leader; the forwarding middleware sends them there from a follower.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_api::auth::Access;
use changeagent_api::body::json_body;
use changeagent_api::ApiError;
use changeagent_proto::types::{ClusterInfo, ClusterMember, JoinRequest, Removed};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::time::Instant;

use super::forward::{leader, no_leader, LeaderIs};
use super::AppState;
use crate::raft::types::NodeId;
use crate::raft::Raft;

/// How long a follower waits for the leader's view of the cluster before answering its own.
const ASK_LEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's view of the cluster; `matched` is known only on the leader.
pub fn local_info(raft: &Raft, cluster_id: Option<String>) -> ClusterInfo {
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let leading = m.state == ServerState::Leader;
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let matched = if !leading {
                None
            } else if *id == m.id {
                m.last_log_index
            } else {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            ClusterMember {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                role: if Some(*id) == m.current_leader {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                }
                .into(),
                matched,
            }
        })
        .collect();
    ClusterInfo {
        cluster_id,
        leader: m.current_leader,
        term: m.current_term,
        members,
    }
}

fn info(app: &AppState) -> ClusterInfo {
    local_info(&app.raft, app.identity.cluster_id().map(|c| c.to_string()))
}

/// `GET /cluster`: the leader's view when a leader answers in time, else this node's own.
pub async fn get_cluster(State(app): State<Arc<AppState>>) -> Json<ClusterInfo> {
    let deadline = Instant::now() + ASK_LEADER_TIMEOUT;
    if let Some(LeaderIs::Other { addr, .. }) = leader(&app.raft, app.node_id, deadline, None).await
    {
        let req = app
            .client
            .get(format!("{}/cluster", app.identity.base_url(&addr)))
            .timeout(deadline.saturating_duration_since(Instant::now()));
        if let Ok(resp) = req.send().await {
            if let Ok(info) = resp.error_for_status() {
                if let Ok(info) = info.json::<ClusterInfo>().await {
                    return Json(info);
                }
            }
        }
    }
    Json(info(&app))
}

fn raft_error(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable {
        message: format!("{what} failed: {e}; retry"),
        retry_after_secs: 1,
    }
}

/// Who may change the membership: the cluster secret (when set) or, with an auth file, an
/// `admin` token without a tenant limit (the auth layer checked that); and never a node of
/// another cluster.
fn check_membership(app: &AppState, access: &Access, headers: &HeaderMap) -> Result<(), ApiError> {
    match access {
        Access::Token(_) => app.identity.check_cluster_header(headers)?,
        Access::Open | Access::ClusterSecret => app.identity.check_member(headers)?,
    }
    Ok(())
}

/// `POST /cluster/join` (on the leader): adds the node as a learner, waits until it caught
/// up, then makes it a voter. Repeating a finished join is harmless.
pub async fn join(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ClusterInfo>, ApiError> {
    check_membership(&app, &access, &headers)?;
    let bytes = json_body(&headers, body, 64 * 1024).await?;
    let req: JoinRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid join request: {e}")))?;
    let addr = req.addr.trim().to_owned();
    if crate::config::parse_peers(&addr).is_err() || req.node_id == 0 {
        return Err(ApiError::BadRequest(format!(
            "a join needs a node id > 0 and an address host:port, got {} and {addr:?}",
            req.node_id
        )));
    }
    let (voters, nodes) = {
        let m = app.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: Vec<(NodeId, String)> = membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        (voters, nodes)
    };
    if voters.contains(&req.node_id) {
        return Ok(Json(info(&app)));
    }
    if let Some((other, _)) = nodes
        .iter()
        .find(|(id, a)| *a == addr && *id != req.node_id)
    {
        return Err(ApiError::Conflict(format!(
            "address {addr} belongs to member {other}; remove it first with \
             DELETE /cluster/members/{other}"
        )));
    }
    tracing::info!(node_id = req.node_id, %addr, "adding a learner");
    let known = nodes.iter().any(|(id, _)| *id == req.node_id);
    if known {
        // Added by an earlier, interrupted join: wait until it has caught up again.
        let target = app.raft.metrics().borrow_watched().last_log_index;
        wait_caught_up(&app.raft, req.node_id, target).await;
    } else {
        app.raft
            .add_learner(req.node_id, BasicNode { addr: addr.clone() }, true)
            .await
            .map_err(|e| raft_error("adding the learner", e))?;
    }
    tracing::info!(
        node_id = req.node_id,
        "learner caught up; making it a voter"
    );
    app.raft
        .change_membership(
            ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id])),
            false,
        )
        .await
        .map_err(|e| raft_error("changing the membership", e))?;
    tracing::info!(node_id = req.node_id, %addr, "node joined as a voter");
    Ok(Json(info(&app)))
}

/// Waits until the leader has replicated up to `target` to `node`.
async fn wait_caught_up(raft: &Raft, node: NodeId, target: Option<u64>) {
    let mut metrics = raft.metrics();
    loop {
        let matched = metrics
            .borrow_and_update()
            .replication
            .as_ref()
            .and_then(|r| r.get(&node).cloned().flatten())
            .map(|l| l.index);
        if matched >= target {
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Removes `id` from the membership (on the leader).
async fn remove(app: &AppState, id: NodeId) -> Result<Removed, ApiError> {
    let (voters, known) = {
        let m = app.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known = membership.get_node(&id).is_some();
        (voters, known)
    };
    if !known {
        return Err(ApiError::NotFound(format!("node {id} is not a member")));
    }
    let change = if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(ApiError::Conflict(format!(
                "node {id} is the only voter; a cluster cannot remove its last voter"
            )));
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    tracing::info!(node_id = id, "removing a member");
    app.raft
        .change_membership(change, false)
        .await
        .map_err(|e| raft_error("changing the membership", e))?;
    tracing::info!(node_id = id, "member removed");
    Ok(Removed { removed: id })
}

/// `DELETE /cluster/members/{id}` (on the leader).
pub async fn remove_member(
    State(app): State<Arc<AppState>>,
    access: Access,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Removed>, ApiError> {
    check_membership(&app, &access, &headers)?;
    let id: NodeId = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid node id {id:?}")))?;
    Ok(Json(remove(&app, id).await?))
}

/// `POST /cluster/leave`: removes the node that receives it (through the leader), then shuts
/// it down.
pub async fn leave(
    State(app): State<Arc<AppState>>,
    access: Access,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_membership(&app, &access, &headers)?;
    let deadline = Instant::now() + app.config.write_timeout();
    let removed = match leader(&app.raft, app.node_id, deadline, None).await {
        None => return Err(no_leader(&app)),
        Some(LeaderIs::Me) => remove(&app, app.node_id).await?,
        Some(LeaderIs::Other { addr, .. }) => {
            let mut req = app
                .client
                .delete(format!(
                    "{}/cluster/members/{}",
                    app.identity.base_url(&addr),
                    app.node_id
                ))
                .timeout(app.config.write_timeout());
            // The caller's token, when it gave one, is what the leader checks.
            if let Some(token) = headers.get(header::AUTHORIZATION) {
                req = req.header(header::AUTHORIZATION, token);
            }
            let resp = app
                .identity
                .sign(req)
                .send()
                .await
                .map_err(|e| raft_error("asking the leader to remove this node", e))?;
            let status = resp.status();
            if !status.is_success() {
                // The leader's refusal goes to the client as the leader sent it.
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| raft_error("reading the leader's answer", e))?;
                let mut answer = (status, body).into_response();
                answer.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(answer);
            }
            resp.json::<Removed>()
                .await
                .map_err(|e| raft_error("reading the leader's answer", e))?
        }
    };
    tracing::info!(node_id = app.node_id, "left the cluster; shutting down");
    app.shutdown.cancel();
    Ok(Json(removed).into_response())
}
