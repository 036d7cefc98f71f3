//! Bearer tokens with scopes, from an auth file the operator writes and may change while the
//! server runs; and a request rate per token.
//!
//! Rules:
//! 1. Without an auth file every request is allowed, as before tokens existed ([`Access::Open`]);
//!    the server says so once in its log at start.
//! 2. With one, `/health` stays open and Raft's `/raft/*` keeps its own check (the cluster
//!    secret); every other request needs `Authorization: Bearer <token>` whose SHA-256 the file
//!    lists: 401 without a known, unexpired token, 403 when the token lacks the route's scope
//!    ([`Need`]), 429 with `Retry-After` over the token's rate.
//! 3. Admin routes (checkpoint records, truncation, membership) also accept the cluster secret
//!    instead of a token, when the request carries no `Authorization` at all
//!    ([`Access::ClusterSecret`]).
//! 4. A token limited to tenants reads and writes only those tenants; handlers check that with
//!    the request's [`Access`], which this layer always inserts (a handler that finds none
//!    answers 500: a missing layer fails closed).
//! 5. The file holds hashes only. It is read again every [`RELOAD_EVERY`]; a file that no
//!    longer parses is logged and the tokens read before stay in force.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// How often the auth file is read again to pick up changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Largest auth file read, in bytes.
pub const MAX_AUTH_FILE_BYTES: u64 = 16 << 20;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every GET: change lists, keys, tenants, checkpoints, `/metrics`, `/cluster`.
    Read,
    /// Posting changes, keyed writes, creating tenants and collections.
    Write,
    /// Checkpoint records, truncation and membership.
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => Err(format!(
                "unknown scope {other:?}: expected read, write or admin"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// What a request needs, from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Open to anyone (`/health`).
    Nothing,
    /// Raft RPCs: checked by the core's own peer guard, not by tokens.
    Peer,
    /// A scope; `all_tenants` when the route shows the whole server (`/metrics`, `/cluster`).
    Scope { scope: Scope, all_tenants: bool },
}

/// The [`Need`] of a request.
pub fn need(method: &Method, path: &str) -> Need {
    if path == "/health" {
        return Need::Nothing;
    }
    if path.starts_with("/raft/") {
        return Need::Peer;
    }
    let read = matches!(*method, Method::GET | Method::HEAD);
    let scope = if path.starts_with("/admin/") || (!read && path.starts_with("/cluster/")) {
        Scope::Admin
    } else if read {
        Scope::Read
    } else {
        Scope::Write
    };
    let all_tenants = (scope == Scope::Admin && !path.starts_with("/admin/checkpoints/"))
        || path == "/metrics"
        || path == "/cluster";
    Need::Scope { scope, all_tenants }
}

/// One token of the auth file, as the handlers see it.
#[derive(Debug)]
pub struct Grant {
    /// The token's name from the file (logs, errors; never the token).
    pub name: String,
    scopes: BTreeSet<Scope>,
    /// `None`: every tenant.
    tenants: Option<BTreeSet<String>>,
    expires: Option<SystemTime>,
    limiter: Option<Limiter>,
}

impl Grant {
    /// Whether the token may act on `tenant` (by name).
    pub fn allows_tenant(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
    }

    /// The tenants the token is limited to, `None` for all.
    pub fn tenants(&self) -> Option<&BTreeSet<String>> {
        self.tenants.as_ref()
    }
}

/// Who a request acts as; inserted into every request by [`layer`].
#[derive(Debug, Clone)]
pub enum Access {
    /// No auth file: everything is allowed.
    Open,
    /// The request carried the cluster secret on an admin route.
    ClusterSecret,
    /// A token of the auth file.
    Token(Arc<Grant>),
}

impl Access {
    /// The token's grant, `None` when the access is not limited by a token.
    pub fn grant(&self) -> Option<&Grant> {
        match self {
            Access::Token(g) => Some(g),
            Access::Open | Access::ClusterSecret => None,
        }
    }

    /// Whether the request may act on `tenant` (by name).
    pub fn allows_tenant(&self, tenant: &str) -> bool {
        self.grant().is_none_or(|g| g.allows_tenant(tenant))
    }

    /// Whether nothing limits the request to some tenants.
    pub fn all_tenants(&self) -> bool {
        self.grant().is_none_or(|g| g.tenants.is_none())
    }

    /// 403 unless the request may act on `tenant`.
    pub fn check_tenant(&self, tenant: &str) -> Result<(), ApiError> {
        match self.grant() {
            Some(g) if !g.allows_tenant(tenant) => Err(ApiError::Forbidden(format!(
                "token {:?} is limited to tenants {}, not {tenant:?}",
                g.name,
                tenant_list(g)
            ))),
            _ => Ok(()),
        }
    }

    /// 403 unless the request is limited to no tenants; `what` says what it asked for.
    pub fn check_all_tenants(&self, what: &str) -> Result<(), ApiError> {
        match self.grant() {
            Some(g) if g.tenants.is_some() => Err(ApiError::Forbidden(format!(
                "token {:?} is limited to tenants {}: {what} needs a token without a tenant \
                 limit",
                g.name,
                tenant_list(g)
            ))),
            _ => Ok(()),
        }
    }
}

fn tenant_list(g: &Grant) -> String {
    let names: Vec<&str> = g.tenants.iter().flatten().map(String::as_str).collect();
    format!("{names:?}")
}

impl<S: Send + Sync> FromRequestParts<S> for Access {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Access>().cloned().ok_or_else(|| {
            ApiError::Internal(
                "no access decision for this route: the auth layer is missing".into(),
            )
        })
    }
}

