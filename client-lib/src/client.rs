//! The async HTTP client: one shared connection pool over one or more
//! endpoints, with retries and failover, idempotent posts, typed errors and
//! the [`Client::follow`] change stream.
//!
//! # Retries
//!
//! A request is retried when it failed in a way that may go away by itself
//! (connection refused or reset, timeout, `502`/`503`/`504`) and retrying
//! cannot append a change twice:
//!
//! 1. reads (`GET`) are always retried;
//! 2. writes are retried when they carry an `Idempotency-Key` (the client
//!    adds a fresh one to every change post unless
//!    [`ClientBuilder::auto_idempotency`] is off), because the server answers
//!    a repeated key with the first result;
//! 3. any request is retried when the connection could not even be opened,
//!    since then nothing reached a server.
//!
//! `4xx` answers and other `5xx` answers are never retried. Each failure moves
//! the client on to the next endpoint (round-robin, shared by all clones of
//! the client); after every endpoint failed once in a row the client sleeps
//! for the next delay of the exponential schedule of [`RetryPolicy`] (at
//! least the server's `Retry-After`), until `max_attempts` or the
//! `deadline` is reached. Then the last failure is returned.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use futures::Stream;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LINK};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use url::Url;

use crate::error::{is_unavailable, retry_after, Error, Result};
use crate::query::Query;
use crate::types::{
    Change, ChangeList, ClusterInfo, Collection, Health, KeyWrite, NameRequest, NewChange, Posted,
    Tenant,
};

/// Header that makes a retried post return the first answer instead of
/// appending again.
pub const IDEMPOTENCY_KEY: HeaderName =
    HeaderName::from_static(changeagent_proto::headers::IDEMPOTENCY_KEY);

/// Time allowed for one request and its answer, long polls excepted (they
/// get their `block` time on top). Generous enough for a quorum write with
/// an fsync on every node of a slow disk; a server that cannot commit in
/// time answers `503` well before it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed to open a connection. A live server on a LAN accepts in
/// milliseconds; a dead host should not hold up failover to the next one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Seconds a [`Client::follow`] long poll waits on the server: below the
/// 60 s idle timeout common in proxies and NAT gateways, so a quiet
/// connection is not cut, and long enough that an idle consumer costs about
/// two requests a minute.
pub const DEFAULT_FOLLOW_BLOCK_SECS: u32 = 30;

/// Changes asked for per [`Client::follow`] request when the filter sets no
/// limit: large enough that a consumer far behind catches up in few round
/// trips, small enough that one answer stays well under a megabyte for
/// typical changes.
pub const DEFAULT_FOLLOW_LIMIT: u32 = 1000;

/// Longest pause [`Client::follow`] makes between attempts while no server
/// answers, so a consumer resumes within a few seconds of a server coming
/// back.
pub const FOLLOW_MAX_DELAY: Duration = Duration::from_secs(5);

/// Shortest time between two [`Client::follow`] polls that returned nothing.
/// A server honours `block` and only answers empty after the wait, so this
/// only bites when one answers empty at once (shutting down, or `block=0`),
/// and then keeps the consumer from spinning.
const EMPTY_POLL_MIN_INTERVAL: Duration = Duration::from_millis(250);

/// How and how long failed requests are retried. See the
/// [module docs](self) for which failures are retried at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Requests sent in all for one call, the first included; 1 means
    /// never retry.
    pub max_attempts: u32,
    /// First delay of the exponential schedule.
    pub min_delay: Duration,
    /// Delays grow by `factor` up to this (before jitter).
    pub max_delay: Duration,
    /// Growth factor of the delays.
    pub factor: f32,
    /// No retry starts later than this after the call began.
    pub deadline: Option<Duration>,
    /// Add a random 0–100 % to each delay, so clients that failed together
    /// do not come back together.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    /// 8 attempts within 30 s, delays 50 ms, 100 ms, … up to 2 s (plus
    /// jitter): rides out a leader election or a quick server restart.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            factor: 2.0,
            deadline: Some(Duration::from_secs(30)),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Send every request once and return its failure as it is.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delays to sleep between rounds of attempts, endless.
    pub(crate) fn delays(&self) -> ExponentialBackoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }

    /// The schedule [`Client::follow`] uses while no server answers: the
    /// same growth, capped at [`FOLLOW_MAX_DELAY`], without end.
    fn for_follow(&self) -> Self {
        Self {
            min_delay: self.min_delay.min(FOLLOW_MAX_DELAY),
            max_delay: FOLLOW_MAX_DELAY,
            deadline: None,
            ..*self
        }
    }
}

