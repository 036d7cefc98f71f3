//! Reading request bodies: `Content-Type` checked (415), size bounded (413).

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};

use crate::error::ApiError;

/// True for `application/json` and `application/json; charset=…`.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a JSON request body of at most `limit` bytes.
pub async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    body_bytes(headers, body, limit).await
}

/// Reads a request body of any type, of at most `limit` bytes.
pub async fn body_bytes(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                Err(ApiError::TooLarge { limit })
            } else {
                Err(ApiError::BadRequest(format!(
                    "could not read the request body: {e}"
                )))
            }
        }
    }
}
