//! meshgate quota service: daily token and cost budgets and per-minute rate limits per
//! organization, project, user and key, enforced with reserve → commit/release so concurrent
//! requests never overspend. Usage made without a reservation (an edge's traffic uploaded later,
//! a delivered async job) is added with Charge, once per charge id.
//!
//! A gateway replica may instead hold leases: slices of every scope's budget carved atomically
//! like reservations, against which it admits requests locally and settles in batches (Lease).
//!
//! Hot counters live in Redis (atomic Lua scripts, shared by replicas) or in memory (standalone);
//! limit overrides and the per-day usage ledger live in Postgres when it is configured.

mod config;
pub mod engine;
mod error;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod model;
mod service;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshgate_runtime::{Listeners, ServiceHost, Shutdown};
use meshgate_storage::{Migration, PgPool, migrate, ping_postgres, postgres_pool, redis_connection, system_clock};
use tracing::{info, warn};

pub use config::Config;
pub use engine::{EngineSettings, QuotaEngine, reservation_id};
pub use error::Error;
pub use ledger::{Ledger, LedgerFlusher};
pub use limits::{DefaultLimits, LimitsRepo, MemoryLimits, PostgresLimits};
pub use metrics::QuotaMetrics;
pub use service::QuotaService;
pub use store::{MemoryStore, QuotaStore, RedisStore, RedisStoreSettings, SLICE_DIVISOR};

/// Component name of this service's migrations in `schema_migrations`.
pub const COMPONENT: &str = "quota";

static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "quota_limits_and_usage_ledger",
        sql: include_str!("../migrations/0001_quota_limits_and_usage_ledger.sql"),
    },
    Migration {
        version: 2,
        name: "quota_limits_time_zone",
        sql: include_str!("../migrations/0002_quota_limits_time_zone.sql"),
    },
];

/// The schema migrations of the quota service's tables (`quota_limits`, `usage_ledger`).
pub fn migrations() -> &'static [Migration] {
    MIGRATIONS
}

/// Runs the quota service until `shutdown`: Redis counters when `redis_url` is set (else in
/// memory), Postgres limits and ledger when `database_url` is set (else in memory, no ledger).
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    config.validate()?;
    let host = ServiceHost::new("quota");
    let metrics = QuotaMetrics::new(host.metrics());
    let clock = system_clock();

    let pg = config.database_url.as_deref().map(|url| postgres_pool(url, &config.postgres)).transpose()?;
    let redis = config.redis_url.as_deref().map(|url| redis_connection(url, &config.redis)).transpose()?;
    let track_dirty = pg.is_some();
    let store: Arc<dyn QuotaStore> = match redis {
        Some(conn) => Arc::new(RedisStore::new(
            conn,
            RedisStoreSettings {
                key_prefix: config.key_prefix.clone(),
                settled_retention: config.settled_retention(),
                track_dirty,
                // When the store gives up waiting for the script.
                late_after: Duration::from_millis(config.redis.response_timeout_ms),
            },
        )),
        None => Arc::new(MemoryStore::new(clock.clone(), config.settled_retention(), track_dirty)),
    };
    let limits: Arc<dyn LimitsRepo> = match &pg {
        Some(pool) => Arc::new(PostgresLimits::new(pool.clone())),
        None => {
            if config.redis_url.is_some() {
                warn!("no database_url: limits set through SetLimits stay in this replica only");
            }
            Arc::new(MemoryLimits::default())
        }
    };
    info!(store = store.kind(), postgres = pg.is_some(), fail_open = config.fail_open, "quota store selected");

    let mut engine = QuotaEngine::new(
        store.clone(),
        limits,
        clock,
        EngineSettings {
            defaults: config.defaults,
            reservation_ttl: config.reservation_ttl(),
            max_reservation_ttl: config.max_reservation_ttl(),
            settled_retention: config.settled_retention(),
            charge_retention: config.charge_retention(),
            limits_cache_ttl: Duration::from_millis(config.limits_cache_ttl_ms),
            fail_open: config.fail_open,
            lease_ttl: config.lease_ttl(),
            max_lease_ttl: config.max_lease_ttl(),
            leased_retry_after: config.leased_retry_after(),
            ledger_write_timeout: Duration::from_millis(config.ledger_write_timeout_ms),
        },
        metrics.clone(),
    );
    if let Some(pool) = &pg {
        engine = engine.with_ledger(Ledger::new(pool.clone()));
    }
    let engine = Arc::new(engine);

    // Stopped only after the server drained, so commits made while draining reach the ledger.
    let stop_flusher = Shutdown::new();
    let flusher = pg.clone().map(|pool| {
        let flusher = LedgerFlusher::new(
            store.clone(),
            Ledger::new(pool),
            config.ledger_batch_size,
            Duration::from_millis(config.ledger_flush_interval_ms),
            metrics,
        );
        tokio::spawn(flusher.run(stop_flusher.clone()))
    });

    let probe = readiness_probe(store, pg, config.migrate_on_start);
    let result = host.run(QuotaService::new(engine).into_server(), listeners, probe, shutdown).await;
    stop_flusher.trigger();
    if let Some(flusher) = flusher
        && let Err(err) = flusher.await
    {
        warn!(%err, "usage ledger flusher ended abnormally");
    }
    Ok(result?)
}

type ProbeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Ready when the counter store and Postgres (if configured) answer and migrations are applied.
fn readiness_probe(
    store: Arc<dyn QuotaStore>,
    pg: Option<PgPool>,
    migrate_on_start: bool,
) -> impl Fn() -> ProbeFuture + Send + Sync + 'static {
    let migrated = Arc::new(AtomicBool::new(!migrate_on_start));
    move || {
        let (store, pg, migrated) = (store.clone(), pg.clone(), migrated.clone());
        Box::pin(async move {
            store.ping().await.map_err(|e| e.to_string())?;
            if let Some(pool) = pg {
                ping_postgres(&pool, Duration::from_secs(2)).await.map_err(|e| e.to_string())?;
                if !migrated.load(Ordering::Acquire) {
                    migrate(&pool, COMPONENT, migrations()).await.map_err(|e| e.to_string())?;
                    migrated.store(true, Ordering::Release);
                }
            }
            Ok(())
        })
    }
}
