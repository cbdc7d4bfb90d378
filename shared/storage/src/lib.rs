//! Storage plumbing shared by meshgate's stateful services: a Postgres pool, embedded
//! per-component migrations, a Redis connection manager, readiness pings, and a clock that tests
//! can drive.

mod clock;
mod error;
mod migrate;
mod postgres;
mod redis_conn;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock, system_clock};
pub use error::Error;
pub use migrate::{Migration, MigrationReport, migrate};
pub use postgres::{PgClient, PgPool, PostgresConfig, ping_postgres, postgres_client, postgres_pool};
pub use redis_conn::{RedisConfig, RedisConnection, ping_redis, redis_connection};

/// `DATABASE_URL` / `REDIS_URL` style variables: the value of `name`, unless unset or blank. A
/// service's own configuration wins; these fill in what it leaves unset.
pub fn url_from_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
