//! The async HTTP client: one shared connection pool over one or more
//! endpoints, with retries and failover, idempotent posts, typed errors and
//! checkpoint downloads checked against their manifest. The change streams,
//! [`Client::follow`] and [`Client::follow_raw`], live in [`crate::follow`].
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
//! the client, see [`crate::failover`]); once the client has been away from
//! the first endpoint for [`ClientBuilder::prefer_first_after`], the next
//! request starts at the first endpoint again, so a client given its edges
//! before the core returns to the edges when they are back. After every
//! endpoint failed once in a row the client sleeps
//! for the next delay of the exponential schedule of [`RetryPolicy`] (at
//! least the server's `Retry-After`), until `max_attempts` or the
//! `deadline` is reached. Then the last failure is returned.
//!
//! A request pinned to one endpoint (the download of a checkpoint that
//! endpoint named in a `410`) is retried on that endpoint only. A streamed
//! answer (checkpoint data) is retried until it begins; the request timeout
//! then bounds the wait for each chunk rather than the whole transfer, and a
//! transfer that breaks off fails the call (transient) without resuming.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use changeagent_proto::types::{AdminAnswer, EndRequest, StartRecord, TruncateRequest};
use changeagent_proto::{Manifest, Scope};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LINK};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use url::Url;

use crate::checkpoint::{check_not_longer, temp_file, Digest, VerifiedCheckpoint};
use crate::error::{is_unavailable, retry_after, Error, Result};
use crate::failover::{Failover, DEFAULT_PREFER_FIRST_AFTER};
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
    pub(crate) fn for_follow(&self) -> Self {
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
    checkpoint_dir: Option<PathBuf>,
    cluster_secret: Option<String>,
    token: Option<String>,
    prefer_first_after: Option<Duration>,
    root_certificates: Option<Vec<reqwest::Certificate>>,
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
            checkpoint_dir: None,
            cluster_secret: None,
            token: None,
            root_certificates: None,
            prefer_first_after: Some(DEFAULT_PREFER_FIRST_AFTER),
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

    /// Directory of the temp files that checkpoints are downloaded into
    /// before their records are read ([`Client::follow`] after a `410`,
    /// [`Client::fetch_checkpoint`]): it needs room for the largest
    /// checkpoint. Default: the system's temp dir.
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Sends the cluster secret (`X-Cluster-Secret`) with every request: the admin routes
    /// need it when the core has one (a checkpointer's calls).
    pub fn cluster_secret(mut self, secret: Option<String>) -> Self {
        self.cluster_secret = secret;
        self
    }

    /// Sends `Authorization: Bearer <token>` with every request: servers started with an
    /// auth file need a token (see [`read_token_file`]).
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Trusts these CA certificates (see [`crate::read_ca_file`]) for `https://` endpoints
    /// instead of the system's roots; `None` keeps the system's.
    pub fn root_certificates(mut self, certs: Option<Vec<reqwest::Certificate>>) -> Self {
        self.root_certificates = certs;
        self
    }

    /// Once failover has moved the client off the first endpoint, the first
    /// request after this long starts at the first endpoint again (and
    /// moves on at once if it still fails). List the endpoints in order of
    /// preference, e.g. edges before the core: the client returns to the
    /// edges when they answer again instead of staying on the core.
    /// `None`: stay wherever failover left the client. Long polls of
    /// [`Client::follow`] follow along from their next request. Default
    /// [`DEFAULT_PREFER_FIRST_AFTER`].
    pub fn prefer_first_after(mut self, after: Option<Duration>) -> Self {
        self.prefer_first_after = after;
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
            .user_agent(concat!("changeagent-client/", env!("CARGO_PKG_VERSION")));
        let http = crate::tls::trust(http, self.root_certificates).build()?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                failover: Failover::new(endpoints.len(), self.prefer_first_after),
                endpoints,
                timeout: self.timeout,
                retry: self.retry,
                auto_idempotency: self.auto_idempotency,
                follow_block_secs: self.follow_block_secs,
                checkpoint_dir: self.checkpoint_dir,
                cluster_secret: self
                    .cluster_secret
                    .map(|s| HeaderValue::from_str(&s).map_err(|_| Error::InvalidSecret))
                    .transpose()?,
                authorization: self
                    .token
                    .map(|t| {
                        let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                            .map_err(|_| Error::InvalidToken)?;
                        v.set_sensitive(true);
                        Ok::<_, Error>(v)
                    })
                    .transpose()?,
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
    /// Which endpoint each attempt goes to; a request whose endpoint failed
    /// moves it on.
    failover: Failover,
    timeout: Duration,
    retry: RetryPolicy,
    auto_idempotency: bool,
    follow_block_secs: u32,
    checkpoint_dir: Option<PathBuf>,
    /// Sent as `X-Cluster-Secret` on every request, when set.
    cluster_secret: Option<HeaderValue>,
    /// Sent as `Authorization` on every request, when set.
    authorization: Option<HeaderValue>,
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
pub(crate) struct Call {
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
    /// Send only to this endpoint (an index into the endpoints), e.g. the
    /// one that named a checkpoint; `None` fails over across all.
    endpoint: Option<usize>,
    /// Leave the body of a successful answer unread, for the caller to
    /// stream: the request timeout then bounds the wait for the answer to
    /// begin, and each chunk after it, not the whole transfer.
    stream: bool,
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
            endpoint: None,
            stream: false,
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

    // ---- checkpoints --------------------------------------------------

    /// `GET /checkpoints?scope=`: the checkpoints the server keeps, newest
    /// first; of every scope when `scope` is `None`.
    pub async fn checkpoints(&self, scope: Option<&Scope>) -> Result<Vec<Manifest>> {
        let query = scope
            .map(|scope| vec![("scope", scope.to_string())])
            .unwrap_or_default();
        self.read(Call::get("list checkpoints", &["checkpoints"]).query(query))
            .await
    }

    /// `GET /checkpoints/latest?scope=`: the newest checkpoint of a scope,
    /// `None` when it has none (`404`).
    pub async fn latest_checkpoint(&self, scope: &Scope) -> Result<Option<Manifest>> {
        let call = Call::get("latest checkpoint", &["checkpoints", "latest"])
            .query(vec![("scope", scope.to_string())]);
        match self.read(call).await {
            Ok(manifest) => Ok(Some(manifest)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The checkpoint of a scope at `index`, from [`Client::checkpoints`];
    /// `None` when the server keeps none there.
    pub async fn checkpoint(&self, index: u64, scope: &Scope) -> Result<Option<Manifest>> {
        let manifests = self.checkpoints(Some(scope)).await?;
        Ok(manifests
            .into_iter()
            .find(|m| m.index == index && m.scope == *scope))
    }

    /// `GET /checkpoints/{index}/data?scope=`: streams the checkpoint's
    /// compressed bytes into `out` as they arrive, hashing them, then checks
    /// their size and sha256 against `manifest`. Stops at the first byte
    /// past the manifest's size.
    ///
    /// `out` has received the bytes whether or not they pass: on an error,
    /// discard what it holds. [`Client::fetch_checkpoint`] and
    /// [`Client::download_checkpoint_to`] do that for you. A transfer that
    /// breaks off is not resumed (the call fails, transient).
    pub async fn download_checkpoint<W>(&self, manifest: &Manifest, out: &mut W) -> Result<()>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        self.download_checkpoint_at(None, manifest, out).await
    }

    /// [`Client::download_checkpoint`] from one endpoint, or any.
    async fn download_checkpoint_at<W>(
        &self,
        endpoint: Option<usize>,
        manifest: &Manifest,
        out: &mut W,
    ) -> Result<()>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let index = manifest.index.to_string();
        let call = Call {
            endpoint,
            stream: true,
            ..Call::get("download checkpoint", &["checkpoints", &index, "data"])
                .query(vec![("scope", manifest.scope.to_string())])
        };
        let answer = self.send(&call).await?;
        let mut response = match answer.body {
            AnswerBody::Unread(response) if answer.status.is_success() => response,
            AnswerBody::Unread(response) => {
                let body = response.bytes().await?;
                return Err(Error::from_response(answer.status, &answer.headers, &body));
            }
            AnswerBody::Read(body) => {
                return Err(Error::from_response(answer.status, &answer.headers, &body))
            }
        };
        let write_error = |source| Error::Io {
            what: "write the downloaded checkpoint",
            source,
        };
        let mut digest = Digest::new();
        while let Some(chunk) = self.next_chunk(call.what, &mut response).await? {
            digest.update(&chunk);
            check_not_longer(&digest, manifest)?;
            out.write_all(&chunk).await.map_err(write_error)?;
        }
        out.flush().await.map_err(write_error)?;
        digest.verify(manifest)
    }

    /// Downloads a checkpoint into a temp file (in
    /// [`ClientBuilder::checkpoint_dir`]) and checks its size and sha256:
    /// its records can then be read with [`VerifiedCheckpoint::reader`]
    /// without acting on any record of a corrupt file.
    pub async fn fetch_checkpoint(&self, manifest: &Manifest) -> Result<VerifiedCheckpoint> {
        self.fetch_checkpoint_at(None, manifest).await
    }

    /// [`Client::fetch_checkpoint`] from one endpoint, or any.
    pub(crate) async fn fetch_checkpoint_at(
        &self,
        endpoint: Option<usize>,
        manifest: &Manifest,
    ) -> Result<VerifiedCheckpoint> {
        let dir = self.inner.checkpoint_dir.clone();
        let file = blocking("create a temp file for the checkpoint", move || {
            temp_file(dir.as_deref())
        })
        .await?;
        let mut file = tokio::fs::File::from_std(file);
        self.download_checkpoint_at(endpoint, manifest, &mut file)
            .await?;
        Ok(VerifiedCheckpoint::new(
            file.into_std().await,
            manifest.clone(),
        ))
    }

    /// Downloads a checkpoint to `path`: into a temp file beside it, checked
    /// against the manifest's size and sha256 and synced, then renamed to
    /// `path`. On any failure `path` is left as it was.
    pub async fn download_checkpoint_to(&self, manifest: &Manifest, path: &Path) -> Result<()> {
        let target = path.to_owned();
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let what = "create a temp file beside the download's target";
        let temp = blocking(what, move || {
            tempfile::NamedTempFile::new_in(dir).map_err(|source| Error::Io { what, source })
        })
        .await?;
        let (file, temp_path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        // On an error `temp_path` is dropped, which deletes the temp file.
        self.download_checkpoint(manifest, &mut file).await?;
        file.sync_all().await.map_err(|source| Error::Io {
            what: "sync the downloaded checkpoint",
            source,
        })?;
        drop(file);
        let what = "move the downloaded checkpoint into place";
        blocking(what, move || {
            temp_path.persist(&target).map_err(|e| Error::Io {
                what,
                source: e.error,
            })?;
            sync_parent_dir(&target).map_err(|source| Error::Io {
                what: "sync the download's directory",
                source,
            })
        })
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

    /// `GET /health` as the server sent it, every field kept (an edge's and a
    /// checkpointer's differ from a core node's).
    pub(crate) async fn health_json(&self) -> Result<Value> {
        self.read(Call::get("health", &["health"])).await
    }

    /// `GET /cluster` as the server sent it, every field kept.
    pub(crate) async fn cluster_json(&self) -> Result<Value> {
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

    // ---- admin (checkpointers) ------------------------------------------

    /// `POST /admin/checkpoints/start`: registers a checkpoint at `start.index`. A `409`
    /// ([`Error::is_conflict`]) means another checkpointer's start of the scope is open and
    /// fresh. Retried safely (an automatic `Idempotency-Key`).
    pub async fn checkpoint_start(&self, start: &StartRecord) -> Result<AdminAnswer> {
        let body = encode("start a checkpoint", start)?;
        self.write(
            Method::POST,
            "start a checkpoint",
            &["admin", "checkpoints", "start"],
            body,
            KeyChoice::Auto,
        )
        .await
    }

    /// `POST /admin/checkpoints/end` with the caller's `Idempotency-Key` (make it name the
    /// checkpoint, so a retry after a crash gets the first answer).
    pub async fn checkpoint_end(&self, end: &EndRequest, key: &str) -> Result<AdminAnswer> {
        let body = encode("end a checkpoint", end)?;
        self.write(
            Method::POST,
            "end a checkpoint",
            &["admin", "checkpoints", "end"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    /// `POST /admin/truncate` with the caller's `Idempotency-Key`. A `409` means `before - 1`
    /// is past the newest full checkpoint.
    pub async fn truncate(&self, before: u64, key: &str) -> Result<AdminAnswer> {
        let body = encode("truncate", &TruncateRequest { before })?;
        self.write(
            Method::POST,
            "truncate",
            &["admin", "truncate"],
            body,
            KeyChoice::Given(key),
        )
        .await
    }

    // ---- plumbing -----------------------------------------------------

    /// `block` seconds of follow long polls whose filter sets none.
    pub(crate) fn follow_block_secs(&self) -> u32 {
        self.inner.follow_block_secs
    }

    /// The retry policy.
    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

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
    /// describe, and reads the whole answer. Any HTTP answer that is not
    /// retried is returned as `Ok`, whatever its status.
    async fn execute(&self, call: &Call) -> Result<RawResponse> {
        let answer = self.send(call).await?;
        let body = match answer.body {
            AnswerBody::Read(body) => body,
            AnswerBody::Unread(response) => response.bytes().await?,
        };
        Ok((answer.status, answer.headers, body))
    }

    /// Sends `call`, retrying and failing over as the [module docs](self)
    /// describe. Any HTTP answer that is not retried is returned as `Ok`,
    /// whatever its status; the body of a streaming call's successful
    /// answer is left unread.
    pub(crate) async fn send(&self, call: &Call) -> Result<Answer> {
        let inner = &*self.inner;
        let policy = &inner.retry;
        let endpoints = inner.endpoints.len();
        // A call pinned to one endpoint tries only that one each round.
        let round = if call.endpoint.is_some() {
            1
        } else {
            endpoints
        };
        let started = Instant::now();
        let mut delays = policy.delays();
        let mut attempts = 0u32;
        let mut failed_this_round = 0usize;
        loop {
            attempts += 1;
            let index = match call.endpoint {
                Some(pinned) => pinned % endpoints,
                None if attempts == 1 => inner.failover.start(),
                None => inner.failover.current(),
            };
            let outcome = self.attempt(index, call).await;
            let server_delay = match &outcome {
                Ok(answer) if is_unavailable(answer.status) && call.retry_safe() => {
                    tracing::debug!(
                        endpoint = %inner.endpoints[index],
                        what = call.what,
                        status = %answer.status,
                        attempts,
                        "server unavailable"
                    );
                    retry_after(&answer.headers)
                }
                // Over the token's rate, or the server gave up reading the request (408):
                // nothing was done, so any call may be sent again.
                Ok(answer)
                    if matches!(
                        answer.status,
                        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT
                    ) =>
                {
                    tracing::debug!(
                        endpoint = %inner.endpoints[index],
                        what = call.what,
                        attempts,
                        status = %answer.status,
                        "the server did not take the request"
                    );
                    retry_after(&answer.headers)
                }
                Err(error) if retryable(error, call.retry_safe()) => {
                    tracing::debug!(
                        endpoint = %inner.endpoints[index],
                        what = call.what,
                        %error,
                        attempts,
                        "request failed"
                    );
                    None
                }
                _ => return outcome,
            };
            // Fail over to the next endpoint, unless a concurrent request
            // already moved on from this one.
            inner.failover.failed(index);
            if attempts >= policy.max_attempts {
                return outcome;
            }
            failed_this_round += 1;
            let mut delay = Duration::ZERO;
            if failed_this_round >= round {
                failed_this_round = 0;
                delay = delays.next().unwrap_or(policy.max_delay);
                delay = delay.max(server_delay.unwrap_or_default());
            }
            if let Some(deadline) = policy.deadline {
                if started.elapsed() + delay >= deadline {
                    return outcome;
                }
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Sends `call` once to endpoint `index`. Reads the whole answer, except
    /// the successful answer of a streaming call: that one only has to
    /// begin within the request timeout, its body is left to the caller.
    async fn attempt(&self, index: usize, call: &Call) -> Result<Answer> {
        let inner = &*self.inner;
        // `index` is taken modulo the (non-zero) number of endpoints.
        let url = endpoint_url(&inner.endpoints[index], &call.segments, &call.query);
        let mut request = inner.http.request(call.method.clone(), url);
        if !call.stream {
            request = request.timeout(inner.timeout + call.extra_timeout);
        }
        if let Some(body) = &call.body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body.clone());
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header(IDEMPOTENCY_KEY, key.clone());
        }
        if let Some(secret) = &inner.cluster_secret {
            request = request.header(changeagent_proto::headers::CLUSTER_SECRET, secret.clone());
        }
        if let Some(authorization) = &inner.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = if call.stream {
            let wait = inner.timeout + call.extra_timeout;
            tokio::time::timeout(wait, request.send())
                .await
                .map_err(|_| Error::TimedOut {
                    what: call.what,
                    after: wait,
                })??
        } else {
            request.send().await?
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = if call.stream && status.is_success() {
            AnswerBody::Unread(response)
        } else {
            let read = response.bytes();
            let bytes = if call.stream {
                // An error answer to a streaming call: small, but give it
                // the usual time.
                tokio::time::timeout(inner.timeout, read)
                    .await
                    .map_err(|_| Error::TimedOut {
                        what: call.what,
                        after: inner.timeout,
                    })??
            } else {
                read.await?
            };
            AnswerBody::Read(bytes)
        };
        Ok(Answer {
            endpoint: index,
            status,
            headers,
            body,
        })
    }

    /// The next chunk of a streamed body; an error when none arrives within
    /// the request timeout.
    pub(crate) async fn next_chunk(
        &self,
        what: &'static str,
        response: &mut reqwest::Response,
    ) -> Result<Option<Bytes>> {
        let wait = self.inner.timeout;
        tokio::time::timeout(wait, response.chunk())
            .await
            .map_err(|_| Error::TimedOut { what, after: wait })?
            .map_err(Error::Transport)
    }
}

/// An answer as [`Client::send`] returns it.
pub(crate) struct Answer {
    /// Index of the endpoint that answered.
    pub(crate) endpoint: usize,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: AnswerBody,
}

/// The body of an [`Answer`].
pub(crate) enum AnswerBody {
    /// Read whole.
    Read(Bytes),
    /// A streaming call's successful answer, its body not read yet.
    Unread(reqwest::Response),
}

/// The call for a `GET /changes`-like route, its timeout stretched by the
/// query's `block`.
pub(crate) fn changes_call(segments: &[&str], query: &Query) -> Call {
    Call {
        extra_timeout: Duration::from_secs(query.block.unwrap_or(0).into()),
        ..Call::get("get changes", segments).query(query.to_pairs())
    }
}

/// Runs blocking file work on tokio's blocking threads.
pub(crate) async fn blocking<T, F>(what: &'static str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io {
            what,
            source: io::Error::other(e),
        })?
}

/// Makes a rename in `path`'s directory durable (a no-op where directories
/// cannot be opened as files).
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    if cfg!(unix) {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
fn retryable(error: &Error, retry_safe: bool) -> bool {
    match error {
        Error::Transport(error) => transport_retryable(error, retry_safe),
        Error::TimedOut { .. } => retry_safe,
        _ => false,
    }
}

/// [`retryable`] for a reqwest error.
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
pub(crate) fn next_since(headers: &HeaderMap) -> Option<u64> {
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

    // ---- failover against servers ------------------------------------------

    mod preference {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;

        use axum::extract::State;
        use axum::http::StatusCode as Status;
        use axum::response::{IntoResponse, Response};
        use axum::routing::get;
        use axum::{Json, Router};
        use futures::StreamExt;

        use super::*;

        /// A `GET /changes` that answers an empty page while `up`, else 503,
        /// and counts the pages it served.
        #[derive(Default)]
        struct Fake {
            up: AtomicBool,
            served: AtomicUsize,
            /// Requests still to answer with a 408.
            timeouts: AtomicUsize,
        }

        async fn changes(State(fake): State<Arc<Fake>>) -> Response {
            let timeouts = &fake.timeouts;
            if timeouts
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let body = serde_json::json!({"error": "the request head did not arrive in time"});
                return (Status::REQUEST_TIMEOUT, Json(body)).into_response();
            }
            if !fake.up.load(Ordering::Relaxed) {
                let body = serde_json::json!({"error": "restarting"});
                return (Status::SERVICE_UNAVAILABLE, Json(body)).into_response();
            }
            fake.served.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::json!({
                "changes": [], "atStart": true, "atEnd": true, "firstIndex": 1, "lastIndex": 0
            });
            Json(body).into_response()
        }

        async fn serve(up: bool) -> (Arc<Fake>, String) {
            let fake = Arc::new(Fake::default());
            fake.up.store(up, Ordering::Relaxed);
            let app = Router::new()
                .route("/changes", get(changes))
                .with_state(Arc::clone(&fake));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address");
            tokio::spawn(async move { axum::serve(listener, app).await });
            (fake, format!("http://{addr}"))
        }

        /// A client over `first` then `second` that fails over at once.
        fn client(first: &str, second: &str, prefer: Option<Duration>) -> Client {
            Client::builder([first, second])
                .retry(RetryPolicy {
                    max_attempts: 4,
                    min_delay: Duration::from_millis(1),
                    max_delay: Duration::from_millis(5),
                    ..RetryPolicy::default()
                })
                .follow_block_secs(0)
                .prefer_first_after(prefer)
                .build()
                .expect("client")
        }

        /// Sends reads until the first server has served one, failing
        /// after a deadline.
        async fn until_first_serves(client: &Client, first: &Fake) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while first.served.load(Ordering::Relaxed) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the client never went back to the first endpoint"
                );
                client.get_changes(&Query::new()).await.expect("a read");
            }
        }

        #[tokio::test]
        async fn requests_return_to_the_first_endpoint_once_the_interval_passed() {
            let (first, first_url) = serve(false).await;
            let (second, second_url) = serve(true).await;
            let c = client(&first_url, &second_url, Some(Duration::from_millis(200)));
            c.get_changes(&Query::new()).await.expect("fails over");
            assert_eq!(second.served.load(Ordering::Relaxed), 1);
            first.up.store(true, Ordering::Relaxed);
            until_first_serves(&c, &first).await;
        }

        #[tokio::test]
        async fn a_408_is_asked_again() {
            let (first, first_url) = serve(true).await;
            first.timeouts.store(3, Ordering::Relaxed);
            let c = client(&first_url, &first_url, None);
            c.get_changes(&Query::new())
                .await
                .expect("served after three 408s");
            assert_eq!(first.timeouts.load(Ordering::Relaxed), 0);
            assert_eq!(first.served.load(Ordering::Relaxed), 1);
        }

        #[tokio::test]
        async fn within_the_interval_requests_stay_where_failover_took_them() {
            let (first, first_url) = serve(false).await;
            let (second, second_url) = serve(true).await;
            let c = client(&first_url, &second_url, Some(Duration::from_secs(3600)));
            c.get_changes(&Query::new()).await.expect("fails over");
            first.up.store(true, Ordering::Relaxed);
            for _ in 0..5 {
                c.get_changes(&Query::new()).await.expect("a read");
            }
            assert_eq!(first.served.load(Ordering::Relaxed), 0);
            assert_eq!(second.served.load(Ordering::Relaxed), 6);
        }

        #[tokio::test]
        async fn a_follow_returns_to_the_first_endpoint_too() {
            let (first, first_url) = serve(false).await;
            let (second, second_url) = serve(true).await;
            let c = client(&first_url, &second_url, Some(Duration::from_millis(200)));
            let mut pages = Box::pin(c.follow_raw(0, Query::new()));
            let deadline = Instant::now() + Duration::from_secs(20);
            pages.next().await.expect("a page").expect("no error");
            assert!(second.served.load(Ordering::Relaxed) >= 1);
            first.up.store(true, Ordering::Relaxed);
            while first.served.load(Ordering::Relaxed) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the follow never went back to the first endpoint"
                );
                pages.next().await.expect("a page").expect("no error");
            }
        }
    }

    // ---- checkpoint routes against a server --------------------------------

    mod checkpoint_routes {
        use std::sync::Arc;

        use axum::extract::{Path as UrlPath, RawQuery, State};
        use axum::http::StatusCode as Status;
        use axum::response::{IntoResponse, Response};
        use axum::routing::get;
        use axum::{Json, Router};

        use super::*;
        use crate::checkpoint::testing::checkpoint;

        /// Serves one checkpoint of scope `all`: its manifest in the list
        /// and as the latest, and `data` as its bytes.
        struct Fake {
            manifest: Manifest,
            data: Vec<u8>,
        }

        fn scope_of(query: Option<String>) -> Option<String> {
            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "scope")
                .map(|(_, v)| v.into_owned())
        }

        async fn list(State(fake): State<Arc<Fake>>, RawQuery(query): RawQuery) -> Response {
            match scope_of(query).as_deref() {
                None | Some("all") => Json(vec![fake.manifest.clone()]).into_response(),
                Some(_) => Json(Vec::<Manifest>::new()).into_response(),
            }
        }

        async fn latest(State(fake): State<Arc<Fake>>, RawQuery(query): RawQuery) -> Response {
            match scope_of(query).as_deref() {
                Some("all") => Json(fake.manifest.clone()).into_response(),
                _ => (
                    Status::NOT_FOUND,
                    Json(serde_json::json!({"error": "no checkpoint"})),
                )
                    .into_response(),
            }
        }

        async fn data(State(fake): State<Arc<Fake>>, UrlPath(index): UrlPath<u64>) -> Response {
            if index != fake.manifest.index {
                return (
                    Status::NOT_FOUND,
                    Json(serde_json::json!({"error": "no such"})),
                )
                    .into_response();
            }
            fake.data.clone().into_response()
        }

        async fn serve(fake: Fake) -> Client {
            let app = Router::new()
                .route("/checkpoints", get(list))
                .route("/checkpoints/latest", get(latest))
                .route("/checkpoints/{index}/data", get(data))
                .with_state(Arc::new(fake));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address");
            tokio::spawn(async move { axum::serve(listener, app).await });
            Client::new([format!("http://{addr}")]).expect("client")
        }

        const RECORDS: [&str; 2] = [r#"{"_id":1,"data":1}"#, r#"{"_id":2,"data":2}"#];

        #[tokio::test]
        async fn manifests_are_listed_and_the_latest_may_be_missing() {
            let (data, manifest) = checkpoint(2, &Scope::All, &RECORDS);
            let client = serve(Fake {
                manifest: manifest.clone(),
                data,
            })
            .await;
            assert_eq!(
                client.checkpoints(None).await.expect("list"),
                std::slice::from_ref(&manifest)
            );
            let acme = Scope::Tenant("acme".into());
            assert!(client
                .checkpoints(Some(&acme))
                .await
                .expect("list")
                .is_empty());
            assert_eq!(
                client.latest_checkpoint(&Scope::All).await.expect("latest"),
                Some(manifest.clone())
            );
            assert_eq!(client.latest_checkpoint(&acme).await.expect("latest"), None);
            assert_eq!(
                client.checkpoint(2, &Scope::All).await.expect("find"),
                Some(manifest)
            );
            assert_eq!(client.checkpoint(3, &Scope::All).await.expect("find"), None);
        }

        #[tokio::test]
        async fn a_download_lands_whole_and_checked_or_not_at_all() {
            let dir = tempfile::tempdir().expect("temp dir");
            let (data, manifest) = checkpoint(2, &Scope::All, &RECORDS);
            let client = serve(Fake {
                manifest: manifest.clone(),
                data: data.clone(),
            })
            .await;
            let target = dir.path().join("ckpt.jsonl.zst");
            client
                .download_checkpoint_to(&manifest, &target)
                .await
                .expect("download");
            assert_eq!(std::fs::read(&target).expect("read"), data);

            let verified = client.fetch_checkpoint(&manifest).await.expect("fetch");
            let ids: Vec<u64> = verified
                .reader()
                .expect("reader")
                .map(|c| c.expect("change").id)
                .collect();
            assert_eq!(ids, [1, 2]);

            // Bytes that do not match: no file, no temp file left behind.
            let mut bad = manifest.clone();
            bad.sha256 = "f".repeat(64);
            let other = dir.path().join("bad.jsonl.zst");
            let error = client
                .download_checkpoint_to(&bad, &other)
                .await
                .expect_err("mismatch");
            assert!(
                matches!(error, Error::ChecksumMismatch { index: 2, .. }),
                "{error:?}"
            );
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .expect("list")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(names, ["ckpt.jsonl.zst"]);
            assert!(matches!(
                client.fetch_checkpoint(&bad).await,
                Err(Error::ChecksumMismatch { .. })
            ));

            // A checkpoint the server does not have.
            let mut missing = manifest;
            missing.index = 9;
            let error = client
                .fetch_checkpoint(&missing)
                .await
                .expect_err("not found");
            assert!(error.is_not_found(), "{error:?}");
        }
    }
}
