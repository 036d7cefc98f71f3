//! Writes through an edge: every request that is not a read (`POST`, `PUT`, `DELETE`, …) is
//! sent upstream unchanged, with the client's own headers (`Authorization`,
//! `Idempotency-Key`, …), and the upstream's answer comes back unchanged.
//!
//! Rules:
//! 1. Upstreams are tried in order from the one in use; a request that never reached one
//!    (connection refused) goes to the next.
//! 2. A failure after the request may have reached an upstream is a 503 saying the write may
//!    have been applied, so the client retries with the same `Idempotency-Key`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use changeagent_api::body::body_bytes;
use changeagent_api::ApiError;
use changeagent_proto::headers;

use crate::Context;

/// How long a forwarded write may take: the core answers within its own write timeout, and
/// a membership or admin call may take longer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to an upstream may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The HTTP client for forwarded writes (no retries of its own: rule 2) and the upstream to
/// try first.
pub struct Forwarder {
    http: reqwest::Client,
    next: AtomicUsize,
}

impl Forwarder {
    /// A forwarder trusting `roots` (`--ca`) for https upstreams, the system's without.
    pub fn new(roots: Option<Vec<reqwest::Certificate>>) -> anyhow::Result<Forwarder> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FORWARD_TIMEOUT);
        Ok(Forwarder {
            http: changeagent_client::tls::trust(http, roots).build()?,
            next: AtomicUsize::new(0),
        })
    }
}

/// Middleware in front of every route: reads go on to the read API, anything else upstream.
pub async fn writes_upstream(
    State(ctx): State<Arc<Context>>,
    req: Request,
    next: Next,
) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    match forward(&ctx, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn forward(ctx: &Context, req: Request) -> Result<Response, ApiError> {
    let fwd = &ctx.forwarder;
    let (parts, body) = req.into_parts();
    let bytes: Bytes = body_bytes(&parts.headers, body, ctx.config.max_body_bytes).await?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let upstreams = &ctx.config.upstream;
    let first = fwd.next.load(Ordering::Relaxed) % upstreams.len();
    let mut refused = Vec::new();
    for i in 0..upstreams.len() {
        let at = (first + i) % upstreams.len();
        let base = upstreams[at].trim_end_matches('/');
        let mut builder = fwd
            .http
            .request(parts.method.clone(), format!("{base}{path}"))
            .body(bytes.clone());
        for (name, value) in &parts.headers {
            if !headers::is_hop_by_hop(name.as_str()) {
                builder = builder.header(name, value);
            }
        }
        let resp = match builder.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => {
                tracing::debug!(upstream = %base, error = %e, "upstream refused a write; trying the next");
                refused.push(format!("{base}: {e}"));
                continue;
            }
            Err(e) => return Err(maybe_applied(base, &e.to_string())),
        };
        fwd.next.store(at, Ordering::Relaxed);
        let status = resp.status();
        let answer_headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| maybe_applied(base, &e.to_string()))?;
        let mut out = Response::new(Body::from(body));
        *out.status_mut() = status;
        for (name, value) in &answer_headers {
            if !headers::is_hop_by_hop(name.as_str()) {
                out.headers_mut().append(name, value.clone());
            }
        }
        return Ok(out);
    }
    Err(ApiError::Unavailable {
        message: format!(
            "no upstream accepted the write ({}); nothing was applied: retry shortly",
            refused.join("; ")
        ),
        retry_after_secs: 1,
    })
}

fn maybe_applied(upstream: &str, why: &str) -> ApiError {
    ApiError::Unavailable {
        message: format!(
            "forwarding the write to {upstream} failed ({why}); it may have been applied: \
             retry with the same Idempotency-Key"
        ),
        retry_after_secs: 1,
    }
}
