//! Handlers of the read routes. RocksDB reads run on the blocking pool; long-polls wait on
//! the store's applied-index watch, woken once per applied batch, never by polling, and a
//! woken long-poll answers from the store's tail cache on the async worker when it can,
//! without a RocksDB read.

use std::sync::Arc;

use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use changeagent_proto::limits::DEFAULT_LIMIT;
use changeagent_proto::query::{parse_bool, parse_limit, ChangesQuery};
use changeagent_store::{Collection, Filter, PageInfo, Store, Tenant};

use crate::auth::Access;
use crate::error::ApiError;
use crate::metrics::PageSource;
use crate::ReadApi;

/// Store reads running at once in this process. Thousands of long-polls woken together
/// queue here, in order, rather than fill the blocking pool: a few reads keep both cores
/// busy, and other blocking work (a write's check, a snapshot) still finds a thread.
pub const MAX_CONCURRENT_READS: usize = 16;

static READ_SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_READS);

/// Woken long-polls building their answers at once in this process. One applied batch wakes
/// every waiting long-poll; without turns, thousands of them would be ready to run at once
/// and a Raft heartbeat arriving then would wait behind all of them. With turns, they queue
/// on this semaphore in order and the ready queue stays short.
pub const MAX_CONCURRENT_WAKEUPS: usize = 32;

static WAKE_SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_WAKEUPS);

/// Runs a blocking store call off the async workers, at most [`MAX_CONCURRENT_READS`] at
/// once.
pub async fn blocking<T, F>(store: &Arc<Store>, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&Store) -> changeagent_store::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let slot = READ_SLOTS
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(format!("read slots closed: {e}")))?;
    let store = store.clone();
    // The slot is held by the read itself, which runs on even when its request is dropped.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f(&store)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("read task failed: {e}")))?
    .map_err(ApiError::from)
}

