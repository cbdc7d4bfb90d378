//! The sync service's errors, each mapped to one shared [`ErrorCode`].
//!
//! | situation | variant | code | gRPC | edge HTTP |
//! |---|---|---|---|---|
//! | bad `CompleteRequest` (the canonical checks, naming the field; a field the provider cannot take, or refuses under `unknown_params = refuse`) | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | provider name not configured | `UnknownProvider` | `not_found` | NOT_FOUND | 404 |
//! | connect refused / DNS / reset before an answer | `Connect` | `service_unavailable` | UNAVAILABLE | 503 |
//! | connect, first-byte or total timeout | `Timeout` | `timeout` | DEADLINE_EXCEEDED | 504 |
//! | the prompt does not fit the model's context window (OpenAI `context_length_exceeded`, Anthropic "prompt is too long", vLLM's message) | `ContextLengthExceeded` | `context_length_exceeded` | INVALID_ARGUMENT | 400 |
//! | upstream 400 / 422 | `UpstreamRejected` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | upstream 401 / 403 (meshgate's provider key is wrong: not the caller's fault) | `UpstreamAuth` | `upstream_error` | UNAVAILABLE | 502 |
//! | upstream 404 (unknown model) | `UpstreamModelNotFound` | `model_not_found` | NOT_FOUND | 404 |
//! | upstream 408 | `Timeout` | `timeout` | DEADLINE_EXCEEDED | 504 |
//! | upstream 413 | `UpstreamPayloadTooLarge` | `payload_too_large` | INVALID_ARGUMENT | 413 |
//! | upstream 429 (`Retry-After` → `x-meshgate-retry-after`) | `UpstreamRateLimited` | `rate_limited` | RESOURCE_EXHAUSTED | 429 |
//! | upstream 5xx, Anthropic 529 overloaded, any other status, an error event inside the answer | `UpstreamFailed` | `upstream_error` | UNAVAILABLE | 502 |
//! | garbage, wrong content type, stream closed before its end (`[DONE]`, `message_stop`) | `Protocol` | `upstream_error` | UNAVAILABLE | 502 |
//! | connection broken mid-stream | `StreamBroken` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a queue RPC without a configured queue | `NotImplemented` | `not_implemented` | UNIMPLEMENTED | 501 |
//! | bad `EnqueueRequest` (no principal, malformed idempotency key, bad request) | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | unknown job id (or one of another project) | `JobNotFound` | `not_found` | NOT_FOUND | 404 |
//! | idempotency key reused with another request; retrying a job that is not dead | `Queue` | `conflict` | ALREADY_EXISTS | 409 |
//! | the queue's store is down | `Queue` | `service_unavailable` | UNAVAILABLE | 503 |
//! | the queue's store holds undecodable data | `Queue` | `internal_error` | INTERNAL | 500 |
//! | `Uplink` without `[sync.cloud] url` | `NotImplemented` | `not_implemented` | UNIMPLEMENTED | 501 |
//! | bad `UplinkRequest` (no traces, too many, a trace without `request_id` or too large) | `Cloud` | `invalid_request` | INVALID_ARGUMENT | 400 |
//! | the cloud outbox is full (the cloud unreachable for long) | `Cloud` | `overloaded` | RESOURCE_EXHAUSTED | 503 |
//! | the cloud outbox cannot be written | `Cloud` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a delivered job cannot be charged (quota down): only the charge is retried | `Charge` | `service_unavailable` | UNAVAILABLE | 503 |
//! | a retried dead letter's old reservation cannot be released (quota down) | `Release` | `service_unavailable` | UNAVAILABLE | 503 |
//! | `GetJob`, `ListJobs` or `RetryJob` without a project | `InvalidRequest` | `invalid_request` | INVALID_ARGUMENT | 400 |
//!
//! The queue and the cloud uplink map their own errors (`QueueError` in [`crate::queue`],
//! `CloudError` in [`crate::cloud`]) to a code, and hand them over as `Queue` and `Cloud` with
//! that code and their message: this module names none of their types, so it imports no other
//! module of the crate and any of them can import it without a cycle.
//!
//! Statuses carry the code in `x-meshgate-error-code`, the retry delay in
//! `x-meshgate-retry-after` (seconds) and, when the provider answered, its HTTP status in
//! [`UPSTREAM_STATUS_METADATA`].
//!
//! A context overflow is not client-caused ([`ErrorCode::is_client_caused`]): the gateway goes
//! on with the plan's next step, which the router's `context_window_fallbacks` make a
//! larger-context model, and answers 400 `context_length_exceeded` only when no step fits.

