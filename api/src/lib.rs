//! ChangeAgent's read API, served identically by core nodes and edges: change lists with
//! long-poll, single changes, tenants, collections and keys; plus what the write routes of a
//! core share with it: [`ApiError`] (the one place store errors become HTTP statuses), body
//! reading, metrics, and serving with a drain on shutdown.
//!
//! # Layout
//! - [`auth`]: bearer tokens with scopes and tenants, the request rate per token.
//! - [`handlers`]: the read handlers.
//! - [`checkpoints`]: the kept checkpoints and their bytes.
//! - [`error`]: [`ApiError`] and the mapping from store errors and rejections.
//! - [`body`]: reading request bodies (415, 413).
//! - [`metrics`]: Prometheus metrics of the HTTP layer.
//! - [`lean`]: a lean HTTP/1.1 server that holds no buffer while a long-poll waits.
//! - [`limits`]: the operator's limits of a listener (head timeout, connections), their
//!   flags, and the open-file limit they need.
//! - [`serve`]: serving a router until shutdown, then draining.

pub mod auth;
pub mod body;
pub mod checkpoints;
pub mod error;
pub mod handlers;
pub mod lean;
pub mod limits;
pub mod metrics;
pub mod serve;
pub mod tls;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use changeagent_store::{Objects, Store};
pub use error::ApiError;
pub use metrics::HttpMetrics;

/// Limits the read API enforces.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Longest `block` a client may ask for, in seconds.
    pub max_block_secs: u64,
    /// Long-polls waiting at once at most (`--max-long-polls`); one more is answered 503.
    pub max_long_polls: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_block_secs: changeagent_proto::limits::DEFAULT_MAX_BLOCK_SECS,
            max_long_polls: usize::MAX,
        }
    }
}

/// State of the read routes.
pub struct ReadApi {
    pub store: Arc<Store>,
    pub limits: ReadLimits,
    pub metrics: Arc<HttpMetrics>,
    /// Cancelled at shutdown: waiting long-polls answer at once so the server can drain.
    pub shutdown: CancellationToken,
    /// What `consistent=true` waits for; `None` where local state is always current (a
    /// single store with no cluster behind it).
    pub barrier: Option<Arc<dyn ReadBarrier>>,
    /// Where checkpoint data is read from for `GET /checkpoints/{index}/data`.
    pub objects: Option<Arc<Objects>>,
}

/// A future answering a read barrier.
pub type BarrierFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send + 'a>>;

/// Makes a read reflect every write acknowledged before the read began (`consistent=true`):
/// a cluster node confirms with its leader and waits until it has applied that far.
pub trait ReadBarrier: Send + Sync {
    fn wait(&self) -> BarrierFuture<'_>;
}

impl ReadApi {
    /// A `410` names the checkpoint to load: for a tenant's list that tenant's newest scoped
    /// checkpoint when there is one, else the newest full one; none that `access` may not
    /// read (a token limited to tenants reads only their scoped checkpoints).
    pub async fn with_checkpoint(
        &self,
        err: ApiError,
        tenant: Option<&str>,
        access: &auth::Access,
    ) -> ApiError {
        let ApiError::Gone {
            first_index,
            checkpoint: None,
        } = err
        else {
            return err;
        };
        let tenant = tenant.map(str::to_owned);
        let manifest = handlers::blocking(&self.store, move |s| {
            s.manifest_for_reset(tenant.as_deref())
        })
        .await;
        match manifest {
            Ok(m) => ApiError::Gone {
                first_index,
                checkpoint: m
                    .filter(|m| checkpoints::may_read(access, &m.scope))
                    .map(Box::new),
            },
            Err(e) => e,
        }
    }

    /// Waits for the read barrier when `consistent` is asked for.
    pub async fn barrier(&self, consistent: bool) -> Result<(), ApiError> {
        match (&self.barrier, consistent) {
            (Some(b), true) => b.wait().await,
            _ => Ok(()),
        }
    }
}

/// The read routes, with their state applied.
pub fn read_router(api: Arc<ReadApi>) -> Router {
    Router::new()
        .route("/changes", get(handlers::list_changes))
        .route("/changes/{id}", get(handlers::get_change))
        .route("/tenants", get(handlers::list_tenants))
        .route("/tenants/{tenant}", get(handlers::get_tenant))
        .route("/tenants/{tenant}/changes", get(handlers::tenant_changes))
        .route(
            "/tenants/{tenant}/collections",
            get(handlers::list_collections),
        )
        .route("/collections/{collection}", get(handlers::get_collection))
        .route("/collections/{collection}/keys", get(handlers::list_keys))
        .route(
            "/collections/{collection}/keys/{key}",
            get(handlers::get_key),
        )
        .route("/checkpoints", get(checkpoints::list))
        .route("/checkpoints/latest", get(checkpoints::latest))
        .route("/checkpoints/{index}/data", get(checkpoints::data))
        .with_state(api)
}

/// What every request passes through first, as one layer (a layer per concern cost a boxed
/// future and a service clone each, on every write): metrics outermost, then `X-Cluster-Id`
/// on every answer once the cluster has an id, then auth (every request's
/// [`auth::Access`]), so refused requests are counted and carry the header too.
struct Outer {
    auth: Arc<auth::Auth>,
    store: Arc<Store>,
    metrics: Arc<metrics::HttpMetrics>,
    /// The header for the id last seen, so an answer clones it instead of building it.
    cluster_id: std::sync::Mutex<Option<(String, HeaderValue)>>,
}

impl Outer {
    fn cluster_id_header(&self) -> Option<HeaderValue> {
        self.store.with_cluster_id(|id| {
            let id = id?;
            let mut cached = self.cluster_id.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((seen, value)) = cached.as_ref() {
                if seen == id {
                    return Some(value.clone());
                }
            }
            let value = HeaderValue::from_str(id).ok()?;
            *cached = Some((id.to_owned(), value.clone()));
            Some(value)
        })
    }
}

async fn outer(State(outer): State<Arc<Outer>>, mut req: Request, next: Next) -> Response {
    let tracked = metrics::Tracked::start(&req);
    let mut resp = match outer.auth.admit(&mut req) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    };
    if let Some(id) = outer.cluster_id_header() {
        resp.headers_mut()
            .insert(changeagent_proto::headers::CLUSTER_ID, id);
    }
    tracked.finish(&outer.metrics, resp.status().as_u16());
    resp
}

/// Adds the shared outer layers: fallbacks (JSON 404/405), auth, cluster id header, metrics.
pub fn finish_router(
    router: Router,
    auth: Arc<auth::Auth>,
    store: Arc<Store>,
    metrics: Arc<HttpMetrics>,
) -> Router {
    outer_layers(with_fallbacks(router), auth, store, metrics)
}

/// The JSON 404 and 405 answers. A layer added after this also runs for requests that end
/// in them (an edge forwards every write, whatever its path).
pub fn with_fallbacks(router: Router) -> Router {
    router
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
}

/// The layer every request passes first: metrics, `X-Cluster-Id`, auth (see [`Outer`]).
pub fn outer_layers(
    router: Router,
    auth: Arc<auth::Auth>,
    store: Arc<Store>,
    metrics: Arc<HttpMetrics>,
) -> Router {
    let outer_state = Arc::new(Outer {
        auth,
        store,
        metrics,
        cluster_id: std::sync::Mutex::new(None),
    });
    router.layer(axum::middleware::from_fn_with_state(outer_state, outer))
}
