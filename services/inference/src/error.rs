//! The inference service's errors, each mapped to one shared [`ErrorCode`].

use meshgate_runtime::ErrorCode;

/// Everything that can fail in the inference service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is invalid (empty input, bad sampling parameters, prompt too long...).
    #[error("{0}")]
    InvalidRequest(String),
    /// No model of that name in the registry.
    #[error("model `{0}` is not in the registry")]
    ModelNotFound(String),
    /// The model exists but is of another task (e.g. `Embed` on a chat model).
    #[error("model `{model}` is a {actual} model, not a {expected} model")]
    WrongTask { model: String, expected: &'static str, actual: &'static str },
    /// The model is in the registry but not serving (not loaded, loading, or failed to load).
    #[error("model `{model}` is not available: {reason}")]
    ModelUnavailable { model: String, reason: String },
    /// The batching queue of a model is full.
    #[error("model `{model}` has {capacity} requests queued already; retry later")]
    QueueFull { model: String, capacity: usize },
    /// Too many requests are already executing.
    #[error("inference is overloaded: {0} requests in flight")]
    Overloaded(usize),
    /// The service configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The manifest could not be read or is invalid.
    #[error("model manifest {path}: {message}")]
    Manifest { path: String, message: String },
    /// A model could not be loaded (file missing, hash mismatch, unsupported graph...).
    #[error("{0}")]
    Load(String),
    /// ONNX Runtime failed while running a loaded model.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// Tokenization or detokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A bug or an abnormal stop inside the service.
    #[error("internal error: {0}")]
    Internal(String),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    /// The shared error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidRequest(_) | Error::WrongTask { .. } => ErrorCode::InvalidRequest,
            Error::ModelNotFound(_) => ErrorCode::ModelNotFound,
            Error::ModelUnavailable { .. } => ErrorCode::Unavailable,
            Error::Overloaded(_) | Error::QueueFull { .. } => ErrorCode::Overloaded,
            Error::Config(_)
            | Error::Manifest { .. }
            | Error::Load(_)
            | Error::Runtime(_)
            | Error::Tokenizer(_)
            | Error::Internal(_)
            | Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<ort::Error> for Error {
    fn from(err: ort::Error) -> Self {
        Error::Runtime(err.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.code().status(err.to_string())
    }
}