use meshgate_catalog::CatalogError;
use meshgate_runtime::error::{ApiError, ErrorCode};
use meshgate_wire::{ProviderError, ProviderErrorKind, WireError};

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
    #[error("`{param}` does not fit the model's context window at provider '{provider}'{}: {message}", answered(*status))]
    ContextLengthExceeded { provider: String, status: u16, message: String, param: String },
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
    /// `status` 0: an error the provider reported inside its answer.
    #[error("provider '{provider}' failed{}: {message}", answered(*status))]
    UpstreamFailed { provider: String, status: u16, message: String },
    #[error("provider '{provider}' sent an invalid answer: {message}")]
    Protocol { provider: String, message: String },
    #[error("provider '{provider}': connection broken mid-stream: {message}")]
    StreamBroken { provider: String, message: String },
    #[error("{0}")]
    NotImplemented(&'static str),
    #[error("job '{0}' not found")]
    JobNotFound(String),
    /// A failure of the queue, as `QueueError::code` classified it.
    #[error("{message}")]
    Queue { code: ErrorCode, message: String },
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
    /// A failure of the cloud uplink, as `CloudError::code` classified it.
    #[error("{message}")]
    Cloud { code: ErrorCode, message: String },
    #[error("cannot charge the delivered job to its budgets: {0}")]
    Charge(String),
    #[error("cannot release the job's quota reservation: {0}")]
    Release(String),
}

