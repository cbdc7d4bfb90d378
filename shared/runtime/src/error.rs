//! The one error-code table: every error anywhere in meshgate maps to an [`ErrorCode`], which knows
//! its gRPC code, its HTTP status and its OpenAI-style error type. Codes cross gRPC hops in the
//! `x-meshgate-error-code` metadata entry, so the edge answers with the code the failing service chose.

use http::StatusCode;
use serde::Serialize;

/// Metadata key carrying the [`ErrorCode`] of a failed gRPC call.
pub const ERROR_CODE_METADATA: &str = "x-meshgate-error-code";
/// 499: the client closed the connection before the reply ended (nginx's convention).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Metadata key carrying a retry delay in seconds (quota and upstream rate limits).
pub const RETRY_AFTER_METADATA: &str = "x-meshgate-retry-after";

macro_rules! error_codes {
    ($($variant:ident => $name:literal, $grpc:ident, $http:expr, $kind:literal;)*) => {
        /// Stable error codes, shared by every service.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it appears in JSON bodies and metadata.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name,)* }
            }

            /// The gRPC status code.
            pub fn grpc_code(self) -> tonic::Code {
                match self { $(ErrorCode::$variant => tonic::Code::$grpc,)* }
            }

            /// The HTTP status of the edge's answer.
            pub fn http_status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => $http,)* }
            }

            /// The OpenAI-compatible `error.type`.
            pub fn error_type(self) -> &'static str {
                match self { $(ErrorCode::$variant => $kind,)* }
            }

            /// Parses [`ErrorCode::as_str`] back.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    InvalidRequest      => "invalid_request", InvalidArgument, StatusCode::BAD_REQUEST, "invalid_request_error";
    ContextLengthExceeded => "context_length_exceeded", InvalidArgument, StatusCode::BAD_REQUEST, "invalid_request_error";
    Unauthenticated     => "invalid_api_key", Unauthenticated, StatusCode::UNAUTHORIZED, "authentication_error";
    PermissionDenied    => "permission_denied", PermissionDenied, StatusCode::FORBIDDEN, "permission_error";
    NotFound            => "not_found", NotFound, StatusCode::NOT_FOUND, "not_found_error";
    ModelNotFound       => "model_not_found", NotFound, StatusCode::NOT_FOUND, "invalid_request_error";
    Conflict            => "conflict", AlreadyExists, StatusCode::CONFLICT, "invalid_request_error";
    PayloadTooLarge     => "payload_too_large", InvalidArgument, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error";
    MessageTooLarge     => "message_too_large", OutOfRange, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error";
    UnsupportedMediaType=> "unsupported_media_type", InvalidArgument, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error";
    PolicyViolation     => "policy_violation", FailedPrecondition, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error";
    QuotaExceeded       => "quota_exceeded", ResourceExhausted, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error";
    RateLimited         => "rate_limited", ResourceExhausted, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error";
    Overloaded          => "overloaded", ResourceExhausted, StatusCode::SERVICE_UNAVAILABLE, "api_error";
    Unavailable         => "service_unavailable", Unavailable, StatusCode::SERVICE_UNAVAILABLE, "api_error";
    Timeout             => "timeout", DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT, "api_error";
    UpstreamError       => "upstream_error", Unavailable, StatusCode::BAD_GATEWAY, "api_error";
    NotImplemented      => "not_implemented", Unimplemented, StatusCode::NOT_IMPLEMENTED, "api_error";
    Internal            => "internal_error", Internal, StatusCode::INTERNAL_SERVER_ERROR, "api_error";
    ClientClosed        => "client_closed", Cancelled, CLIENT_CLOSED_REQUEST, "invalid_request_error";
}

impl ErrorCode {
    /// A gRPC status carrying this code in its metadata.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), message);
        status.metadata_mut().insert(ERROR_CODE_METADATA, tonic::metadata::MetadataValue::from_static(self.as_str()));
        status
    }

    /// The code a bare gRPC status maps to when it carries none of ours.
    pub fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => ErrorCode::InvalidRequest,
            C::Unauthenticated => ErrorCode::Unauthenticated,
            C::PermissionDenied => ErrorCode::PermissionDenied,
            C::NotFound => ErrorCode::NotFound,
            C::AlreadyExists | C::Aborted => ErrorCode::Conflict,
            C::FailedPrecondition => ErrorCode::PolicyViolation,
            C::ResourceExhausted => ErrorCode::RateLimited,
            C::DeadlineExceeded => ErrorCode::Timeout,
            C::Cancelled => ErrorCode::ClientClosed,
            C::Unavailable => ErrorCode::Unavailable,
            C::Unimplemented => ErrorCode::NotImplemented,
            C::Ok | C::Unknown | C::Internal | C::DataLoss => ErrorCode::Internal,
        }
    }
}

