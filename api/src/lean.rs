//! A lean HTTP/1.1 server for fleets of long-polling consumers. hyper keeps an 8 KiB read
//! buffer and an 8 KiB write buffer per connection for as long as the connection lives; here
//! a connection between requests, and a request waiting for its answer, holds no buffer at
//! all: only its task, the parsed request and the handler's own state.
//!
//! Rules:
//! 1. A request head (request line and headers) is read into a buffer that is dropped once
//!    the head is parsed into owned values; at most `max_head_bytes`, else `431`. The first
//!    head must be whole within the header read timeout from accept, a later one within it
//!    from its first byte, else `408`. That holds for a new connection that sent nothing
//!    too: from the client's side, bytes still on their way at the deadline and no bytes
//!    look the same, so both get the same answer. A connection idle between requests for
//!    `idle_timeout` is closed without one.
//! 2. A body is read whole before the handler runs, at most `max_body_bytes` (`413` without
//!    reading it when `Content-Length` says more); `Content-Length` or chunked, never both.
//! 3. While the handler runs, the socket is watched: a client that closes its side drops the
//!    request (a long-poll nobody waits for any more costs nothing further).
//! 4. An answer is written with one `write` when it is small, else streamed; bodies without
//!    a known length are sent chunked (HTTP/1.1) or delimited by closing (HTTP/1.0).
//! 5. At shutdown idle connections close at once, running requests finish (long-polls answer
//!    at once, they watch the same token), and no connection is kept alive afterwards.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, HttpBody};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::limits::{ListenerLimits, KEEP_ALIVE_IDLE};
use crate::metrics::{ConnectionGuard, HttpMetrics};
use crate::tls::{ServerTls, Stream};

