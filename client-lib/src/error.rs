//! The client's one error type. Variants carry the status code, index or
//! decoded error body they are about, so callers can match on them instead of
//! parsing messages. As usual, `Display` shows one level; the cause (a
//! reqwest or serde_json error) is its `source()` (`{:#}` with anyhow).

use std::path::PathBuf;
use std::time::Duration;

use changeagent_proto::checkpoint::ReadError;
use changeagent_proto::{Manifest, Scope};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use crate::types::ErrorBody;

/// Result of every client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How many bytes of a non-JSON error body are kept as its message: enough to
/// recognise a proxy's error page, short enough for one log line.
const MAX_ERROR_TEXT: usize = 512;

/// Everything that can go wrong talking to a ChangeAgent server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client was built without any endpoint.
    #[error("no server endpoint given")]
    NoEndpoints,

    /// An endpoint is not a parseable URL.
    #[error("invalid server URL {url:?}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },

    /// An endpoint is a URL, but not an `http://` or `https://` one.
    #[error("invalid server URL {url:?}: only http:// and https:// are supported")]
    UnsupportedScheme {
        /// The URL as given.
        url: String,
    },

    /// An `Idempotency-Key` that cannot be sent as an HTTP header value.
    #[error("invalid Idempotency-Key {key:?}: use visible ASCII characters only")]
    InvalidIdempotencyKey {
        /// The key as given.
        key: String,
    },

    /// The server answered with an error status (4xx, or a 5xx other than
    /// the "unavailable" ones). Not retried.
    #[error("server answered {status}: {}", body.error)]
    Api {
        /// HTTP status code.
        status: u16,
        /// The decoded `{"error": …}` body (synthesised from the raw text
        /// when the body was not JSON, e.g. from a proxy).
        body: ErrorBody,
    },

    /// `410 Gone`: the requested changes were truncated. Load the checkpoint
    /// and continue after its index.
    #[error("changes before {first_index} were truncated; load a checkpoint and continue from its index")]
    Truncated {
        /// Oldest `_id` the server still retains.
        first_index: u64,
        /// Manifest of the checkpoint to load, when the server has one.
        checkpoint: Option<Box<changeagent_proto::Manifest>>,
    },

    /// The cluster secret cannot be sent as a header value.
    #[error("the cluster secret must be visible ASCII")]
    InvalidSecret,

    /// The token cannot be sent as a header value.
    #[error("the token must be visible ASCII")]
    InvalidToken,

    /// 502, 503 or 504: no leader, no quorum, a write timeout or a proxy
    /// that cannot reach the server. Returned after the retries ran out.
    #[error("server unavailable ({status}): {}", body.error)]
    Unavailable {
        /// HTTP status code (503 from ChangeAgent itself).
        status: u16,
        /// The server's `Retry-After`, when it sent one in seconds.
        retry_after: Option<Duration>,
        /// The decoded error body.
        body: ErrorBody,
    },

    /// The request could not be sent or its answer not read: connection
    /// refused or reset, timeout, and so on.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),

    /// A request body could not be encoded as JSON.
    #[error("cannot encode the {what} request as JSON")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serializer's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A successful answer did not have the expected JSON shape.
    #[error("cannot decode the {what} answer (status {status})")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// HTTP status of the answer.
        status: u16,
        /// The deserializer's complaint.
        #[source]
        source: serde_json::Error,
    },

    /// A streamed answer (checkpoint data) stalled: no bytes arrived for the
    /// request timeout. Transient.
    #[error("{what}: nothing received for {after:?}")]
    TimedOut {
        /// What was being received.
        what: &'static str,
        /// How long nothing arrived.
        after: Duration,
    },

    /// A checkpoint's bytes do not hash to its manifest's `sha256`: the
    /// object is corrupt or not the one the manifest describes.
    #[error("checkpoint {index} has sha256 {actual}, its manifest says {expected}")]
    ChecksumMismatch {
        /// The checkpoint's index.
        index: u64,
        /// The manifest's `sha256`.
        expected: String,
        /// The sha256 of the bytes read, lowercase hex.
        actual: String,
    },

    /// A checkpoint's compressed size is not its manifest's `size`.
    #[error("checkpoint {index}: {actual} bytes read, its manifest says {expected}")]
    SizeMismatch {
        /// The checkpoint's index.
        index: u64,
        /// The manifest's `size`.
        expected: u64,
        /// Bytes read until the mismatch was certain: a longer object is
        /// cut off at the first byte past `expected`.
        actual: u64,
    },

    /// A checkpoint file's header or trailer disagrees with its manifest.
    #[error("checkpoint {index}: the file's {field} is {found}, its manifest says {expected}")]
    ManifestMismatch {
        /// The manifest's index.
        index: u64,
        /// The disagreeing field: `index`, `scope`, `clusterId` or `records`.
        field: &'static str,
        /// The manifest's value.
        expected: String,
        /// The file's value.
        found: String,
    },

    /// A checkpoint file is malformed or incomplete, or its bytes could not
    /// be read or decompressed.
    #[error("cannot read checkpoint{}", index_suffix(*.index))]
    BadCheckpoint {
        /// The checkpoint's index, when known.
        index: Option<u64>,
        /// What is wrong, and on which line.
        #[source]
        source: ReadError,
    },

    /// A `410` named a checkpoint of one tenant while the follow reads more
    /// than that tenant: loading it would lose the other tenants' state.
    #[error("checkpoint {index} covers only {scope}, not everything this follow reads")]
    WrongScope {
        /// The checkpoint's index.
        index: u64,
        /// The checkpoint's scope.
        scope: Scope,
    },

    /// The thread reading a checkpoint's records stopped before the end
    /// (it panicked).
    #[error("the reader of checkpoint {index} stopped before the end")]
    ReaderStopped {
        /// The checkpoint's index.
        index: u64,
    },

    /// A local file (a checkpoint's temp file or a download's target) could
    /// not be created, written or read.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The operating system's complaint.
        #[source]
        source: std::io::Error,
    },

    /// An outbox file could not be created, written, synced or read.
    #[error("cannot {what} {}", path.display())]
    OutboxIo {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's complaint.
        #[source]
        source: std::io::Error,
    },

    /// The outbox holds as many entries or bytes as it may: nothing more is
    /// queued until a flush reaches a server.
    #[error(
        "the outbox is full: {entries} entries of {bytes} bytes pending, at most \
         {max_entries} entries and {max_bytes} bytes; flush it to a server before queueing more"
    )]
    OutboxFull {
        /// Entries pending.
        entries: usize,
        /// Bytes those entries take in the outbox file.
        bytes: u64,
        /// [`crate::outbox::MAX_PENDING_ENTRIES`].
        max_entries: usize,
        /// [`crate::outbox::MAX_PENDING_BYTES`].
        max_bytes: u64,
    },

    /// A change too large to queue (the server would refuse it too).
    #[error("the change takes {bytes} bytes as JSON, more than an outbox entry may ({max} bytes)")]
    EntryTooLarge {
        /// The change's size as JSON.
        bytes: usize,
        /// [`crate::outbox::MAX_ENTRY_BYTES`].
        max: usize,
    },

    /// Another process (or another [`crate::Outbox`] of this one) has the
    /// outbox directory open.
    #[error("the outbox in {} is open in another process", dir.display())]
    OutboxLocked {
        /// The outbox directory.
        dir: PathBuf,
    },

    /// A complete line of the outbox file is not what the outbox writes:
    /// the file was damaged or edited. (A torn last line, left by a crash
    /// during an append, is not an error: it is dropped.)
    #[error("outbox file {} line {line}: {problem}", path.display())]
    OutboxCorrupt {
        /// The outbox file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        problem: &'static str,
        /// The decoder's complaint, when the line is not valid JSON of the
        /// expected shape.
        #[source]
        source: Option<serde_json::Error>,
    },

    /// An earlier write to the outbox file failed in a way that leaves its
    /// state on disk unknown (a failed fsync, or an append that could not be
    /// undone): this handle refuses further work.
    #[error("an earlier write to the outbox in {} failed; reopen the outbox to go on from what is on disk", dir.display())]
    OutboxBroken {
        /// The outbox directory.
        dir: PathBuf,
    },
}

