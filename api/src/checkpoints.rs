//! `GET /checkpoints`, `/checkpoints/latest` and `/checkpoints/{index}/data`: the committed
//! checkpoints this server keeps, and their bytes streamed from its object store, so a
//! consumer that only speaks HTTP to a core node or an edge never needs object-store
//! credentials.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use changeagent_proto::checkpoint::CONTENT_TYPE;
use changeagent_proto::{Manifest, Scope};
use futures::TryStreamExt;

use crate::auth::Access;
use crate::error::ApiError;
use crate::handlers::blocking;
use crate::ReadApi;

/// The `scope` parameter: `None` when absent.
fn scope_param(raw: Option<&str>) -> Result<Option<Scope>, ApiError> {
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if k == "scope" {
            return Scope::parse(&v).map(Some).map_err(ApiError::BadRequest);
        }
    }
    Ok(None)
}

/// Whether `access` may read checkpoints of `scope`: full ones need a token without a tenant
/// limit, a tenant's scoped ones a token allowed that tenant.
pub fn may_read(access: &Access, scope: &Scope) -> bool {
    match scope {
        Scope::All => access.all_tenants(),
        Scope::Tenant(t) => access.allows_tenant(t),
    }
}

/// 403 unless `access` may read checkpoints of `scope`.
fn check_scope(access: &Access, scope: &Scope) -> Result<(), ApiError> {
    match scope {
        Scope::All => access.check_all_tenants("a full checkpoint (ask for ?scope=tenant=NAME)"),
        Scope::Tenant(t) => access.check_tenant(t),
    }
}

/// `GET /checkpoints?scope=`: kept checkpoints, newest first; every scope the request may
/// read when none is named.
pub async fn list(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Manifest>>, ApiError> {
    let scope = scope_param(raw.as_deref())?;
    if let Some(scope) = &scope {
        check_scope(&access, scope)?;
    }
    let mut manifests = blocking(&api.store, move |s| s.manifests(scope.as_ref())).await?;
    manifests.retain(|m| may_read(&access, &m.scope));
    Ok(Json(manifests))
}

/// `GET /checkpoints/latest?scope=` (default `all`): the newest checkpoint, 404 when none.
pub async fn latest(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    RawQuery(raw): RawQuery,
) -> Result<Json<Manifest>, ApiError> {
    let scope = scope_param(raw.as_deref())?.unwrap_or_default();
    check_scope(&access, &scope)?;
    let label = scope.to_string();
    blocking(&api.store, move |s| s.latest_manifest(&scope))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no checkpoint of scope {label} yet")))
}

/// `GET /checkpoints/{index}/data?scope=` (default `all`): the checkpoint's compressed bytes
/// as stored, streamed.
pub async fn data(
    State(api): State<Arc<ReadApi>>,
    access: Access,
    Path(index): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let index: u64 = index.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "invalid checkpoint index {index:?}: expected a non-negative integer"
        ))
    })?;
    let scope = scope_param(raw.as_deref())?.unwrap_or_default();
    check_scope(&access, &scope)?;
    let label = scope.to_string();
    let manifest = blocking(&api.store, move |s| s.manifests(Some(&scope)))
        .await?
        .into_iter()
        .find(|m| m.index == index)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no kept checkpoint of scope {label} at index {index}; see GET /checkpoints"
            ))
        })?;
    let objects = api.objects.as_ref().ok_or_else(|| {
        ApiError::NotFound("this server has no object store to read checkpoints from".into())
    })?;
    let stream = match objects.get(&manifest.object).await {
        Ok(stream) => stream,
        Err(e) if e.is_missing_object() => {
            return Err(ApiError::NotFound(format!(
                "checkpoint {index} is kept, but its object {} is missing from this server's \
                 object store (is --object-store the checkpointers' store?)",
                manifest.object
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let body = Body::from_stream(stream.map_err(std::io::Error::other));
    let mut resp = (StatusCode::OK, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(manifest.size));
    Ok(resp)
}
