//! The sync service's errors, each mapped to one shared [`ErrorCode`].
//!
//! | situation | variant | code | gRPC | edge HTTP |
//! |---|---|---|---|---|
//! | bad `CompleteRequest` (no model, no messages, bad role, bad sampling) | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | provider name not configured | `UnknownProvider` | `not_found` | NOT_FOUND | 404 |
//! | connect refused / DNS / reset before an answer | `Connect` | `service_unavailable` | UNAVAILABLE | 503 |
//! | connect, first-byte or total timeout | `Timeout` | `timeout` | DEADLINE_EXCEEDED | 504 |
//! | upstream 400 / 422 | `UpstreamRejected` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | upstream 401 / 403 (meshgate's provider key is wrong: not the caller's fault) | `UpstreamAuth` | `upstream_error` | UNAVAILABLE | 502 |
//! | upstream 404 (unknown model) | `UpstreamModelNotFound` | `model_not_found` | NOT_FOUND | 404 |
//! | upstream 408 | `Timeout` | `timeout` | DEADLINE_EXCEEDED | 504 |
//! | upstream 413 | `UpstreamPayloadTooLarge` | `payload_too_large` | INVALID_ARGUMENT | 413 |
//! | upstream 429 (`Retry-After` → `x-meshgate-retry-after`) | `UpstreamRateLimited` | `rate_limited` | RESOURCE_EXHAUSTED | 429 |
//! | upstream 5xx and any other status | `UpstreamFailed` | `upstream_error` | UNAVAILABLE | 502 |
//! | garbage, wrong content type, error event, stream closed before `[DONE]` | `Protocol` | `upstream_error` | UNAVAILABLE | 502 |
//! | connection broken mid-stream | `StreamBroken` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a queue RPC without a configured queue | `NotImplemented` | `not_implemented` | UNIMPLEMENTED | 501 |
//! | bad `EnqueueRequest` (no principal, malformed idempotency key, bad request) | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | unknown job id (or one of another project) | `JobNotFound` | `not_found` | NOT_FOUND | 404 |
//! | idempotency key reused with another request; retrying a job that is not dead | `Conflict` | `conflict` | ALREADY_EXISTS | 409 |
//! | the queue's store is down | `Queue` | `service_unavailable` | UNAVAILABLE | 503 |
//! | the queue's store holds undecodable data | `Queue` | `internal_error` | INTERNAL | 500 |
//! | `Uplink` without `[sync.cloud] url` | `NotImplemented` | `not_implemented` | UNIMPLEMENTED | 501 |
//! | the cloud outbox is full (the cloud unreachable for long) | `Outbox` | `overloaded` | RESOURCE_EXHAUSTED | 503 |
//! | the cloud outbox cannot be written | `Outbox` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a delivered job cannot be charged (quota down): only the charge is retried | `Charge` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a retried dead letter's old reservation cannot be released (quota down) | `Release` | `service_unavailable` | UNAVAILABLE | 503 |
//! | `GetJob`, `ListJobs` or `RetryJob` without a project | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//!
//! Statuses carry the code in `x-meshgate-error-code`, the retry delay in
//! `x-meshgate-retry-after` (seconds) and, when the provider answered, its HTTP status in
//! [`UPSTREAM_STATUS_METADATA`].

use meshgate_catalog::CatalogError;
use meshgate_runtime::error::{ApiError, ErrorCode};