/// ` N` after "checkpoint" when the index is known.
fn index_suffix(index: Option<u64>) -> String {
    index.map(|i| format!(" {i}")).unwrap_or_default()
}

impl Error {
    /// The HTTP status this error stands for, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } | Error::Unavailable { status, .. } => Some(*status),
            Error::Decode { status, .. } => Some(*status),
            Error::Truncated { .. } => Some(StatusCode::GONE.as_u16()),
            Error::Transport(e) => e.status().map(|s| s.as_u16()),
            _ => None,
        }
    }

    /// The decoded error body, when the server sent one.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            Error::Api { body, .. } | Error::Unavailable { body, .. } => Some(body),
            _ => None,
        }
    }

    /// `404`: unknown change, tenant, collection, key or route.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND.as_u16())
    }

    /// `409`: duplicate name, or a collection name that is ambiguous.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT.as_u16())
    }

    /// `400`: the server rejected the input.
    pub fn is_bad_request(&self) -> bool {
        self.status() == Some(StatusCode::BAD_REQUEST.as_u16())
    }

    /// `410`: the requested changes were truncated.
    pub fn is_truncated(&self) -> bool {
        matches!(self, Error::Truncated { .. })
    }

    /// The manifest a `410` named, on [`Error::Truncated`]: `None` when
    /// this is another error or the server had no checkpoint, an error when
    /// the server's manifest does not decode.
    pub fn truncated_manifest(&self) -> Option<Result<Manifest>> {
        match self {
            Error::Truncated {
                checkpoint: Some(checkpoint),
                ..
            } => Some(Ok(Manifest::clone(checkpoint))),
            _ => None,
        }
    }

    /// The failure may go away by itself: the server was unreachable,
    /// unavailable or failed internally, a stream stalled, or the server
    /// gave up reading the request (`408`: its head or body did not arrive
    /// in time, which a server that was itself stalled, say paused, also
    /// answers; nothing was done). Retrying a read is always safe; retrying
    /// a post is only safe with an `Idempotency-Key`.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(e) => !e.is_builder(),
            Error::Unavailable { .. } | Error::TimedOut { .. } => true,
            Error::Api { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// The server's `Retry-After`, on [`Error::Unavailable`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Turns a non-success answer into the fitting variant: 410 with a
    /// `truncated` body → [`Error::Truncated`], 502/503/504 →
    /// [`Error::Unavailable`], anything else → [`Error::Api`].
    pub fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Error {
        let decoded = decode_error_body(status, body);
        if status == StatusCode::GONE && decoded.error == "truncated" {
            if let Some(first_index) = decoded.first_index {
                return Error::Truncated {
                    first_index,
                    checkpoint: decoded.checkpoint,
                };
            }
        }
        if is_unavailable(status) {
            return Error::Unavailable {
                status: status.as_u16(),
                retry_after: retry_after(headers),
                body: decoded,
            };
        }
        Error::Api {
            status: status.as_u16(),
            body: decoded,
        }
    }
}