/// A 200 answer with a JSON body already serialized.
pub fn json_response(body: Vec<u8>) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /changes`.
pub async fn list_changes(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    OriginalUri(uri): OriginalUri,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = ChangesQuery::parse(raw.as_deref(), api.limits.max_block_secs)?;
    // Only the path is kept: the URI shares the connection's read buffer.
    let path = uri.path().to_owned();
    drop((uri, raw));
    api.barrier(q.consistent).await?;
    serve_changes(&api, &access, &path, q).await
}

/// `GET /tenants/{t}/changes`: the change list of one tenant.
pub async fn tenant_changes(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(tenant): Path<String>,
    OriginalUri(uri): OriginalUri,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut q = ChangesQuery::parse(raw.as_deref(), api.limits.max_block_secs)?;
    q.tenant = Some(tenant);
    let path = uri.path().to_owned();
    drop((uri, raw));
    api.barrier(q.consistent).await?;
    serve_changes(&api, &access, &path, q).await
}

/// Answers a change query, long-polling when asked to and nothing matches yet. A token
/// limited to tenants reads only their lists (internal records are in the unfiltered list
/// only, so it never sees them).
pub async fn serve_changes(
    api: &ReadApi,
    access: &Access,
    path: &str,
    q: ChangesQuery,
) -> Result<Response, ApiError> {
    let store = &api.store;
    let tenant = match &q.tenant {
        Some(t) => Some(tenant_for(access, store, t)?),
        None => {
            access.check_all_tenants("the whole change list (ask for ?tenant=NAME)")?;
            None
        }
    };
    let filter = Arc::new(Filter {
        tags: q.tags.clone(),
        change_type: q.change_type,
        tenant: tenant.as_ref().map(|t| t.id),
    });
    let tenant_name = tenant.map(|t| t.name);
    let since = match q.since_time {
        Some(t) => q
            .since
            .max(blocking(store, move |s| s.since_for_time(t)).await?),
        None => q.since,
    };
    let deadline = Instant::now() + q.block;
    let mut applied = store.subscribe();
    let mut waiting = None;
    loop {
        let turn = match waiting {
            Some(_) => Some(
                WAKE_SLOTS
                    .acquire()
                    .await
                    .map_err(|e| ApiError::Internal(format!("wake-up turns closed: {e}")))?,
            ),
            None => None,
        };
        applied.borrow_and_update();
        let mut body = Vec::new();
        let page = match store.read_page_cached(since, q.limit, &filter, &mut body) {
            Some(page) => {
                api.metrics.page_read(PageSource::TailCache);
                page.map(|info| (body, info)).map_err(ApiError::from)
            }
            None => {
                api.metrics.page_read(PageSource::Store);
                let (f, limit) = (filter.clone(), q.limit);
                blocking(store, move |s| {
                    let mut body = Vec::new();
                    let info = s.read_page(since, limit, &f, &mut body)?;
                    Ok((body, info))
                })
                .await
            }
        };
        let (body, info) = match page {
            Ok(page) => page,
            Err(e) => return Err(api.with_checkpoint(e, tenant_name.as_deref(), access).await),
        };
        let stop = info.count > 0 || Instant::now() >= deadline || api.shutdown.is_cancelled();
        if stop || applied.has_changed().is_err() {
            return Ok(render_page(path, &q, since, body, info));
        }
        // Nothing to answer yet: wait holding no page buffer and no turn, so an idle
        // long-poll costs only its connection and this small future.
        drop((body, turn));
        if waiting.is_none() {
            let Some(guard) = api.metrics.long_poll(api.limits.max_long_polls) else {
                return Err(ApiError::Unavailable {
                    message: format!(
                        "{} long-polls are waiting already, the most this server takes; \
                         retry later",
                        api.limits.max_long_polls
                    ),
                    retry_after_secs: crate::limits::LONG_POLL_RETRY_AFTER_SECS,
                });
            };
            waiting = Some(guard);
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = api.shutdown.cancelled() => {}
        }
    }
}

fn render_page(
    path: &str,
    q: &ChangesQuery,
    since: u64,
    changes: Vec<u8>,
    info: PageInfo,
) -> Response {
    let mut out = Vec::with_capacity(changes.len() + 96);
    out.extend_from_slice(b"{\"changes\":[");
    out.extend_from_slice(&changes);
    out.extend_from_slice(
        format!(
            "],\"atStart\":{},\"atEnd\":{},\"firstIndex\":{},\"lastIndex\":{}}}",
            since < info.first_index,
            !info.more,
            info.first_index,
            info.last_index
        )
        .as_bytes(),
    );
    let mut resp = json_response(out);
    if info.more {
        let next = info.last_returned.unwrap_or(since);
        if let Ok(v) =
            HeaderValue::from_str(&format!("<{path}?{}>; rel=\"next\"", q.next_page(next)))
        {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "invalid change id {raw:?}: expected a positive integer"
        ))
    })
}

/// The `consistent` parameter of a query that takes no other.
fn consistent_param(raw: Option<&str>) -> Result<bool, ApiError> {
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if k == "consistent" {
            return Ok(parse_bool("consistent", &v)?);
        }
    }
    Ok(false)
}

/// `GET /changes/{id}`.
pub async fn get_change(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    api.barrier(consistent_param(raw.as_deref())?).await?;
    let change = match blocking(&api.store, move |s| s.get_change(id)).await {
        Ok(change) => change,
        Err(e) => return Err(api.with_checkpoint(e, None, &access).await),
    };
    match change {
        Some(json) => {
            if !access.all_tenants() {
                match change_tenant(&json)? {
                    Some(t) => access.check_tenant(&t)?,
                    None => {
                        access.check_all_tenants(&format!("change {id}, which names no tenant,"))?
                    }
                }
            }
            Ok(json_response(json))
        }
        None => Err(ApiError::NotFound(format!("change {id} not found"))),
    }
}

/// The tenant a stored change names, if any.
fn change_tenant(json: &[u8]) -> Result<Option<String>, ApiError> {
    #[derive(serde::Deserialize)]
    struct TenantOf {
        tenant: Option<String>,
    }
    serde_json::from_slice::<TenantOf>(json)
        .map(|t| t.tenant)
        .map_err(|e| ApiError::Internal(format!("a stored change does not parse: {e}")))
}

/// `GET /tenants`: the tenants the request may see.
pub async fn list_tenants(State(api): State<Arc<ReadApi>>, access: Access) -> Json<Vec<Tenant>> {
    let mut tenants = api.store.tenants();
    tenants.retain(|t| access.allows_tenant(&t.name));
    Json(tenants)
}

/// Looks a tenant up by name or id.
pub fn tenant_or_404(store: &Store, reference: &str) -> Result<Tenant, ApiError> {
    store
        .tenant(reference)
        .ok_or_else(|| ApiError::NotFound(format!("unknown tenant {reference:?}")))
}

/// Looks a tenant up by name or id for a request that must be allowed to act on it: 403
/// outside the request's tenants, and for an unknown reference that is not one of them (a
/// limited token learns nothing of other tenants).
pub fn tenant_for(access: &Access, store: &Store, reference: &str) -> Result<Tenant, ApiError> {
    match store.tenant(reference) {
        Some(t) => {
            access.check_tenant(&t.name)?;
            Ok(t)
        }
        None => {
            access.check_tenant(reference)?;
            Err(ApiError::NotFound(format!("unknown tenant {reference:?}")))
        }
    }
}

/// Looks a collection up by name or id for a request that must be allowed to act on its
/// tenant.
pub fn collection_for(
    access: &Access,
    store: &Store,
    reference: &str,
) -> Result<Collection, ApiError> {
    match store.collection(reference) {
        Ok(c) => {
            access.check_tenant(&c.tenant)?;
            Ok(c)
        }
        Err(e) => {
            access.check_all_tenants(&format!("collection {reference:?} (not found)"))?;
            Err(e.into())
        }
    }
}

/// `GET /tenants/{t}`.
pub async fn get_tenant(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(tenant): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(tenant_for(&access, &api.store, &tenant)?))
}

/// `GET /tenants/{t}/collections`.
pub async fn list_collections(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(tenant): Path<String>,
) -> Result<Json<Vec<Collection>>, ApiError> {
    let t = tenant_for(&access, &api.store, &tenant)?;
    Ok(Json(api.store.collections(t.id)))
}

/// `GET /collections/{c}`.
pub async fn get_collection(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(collection): Path<String>,
) -> Result<Json<Collection>, ApiError> {
    Ok(Json(collection_for(&access, &api.store, &collection)?))
}

/// `GET /collections/{c}/keys?after=&limit=`: latest change of each live key, by key.
pub async fn list_keys(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(collection): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let c = collection_for(&access, &api.store, &collection)?;
    let mut after = None;
    let mut limit = DEFAULT_LIMIT;
    let mut consistent = false;
    for (k, v) in form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            // `last` is the original ChangeAgent's name for `after`.
            "after" | "last" => after = Some(v.into_owned()),
            "limit" => limit = parse_limit(&v)?,
            "consistent" => consistent = parse_bool("consistent", &v)?,
            _ => {}
        }
    }
    api.barrier(consistent).await?;
    let body = blocking(&api.store, move |s| {
        let mut out = b"[".to_vec();
        s.list_keys(c.id, after.as_deref(), limit, &mut out)?;
        out.push(b']');
        Ok(out)
    })
    .await?;
    Ok(json_response(body))
}

/// `GET /collections/{c}/keys/{key}`: the key's latest change.
pub async fn get_key(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path((collection, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let c = collection_for(&access, &api.store, &collection)?;
    api.barrier(consistent_param(raw.as_deref())?).await?;
    let k = key.clone();
    match blocking(&api.store, move |s| s.get_key(c.id, &k)).await? {
        Some(json) => Ok(json_response(json)),
        None => Err(ApiError::NotFound(format!(
            "key {key:?} not found in collection {:?}",
            c.name
        ))),
    }
}