/// Metadata key carrying the provider's HTTP status on a failed call.
pub const UPSTREAM_STATUS_METADATA: &str = "x-meshgate-upstream-status";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ProviderConfig(#[from] CatalogError),
    #[error("invalid sync configuration: {0}")]
    Config(String),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown provider '{0}'")]
    UnknownProvider(String),
    #[error("provider '{provider}' is unreachable: {message}")]
    Connect { provider: String, message: String },
    #[error("provider '{provider}': {message}")]
    Timeout { provider: String, message: String, upstream_status: Option<u16> },
    #[error("provider '{provider}' rejected the request ({status}): {message}")]
    UpstreamRejected { provider: String, status: u16, message: String },
    #[error("provider '{provider}' rejected meshgate's credentials ({status}): {message}")]
    UpstreamAuth { provider: String, status: u16, message: String },
    #[error("provider '{provider}' does not know the model ({status}): {message}")]
    UpstreamModelNotFound { provider: String, status: u16, message: String },
    #[error("provider '{provider}' refused the request as too large ({status}): {message}")]
    UpstreamPayloadTooLarge { provider: String, status: u16, message: String },
    #[error("provider '{provider}' is rate limiting ({status}): {message}")]
    UpstreamRateLimited { provider: String, status: u16, message: String, retry_after: Option<u64> },
    #[error("provider '{provider}' failed ({status}): {message}")]
    UpstreamFailed { provider: String, status: u16, message: String },
    #[error("provider '{provider}' sent an invalid stream: {message}")]
    Protocol { provider: String, message: String },
    #[error("provider '{provider}': connection broken mid-stream: {message}")]
    StreamBroken { provider: String, message: String },
    #[error("{0}")]
    NotImplemented(&'static str),
    #[error("job '{0}' not found")]
    JobNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Queue(crate::queue::QueueError),
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
    #[error(transparent)]
    Outbox(#[from] crate::cloud::OutboxError),
    #[error("cannot charge the delivered job to its budgets: {0}")]
    Charge(String),
    #[error("cannot release the job's quota reservation: {0}")]
    Release(String),
}

impl From<crate::queue::QueueError> for Error {
    fn from(err: crate::queue::QueueError) -> Self {
        use crate::queue::QueueError;
        match err {
            QueueError::IdempotencyConflict { .. } | QueueError::NotDead { .. } => Error::Conflict(err.to_string()),
            other => Error::Queue(other),
        }
    }
}

impl Error {
    /// The shared code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::ProviderConfig(_) | Error::Config(_) | Error::InvalidRequest(_) | Error::UpstreamRejected { .. } => {
                ErrorCode::InvalidRequest
            }
            Error::HttpClient(_) | Error::Serve(_) => ErrorCode::Internal,
            Error::UnknownProvider(_) => ErrorCode::NotFound,
            Error::Connect { .. } | Error::StreamBroken { .. } => ErrorCode::Unavailable,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::UpstreamAuth { .. } | Error::UpstreamFailed { .. } | Error::Protocol { .. } => {
                ErrorCode::UpstreamError
            }
            Error::UpstreamModelNotFound { .. } => ErrorCode::ModelNotFound,
            Error::UpstreamPayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::UpstreamRateLimited { .. } => ErrorCode::RateLimited,
            Error::NotImplemented(_) => ErrorCode::NotImplemented,
            Error::JobNotFound(_) => ErrorCode::NotFound,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Queue(crate::queue::QueueError::Corrupt(_)) => ErrorCode::Internal,
            Error::Queue(_) | Error::Storage(_) => ErrorCode::Unavailable,
            Error::Outbox(crate::cloud::OutboxError::Full { .. }) => ErrorCode::Overloaded,
            Error::Outbox(_) | Error::Charge(_) | Error::Release(_) => ErrorCode::Unavailable,
        }
    }

    /// The provider's HTTP status, when it answered with one.
    pub fn upstream_status(&self) -> Option<u16> {
        match self {
            Error::UpstreamRejected { status, .. }
            | Error::UpstreamAuth { status, .. }
            | Error::UpstreamModelNotFound { status, .. }
            | Error::UpstreamPayloadTooLarge { status, .. }
            | Error::UpstreamRateLimited { status, .. }
            | Error::UpstreamFailed { status, .. } => Some(*status),
            Error::Timeout { upstream_status, .. } => *upstream_status,
            _ => None,
        }
    }

    /// Whether another attempt of the same call may succeed: rate limits, server errors, refused
    /// or reset connections. Timeouts are not retried (the time is spent); garbage, rejections
    /// and auth failures would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::StreamBroken { .. } | Error::UpstreamRateLimited { .. } => true,
            Error::UpstreamFailed { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Seconds after which the provider said a retry may succeed.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::UpstreamRateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Classifies a non-success answer of `provider`.
    pub(crate) fn from_upstream_status(provider: &str, status: u16, message: String, retry_after: Option<u64>) -> Self {
        let provider = provider.to_owned();
        match status {
            400 | 422 => Error::UpstreamRejected { provider, status, message },
            401 | 403 => Error::UpstreamAuth { provider, status, message },
            404 => Error::UpstreamModelNotFound { provider, status, message },
            408 => Error::Timeout {
                provider,
                message: format!("the provider timed out the request (408): {message}"),
                upstream_status: Some(status),
            },
            413 => Error::UpstreamPayloadTooLarge { provider, status, message },
            429 => Error::UpstreamRateLimited { provider, status, message, retry_after },
            _ => Error::UpstreamFailed { provider, status, message },
        }
    }

    /// The gRPC status, with code, retry delay and upstream status in metadata.
    pub fn to_status(&self) -> tonic::Status {
        let mut error = ApiError::new(self.code(), self.to_string());
        if let Some(seconds) = self.retry_after() {
            error = error.with_retry_after(seconds);
        }
        let mut status = error.to_status();
        if let Some(upstream) = self.upstream_status() {
            status.metadata_mut().insert(UPSTREAM_STATUS_METADATA, tonic::metadata::MetadataValue::from(upstream));
        }
        status
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_map_to_the_documented_codes() {
        let cases = [
            (400, ErrorCode::InvalidRequest, tonic::Code::InvalidArgument),
            (401, ErrorCode::UpstreamError, tonic::Code::Unavailable),
            (403, ErrorCode::UpstreamError, tonic::Code::Unavailable),
            (404, ErrorCode::ModelNotFound, tonic::Code::NotFound),
            (408, ErrorCode::Timeout, tonic::Code::DeadlineExceeded),
            (413, ErrorCode::PayloadTooLarge, tonic::Code::InvalidArgument),
            (418, ErrorCode::UpstreamError, tonic::Code::Unavailable),
            (422, ErrorCode::InvalidRequest, tonic::Code::InvalidArgument),
            (429, ErrorCode::RateLimited, tonic::Code::ResourceExhausted),
            (500, ErrorCode::UpstreamError, tonic::Code::Unavailable),
            (503, ErrorCode::UpstreamError, tonic::Code::Unavailable),
        ];
        for (status, code, grpc) in cases {
            let err = Error::from_upstream_status("p", status, "m".into(), Some(3));
            assert_eq!(err.code(), code, "{status}");
            let st = err.to_status();
            assert_eq!(st.code(), grpc, "{status}");
            assert_eq!(st.metadata().get(UPSTREAM_STATUS_METADATA).unwrap().to_str().unwrap(), status.to_string());
            let back = ApiError::from_status(&st);
            assert_eq!(back.code, code);
            assert_eq!(back.retry_after, if status == 429 { Some(3) } else { None });
        }
    }
}
