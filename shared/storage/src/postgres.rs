use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

use crate::Error;

/// A pool of Postgres connections.
pub type PgPool = deadpool_postgres::Pool;
/// A connection checked out of a [`PgPool`]; returns to the pool on drop.
pub type PgClient = deadpool_postgres::Object;

/// Pool sizing and timeouts (the URL itself is configured by each service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Maximum connections the pool opens.
    pub max_connections: usize,
    /// Time allowed to open one connection.
    pub connect_timeout_ms: u64,
    /// Time a caller waits for a free connection before the store counts as unavailable.
    pub acquire_timeout_ms: u64,
    /// Server-side `statement_timeout` for every session; 0 disables it.
    pub statement_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { max_connections: 16, connect_timeout_ms: 3_000, acquire_timeout_ms: 3_000, statement_timeout_ms: 30_000 }
    }
}

/// Builds a pool for `url` (`postgres://user@host:port/db?...`, TLS off). No connection is opened
/// here: the pool connects on first use, so a service can start while Postgres is still down and
/// report it through its readiness probe.
pub fn postgres_pool(url: &str, config: &PostgresConfig) -> Result<PgPool, Error> {
    if config.max_connections == 0 {
        return Err(Error::Config("postgres.max_connections must be at least 1".into()));
    }
    let mut pg =
        tokio_postgres::Config::from_str(url).map_err(|e| Error::Config(format!("invalid Postgres URL: {e}")))?;
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
    pg.connect_timeout(connect_timeout);
    if config.statement_timeout_ms > 0 {
        let options = match pg.get_options() {
            Some(existing) => format!("{existing} -c statement_timeout={}", config.statement_timeout_ms),
            None => format!("-c statement_timeout={}", config.statement_timeout_ms),
        };
        pg.options(options);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("meshgate");
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let acquire_timeout = Duration::from_millis(config.acquire_timeout_ms.max(1));
    PgPool::builder(manager)
        .max_size(config.max_connections)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(acquire_timeout))
        .create_timeout(Some(connect_timeout))
        .recycle_timeout(Some(acquire_timeout))
        .build()
        .map_err(|e| Error::Config(format!("could not build the Postgres pool: {e}")))
}

/// Checks a connection out of the pool, classifying failures as [`Error::PostgresUnavailable`].
pub async fn postgres_client(pool: &PgPool) -> Result<PgClient, Error> {
    Ok(pool.get().await?)
}

/// Readiness probe: a round trip to Postgres within `timeout`.
pub async fn ping_postgres(pool: &PgPool, timeout: Duration) -> Result<(), Error> {
    let check = async {
        let client = postgres_client(pool).await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(Error::PostgresUnavailable(format!("no answer within {} ms", timeout.as_millis()))),
    }
}
