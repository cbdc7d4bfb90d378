use meshgate_runtime::ErrorCode;

/// Errors of the quota service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("reservation {0} is unknown or expired")]
    ReservationNotFound(String),
    #[error("reservation {id} was already {state}")]
    ReservationSettled { id: String, state: &'static str },
    /// The quota store cannot be reached and the service fails closed.
    #[error("quota store unavailable, request refused (fail-closed): {0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
    #[error("unexpected answer from the quota store: {0}")]
    StoreReply(String),
    #[error("invalid quota configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    /// The shared error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) => ErrorCode::InvalidRequest,
            Error::ReservationNotFound(_) => ErrorCode::NotFound,
            Error::ReservationSettled { .. } => ErrorCode::Conflict,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Storage(e) => e.code(),
            Error::StoreReply(_) | Error::Config(_) | Error::Serve(_) => ErrorCode::Internal,
        }
    }

    /// Whether the store could not be reached (as opposed to a bad request or a bug).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Storage(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Storage(e.into())
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
