use meshgate_runtime::ErrorCode;

/// Errors of the policy crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A project's policy document is malformed or out of bounds (a 400 on the management API).
    #[error("invalid security policy: {0}")]
    InvalidConfig(String),
    /// The injection classifier could not answer; scanning falls back to the heuristic.
    #[error("injection classifier unavailable: {0}")]
    Classifier(String),
}

impl PolicyError {
    /// The shared error code this error answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            PolicyError::InvalidConfig(_) => ErrorCode::InvalidRequest,
            PolicyError::Classifier(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<PolicyError> for meshgate_runtime::ApiError {
    fn from(err: PolicyError) -> Self {
        meshgate_runtime::ApiError::new(err.code(), err.to_string())
    }
}