/// Headers a request may have at most; more is a `431`.
const MAX_HEADERS: usize = 64;
/// Bytes read from the socket at a time while reading a head or a body.
const READ_CHUNK: usize = 4096;
/// Answers up to this size are written together with their head in one `write`.
const SINGLE_WRITE_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (out of file descriptors, say), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Limits of the lean server.
#[derive(Debug, Clone)]
pub struct LeanOptions {
    /// Largest request head (request line and headers), in bytes: 16 KiB holds any request
    /// of the API with room to spare.
    pub max_head_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Once a request's head arrived, its body must arrive within this (a client that
    /// trickles its body in does not hold a task forever). The head's own limit is the
    /// listener's header read timeout.
    pub request_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for LeanOptions {
    fn default() -> Self {
        LeanOptions {
            max_head_bytes: 16 * 1024,
            max_body_bytes: changeagent_proto::limits::DEFAULT_MAX_BODY_BYTES,
            request_timeout: Duration::from_secs(30),
            idle_timeout: KEEP_ALIVE_IDLE,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then until every running
/// request finished (rule 5). A new connection over `limits.max_connections` is closed as
/// soon as it is accepted; connections are counted in `metrics`. Dropping (aborting) the
/// returned future closes every connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    tls: Option<ServerTls>,
    options: LeanOptions,
    limits: ListenerLimits,
    metrics: Arc<HttpMetrics>,
) -> io::Result<()> {
    let options = Arc::new(options);
    // Owns every connection task: aborting the server aborts them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over the limit the socket is dropped (closed) before anything is read.
                    let Some(open) = metrics.connection(limits.max_connections, false) else {
                        tracing::debug!(%peer, "--max-connections reached; closing a new connection");
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    let first_head_by = Instant::now() + limits.header_read_timeout;
                    let (tls, router, shutdown, options, metrics) = (
                        tls.clone(),
                        router.clone(),
                        shutdown.clone(),
                        options.clone(),
                        metrics.clone(),
                    );
                    connections.spawn(async move {
                        // The handshake counts against the first head's time.
                        let stream = tokio::select! {
                            accepted = crate::tls::accept(tls.as_ref(), stream) => match accepted {
                                Ok((stream, _)) => stream,
                                Err(e) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                            },
                            _ = tokio::time::sleep_until(first_head_by) => {
                                metrics.header_timeout();
                                return;
                            }
                            _ = shutdown.cancelled() => return,
                        };
                        Connection {
                            stream,
                            pending: BytesMut::new(),
                            router,
                            shutdown,
                            options,
                            header_read_timeout: limits.header_read_timeout,
                            first_head_by: Some(first_head_by),
                            metrics,
                            _open: open,
                        }
                        .run()
                        .await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Why a request cannot be served; answered with the status and message, then the
/// connection closes.
struct Refusal {
    status: StatusCode,
    message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// A parsed request head, owning its values.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    framing: Framing,
    expect_continue: bool,
}

/// How a request's body is delimited.
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

struct Connection {
    stream: Stream,
    /// Bytes read past the end of the last request (empty, not just cleared, between
    /// requests: rule 1).
    pending: BytesMut,
    router: Router,
    shutdown: CancellationToken,
    options: Arc<LeanOptions>,
    header_read_timeout: Duration,
    /// When the first request's head must be whole (from accept); `None` after it.
    first_head_by: Option<Instant>,
    /// Counts header timeouts.
    metrics: Arc<HttpMetrics>,
    /// Counts this connection as open until it ends.
    _open: ConnectionGuard,
}

impl Connection {
    async fn run(mut self) {
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => {
                    self.first_head_by = None;
                    head
                }
                Ok(None) => return,
                Err(Some(refusal)) => return self.refuse(refusal).await,
                Err(None) => return,
            };
            let deadline = Instant::now() + self.options.request_timeout;
            let body = match self.read_body(&head, deadline).await {
                Ok(body) => body,
                Err(Some(refusal)) => return self.refuse(refusal).await,
                Err(None) => return,
            };
            let keep_alive = head.keep_alive;
            let (method, version) = (head.method.clone(), head.version);
            let mut request = Request::new(Body::from(body));
            *request.method_mut() = head.method;
            *request.uri_mut() = head.uri;
            *request.version_mut() = head.version;
            *request.headers_mut() = head.headers;
            let Some(response) = self.call(request).await else {
                return;
            };
            let keep_alive = keep_alive && !self.shutdown.is_cancelled();
            if self
                .write_response(response, &method, version, keep_alive)
                .await
                .is_err()
                || !keep_alive
            {
                return;
            }
        }
    }

    /// Rule 1: the next request's head; `None` when the client closed, went idle too long,
    /// or the server shuts down between requests.
    async fn read_head(&mut self) -> Result<Option<Head>, Option<Refusal>> {
        let mut deadline = self.first_head_by;
        loop {
            if let Some(end) = find_head_end(&self.pending) {
                let raw = self.pending.split_to(end);
                if self.pending.is_empty() {
                    self.pending = BytesMut::new();
                }
                return parse_head(&raw, self.options.max_head_bytes)
                    .map(Some)
                    .map_err(Some);
            }
            if self.pending.len() > self.options.max_head_bytes {
                return Err(Some(refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!(
                        "the request head is larger than {} bytes",
                        self.options.max_head_bytes
                    ),
                )));
            }
            let idle = self.pending.is_empty();
            let wait = match deadline {
                Some(at) => at,
                None if idle => Instant::now() + self.options.idle_timeout,
                None => *deadline.insert(Instant::now() + self.header_read_timeout),
            };
            // Bytes already waiting are read before a deadline that passed while this task
            // was not scheduled (10,000 connections accepted at once) is acted on.
            let read = tokio::select! {
                biased;
                read = read_some(&mut self.stream, &mut self.pending) => read,
                _ = tokio::time::sleep_until(wait) => {
                    if deadline.is_none() {
                        return Ok(None);
                    }
                    self.metrics.header_timeout();
                    // A new connection gets its 408 whatever arrived of its first head; a
                    // kept-alive one whose later head emptied to nothing is just closed.
                    return if idle && self.first_head_by.is_none() {
                        Err(None)
                    } else {
                        Err(Some(refuse(StatusCode::REQUEST_TIMEOUT, "the request head did not arrive in time")))
                    };
                }
                _ = self.shutdown.cancelled(), if idle => return Ok(None),
            };
            match read {
                Ok(0) if self.pending.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {
                    // Tolerate empty lines before a request (RFC 9112 section 2.2).
                    while self.pending.starts_with(b"\r\n") {
                        let _ = self.pending.split_to(2);
                    }
                    if deadline.is_none() && !self.pending.is_empty() {
                        deadline = Some(Instant::now() + self.header_read_timeout);
                    }
                }
            }
        }
    }

    /// Rule 2.
    async fn read_body(
        &mut self,
        head: &Head,
        deadline: Instant,
    ) -> Result<Bytes, Option<Refusal>> {
        let max = self.options.max_body_bytes;
        let too_large = || {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {max} bytes"),
            )
        };
        match head.framing {
            Framing::Empty => Ok(Bytes::new()),
            Framing::Length(n) => {
                if n > max as u64 {
                    return Err(Some(too_large()));
                }
                self.continue_if_expected(head).await?;
                let n = n as usize;
                self.fill(n, deadline).await?;
                Ok(self.take(n))
            }
            Framing::Chunked => {
                self.continue_if_expected(head).await?;
                let mut body = BytesMut::new();
                loop {
                    let line = self.line(deadline).await?;
                    let size = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|l| l.split(';').next())
                        .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "a malformed chunk size"))?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        while !self.line(deadline).await?.is_empty() {}
                        return Ok(body.freeze());
                    }
                    if body.len() + size > max {
                        return Err(Some(too_large()));
                    }
                    self.fill(size + 2, deadline).await?;
                    body.extend_from_slice(&self.take(size));
                    if self.take(2).as_ref() != b"\r\n" {
                        return Err(Some(refuse(
                            StatusCode::BAD_REQUEST,
                            "a chunk without its CRLF",
                        )));
                    }
                }
            }
        }
    }

    async fn continue_if_expected(&mut self, head: &Head) -> Result<(), Option<Refusal>> {
        if head.expect_continue && self.pending.is_empty() {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| None)?;
            self.stream.flush().await.map_err(|_| None)?;
        }
        Ok(())
    }

    /// Reads until `pending` holds at least `n` bytes.
    async fn fill(&mut self, n: usize, deadline: Instant) -> Result<(), Option<Refusal>> {
        self.pending.reserve(n.saturating_sub(self.pending.len()));
        while self.pending.len() < n {
            let read =
                tokio::time::timeout_at(deadline, read_some(&mut self.stream, &mut self.pending))
                    .await;
            match read {
                Err(_) => {
                    return Err(Some(refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time",
                    )))
                }
                Ok(Ok(0)) | Ok(Err(_)) => return Err(None),
                Ok(Ok(_)) => {}
            }
        }
        Ok(())
    }

    /// The next line of a chunked body, without its CRLF.
    async fn line(&mut self, deadline: Instant) -> Result<Bytes, Option<Refusal>> {
        loop {
            if let Some(at) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(at);
                let _ = self.take(2);
                return Ok(line);
            }
            if self.pending.len() > self.options.max_head_bytes {
                return Err(Some(refuse(
                    StatusCode::BAD_REQUEST,
                    "a chunk line too long",
                )));
            }
            let have = self.pending.len();
            self.fill(have + 1, deadline).await?;
        }
    }

    fn take(&mut self, n: usize) -> Bytes {
        let out = self.pending.split_to(n).freeze();
        if self.pending.is_empty() {
            self.pending = BytesMut::new();
        }
        out
    }

    /// Rule 3: runs the handler while watching for the client to go away.
    async fn call(&mut self, request: Request<Body>) -> Option<Response<Body>> {
        let answer = self.router.clone().oneshot(request);
        let mut answer = std::pin::pin!(answer);
        let mut watching = true;
        let mut probe = [0u8; 512];
        loop {
            // A read dropped before it completes loses nothing (over TLS the record stays in
            // the session), so the next request's bytes are never lost.
            tokio::select! {
                response = &mut answer => {
                    let response: Result<Response<Body>, Infallible> = response;
                    return response.ok();
                }
                read = self.stream.read(&mut probe), if watching => {
                    match read {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => {
                            // A pipelined request: keep it for later, within bounds.
                            self.pending.extend_from_slice(&probe[..n]);
                            if self.pending.len() > self.options.max_head_bytes {
                                watching = false;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rule 4.
    async fn write_response(
        &mut self,
        response: Response<Body>,
        method: &Method,
        version: Version,
        keep_alive: bool,
    ) -> io::Result<()> {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let given_length = parts.headers.get(header::CONTENT_LENGTH).cloned();
        let exact = HttpBody::size_hint(&body).exact();
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if name == header::CONNECTION
                || name == header::TRANSFER_ENCODING
                || name == header::CONTENT_LENGTH
            {
                continue;
            }
            push_header(&mut head, name, value);
        }
        push_header(
            &mut head,
            &header::DATE,
            &HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now()))
                .unwrap_or(HeaderValue::from_static("")),
        );
        // Small bodies with a known length are collected and written with the head.
        if let (Some(n), None) = (exact, &given_length) {
            if n as usize <= SINGLE_WRITE_BYTES {
                let bytes = body.collect().await.map_err(io::Error::other)?.to_bytes();
                if !bodiless || *method == Method::HEAD {
                    push_header(
                        &mut head,
                        &header::CONTENT_LENGTH,
                        &HeaderValue::from(bytes.len()),
                    );
                }
                finish_head(&mut head, keep_alive);
                if !bodiless {
                    head.extend_from_slice(&bytes);
                }
                self.stream.write_all(&head).await?;
                // TLS holds what the socket did not take yet until flushed.
                return self.stream.flush().await;
            }
        }
        let length = given_length.or_else(|| exact.map(HeaderValue::from));
        let chunked = length.is_none() && version == Version::HTTP_11 && !bodiless;
        let keep_alive = keep_alive && (length.is_some() || chunked || bodiless);
        match (&length, chunked) {
            (Some(len), _) => push_header(&mut head, &header::CONTENT_LENGTH, len),
            (None, true) => push_header(
                &mut head,
                &header::TRANSFER_ENCODING,
                &HeaderValue::from_static("chunked"),
            ),
            (None, false) => {}
        }
        finish_head(&mut head, keep_alive);
        self.stream.write_all(&head).await?;
        self.stream.flush().await?;
        drop(head);
        if bodiless {
            return Ok(());
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(io::Error::other)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let size = format!("{:x}\r\n", data.len());
                self.stream.write_all(size.as_bytes()).await?;
                self.stream.write_all(&data).await?;
                self.stream.write_all(b"\r\n").await?;
            } else {
                self.stream.write_all(&data).await?;
            }
            self.stream.flush().await?;
        }
        if chunked {
            self.stream.write_all(b"0\r\n\r\n").await?;
        }
        self.stream.flush().await?;
        if !keep_alive {
            self.stream.shutdown().await?;
        }
        Ok(())
    }

    /// Answers a request that cannot be served with its JSON error, and closes.
    async fn refuse(mut self, refusal: Refusal) {
        let body = serde_json::json!({ "error": refusal.message }).to_string();
        let mut out = Vec::with_capacity(160 + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(refusal.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(refusal.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(
            format!(
                "\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body.as_bytes());
        if self.stream.write_all(&out).await.is_ok() {
            let _ = self.stream.shutdown().await;
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn finish_head(out: &mut Vec<u8>, keep_alive: bool) {
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads what the socket has (up to [`READ_CHUNK`] bytes) onto the end of `into`.
async fn read_some(stream: &mut Stream, into: &mut BytesMut) -> io::Result<usize> {
    into.reserve(READ_CHUNK);
    stream.read_buf(into).await
}

/// The length of the head at the start of `buf` (through its empty line), once whole.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Parses a whole head into owned values.
fn parse_head(raw: &[u8], max_head_bytes: usize) -> Result<Head, Refusal> {
    let bad = |message: String| refuse(StatusCode::BAD_REQUEST, message);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("an incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} request headers"),
            ))
        }
        Err(e) => return Err(bad(format!("a malformed request head: {e}"))),
    }
    if raw.len() > max_head_bytes {
        return Err(refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request head is larger than {max_head_bytes} bytes"),
        ));
    }
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("an invalid method".into()))?;
    let uri: Uri = parsed
        .path
        .unwrap_or("")
        .parse()
        .map_err(|e| bad(format!("an invalid request target: {e}")))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad(format!("an invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad(format!("an invalid value of header {}", h.name)))?;
        map.append(name, value);
    }
    let connection = |token: &str| {
        map.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let keep_alive = match version {
        Version::HTTP_10 => connection("keep-alive"),
        _ => !connection("close"),
    };
    let lengths: Vec<&HeaderValue> = map.get_all(header::CONTENT_LENGTH).iter().collect();
    let framing = match (map.get(header::TRANSFER_ENCODING), lengths.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(bad(
                "a request with both Transfer-Encoding and Content-Length".into(),
            ))
        }
        (Some(te), []) => {
            let last = te
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim);
            if last.is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
                Framing::Chunked
            } else {
                return Err(refuse(
                    StatusCode::NOT_IMPLEMENTED,
                    "only the chunked transfer coding is supported",
                ));
            }
        }
        (None, []) => Framing::Empty,
        (None, [first, rest @ ..]) => {
            if rest.iter().any(|v| v != first) {
                return Err(bad("differing Content-Length headers".into()));
            }
            let n = first
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| bad("an invalid Content-Length".into()))?;
            if n == 0 {
                Framing::Empty
            } else {
                Framing::Length(n)
            }
        }
    };
    let expect_continue = map
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Head {
        method,
        uri,
        version,
        headers: map,
        keep_alive,
        framing,
        expect_continue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::net::TcpStream;

    /// A server over a few routes: an echo, a handler that waits until told, and a
    /// streamed body of unknown length.
    async fn server(
        options: LeanOptions,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        Arc<tokio::sync::Notify>,
    ) {
        let (addr, shutdown, release, _) = limited(options, ListenerLimits::default()).await;
        (addr, shutdown, release)
    }

    /// [`server`] within `limits`, with its metrics.
    async fn limited(
        options: LeanOptions,
        limits: ListenerLimits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        Arc<tokio::sync::Notify>,
        Arc<HttpMetrics>,
    ) {
        let release = Arc::new(tokio::sync::Notify::new());
        let waiting = release.clone();
        let router = Router::new()
            .route("/echo", post(|body: Bytes| async move { body }))
            .route(
                "/wait",
                get(move || {
                    let waiting = waiting.clone();
                    async move {
                        waiting.notified().await;
                        "released"
                    }
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    let parts = futures::stream::iter(
                        ["ab", "cd"].map(|s| Ok::<_, Infallible>(Bytes::from(s))),
                    );
                    Body::from_stream(parts)
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(HttpMetrics::default());
        tokio::spawn(serve(
            listener,
            router,
            shutdown.clone(),
            None,
            options,
            limits,
            metrics.clone(),
        ));
        (addr, shutdown, release, metrics)
    }

    /// Sends `raw`, then reads until the server closes or `until` appears.
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8], until: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("the server answered in time")
                .unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if n == 0 || (!until.is_empty() && text.contains(until)) {
                return text;
            }
        }
    }

    #[tokio::test]
    async fn keep_alive_pipelining_chunked_bodies_and_continue() {
        let (addr, _shutdown, _) = server(LeanOptions::default()).await;
        // Two pipelined requests on one connection, the second chunked, then a close.
        let raw = b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let text = exchange(addr, raw, "").await;
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.contains("content-length: 5\r\n"), "{text}");
        assert!(text.contains("\r\n\r\nhello"), "{text}");
        assert!(text.ends_with("\r\n\r\nabcde"), "{text}");
        assert!(text.contains("connection: close"), "{text}");

        // A client that waits for 100 Continue before it sends the body gets it.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 25];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"ok").await.unwrap();
        let mut rest = vec![0u8; 4096];
        let n = s.read(&mut rest).await.unwrap();
        let text = String::from_utf8_lossy(&rest[..n]).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200 OK") && text.ends_with("\r\n\r\nok"),
            "{text}"
        );

        let text = exchange(addr, b"GET /stream HTTP/1.1\r\n\r\n", "0\r\n\r\n").await;
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert!(text.contains("2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"), "{text}");
        let text = exchange(addr, b"GET /stream HTTP/1.0\r\n\r\n", "").await;
        assert!(text.ends_with("\r\n\r\nabcd"), "{text}");
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors_and_nothing_runs() {
        let options = LeanOptions {
            max_head_bytes: 1024,
            max_body_bytes: 10,
            ..LeanOptions::default()
        };
        let (addr, _shutdown, _) = server(options).await;
        let text = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\n\r\n",
            "}",
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
        assert!(
            text.contains("{\"error\":\"the request body is larger than 10 bytes\"}"),
            "{text}"
        );
        let big = format!("GET /echo HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(2000));
        let text = exchange(addr, big.as_bytes(), "}").await;
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let text = exchange(addr, b"GET /\x01 HTTP/1.1\r\n\r\n", "}").await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        let chunks =
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n";
        let text = exchange(addr, chunks, "}").await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    }

    #[tokio::test]
    async fn a_request_whose_client_left_is_dropped_and_shutdown_closes_idle_connections() {
        let (addr, shutdown, release) = server(LeanOptions::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /wait HTTP/1.1\r\n\r\n").await.unwrap();
        drop(s);
        // The dropped request no longer waits: a new one is the only waiter released.
        let waiter = tokio::spawn(exchange(addr, b"GET /wait HTTP/1.1\r\n\r\n", "released"));
        let mut idle = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                release.notify_one();
                if waiter.is_finished() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(waiter.await.unwrap().contains("released"));
        shutdown.cancel();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
            .await
            .expect("an idle connection closes at shutdown")
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn heads_must_arrive_in_time_but_idle_kept_alive_connections_stay() {
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_millis(200),
            max_connections: 2,
        };
        let (addr, _shutdown, _, metrics) = limited(LeanOptions::default(), limits).await;
        // A head that never ends gets a 408 with a JSON error once the timeout passed.
        let text = exchange(addr, b"GET /echo HTTP/1.1\r\nHost: x\r\n", "}").await;
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(text.contains("{\"error\":\"the request head"), "{text}");
        // A new connection that sends nothing gets the same 408.
        let text = exchange(addr, b"", "}").await;
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert_eq!(metrics.header_timeouts(), 2);
        let mut buf = [0u8; 4096];

        // A kept-alive connection idle after its first request is not cut by the head
        // timeout (clients pool connections far longer), only after `idle_timeout`.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        for body in ["hi", "ho"] {
            let request = format!("POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n{body}");
            kept.write_all(request.as_bytes()).await.unwrap();
            let n = kept.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
            assert!(text.ends_with(body), "{text}");
            // Five head timeouts idle: a bounded wait for nothing to happen.
            let idle = tokio::time::timeout(Duration::from_secs(1), kept.peek(&mut buf)).await;
            assert!(
                idle.is_err(),
                "the idle connection was closed or written to"
            );
        }

        // With `kept` and one more open the listener is full: a third is closed unanswered.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let n = second.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
        assert_eq!(metrics.connections_open(), 2);
        let mut third = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .expect("the third connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        assert_eq!(metrics.connections_refused(), 1);
    }

    #[test]
    fn heads_parse_into_owned_values_with_their_framing() {
        let raw = b"POST /changes?since=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n";
        let head = parse_head(raw, 1024).ok().unwrap();
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.query(), Some("since=1"));
        assert!(head.keep_alive);
        assert!(matches!(head.framing, Framing::Length(5)));

        let raw = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse_head(raw, 1024).ok().unwrap().keep_alive);
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            parse_head(raw, 1024).err().unwrap().status,
            StatusCode::BAD_REQUEST
        );
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(
            parse_head(raw, 1024).err().unwrap().status,
            StatusCode::NOT_IMPLEMENTED
        );
        let raw = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse_head(raw, 1024).err().unwrap().status,
            StatusCode::BAD_REQUEST
        );
        let raw = b"GET / HTTP/1.1\r\nX: y\r\n\r\n";
        assert_eq!(
            parse_head(raw, 8).err().unwrap().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            parse_head(b"GET\x01 / HTTP/1.1\r\n\r\n", 1024)
                .err()
                .unwrap()
                .status,
            StatusCode::BAD_REQUEST
        );
    }
}
