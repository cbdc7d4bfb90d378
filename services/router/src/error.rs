//! Errors of the router, mapped through the one error-code table.

use meshgate_runtime::ErrorCode;
use tonic::Status;

/// Errors of the router service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no provider or local model serves model {0:?}")]
    UnknownModel(String),
    #[error("no target may serve this request: {detail}")]
    NoEligibleTarget {
        detail: String,
        /// Whether the project's policy (layer, cost, task, weight) ruled targets out, rather
        /// than the request itself (its size, the capabilities it needs).
        by_policy: bool,
    },
    /// Every target was left out because its context window cannot hold the prompt and the
    /// requested completion (none of the model's context-window fallbacks can either).
    #[error("no target can hold this request: {detail}")]
    ContextOverflow { detail: String },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid router configuration: {0}")]
    Config(String),
    #[error("cannot reach Kubernetes: {0}")]
    Kube(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnknownModel(_) => ErrorCode::ModelNotFound,
            Error::NoEligibleTarget { by_policy: true, .. } => ErrorCode::PolicyViolation,
            Error::ContextOverflow { .. } => ErrorCode::ContextLengthExceeded,
            Error::NoEligibleTarget { by_policy: false, .. } | Error::InvalidRequest(_) | Error::Config(_) => {
                ErrorCode::InvalidRequest
            }
            Error::Kube(_) => ErrorCode::Unavailable,
            Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        err.code().status(err.to_string())
    }
}

impl From<meshgate_catalog::CatalogError> for Error {
    fn from(err: meshgate_catalog::CatalogError) -> Self {
        Error::Config(err.to_string())
    }
}