/// Checks a request's cluster secret: true only when a secret is configured and matches.
pub type SecretCheck = Arc<dyn Fn(&HeaderMap) -> bool + Send + Sync>;

/// A request rate: `per_second` on average, bursts of up to one second's worth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: u32,
}

/// The flags every tier takes for its own clients' tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthFlags {
    /// JSON file of the tokens this server accepts (`{"tokens":[{"name","sha256","scopes",
    /// "tenants"?,"rate"?,"expires"?}]}`, see the README's Security section); read again when
    /// it changes. Without it, anyone who can reach the port may read and write.
    #[arg(long, env = "CHANGEAGENT_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Requests per second a token may make to this server when the auth file sets no `rate`
    /// for it (bursts of one second's worth); 0 for no limit. Over it: 429 with Retry-After.
    #[arg(long, env = "CHANGEAGENT_TOKEN_RATE", default_value_t = DEFAULT_TOKEN_RATE)]
    pub token_rate: u32,
}

/// Default of `--token-rate`: far above what one client needs, low enough that one leaked or
/// runaway token cannot take a server's whole capacity.
pub const DEFAULT_TOKEN_RATE: u32 = 10_000;

impl AuthFlags {
    /// The server's [`Auth`], logging whether requests need tokens.
    pub fn load(&self) -> Result<Auth, AuthFileError> {
        let rate = (self.token_rate > 0).then_some(Rate {
            per_second: self.token_rate,
        });
        Auth::from_flags(self.auth_file.as_deref(), rate)
    }
}

/// Where a server's tokens come from and how fast each may go.
pub struct Auth {
    file: Option<AuthFile>,
    /// The rate of tokens that name none; `None`: unlimited.
    default_rate: Option<Rate>,
    secret: Option<SecretCheck>,
}

struct AuthFile {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    /// The bytes last parsed, to skip reparsing an unchanged file.
    last: tokio::sync::Mutex<Vec<u8>>,
}

/// The tokens of one version of the auth file, by the SHA-256 of the token.
#[derive(Default)]
struct Tokens {
    by_hash: HashMap<[u8; 32], Arc<Grant>>,
}

