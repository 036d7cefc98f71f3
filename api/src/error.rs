//! `ApiError`: every failure an HTTP handler can answer with, mapped to a status and the JSON
//! error body. 5xx details are logged, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use changeagent_proto::{ErrorBody, Manifest, QueryError};
use changeagent_store::{Error, Rejection};

/// An HTTP error answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// No credentials, or unknown ones: a missing or unknown token, a wrong cluster secret.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials that do not cover the request: a token's scope or tenants, a peer request
    /// from another cluster.
    #[error("{0}")]
    Forbidden(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("changes before {first_index} were truncated")]
    Gone {
        first_index: u64,
        checkpoint: Option<Box<Manifest>>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// Over a token's request rate.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after_secs: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone { .. } => StatusCode::GONE,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let message = r.to_string();
        match r {
            Rejection::Invalid(m) => ApiError::BadRequest(m),
            Rejection::CollectionTenantMismatch { .. } => ApiError::BadRequest(message),
            Rejection::UnknownTenant(_)
            | Rejection::UnknownCollection(_)
            | Rejection::UnknownKey { .. } => ApiError::NotFound(message),
            Rejection::AmbiguousCollection(_)
            | Rejection::TenantExists(_)
            | Rejection::CollectionExists { .. }
            | Rejection::CheckpointInProgress { .. }
            | Rejection::NoOpenStart { .. }
            | Rejection::NotCheckpointed { .. } => ApiError::Conflict(message),
            Rejection::Truncated { first_index } => ApiError::Gone {
                first_index,
                checkpoint: None,
            },
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Rejected(r) => r.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error answering a request");
                ErrorBody {
                    error: "internal error; see the server log".into(),
                    message: None,
                    first_index: None,
                    checkpoint: None,
                }
            }
            ApiError::Gone {
                first_index,
                checkpoint,
            } => ErrorBody {
                error: "truncated".into(),
                message: Some(format!(
                    "changes before {first_index} were truncated; load the checkpoint and \
                     continue from its index"
                )),
                first_index: Some(*first_index),
                checkpoint: checkpoint.clone(),
            },
            other => ErrorBody {
                error: other.to_string(),
                message: None,
                first_index: None,
                checkpoint: None,
            },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
        let mut resp = (status, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ApiError::Unavailable {
                retry_after_secs, ..
            }
            | ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            ApiError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"changeagent\""),
                );
            }
            _ => {}
        }
        resp
    }
}

/// Answer for routes that do not exist.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the API in the README".into())
}

/// Answer for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
