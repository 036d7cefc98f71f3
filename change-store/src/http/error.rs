//! `ApiError`: every failure an HTTP handler can answer with, mapped to a status and the JSON
//! error body. 5xx details are logged, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use changeagent_client::types::ErrorBody;

use crate::error::Error;

/// An HTTP error answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// A peer request without the right cluster secret.
    #[error("{0}")]
    Unauthorized(String),
    /// A peer request from another cluster.
    #[error("{0}")]
    Forbidden(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("changes before {first_index} were truncated")]
    Gone {
        first_index: u64,
        checkpoint: Option<serde_json::Value>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
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
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// Rebuilds an error from a status and message (e.g. a state machine's answer).
    pub fn from_status(status: u16, message: String) -> Self {
        match status {
            400 => ApiError::BadRequest(message),
            401 => ApiError::Unauthorized(message),
            403 => ApiError::Forbidden(message),
            404 => ApiError::NotFound(message),
            409 => ApiError::Conflict(message),
            503 => ApiError::Unavailable {
                message,
                retry_after_secs: 1,
            },
            _ => ApiError::Internal(message),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) => ApiError::BadRequest(m),
            Error::CollectionTenantMismatch { .. } => ApiError::BadRequest(e.to_string()),
            Error::UnknownTenant(_) | Error::UnknownCollection(_) | Error::UnknownKey { .. } => {
                ApiError::NotFound(e.to_string())
            }
            Error::AmbiguousCollection(_)
            | Error::TenantExists(_)
            | Error::CollectionExists { .. } => ApiError::Conflict(e.to_string()),
            Error::Truncated { first_index } => ApiError::Gone {
                first_index,
                checkpoint: None,
            },
            other => ApiError::Internal(other.to_string()),
        }
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
        if let ApiError::Unavailable {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
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