/// Configures and builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    auto_idempotency: bool,
    follow_block_secs: u32,
}

impl ClientBuilder {
    /// A builder for a client over these endpoints (`http://host:port`,
    /// optionally with a path prefix; `host:port` means `http://host:port`).
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.as_ref().to_owned())
                .collect(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry: RetryPolicy::default(),
            auto_idempotency: true,
            follow_block_secs: DEFAULT_FOLLOW_BLOCK_SECS,
        }
    }

    /// Time allowed for one request and its answer (a long poll gets its
    /// `block` time on top). Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time allowed to open a connection. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The whole retry policy. Default [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Requests sent in all for one call; 1 disables retries.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.retry.max_attempts = attempts;
        self
    }

    /// No retry starts later than this after a call began; `None` lets
    /// `max_attempts` alone decide.
    pub fn retry_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.retry.deadline = deadline;
        self
    }

    /// Give every change post and keyed write without an explicit key a
    /// fresh random `Idempotency-Key`, so it can be retried safely.
    /// Default `true`.
    pub fn auto_idempotency(mut self, on: bool) -> Self {
        self.auto_idempotency = on;
        self
    }

    /// `block` seconds of [`Client::follow`]'s long polls when its filter
    /// sets none. Default [`DEFAULT_FOLLOW_BLOCK_SECS`].
    pub fn follow_block_secs(mut self, secs: u32) -> Self {
        self.follow_block_secs = secs;
        self
    }

    /// Checks the endpoints and builds the client.
    pub fn build(self) -> Result<Client> {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| parse_endpoint(e))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .user_agent(concat!("changeagent-client/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                endpoints,
                current: AtomicUsize::new(0),
                timeout: self.timeout,
                retry: self.retry,
                auto_idempotency: self.auto_idempotency,
                follow_block_secs: self.follow_block_secs,
            }),
        })
    }
}

/// A ChangeAgent client over one or more endpoints (core nodes or edges).
/// Cheap to clone: clones share one connection pool and one failover
/// position.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One pool of keep-alive connections for every request of every clone.
    http: reqwest::Client,
    /// Never empty (checked by [`ClientBuilder::build`]).
    endpoints: Vec<Url>,
    /// Index of the endpoint the next request goes to, always below
    /// `endpoints.len()`; a request whose endpoint failed moves it on.
    current: AtomicUsize,
    timeout: Duration,
    retry: RetryPolicy,
    auto_idempotency: bool,
    follow_block_secs: u32,
}

/// Status, headers and body bytes of an answer, exactly as received.
pub type RawResponse = (StatusCode, HeaderMap, Bytes);

/// Which `Idempotency-Key` a write carries.
#[derive(Clone, Copy)]
enum KeyChoice<'a> {
    /// A fresh random one when auto-idempotency is on, else none.
    Auto,
    /// The caller's.
    Given(&'a str),
    /// None: the write is retried only when it never reached a server.
    None,
}

/// One logical request, sent once per attempt.
struct Call {
    /// Names the request in errors.
    what: &'static str,
    method: Method,
    /// Path segments after the endpoint's own path; percent-encoded when
    /// the URL is built.
    segments: Vec<String>,
    query: Vec<(&'static str, String)>,
    /// A JSON body.
    body: Option<Bytes>,
    idempotency_key: Option<HeaderValue>,
    /// Added to the request timeout: a long poll's `block` time.
    extra_timeout: Duration,
}

impl Call {
    fn get(what: &'static str, segments: &[&str]) -> Self {
        Self {
            what,
            method: Method::GET,
            segments: segments.iter().map(|s| (*s).to_owned()).collect(),
            query: Vec::new(),
            body: None,
            idempotency_key: None,
            extra_timeout: Duration::ZERO,
        }
    }

    fn query(mut self, query: Vec<(&'static str, String)>) -> Self {
        self.query = query;
        self
    }

    /// Retrying cannot cause a second write.
    fn retry_safe(&self) -> bool {
        self.method == Method::GET || self.method == Method::HEAD || self.idempotency_key.is_some()
    }
}

impl Client {
    /// A client over these endpoints with default settings; see
    /// [`ClientBuilder`] for the others.
    pub fn new<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientBuilder::new(endpoints).build()
    }

    /// A builder over these endpoints.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientBuilder::new(endpoints)
    }

    /// The endpoints, normalised, in failover order.
    pub fn endpoints(&self) -> &[Url] {
        &self.inner.endpoints
    }

    // ---- changes ------------------------------------------------------

