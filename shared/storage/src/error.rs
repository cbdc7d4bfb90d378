use redis::ServerErrorKind;

/// Errors of the storage layer. `*Unavailable` variants mean the store could not be reached or
/// did not answer in time (a readiness/503 condition); the others are real failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid storage configuration: {0}")]
    Config(String),
    #[error("Postgres is unavailable: {0}")]
    PostgresUnavailable(String),
    #[error("Postgres error: {}", describe_pg(.0))]
    Postgres(#[source] tokio_postgres::Error),
    #[error("Redis is unavailable: {0}")]
    RedisUnavailable(#[source] redis::RedisError),
    #[error("Redis error: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("invalid migration set for {component}: {reason}")]
    InvalidMigrations { component: String, reason: String },
    #[error("migration {component}/{version} ({name}) failed: {}", describe_pg(.source))]
    MigrationFailed {
        component: String,
        version: i64,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration {component}/{version} ({name}) was edited after it was applied; add a new migration instead")]
    MigrationChanged { component: String, version: i64, name: &'static str },
}

impl Error {
    /// Whether the error means "the store is unreachable right now" rather than a bad request or
    /// a bug; callers turn it into UNAVAILABLE / 503 and may fail open.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::PostgresUnavailable(_) | Self::RedisUnavailable(_))
    }

    /// The shared error code this error answers with.
    pub fn code(&self) -> meshgate_runtime::ErrorCode {
        if self.is_unavailable() {
            meshgate_runtime::ErrorCode::Unavailable
        } else {
            meshgate_runtime::ErrorCode::Internal
        }
    }
}

/// tokio-postgres displays server errors as just "db error"; operators need the server's message.
pub(crate) fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            text
        }
        None => e.to_string(),
    }
}

/// SQLSTATE classes and codes that mean the server cannot serve us right now.
fn pg_code_is_unavailable(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "57014" // shutdown, crash, starting, too many connections, statement timeout
        )
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let unavailable = e.is_closed()
            || e.code().is_some_and(|c| pg_code_is_unavailable(c.code()))
            || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if unavailable { Self::PostgresUnavailable(describe_pg(&e)) } else { Self::Postgres(e) }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Self::PostgresUnavailable(other.to_string()),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        let unavailable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::ReadOnly
                )
            );
        if unavailable { Self::RedisUnavailable(e) } else { Self::Redis(e) }
    }
}