/// Why an auth file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("auth file {path}: {why}")]
pub struct AuthFileError {
    path: String,
    why: String,
}

impl Auth {
    /// No auth file: every request is allowed.
    pub fn open() -> Auth {
        Auth {
            file: None,
            default_rate: None,
            secret: None,
        }
    }

    /// Reads the auth file at `path`; `default_rate` applies to tokens that set no `rate`.
    pub fn from_file(path: &Path, default_rate: Option<Rate>) -> Result<Auth, AuthFileError> {
        let bytes = read_limited(path).map_err(|why| file_error(path, why))?;
        let tokens = parse(&bytes, default_rate).map_err(|why| file_error(path, why))?;
        Ok(Auth {
            file: Some(AuthFile {
                path: path.to_owned(),
                tokens: RwLock::new(Arc::new(tokens)),
                last: tokio::sync::Mutex::new(bytes),
            }),
            default_rate,
            secret: None,
        })
    }

    /// The auth file when one is given, else open; logs which once.
    pub fn from_flags(
        path: Option<&Path>,
        default_rate: Option<Rate>,
    ) -> Result<Auth, AuthFileError> {
        match path {
            Some(p) => {
                let auth = Auth::from_file(p, default_rate)?;
                tracing::info!(
                    file = %p.display(),
                    tokens = auth.token_count(),
                    "requests need a bearer token from the auth file"
                );
                Ok(auth)
            }
            None => {
                tracing::warn!(
                    "no --auth-file: anyone who can reach this port may read and write; see \
                     the README's Security section"
                );
                Ok(Auth::open())
            }
        }
    }

    /// Also accepts the cluster secret on admin routes (rule 3).
    pub fn with_secret(mut self, check: SecretCheck) -> Auth {
        self.secret = Some(check);
        self
    }

