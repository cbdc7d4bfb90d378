use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A multiplexed, automatically reconnecting Redis connection; cheap to clone.
pub type RedisConnection = redis::aio::ConnectionManager;

/// Redis client timeouts (the URL itself is configured by each service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Time allowed to open a connection.
    pub connect_timeout_ms: u64,
    /// Time allowed for one command's answer; past it the command fails as unavailable.
    pub response_timeout_ms: u64,
    /// Immediate reconnection attempts before a command fails; later commands try again.
    pub reconnect_retries: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { connect_timeout_ms: 1_000, response_timeout_ms: 1_000, reconnect_retries: 1 }
    }
}

/// Builds a connection manager for `url` (`redis://host:port/db`). It connects lazily (must be
/// called inside a Tokio runtime), so a service can start while Redis is down and recover
/// without a restart once it is back.
pub fn redis_connection(url: &str, config: &RedisConfig) -> Result<RedisConnection, Error> {
    let client = redis::Client::open(url).map_err(|e| Error::Config(format!("invalid Redis URL: {e}")))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms.max(1))))
        .set_response_timeout(Some(Duration::from_millis(config.response_timeout_ms.max(1))))
        .set_number_of_retries(config.reconnect_retries)
        .set_max_delay(Duration::from_millis(500));
    RedisConnection::new_lazy_with_config(client, manager_config)
        .map_err(|e| Error::Config(format!("could not build the Redis connection manager: {e}")))
}

/// Readiness probe: `PING` must answer `PONG`.
pub async fn ping_redis(conn: &RedisConnection) -> Result<(), Error> {
    let mut conn = conn.clone();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(Error::Redis(redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "PING did not answer PONG"))))
    }
}