/// How the provider answered: its HTTP status, or inside its answer (status 0).
fn answered(status: u16) -> String {
    if status == 0 { " inside its answer".to_owned() } else { format!(" ({status})") }
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
            Error::ContextLengthExceeded { .. } => ErrorCode::ContextLengthExceeded,
            Error::UpstreamModelNotFound { .. } => ErrorCode::ModelNotFound,
            Error::UpstreamPayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::UpstreamRateLimited { .. } => ErrorCode::RateLimited,
            Error::NotImplemented(_) => ErrorCode::NotImplemented,
            Error::JobNotFound(_) => ErrorCode::NotFound,
            Error::Queue { code, .. } | Error::Cloud { code, .. } => *code,
            Error::Storage(_) | Error::Charge(_) | Error::Release(_) => ErrorCode::Unavailable,
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
            | Error::UpstreamFailed { status, .. }
            | Error::ContextLengthExceeded { status, .. } => Some(*status).filter(|s| *s != 0),
            Error::Timeout { upstream_status, .. } => *upstream_status,
            _ => None,
        }
    }

    /// Whether another attempt of the same call may succeed: rate limits, server errors (an
    /// error event in the answer among them), refused or reset connections. Timeouts are not
    /// retried (the time is spent); garbage, rejections, context overflows and auth failures
    /// would fail the same way again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::StreamBroken { .. } | Error::UpstreamRateLimited { .. } => true,
            Error::UpstreamFailed { status, .. } => *status == 0 || *status >= 500,
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

    /// An error answer of `provider` as the wire crate classified it (`status` 0: reported
    /// inside the answer), with the `Retry-After` it came with.
    pub(crate) fn from_provider(provider: &str, err: ProviderError, retry_after: Option<u64>) -> Self {
        let provider = provider.to_owned();
        let ProviderError { kind, status, message, param, .. } = err;
        match kind {
            ProviderErrorKind::ContextLengthExceeded => {
                Error::ContextLengthExceeded { provider, status, message, param }
            }
            ProviderErrorKind::InvalidRequest => Error::UpstreamRejected { provider, status, message },
            ProviderErrorKind::Auth => Error::UpstreamAuth { provider, status, message },
            ProviderErrorKind::ModelNotFound => Error::UpstreamModelNotFound { provider, status, message },
            ProviderErrorKind::PayloadTooLarge => Error::UpstreamPayloadTooLarge { provider, status, message },
            ProviderErrorKind::RateLimited => Error::UpstreamRateLimited { provider, status, message, retry_after },
            ProviderErrorKind::Timeout => Error::Timeout {
                provider,
                message: format!("the provider timed out the request{}: {message}", answered(status)),
                upstream_status: Some(status).filter(|s| *s != 0),
            },
            ProviderErrorKind::Overloaded | ProviderErrorKind::Server => {
                Error::UpstreamFailed { provider, status, message }
            }
        }
    }

    /// A translation failure of a call to `provider`: the request's (a 400 naming the field) or
    /// the answer's.
    pub(crate) fn from_wire(provider: &str, err: WireError) -> Self {
        match err {
            WireError::Invalid { .. } | WireError::Unsupported { .. } => Error::InvalidRequest(err.to_string()),
            WireError::Protocol(message) => Error::Protocol { provider: provider.to_owned(), message },
            WireError::Provider(err) => Error::from_provider(provider, err, None),
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
            (529, ErrorCode::UpstreamError, tonic::Code::Unavailable),
        ];
        for (status, code, grpc) in cases {
            let body = br#"{"error": {"message": "m", "type": "some_error"}}"#;
            let err = Error::from_provider("p", meshgate_wire::openai::provider::provider_error(status, body), Some(3));
            assert_eq!(err.code(), code, "{status}");
            let st = err.to_status();
            assert_eq!(st.code(), grpc, "{status}");
            assert_eq!(st.metadata().get(UPSTREAM_STATUS_METADATA).unwrap().to_str().unwrap(), status.to_string());
            let back = ApiError::from_status(&st);
            assert_eq!(back.code, code);
            assert_eq!(back.retry_after, if status == 429 { Some(3) } else { None });
            assert_eq!(err.is_retryable(), matches!(status, 429 | 500 | 503 | 529), "{status}");
        }
    }

    #[test]
    fn a_context_overflow_keeps_its_code_names_the_messages_and_is_not_retried() {
        let openai = br#"{"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}"#;
        let anthropic = br#"{"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        let vllm = br#"{"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens.", "type": "BadRequestError", "code": 400}"#;
        for err in [
            meshgate_wire::openai::provider::provider_error(400, openai),
            meshgate_wire::anthropic::provider::provider_error(400, anthropic),
            meshgate_wire::openai::provider::provider_error(400, vllm),
        ] {
            let err = Error::from_provider("small", err, None);
            assert_eq!(err.code(), ErrorCode::ContextLengthExceeded, "{err}");
            assert!(err.to_string().starts_with("`messages` does not fit"), "{err}");
            assert!(!err.is_retryable());
            assert!(!err.code().is_client_caused(), "the plan's larger-context step is tried next");
            let status = err.to_status();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(ApiError::from_status(&status).code, ErrorCode::ContextLengthExceeded);
        }
    }

    #[test]
    fn errors_inside_the_answer_and_translation_failures_map_too() {
        let event = br#"{"error": {"message": "mid-stream failure injected", "type": "server_error"}}"#;
        let err = Error::from_provider("p", meshgate_wire::openai::provider::provider_error(0, event), None);
        assert_eq!(err.code(), ErrorCode::UpstreamError);
        assert_eq!(err.to_string(), "provider 'p' failed inside its answer: mid-stream failure injected");
        assert!(err.is_retryable(), "before any content, another attempt may succeed");
        assert!(err.to_status().metadata().get(UPSTREAM_STATUS_METADATA).is_none());

        let refused = meshgate_wire::openai::provider::request_body(
            &meshgate_proto::sync::v1::CompleteRequest {
                model: "m".into(),
                options: Some(meshgate_proto::common::v1::ChatOptions {
                    extra_json: r#"{"top_k": 3}"#.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &meshgate_wire::ProviderModel {
                unknown_params: meshgate_wire::UnknownParams::Refuse,
                ..Default::default()
            },
        )
        .unwrap_err();
        let err = Error::from_wire("p", refused);
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(err.to_string().starts_with("`top_k`"), "{err}");
        let garbage = Error::from_wire("p", meshgate_wire::WireError::Protocol("malformed chunk".into()));
        assert_eq!(
            (garbage.code(), garbage.to_string().as_str()),
            (ErrorCode::UpstreamError, "provider 'p' sent an invalid answer: malformed chunk")
        );
    }
}