    /// Whether requests need tokens.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    fn token_count(&self) -> usize {
        self.file.as_ref().map_or(0, |f| f.current().by_hash.len())
    }

    /// Reads the auth file again every [`RELOAD_EVERY`] until `shutdown`.
    pub fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        if self.file.is_none() {
            return;
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.reload().await,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Reads the auth file and swaps its tokens in when it changed and parses.
    pub async fn reload(&self) {
        let Some(file) = &self.file else { return };
        let path = file.path.clone();
        let read = tokio::task::spawn_blocking(move || read_limited(&path)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(why)) => {
                tracing::warn!(file = %file.path.display(), %why, "cannot read the auth file; the tokens read before stay in force");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the auth file failed");
                return;
            }
        };
        let mut last = file.last.lock().await;
        if *last == bytes {
            return;
        }
        match parse(&bytes, self.default_rate) {
            Ok(tokens) => {
                let count = tokens.by_hash.len();
                *file.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
                *last = bytes;
                tracing::info!(file = %file.path.display(), tokens = count, "auth file reloaded");
            }
            Err(why) => {
                *last = bytes;
                tracing::error!(file = %file.path.display(), %why, "the changed auth file is invalid; the tokens read before stay in force until it is fixed");
            }
        }
    }

    /// Decides what `headers` may do on a route that needs `need` (rules 1-3).
    pub fn access(&self, need: Need, headers: &HeaderMap) -> Result<Access, ApiError> {
        let Some(file) = &self.file else {
            return Ok(Access::Open);
        };
        let (scope, all_tenants) = match need {
            Need::Nothing | Need::Peer => return Ok(Access::Open),
            Need::Scope { scope, all_tenants } => (scope, all_tenants),
        };
        let authorization = headers.get(header::AUTHORIZATION);
        if authorization.is_none() && scope == Scope::Admin {
            if let Some(check) = &self.secret {
                if check(headers) {
                    return Ok(Access::ClusterSecret);
                }
            }
        }
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this server needs a token: send Authorization: Bearer <token>".into(),
                )
            })?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let grant = file
            .current()
            .by_hash
            .get(&hash)
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("unknown token".into()))?;
        if grant.expires.is_some_and(|e| SystemTime::now() >= e) {
            return Err(ApiError::Unauthorized(format!(
                "token {:?} has expired; ask for a new one",
                grant.name
            )));
        }
        if !grant.scopes.contains(&scope) {
            return Err(ApiError::Forbidden(format!(
                "token {:?} lacks the {} scope this request needs",
                grant.name,
                scope.name()
            )));
        }
        let access = Access::Token(grant.clone());
        if all_tenants {
            access.check_all_tenants("this route")?;
        }
        if let Some(limiter) = &grant.limiter {
            if let Err(wait) = limiter.take() {
                return Err(ApiError::TooManyRequests {
                    message: format!(
                        "token {:?} is over its rate of {} requests per second; retry later",
                        grant.name, limiter.per_second
                    ),
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(access)
    }
}

impl AuthFile {
    fn current(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware deciding every request's [`Access`] (rules 1-4); outside the routes' own
/// layers, so a follower or an edge checks a write's scope before it forwards it.
pub async fn layer(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    match auth.admit(&mut req) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

impl Auth {
    /// Decides `req`'s [`Access`] from its route and puts it in the request's extensions;
    /// why it is refused otherwise.
    pub fn admit(&self, req: &mut Request) -> Result<(), ApiError> {
        let need = need(req.method(), req.uri().path());
        let access = self.access(need, req.headers())?;
        req.extensions_mut().insert(access);
        Ok(())
    }
}

fn file_error(path: &Path, why: String) -> AuthFileError {
    AuthFileError {
        path: path.display().to_string(),
        why,
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_AUTH_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_AUTH_FILE_BYTES {
        return Err(format!("larger than {MAX_AUTH_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    scopes: Vec<String>,
    #[serde(default)]
    tenants: Option<Vec<String>>,
    /// Requests per second; 0 for unlimited.
    #[serde(default)]
    rate: Option<u32>,
    /// RFC 3339.
    #[serde(default)]
    expires: Option<String>,
}

/// Parses an auth file (the format is in the README's Security section).
fn parse(bytes: &[u8], default_rate: Option<Rate>) -> Result<Tokens, String> {
    let body: FileBody = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a valid auth file ({e}); expected {{\"tokens\":[{{\"name\",\"sha256\",\"scopes\",\
             \"tenants\"?,\"rate\"?,\"expires\"?}}]}}"
        )
    })?;
    let mut tokens = Tokens::default();
    let mut names = BTreeSet::new();
    for t in body.tokens {
        let name = t.name;
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(format!(
                "token names must be unique and non-empty ({name:?})"
            ));
        }
        let hash = parse_hex_sha256(&t.sha256)
            .ok_or_else(|| format!("token {name:?}: sha256 must be 64 hex digits"))?;
        if t.scopes.is_empty() {
            return Err(format!(
                "token {name:?}: scopes must name read, write or admin"
            ));
        }
        let scopes = t
            .scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(|e| format!("token {name:?}: {e}")))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let tenants = match t.tenants {
            Some(list) if list.is_empty() => {
                return Err(format!(
                    "token {name:?}: an empty tenants list allows nothing; leave it out for \
                     every tenant"
                ))
            }
            other => other.map(|l| l.into_iter().collect()),
        };
        let expires = match t.expires {
            Some(s) => Some(parse_time(&s).map_err(|e| format!("token {name:?}: {e}"))?),
            None => None,
        };
        let rate = match t.rate {
            Some(0) => None,
            Some(per_second) => Some(Rate { per_second }),
            None => default_rate,
        };
        let grant = Grant {
            name: name.clone(),
            scopes,
            tenants,
            expires,
            limiter: rate.map(Limiter::new),
        };
        if tokens.by_hash.insert(hash, Arc::new(grant)).is_some() {
            return Err(format!("token {name:?}: another token has the same sha256"));
        }
    }
    Ok(tokens)
}

fn parse_hex_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expires {s:?} is not an RFC 3339 time ({e})"))?;
    let nanos = t.unix_timestamp_nanos();
    let since_epoch = u64::try_from(nanos).map_err(|_| format!("expires {s:?} is before 1970"))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_nanos(since_epoch))
}

/// The hex SHA-256 of a token, as the auth file lists it.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A request rate per token, lock-free (GCRA): each request moves a "theoretical arrival
/// time" on by one interval; a request that would move it more than one second of requests
/// past now is refused, and told when there will be room.
#[derive(Debug)]
struct Limiter {
    per_second: u32,
    /// Nanoseconds since `origin`.
    tat: AtomicU64,
    origin: Instant,
}

impl Limiter {
    fn new(rate: Rate) -> Limiter {
        Limiter {
            per_second: rate.per_second.max(1),
            tat: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// Takes one request, or says how long to wait.
    fn take(&self) -> Result<(), Duration> {
        let interval = 1_000_000_000 / u64::from(self.per_second);
        let burst = 1_000_000_000u64;
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + interval;
            if next - now > burst {
                return Err(Duration::from_nanos(next - now - burst));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn file(json: &str) -> (tempfile::NamedTempFile, Auth) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, json.as_bytes()).unwrap();
        let auth = Auth::from_file(f.path(), None).unwrap();
        (f, auth)
    }

    fn bearer_headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn read() -> Need {
        need(&Method::GET, "/changes")
    }

    fn status(r: Result<Access, ApiError>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    fn one_token(token: &str, extra: &str) -> String {
        format!(
            r#"{{"tokens":[{{"name":"t","sha256":"{}","scopes":["read"]{extra}}}]}}"#,
            token_sha256(token)
        )
    }

    #[test]
    fn routes_need_their_scope() {
        let scope = |m: Method, p: &str| need(&m, p);
        assert_eq!(scope(Method::GET, "/health"), Need::Nothing);
        assert_eq!(scope(Method::POST, "/raft/append"), Need::Peer);
        let s = |scope, all_tenants| Need::Scope { scope, all_tenants };
        assert_eq!(scope(Method::GET, "/changes"), s(Scope::Read, false));
        assert_eq!(scope(Method::GET, "/metrics"), s(Scope::Read, true));
        assert_eq!(scope(Method::GET, "/cluster"), s(Scope::Read, true));
        assert_eq!(scope(Method::POST, "/changes"), s(Scope::Write, false));
        assert_eq!(
            scope(Method::DELETE, "/collections/c/keys/k"),
            s(Scope::Write, false)
        );
        assert_eq!(
            scope(Method::POST, "/admin/checkpoints/start"),
            s(Scope::Admin, false)
        );
        assert_eq!(
            scope(Method::POST, "/admin/truncate"),
            s(Scope::Admin, true)
        );
        assert_eq!(scope(Method::POST, "/cluster/join"), s(Scope::Admin, true));
        assert_eq!(
            scope(Method::DELETE, "/cluster/members/3"),
            s(Scope::Admin, true)
        );
    }

    #[test]
    fn tokens_are_checked_by_hash_scope_and_expiry() {
        let json = format!(
            r#"{{"tokens":[
                {{"name":"reader","sha256":"{}","scopes":["read"]}},
                {{"name":"old","sha256":"{}","scopes":["read"],"expires":"2001-01-01T00:00:00Z"}},
                {{"name":"acme","sha256":"{}","scopes":["read","write"],"tenants":["acme"]}}
            ]}}"#,
            token_sha256("r"),
            token_sha256("o"),
            token_sha256("a")
        );
        let (_f, auth) = file(&json);
        assert_eq!(status(auth.access(read(), &HeaderMap::new())), 401);
        assert_eq!(status(auth.access(read(), &bearer_headers("nope"))), 401);
        assert_eq!(status(auth.access(read(), &bearer_headers("o"))), 401);
        assert_eq!(status(auth.access(read(), &bearer_headers("r"))), 200);
        let write = need(&Method::POST, "/changes");
        assert_eq!(status(auth.access(write, &bearer_headers("r"))), 403);
        assert_eq!(status(auth.access(write, &bearer_headers("a"))), 200);
        let metrics = need(&Method::GET, "/metrics");
        assert_eq!(status(auth.access(metrics, &bearer_headers("a"))), 403);
        assert_eq!(status(auth.access(metrics, &bearer_headers("r"))), 200);
        let health = need(&Method::GET, "/health");
        assert_eq!(status(auth.access(health, &HeaderMap::new())), 200);
        let access = auth.access(read(), &bearer_headers("a")).unwrap();
        assert!(access.allows_tenant("acme") && !access.allows_tenant("other"));
        assert_eq!(access.check_tenant("other").unwrap_err().status(), 403);
        assert_eq!(
            access.check_all_tenants("the list").unwrap_err().status(),
            403
        );
        // The scheme is case-insensitive; other schemes are not tokens.
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer r"));
        assert_eq!(status(auth.access(read(), &h)), 200);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic r"));
        assert_eq!(status(auth.access(read(), &h)), 401);
    }

    #[test]
    fn the_secret_counts_on_admin_routes_without_a_token() {
        let (_f, auth) = file(&one_token("r", ""));
        let auth = auth.with_secret(Arc::new(|h: &HeaderMap| h.contains_key("x-secret")));
        let mut h = HeaderMap::new();
        h.insert("x-secret", HeaderValue::from_static("s"));
        let admin = need(&Method::POST, "/admin/truncate");
        assert!(matches!(auth.access(admin, &h), Ok(Access::ClusterSecret)));
        assert_eq!(status(auth.access(read(), &h)), 401);
        // A token given is what counts, even beside the secret.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer r"));
        assert_eq!(status(auth.access(admin, &h)), 403);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (json, why) in [
            ("[]", "not a valid auth file"),
            (
                r#"{"tokens":[{"name":"a","sha256":"xy","scopes":["read"]}]}"#,
                "64 hex",
            ),
            (&one_token("a", r#","tenants":[]"#), "empty tenants"),
            (&one_token("a", r#","expires":"soon""#), "RFC 3339"),
            (&one_token("a", r#","colour":"red""#), "unknown field"),
            (
                &format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{}","scopes":["root"]}}]}}"#,
                    token_sha256("a")
                ),
                "unknown scope",
            ),
        ] {
            let err = parse(json.as_bytes(), None).err().unwrap();
            assert!(err.contains(why), "{json}: {err}");
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_picked_up_and_a_broken_one_ignored() {
        let (f, auth) = file(&one_token("first", ""));
        assert_eq!(status(auth.access(read(), &bearer_headers("first"))), 200);
        std::fs::write(f.path(), one_token("second", "")).unwrap();
        auth.reload().await;
        assert_eq!(status(auth.access(read(), &bearer_headers("first"))), 401);
        assert_eq!(status(auth.access(read(), &bearer_headers("second"))), 200);
        std::fs::write(f.path(), "{ not json").unwrap();
        auth.reload().await;
        assert_eq!(status(auth.access(read(), &bearer_headers("second"))), 200);
    }

    #[test]
    fn the_rate_allows_a_burst_then_refuses_with_a_wait() {
        let (_f, auth) = file(&one_token("r", r#","rate":5"#));
        let h = bearer_headers("r");
        for _ in 0..5 {
            assert_eq!(status(auth.access(read(), &h)), 200);
        }
        match auth.access(read(), &h) {
            Err(ApiError::TooManyRequests {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 1),
            other => panic!("expected 429, got {other:?}"),
        }
    }
}
