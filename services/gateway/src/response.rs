//! What every answer of the HTTP edge shares: the request-id headers, the JSON error shape and
//! the OpenAI list shape.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meshgate_runtime::ApiError;

/// Header carrying the client's request id, echoed back (or the gateway's id when the client
/// sent none). It is for the client's logs only: quota, traces and upstream calls use the
/// gateway's own id, so a reused id can neither skip a budget check nor hide a trace.
pub const REQUEST_ID: &str = "x-request-id";
/// Header carrying the gateway's own request id, the key of the request's trace.
pub const MESHGATE_REQUEST_ID: &str = "x-meshgate-request-id";
/// Header carrying the W3C trace id of the request.
pub const TRACE_ID: &str = "x-meshgate-trace-id";
/// Header of an answer replayed for an idempotency key seen before.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Client-chosen request ids are echoed when they are short and plain.
pub fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// `{"object": "list", "data": [...]}`: the OpenAI list shape every listing answers with.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct List<T> {
    /// Always `list`.
    object: &'static str,
    data: Vec<T>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Self {
        Self { object: "list", data }
    }
}

/// The JSON error shape, with `Retry-After` and the error's own headers.
pub fn error_response(err: &ApiError, request_id: &str) -> Response {
    let mut response = (err.code.http_status(), axum::Json(err.body(request_id))).into_response();
    if let Some(seconds) = err.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    for (name, value) in &err.headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

/// Seconds since the Unix epoch (`created` of OpenAI objects).
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_must_be_plain() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