/// 502, 503 and 504 mean "try again, perhaps elsewhere".
pub(crate) fn is_unavailable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Decodes an `{"error": …}` body. A body that is not such JSON (an empty
/// body, a proxy's HTML page) becomes an `ErrorBody` whose `error` is the
/// body's text, cut to 512 bytes, or the status's reason
/// phrase when the body is empty.
pub fn decode_error_body(status: StatusCode, body: &[u8]) -> ErrorBody {
    if let Ok(decoded) = serde_json::from_slice::<ErrorBody>(body) {
        return decoded;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("unknown status")
            .to_owned()
    } else {
        let mut end = text.len().min(MAX_ERROR_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_owned()
    };
    ErrorBody {
        error,
        message: None,
        first_index: None,
        checkpoint: None,
    }
}

/// `Retry-After` in seconds. The HTTP-date form is not used by ChangeAgent
/// and is ignored.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use serde_json::json;

    #[test]
    fn json_error_body_becomes_api_error() {
        let err = Error::from_response(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            br#"{"error":"no change 17"}"#,
        );
        assert!(err.is_not_found());
        assert_eq!(err.status(), Some(404));
        assert_eq!(err.body().map(|b| b.error.as_str()), Some("no change 17"));
        assert!(!err.is_transient());
        assert_eq!(err.to_string(), "server answered 404: no change 17");
    }

    #[test]
    fn truncated_body_becomes_truncated_error() {
        let body = json!({
            "error": "truncated",
            "message": "changes before 100 were truncated",
            "firstIndex": 100,
            "checkpoint": {"index": 90, "scope": "all", "object": "c/00090.jsonl.zst",
                "size": 5, "sha256": "ab", "records": 3, "createdTs": 1, "clusterId": "c"}
        });
        let err = Error::from_response(
            StatusCode::GONE,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
        );
        match err {
            Error::Truncated {
                first_index,
                checkpoint,
            } => {
                assert_eq!(first_index, 100);
                let m = checkpoint.expect("a manifest");
                assert_eq!((m.index, m.object.as_str()), (90, "c/00090.jsonl.zst"));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn gone_without_truncated_body_stays_api_error() {
        let err = Error::from_response(StatusCode::GONE, &HeaderMap::new(), b"gone");
        assert!(matches!(err, Error::Api { status: 410, .. }), "{err:?}");
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        let err = Error::from_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers,
            br#"{"error":"no leader"}"#,
        );
        assert!(err.is_transient());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(err.status(), Some(503));
        assert_eq!(err.body().map(|b| b.error.as_str()), Some("no leader"));
    }

    #[test]
    fn http_date_retry_after_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn non_json_body_keeps_text() {
        let body = decode_error_body(StatusCode::BAD_GATEWAY, b"  <html>bad gateway</html>\n");
        assert_eq!(body.error, "<html>bad gateway</html>");
    }

    #[test]
    fn empty_body_uses_reason_phrase() {
        let body = decode_error_body(StatusCode::UNSUPPORTED_MEDIA_TYPE, b"");
        assert_eq!(body.error, "Unsupported Media Type");
    }

    #[test]
    fn long_non_json_body_is_cut_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT);
        let body = decode_error_body(StatusCode::INTERNAL_SERVER_ERROR, text.as_bytes());
        assert!(body.error.len() <= MAX_ERROR_TEXT);
        assert!(body.error.chars().all(|c| c == 'é'));
    }

    #[test]
    fn extra_fields_in_error_body_are_accepted() {
        let body = decode_error_body(
            StatusCode::BAD_REQUEST,
            br#"{"error":"bad limit","field":"limit"}"#,
        );
        assert_eq!(body.error, "bad limit");
    }

    #[test]
    fn internal_error_is_transient_but_bad_request_is_not() {
        let internal =
            Error::from_response(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), b"");
        assert!(internal.is_transient());
        let bad = Error::from_response(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"x"}"#,
        );
        assert!(bad.is_bad_request());
        assert!(!bad.is_transient());
        // The server gave up reading the request: nothing was done, ask again.
        let timed_out = Error::from_response(
            StatusCode::REQUEST_TIMEOUT,
            &HeaderMap::new(),
            br#"{"error":"request timeout","message":"the request head did not arrive in time"}"#,
        );
        assert!(timed_out.is_transient());
    }
}
