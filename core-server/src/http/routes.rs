//! The router: read routes merged with write, ops and Raft routes, under shared layers.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use changeagent_api::auth::Auth;
use changeagent_api::{finish_router, read_router, ReadApi};

use crate::raft::peer_stream::STREAM_PATH;

use super::{admin, cluster, forward, handlers, raft, AppState};

/// Builds the node's whole router.
pub fn router(app: Arc<AppState>, read: Arc<ReadApi>, auth: Arc<Auth>) -> Router {
    let writes = Router::new()
        .route("/changes", post(handlers::post_changes))
        .route("/tenants", post(handlers::create_tenant))
        .route(
            "/tenants/{tenant}/changes",
            post(handlers::post_tenant_changes),
        )
        .route(
            "/tenants/{tenant}/collections",
            post(handlers::create_collection),
        )
        .route("/collections/{collection}/keys", post(handlers::post_key))
        .route(
            "/collections/{collection}/keys/{key}",
            put(handlers::put_key).delete(handlers::delete_key),
        )
        .route("/admin/checkpoints/start", post(admin::checkpoint_start))
        .route("/admin/checkpoints/end", post(admin::checkpoint_end))
        .route("/admin/truncate", post(admin::truncate))
        .route("/cluster/join", post(cluster::join))
        .route("/cluster/members/{id}", delete(cluster::remove_member))
        // Followers forward these to the leader; a join is peer traffic (a peer certificate
        // with --peer-ca), checked before.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            forward::to_leader,
        ))
        .route("/cluster", get(cluster::get_cluster))
        .route("/cluster/leave", post(cluster::leave))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        // Bodies are read with their own limit check (413 as JSON), not axum's.
        .layer(DefaultBodyLimit::disable())
        .with_state(app.clone());
    let raft_routes = Router::new()
        .route("/raft/append", post(raft::append))
        .route(STREAM_PATH, get(raft::stream))
        .route("/raft/vote", post(raft::vote))
        .route("/raft/pre-vote", post(raft::pre_vote))
        .route("/raft/transfer-leader", post(raft::transfer_leader))
        .route("/raft/read-index", post(raft::read_index))
        .route("/raft/identity", get(raft::identity))
        .layer(DefaultBodyLimit::max(raft::MAX_RAFT_BODY))
        .route(
            "/raft/snapshot",
            post(raft::snapshot).layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            raft::peer_guard,
        ))
        .with_state(app.clone());
    let router = read_router(read).merge(writes).merge(raft_routes);
    finish_router(router, auth, app.store.clone(), app.metrics.clone())
}