impl ErrorCode {
    /// Whether the error says something about the request or its client rather than about the
    /// target that answered it: such outcomes must not count against a target's health, and no
    /// other target would answer better. A context overflow is not one: a larger-context target
    /// may serve the request (see [`ErrorCode::spares_the_target`]).
    pub fn is_client_caused(self) -> bool {
        matches!(
            self,
            ErrorCode::InvalidRequest
                | ErrorCode::PayloadTooLarge
                | ErrorCode::MessageTooLarge
                | ErrorCode::UnsupportedMediaType
                | ErrorCode::PolicyViolation
                | ErrorCode::ClientClosed
        )
    }

    /// Whether a failure with this code says nothing about the target's health: the request or
    /// its client was at fault, or the prompt did not fit the model's context window (the
    /// model's limit, not a fault; the plan's larger-context targets are tried next).
    pub fn spares_the_target(self) -> bool {
        self.is_client_caused() || self == ErrorCode::ContextLengthExceeded
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the edge reports it: a code, a message and optionally a retry delay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u64>,
    /// More response headers (HTTP) or metadata (gRPC) explaining the error, e.g. which quota
    /// limit refused a request. Names are lowercase ASCII.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after: None, headers: Vec::new() }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Recovers the code (and retry delay) a downstream service attached to a status.
    pub fn from_status(status: &tonic::Status) -> Self {
        let metadata = status.metadata();
        let code = metadata
            .get(ERROR_CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse)
            .unwrap_or_else(|| ErrorCode::from_grpc(status.code()));
        let retry_after = metadata.get(RETRY_AFTER_METADATA).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        Self { code, message: status.message().to_owned(), retry_after, headers: Vec::new() }
    }

    /// The gRPC status for this error, code and retry delay in metadata.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = self.code.status(self.message.clone());
        if let Some(seconds) = self.retry_after {
            status.metadata_mut().insert(RETRY_AFTER_METADATA, tonic::metadata::MetadataValue::from(seconds));
        }
        for (name, value) in &self.headers {
            if let Ok(value) = value.parse() {
                status.metadata_mut().insert(*name, value);
            }
        }
        status
    }

    /// The JSON body of the edge: `{"error": {"type", "code", "message", "request_id"}}`.
    pub fn body<'a>(&'a self, request_id: &'a str) -> ErrorBody<'a> {
        ErrorBody {
            error: ErrorObject {
                kind: self.code.error_type(),
                code: self.code.as_str(),
                message: &self.message,
                request_id,
            },
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        err.to_status()
    }
}

/// Serialised shape of every error the edge returns.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: &'static str,
    pub message: &'a str,
    pub request_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_name_and_a_status() {
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let err = ApiError::new(code, "boom").with_retry_after(7);
            let back = ApiError::from_status(&err.to_status());
            assert_eq!(back, err);
            assert_eq!(err.to_status().code(), code.grpc_code());
        }
    }

    #[test]
    fn client_errors_are_4xx_and_server_errors_5xx() {
        for &code in ErrorCode::ALL {
            let status = code.http_status();
            let server_side = matches!(
                code,
                ErrorCode::Overloaded
                    | ErrorCode::Unavailable
                    | ErrorCode::Timeout
                    | ErrorCode::UpstreamError
                    | ErrorCode::NotImplemented
                    | ErrorCode::Internal
            );
            assert_eq!(status.is_server_error(), server_side, "{code}");
            assert_eq!(status.is_client_error(), !server_side, "{code}");
        }
    }

    #[test]
    fn a_context_overflow_moves_the_plan_on_but_spares_the_target() {
        let code = ErrorCode::ContextLengthExceeded;
        assert_eq!((code.http_status(), code.error_type()), (StatusCode::BAD_REQUEST, "invalid_request_error"));
        assert!(!code.is_client_caused(), "a larger-context target may serve it");
        assert!(code.spares_the_target(), "the model's limit is no fault of the target");
        assert!(ErrorCode::InvalidRequest.spares_the_target());
        assert!(!ErrorCode::UpstreamError.spares_the_target());
    }

    #[test]
    fn a_foreign_status_maps_by_grpc_code() {
        let err = ApiError::from_status(&tonic::Status::not_found("nope"));
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(err.message, "nope");
    }

    #[test]
    fn body_has_the_documented_shape() {
        let err = ApiError::new(ErrorCode::Unauthenticated, "missing key");
        let json = serde_json::to_value(err.body("req-1")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"type": "authentication_error", "code": "invalid_api_key",
                "message": "missing key", "request_id": "req-1"}})
        );
    }
}
