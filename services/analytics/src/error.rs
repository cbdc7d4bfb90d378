use meshgate_runtime::ErrorCode;

/// Errors of the analytics service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("trace {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
    #[error("stored trace {request_id} cannot be decoded: {source}")]
    Corrupt {
        request_id: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("invalid analytics configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    /// The shared error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidRequest,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Storage(e) => e.code(),
            Error::Corrupt { .. } | Error::Config(_) | Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Storage(e.into())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.code().status(e.to_string())
    }
}