    /// `POST /changes` in the `{"data": …}` form. Retried safely with a
    /// fresh `Idempotency-Key` unless auto-idempotency is off.
    pub async fn post_change(&self, change: &NewChange) -> Result<Posted> {
        let body = encode("post change", change)?;
        self.write(
            Method::POST,
            "post change",
            &["changes"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// `POST /changes` with the caller's `Idempotency-Key`: posting again
    /// with the same key returns the first answer and appends nothing.
    pub async fn post_change_idempotent(&self, key: &str, change: &NewChange) -> Result<Posted> {
        let body = encode("post change", change)?;
        self.write(
            Method::POST,
            "post change",
            &["changes"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    /// `POST /changes` with any JSON value: an object in the `{"data": …}`
    /// form is taken as such, anything else is stored whole as `data`. (A
    /// JSON array would be a batch: use [`Client::post_batch`].)
    pub async fn post_raw(&self, body: &Value) -> Result<Posted> {
        let body = encode("post change", body)?;
        self.write(
            Method::POST,
            "post change",
            &["changes"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// [`Client::post_raw`] with the caller's `Idempotency-Key`.
    pub async fn post_raw_idempotent(&self, key: &str, body: &Value) -> Result<Posted> {
        let body = encode("post change", body)?;
        self.write(
            Method::POST,
            "post change",
            &["changes"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    /// `POST /changes` with these exact bytes as the JSON body, for callers
    /// that need the server to see their bytes (key order, number
    /// spelling). The server checks that they are JSON.
    pub async fn post_bytes(&self, body: impl Into<Bytes>) -> Result<Posted> {
        self.write(
            Method::POST,
            "post change",
            &["changes"],
            body.into(),
            KeyChoice::Auto,
        )
        .await
    }

    /// `POST /changes` with a JSON array: all changes are appended
    /// atomically with contiguous ids, answered in the same order.
    pub async fn post_batch(&self, changes: &[NewChange]) -> Result<Vec<Posted>> {
        let body = encode("post batch", changes)?;
        self.write(
            Method::POST,
            "post batch",
            &["changes"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// [`Client::post_batch`] with the caller's `Idempotency-Key`.
    pub async fn post_batch_idempotent(
        &self,
        key: &str,
        changes: &[NewChange],
    ) -> Result<Vec<Posted>> {
        let body = encode("post batch", changes)?;
        self.write(
            Method::POST,
            "post batch",
            &["changes"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    /// `GET /changes?…`. A `410` becomes [`Error::Truncated`].
    pub async fn get_changes(&self, query: &Query) -> Result<ChangeList> {
        let (list, _next) = self.changes_page(&["changes"], query).await?;
        Ok(list)
    }

    /// `GET /changes?…`, answered exactly as received, whatever the status:
    /// only transport failures and `502`/`503`/`504` are retried, and only
    /// failures that outlast the retries are errors.
    pub async fn get_changes_raw(&self, query: &Query) -> Result<RawResponse> {
        let call = changes_call(&["changes"], query);
        self.execute(&call).await
    }

    /// `GET /changes/{id}`; [`Error::is_not_found`] when there is none.
    pub async fn get_change(&self, id: u64) -> Result<Change> {
        let id = id.to_string();
        self.read(Call::get("get change", &["changes", &id])).await
    }

    /// Follows the change list from `since` on: yields every change with
    /// `_id > since` matching `filter`, in order, each once, then waits for
    /// new ones with long polls, forever.
    ///
    /// - `filter.since` is ignored (the argument wins). `filter.block`
    ///   defaults to [`ClientBuilder::follow_block_secs`], `filter.limit`
    ///   to [`DEFAULT_FOLLOW_LIMIT`]; `filter.since_time` applies until the
    ///   first change arrives.
    /// - Transient failures (no server reachable, `503`, `5xx`) are not
    ///   yielded: the stream retries across the endpoints with backoff up to
    ///   [`FOLLOW_MAX_DELAY`] between tries, logging each at `warn`, so it
    ///   survives restarts of any server. A change is never yielded twice or
    ///   out of order, also when the answering server changes.
    /// - Permanent failures (`4xx`, an undecodable answer) are yielded as the
    ///   last item.
    /// - `410 Gone` is yielded as [`Error::Truncated`] as the last item. Later
    ///   this will instead yield the checkpoint's records and continue after
    ///   them (DESIGN "follow"); until then the caller restarts from the
    ///   checkpoint's index.
    pub fn follow(
        &self,
        since: u64,
        filter: Query,
    ) -> impl Stream<Item = Result<Change>> + Send + 'static {
        let follow = Follow {
            client: self.clone(),
            since,
            filter,
            pending: VecDeque::new(),
            failures: None,
            finished: false,
        };
        futures::stream::unfold(follow, Follow::next)
    }

    // ---- tenants and collections -------------------------------------

    /// `POST /tenants`. Retried only when no server was reached, as a
    /// repeat of a create that succeeded would answer `409`.
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        let body = encode("create tenant", &NameRequest { name: name.into() })?;
        self.write(
            Method::POST,
            "create tenant",
            &["tenants"],
            body,
            KeyChoice::None,
        )
        .await
    }

    /// `GET /tenants`.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.read(Call::get("list tenants", &["tenants"])).await
    }

    /// `GET /tenants/{tenant}` (name or id).
    pub async fn get_tenant(&self, tenant: &str) -> Result<Tenant> {
        self.read(Call::get("get tenant", &["tenants", tenant]))
            .await
    }

    /// `POST /tenants/{tenant}/changes`: a change of that tenant.
    pub async fn post_tenant_change(&self, tenant: &str, change: &NewChange) -> Result<Posted> {
        let body = encode("post tenant change", change)?;
        self.write(
            Method::POST,
            "post tenant change",
            &["tenants", tenant, "changes"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// [`Client::post_tenant_change`] with the caller's `Idempotency-Key`.
    pub async fn post_tenant_change_idempotent(
        &self,
        tenant: &str,
        key: &str,
        change: &NewChange,
    ) -> Result<Posted> {
        let body = encode("post tenant change", change)?;
        self.write(
            Method::POST,
            "post tenant change",
            &["tenants", tenant, "changes"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    /// `GET /tenants/{tenant}/changes?…`: like [`Client::get_changes`]
    /// filtered to that tenant.
    pub async fn get_tenant_changes(&self, tenant: &str, query: &Query) -> Result<ChangeList> {
        let (list, _next) = self
            .changes_page(&["tenants", tenant, "changes"], query)
            .await?;
        Ok(list)
    }

    /// `POST /tenants/{tenant}/collections`. Retried only when no server
    /// was reached, as a repeat of a create that succeeded would answer `409`.
    pub async fn create_collection(&self, tenant: &str, name: &str) -> Result<Collection> {
        let body = encode("create collection", &NameRequest { name: name.into() })?;
        self.write(
            Method::POST,
            "create collection",
            &["tenants", tenant, "collections"],
            body,
            KeyChoice::None,
        )
        .await
    }

    /// `GET /tenants/{tenant}/collections`.
    pub async fn list_collections(&self, tenant: &str) -> Result<Vec<Collection>> {
        self.read(Call::get(
            "list collections",
            &["tenants", tenant, "collections"],
        ))
        .await
    }

    /// `GET /collections/{collection}` (id, or a name unique across tenants).
    pub async fn get_collection(&self, collection: &str) -> Result<Collection> {
        self.read(Call::get("get collection", &["collections", collection]))
            .await
    }

    // ---- keys ---------------------------------------------------------

    /// `PUT /collections/{collection}/keys/{key}` with `value` as the body:
    /// upserts the key. Sent with a fresh `Idempotency-Key` (see
    /// [`ClientBuilder::auto_idempotency`]); a repeat the server does not
    /// recognise writes the same value again.
    pub async fn put_key(&self, collection: &str, key: &str, value: &Value) -> Result<Posted> {
        let body = encode("put key", value)?;
        self.write(
            Method::PUT,
            "put key",
            &["collections", collection, "keys", key],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// `POST /collections/{collection}/keys` with `{"key", "data", "tags"?}`.
    pub async fn post_key(&self, collection: &str, write: &KeyWrite) -> Result<Posted> {
        let body = encode("post key", write)?;
        self.write(
            Method::POST,
            "post key",
            &["collections", collection, "keys"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// `GET /collections/{collection}/keys/{key}`: the latest change of the
    /// key; [`Error::is_not_found`] when absent or deleted.
    pub async fn get_key(&self, collection: &str, key: &str) -> Result<Change> {
        self.read(Call::get(
            "get key",
            &["collections", collection, "keys", key],
        ))
        .await
    }

    /// `DELETE /collections/{collection}/keys/{key}`: appends a deleting
    /// change. [`Error::is_not_found`] when the key is absent.
    pub async fn delete_key(&self, collection: &str, key: &str) -> Result<Posted> {
        let call = Call {
            method: Method::DELETE,
            idempotency_key: self.idempotency_key(KeyChoice::Auto)?,
            ..Call::get("delete key", &["collections", collection, "keys", key])
        };
        self.read(call).await
    }

    /// `GET /collections/{collection}/keys?after=&limit=`: the latest change
    /// of each live key, sorted by key, keys after `after`.
    pub async fn list_keys(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<Change>> {
        let mut query = Vec::new();
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        self.read(Call::get("list keys", &["collections", collection, "keys"]).query(query))
            .await
    }

    // ---- ops ----------------------------------------------------------

    /// `GET /health` of the endpoint the client currently talks to.
    pub async fn health(&self) -> Result<Health> {
        self.read(Call::get("health", &["health"])).await
    }

    /// `GET /cluster`: members, roles, leader, term and each member's replicated index.
    pub async fn cluster(&self) -> Result<ClusterInfo> {
        self.read(Call::get("cluster", &["cluster"])).await
    }

    /// `GET /metrics`: Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let (status, headers, body) = self.execute(&Call::get("metrics", &["metrics"])).await?;
        if !status.is_success() {
            return Err(Error::from_response(status, &headers, &body));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    // ---- plumbing -----------------------------------------------------

    /// A `GET /changes`-like page and the `since` of its `Link: rel="next"`.
    pub(crate) async fn changes_page(
        &self,
        segments: &[&str],
        query: &Query,
    ) -> Result<(ChangeList, Option<u64>)> {
        let call = changes_call(segments, query);
        let (status, headers, body) = self.execute(&call).await?;
        let next = next_since(&headers);
        let list = decode(call.what, status, &headers, &body)?;
        Ok((list, next))
    }

    /// Sends a write with a JSON body and decodes the answer.
    async fn write<T: DeserializeOwned>(
        &self,
        method: Method,
        what: &'static str,
        segments: &[&str],
        body: Bytes,
        key: KeyChoice<'_>,
    ) -> Result<T> {
        let call = Call {
            method,
            body: Some(body),
            idempotency_key: self.idempotency_key(key)?,
            ..Call::get(what, segments)
        };
        self.read(call).await
    }

    /// Sends a call and decodes the answer.
    async fn read<T: DeserializeOwned>(&self, call: Call) -> Result<T> {
        let (status, headers, body) = self.execute(&call).await?;
        decode(call.what, status, &headers, &body)
    }

    fn idempotency_key(&self, choice: KeyChoice<'_>) -> Result<Option<HeaderValue>> {
        match choice {
            KeyChoice::Given(key) => match HeaderValue::from_str(key) {
                Ok(value) if !key.is_empty() => Ok(Some(value)),
                _ => Err(Error::InvalidIdempotencyKey {
                    key: key.to_owned(),
                }),
            },
            KeyChoice::Auto if self.inner.auto_idempotency => {
                let key = new_idempotency_key();
                // Lowercase hex digits only: always a valid header value.
                Ok(HeaderValue::from_str(&key).ok())
            }
            KeyChoice::Auto | KeyChoice::None => Ok(None),
        }
    }

    /// Sends `call`, retrying and failing over as the [module docs](self)
    /// describe. Any HTTP answer that is not retried is returned as `Ok`,
    /// whatever its status.
    async fn execute(&self, call: &Call) -> Result<RawResponse> {
        let inner = &*self.inner;
        let policy = &inner.retry;
        let endpoints = inner.endpoints.len();
        let started = Instant::now();
        let mut delays = policy.delays();
        let mut attempts = 0u32;
        let mut failed_this_round = 0usize;
        loop {
            attempts += 1;
            let index = inner.current.load(Ordering::Relaxed) % endpoints;
            let outcome = self.attempt(index, call).await;
            let server_delay = match &outcome {
                Ok((status, headers, _)) if is_unavailable(*status) && call.retry_safe() => {
                    tracing::debug!(
                        endpoint = %inner.endpoints[index],
                        what = call.what,
                        %status,
                        attempts,
                        "server unavailable"
                    );
                    retry_after(headers)
                }
                Err(error) if transport_retryable(error, call.retry_safe()) => {
                    tracing::debug!(
                        endpoint = %inner.endpoints[index],
                        what = call.what,
                        %error,
                        attempts,
                        "request failed"
                    );
                    None
                }
                _ => return outcome.map_err(Error::Transport),
            };
            // Fail over to the next endpoint, unless a concurrent request
            // already moved on from this one.
            let _ = inner.current.compare_exchange(
                index,
                (index + 1) % endpoints,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if attempts >= policy.max_attempts {
                return outcome.map_err(Error::Transport);
            }
            failed_this_round += 1;
            let mut delay = Duration::ZERO;
            if failed_this_round >= endpoints {
                failed_this_round = 0;
                delay = delays.next().unwrap_or(policy.max_delay);
                delay = delay.max(server_delay.unwrap_or_default());
            }
            if let Some(deadline) = policy.deadline {
                if started.elapsed() + delay >= deadline {
                    return outcome.map_err(Error::Transport);
                }
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Sends `call` once to endpoint `index` and reads the whole answer.
    async fn attempt(&self, index: usize, call: &Call) -> reqwest::Result<RawResponse> {
        let inner = &*self.inner;
        // `index` is taken modulo the (non-zero) number of endpoints.
        let url = endpoint_url(&inner.endpoints[index], &call.segments, &call.query);
        let mut request = inner
            .http
            .request(call.method.clone(), url)
            .timeout(inner.timeout + call.extra_timeout);
        if let Some(body) = &call.body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body.clone());
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key.clone());
        }
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        Ok((status, headers, body))
    }
}

/// State of one [`Client::follow`] stream.
struct Follow {
    client: Client,
    /// `_id` of the last change queued (or skipped by the server's `Link`).
    since: u64,
    filter: Query,
    /// Changes fetched but not yet yielded, in order.
    pending: VecDeque<Change>,
    /// Delays while requests keep failing; reset by an answer.
    failures: Option<ExponentialBackoff>,
    /// A permanent error was yielded; the stream ends.
    finished: bool,
}

impl Follow {
    async fn next(mut self) -> Option<(Result<Change>, Self)> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some((Ok(change), self));
            }
            if self.finished {
                return None;
            }
            let query = self.page_query();
            let started = Instant::now();
            match self.client.changes_page(&["changes"], &query).await {
                Ok((list, next)) => {
                    self.failures = None;
                    let skipped_ahead = self.accept(list, next);
                    let elapsed = started.elapsed();
                    if self.pending.is_empty()
                        && !skipped_ahead
                        && elapsed < EMPTY_POLL_MIN_INTERVAL
                    {
                        tokio::time::sleep(EMPTY_POLL_MIN_INTERVAL - elapsed).await;
                    }
                }
                Err(error) if error.is_transient() => {
                    let policy = self.client.inner.retry.for_follow();
                    let delay = self
                        .failures
                        .get_or_insert_with(|| policy.delays())
                        .next()
                        .unwrap_or(FOLLOW_MAX_DELAY);
                    tracing::warn!(%error, since = self.since, ?delay, "follow: no answer, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    self.finished = true;
                    return Some((Err(error), self));
                }
            }
        }
    }

    fn page_query(&self) -> Query {
        let mut query = self.filter.clone();
        query.since = Some(self.since);
        query.block = Some(query.block.unwrap_or(self.client.inner.follow_block_secs));
        query.limit = Some(query.limit.unwrap_or(DEFAULT_FOLLOW_LIMIT));
        query
    }

    /// Queues the page's changes past `since` and advances `since`; true
    /// when the server's `Link` moved `since` past the last change (a
    /// filtered scan that found nothing yet).
    fn accept(&mut self, list: ChangeList, next: Option<u64>) -> bool {
        let before = self.since;
        for change in list.changes {
            if change.id > self.since {
                self.since = change.id;
                self.pending.push_back(change);
            } else {
                tracing::warn!(
                    id = change.id,
                    since = self.since,
                    "follow: skipped a change at or before the position"
                );
            }
        }
        let mut skipped_ahead = false;
        if !list.at_end {
            if let Some(next) = next.filter(|next| *next > self.since) {
                self.since = next;
                skipped_ahead = true;
            }
        }
        if self.since > before {
            self.filter.since_time = None;
        }
        skipped_ahead
    }
}

/// The call for a `GET /changes`-like route, its timeout stretched by the
/// query's `block`.
fn changes_call(segments: &[&str], query: &Query) -> Call {
    Call {
        extra_timeout: Duration::from_secs(query.block.unwrap_or(0).into()),
        ..Call::get("get changes", segments).query(query.to_pairs())
    }
}

/// A fresh `Idempotency-Key`: 16 random bytes as 32 lowercase hex digits.
pub fn new_idempotency_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Encodes a request body.
fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| Error::Encode { what, source })
}

/// Decodes a success answer, or turns an error answer into its [`Error`].
fn decode<T: DeserializeOwned>(
    what: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T> {
    if !status.is_success() {
        return Err(Error::from_response(status, headers, body));
    }
    serde_json::from_slice(body).map_err(|source| Error::Decode {
        what,
        status: status.as_u16(),
        source,
    })
}

/// Whether a failed request may be sent again: always when the connection
/// could not be opened (nothing reached a server), otherwise only when
/// retrying is safe and the failure was the network's, not the request's.
fn transport_retryable(error: &reqwest::Error, retry_safe: bool) -> bool {
    if error.is_builder() || error.is_redirect() {
        return false;
    }
    if error.is_connect() {
        return true;
    }
    retry_safe && (error.is_timeout() || error.is_request() || error.is_body() || error.is_decode())
}

/// Parses an endpoint: `http(s)://host:port[/prefix]`, or `host:port`
/// meaning `http://host:port`. Query and fragment are dropped.
pub(crate) fn parse_endpoint(raw: &str) -> Result<Url> {
    let trimmed = raw.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|source| Error::InvalidEndpoint {
        url: raw.to_owned(),
        source,
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(Error::UnsupportedScheme {
            url: raw.to_owned(),
        });
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// `base` with `segments` appended to its path (each percent-encoded as one
/// segment) and `query` as its query string.
fn endpoint_url<S: AsRef<str>>(base: &Url, segments: &[S], query: &[(&str, String)]) -> Url {
    let mut url = base.clone();
    // `parse_endpoint` rejected cannot-be-a-base URLs, the only ones whose
    // path segments cannot be changed, so this always matches.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// The `since` of a `Link: <…?since=M&…>; rel="next"` header.
fn next_since(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|link| {
            let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
            let is_next = params.split(';').any(|param| {
                let param = param.trim();
                param == "rel=\"next\"" || param == "rel=next"
            });
            if !is_next {
                return None;
            }
            let (_, query) = target.split_once('?')?;
            url::form_urlencoded::parse(query.as_bytes())
                .find(|(name, _)| name == "since")
                .and_then(|(_, value)| value.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn default_backoff_doubles_from_50ms_to_2s() {
        let delays: Vec<u128> = no_jitter()
            .delays()
            .take(9)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn default_policy_gives_up_within_its_deadline() {
        let policy = RetryPolicy::default();
        // Worst case with jitter (+100 %) over the sleeps between 8 attempts.
        let worst: Duration = no_jitter()
            .delays()
            .take(policy.max_attempts as usize - 1)
            .map(|d| d * 2)
            .sum();
        assert!(
            worst < policy.deadline.unwrap_or(Duration::MAX),
            "{worst:?}"
        );
    }

    #[test]
    fn jitter_stays_within_one_delay() {
        let plain: Vec<Duration> = no_jitter().delays().take(20).collect();
        let jittered: Vec<Duration> = RetryPolicy::default().delays().take(20).collect();
        for (p, j) in plain.iter().zip(&jittered) {
            assert!(*j >= *p && *j <= *p * 2, "{j:?} vs {p:?}");
        }
    }

    #[test]
    fn follow_backoff_is_capped_and_endless() {
        let policy = no_jitter().for_follow();
        let delays: Vec<Duration> = policy.delays().take(1000).collect();
        assert_eq!(delays.len(), 1000);
        assert_eq!(delays.last(), Some(&FOLLOW_MAX_DELAY));
        assert_eq!(policy.deadline, None);
    }

    #[test]
    fn endpoints_are_normalised() {
        let url = parse_endpoint("127.0.0.1:9000").expect("host:port");
        assert_eq!(url.as_str(), "http://127.0.0.1:9000/");
        let url = parse_endpoint(" localhost:9000 ").expect("name:port");
        assert_eq!(url.as_str(), "http://localhost:9000/");
        let url = parse_endpoint("http://edge.example/ca/?x=1#f").expect("prefix");
        assert_eq!(url.as_str(), "http://edge.example/ca/");
    }

    #[test]
    fn bad_endpoints_are_rejected() {
        assert!(matches!(
            parse_endpoint("ftp://host/"),
            Err(Error::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            parse_endpoint("http://"),
            Err(Error::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            Client::new(Vec::<String>::new()),
            Err(Error::NoEndpoints)
        ));
    }

    #[test]
    fn urls_join_segments_and_encode_them() {
        let base = parse_endpoint("http://h:1").expect("endpoint");
        let url = endpoint_url(&base, &["collections", "a/b", "keys", "k y?"], &[]);
        assert_eq!(url.as_str(), "http://h:1/collections/a%2Fb/keys/k%20y%3F");

        let base = parse_endpoint("http://h:1/prefix/").expect("endpoint");
        let query = Query::new().since(5).tag("a").tag("b").to_pairs();
        let url = endpoint_url(&base, &["changes"], &query);
        assert_eq!(
            url.as_str(),
            "http://h:1/prefix/changes?since=5&tag=a&tag=b"
        );

        let base = parse_endpoint("http://h:1/prefix").expect("endpoint");
        let url = endpoint_url(&base, &["health"], &[]);
        assert_eq!(url.as_str(), "http://h:1/prefix/health");
    }

    #[test]
    fn link_next_gives_since() {
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            HeaderValue::from_static("</changes?since=42&limit=100&tag=a>; rel=\"next\""),
        );
        assert_eq!(next_since(&headers), Some(42));
    }

    #[test]
    fn link_other_rel_or_missing_since_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            LINK,
            HeaderValue::from_static(
                "</changes?since=1>; rel=\"prev\", </changes?limit=5>; rel=next",
            ),
        );
        assert_eq!(next_since(&headers), None);
        assert_eq!(next_since(&HeaderMap::new()), None);
    }

    #[test]
    fn idempotency_keys_are_32_hex_digits_and_differ() {
        let a = new_idempotency_key();
        let b = new_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn explicit_idempotency_key_must_be_a_header_value() {
        let client = Client::new(["127.0.0.1:1"]).expect("client");
        assert!(matches!(
            client.idempotency_key(KeyChoice::Given("bad\nkey")),
            Err(Error::InvalidIdempotencyKey { .. })
        ));
        assert!(matches!(
            client.idempotency_key(KeyChoice::Given("")),
            Err(Error::InvalidIdempotencyKey { .. })
        ));
        assert!(client
            .idempotency_key(KeyChoice::Given("order-17"))
            .expect("valid")
            .is_some());
        assert!(client
            .idempotency_key(KeyChoice::Auto)
            .expect("auto")
            .is_some());
        let manual = Client::builder(["127.0.0.1:1"])
            .auto_idempotency(false)
            .build()
            .expect("client");
        assert!(manual
            .idempotency_key(KeyChoice::Auto)
            .expect("auto")
            .is_none());
    }

    #[test]
    fn only_reads_and_keyed_writes_are_retry_safe() {
        let read = Call::get("r", &["changes"]);
        assert!(read.retry_safe());
        let post = Call {
            method: Method::POST,
            ..Call::get("w", &["changes"])
        };
        assert!(!post.retry_safe());
        let keyed = Call {
            idempotency_key: Some(HeaderValue::from_static("k")),
            ..post
        };
        assert!(keyed.retry_safe());
    }

    #[test]
    fn long_polls_get_their_block_time_on_top() {
        let call = changes_call(&["changes"], &Query::new().block(30));
        assert_eq!(call.extra_timeout, Duration::from_secs(30));
        assert_eq!(call.query, vec![("block", "30".to_owned())]);
    }

    fn change(id: u64) -> Change {
        serde_json::from_value(json!({"_id": id, "_ts": 1, "data": id})).expect("change")
    }

    fn follow_at(since: u64, filter: Query) -> Follow {
        Follow {
            client: Client::new(["127.0.0.1:1"]).expect("client"),
            since,
            filter,
            pending: VecDeque::new(),
            failures: None,
            finished: false,
        }
    }

    fn page(ids: &[u64], at_end: bool) -> ChangeList {
        ChangeList {
            changes: ids.iter().copied().map(change).collect(),
            at_start: false,
            at_end,
            first_index: 1,
            last_index: 100,
        }
    }

    #[test]
    fn follow_never_queues_a_change_twice_or_backwards() {
        let mut follow = follow_at(3, Query::new());
        follow.accept(page(&[2, 3, 4, 5], false), None);
        follow.accept(page(&[5, 4, 6], true), None);
        let ids: Vec<u64> = follow.pending.iter().map(|c| c.id).collect();
        assert_eq!(ids, [4, 5, 6]);
        assert_eq!(follow.since, 6);
    }

    #[test]
    fn follow_skips_ahead_on_link_only_when_not_at_end() {
        let mut follow = follow_at(10, Query::new().tag("rare"));
        assert!(follow.accept(page(&[], false), Some(500)));
        assert_eq!(follow.since, 500);
        assert!(!follow.accept(page(&[], true), Some(900)));
        assert_eq!(follow.since, 500);
        // A Link behind the position is ignored.
        assert!(!follow.accept(page(&[], false), Some(400)));
        assert_eq!(follow.since, 500);
    }

    #[test]
    fn follow_query_fills_in_defaults_and_drops_since_time_after_progress() {
        let mut follow = follow_at(
            7,
            Query::new().since(999).since_time("2020-01-01T00:00:00Z"),
        );
        let q = follow.page_query();
        assert_eq!(q.since, Some(7));
        assert_eq!(q.block, Some(DEFAULT_FOLLOW_BLOCK_SECS));
        assert_eq!(q.limit, Some(DEFAULT_FOLLOW_LIMIT));
        assert!(q.since_time.is_some());
        follow.accept(page(&[8], true), None);
        let q = follow.page_query();
        assert_eq!(q.since, Some(8));
        assert_eq!(q.since_time, None);
    }
}
