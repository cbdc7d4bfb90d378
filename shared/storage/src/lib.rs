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
