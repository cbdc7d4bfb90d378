//! meshgate analytics service: stores one trace per request (idempotent by request id) and
//! answers aggregations over them — in day-partitioned Postgres tables with hourly and daily
//! rollups (retention drops whole partitions), or in memory (bounded) in standalone mode.

mod config;
mod error;
pub mod hist;
pub mod metrics;
pub mod model;
mod service;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{Days, NaiveDate};
use meshgate_runtime::{Listeners, Readiness, ServiceHost, Shutdown};
use meshgate_storage::{Migration, PgPool, SharedClock, migrate, postgres_pool, system_clock};
use tracing::{info, warn};

pub use config::Config;
pub use error::Error;
pub use metrics::AnalyticsMetrics;
pub use service::{AnalyticsService, IngestLimits};
pub use store::{MemoryTraceStore, PARTITIONED_TABLES, PostgresTraceStore, TraceStore, partition_name};

/// Component name of this service's migrations in `schema_migrations`.
pub const COMPONENT: &str = "analytics";

/// How often partitions ahead are checked (cheap: known days skip the database).
const PARTITION_CHECK_EVERY: Duration = Duration::from_secs(60);

static MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "request_traces", sql: include_str!("../migrations/0001_request_traces.sql") },
    Migration {
        version: 2,
        name: "partitions_and_rollups",
        sql: include_str!("../migrations/0002_partitions_and_rollups.sql"),
    },
    Migration { version: 3, name: "usage_details", sql: include_str!("../migrations/0003_usage_details.sql") },
];

/// The schema migrations of the analytics tables (`request_traces`, `model_calls`,
/// `policy_findings`, `trace_rollups_hourly`, `trace_rollups_daily`).
pub fn migrations() -> &'static [Migration] {
    MIGRATIONS
}

/// Runs the analytics service until `shutdown`: Postgres when `database_url` is set, else a
/// bounded in-memory store.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    config.validate()?;
    let host = ServiceHost::new("analytics");
    let metrics = AnalyticsMetrics::new(host.metrics());
    let clock = system_clock();

    let pool = config.database_url.as_deref().map(|url| postgres_pool(url, &config.postgres)).transpose()?;
    let store: Arc<dyn TraceStore> = match &pool {
        Some(pool) => {
            host.metrics().register(Box::new(metrics::PoolCollector::new(pool.clone())));
            let pg = Arc::new(PostgresTraceStore::new(pool.clone(), metrics.partitions_created.clone()));
            tokio::spawn(maintain_partitions(
                pg.clone(),
                clock.clone(),
                Maintenance { ahead_days: config.partitions_ahead_days, retention_days: config.retention_days },
                host.readiness(),
                metrics.clone(),
                shutdown.clone(),
            ));
            pg
        }
        None => Arc::new(MemoryTraceStore::new(config.memory_max_traces, metrics.traces_evicted.clone())),
    };
    info!(store = store.kind(), "trace store selected");

    let service = AnalyticsService::new(
        store.clone(),
        clock,
        IngestLimits {
            max_trace_age: config.max_trace_age(),
            max_future_skew: config.max_future_skew(),
            max_batch_traces: config.max_batch_traces,
        },
        metrics,
    );
    let probe = readiness_probe(store, pool, config.migrate_on_start);
    host.run(service.into_server(config.max_message_bytes), listeners, probe, shutdown).await?;
    Ok(())
}

/// What the partition maintenance keeps: days ahead (and behind) today, and how long to keep.
#[derive(Debug, Clone, Copy)]
pub struct Maintenance {
    pub ahead_days: u32,
    pub retention_days: u32,
}

/// The first day retention keeps: partitions of days before it are dropped.
pub fn retention_cutoff(today: NaiveDate, retention_days: u32) -> NaiveDate {
    today.checked_sub_days(Days::new(u64::from(retention_days))).unwrap_or(NaiveDate::MIN)
}

/// One maintenance pass for `today`: partitions for today ± `ahead_days`, retention, and the
/// partition gauge. Returns the partitions (created, dropped).
pub async fn maintain_once(
    store: &PostgresTraceStore,
    today: NaiveDate,
    maintenance: Maintenance,
    metrics: &AnalyticsMetrics,
) -> Result<(usize, usize), Error> {
    let created = store.ensure_partitions_around(today, maintenance.ahead_days.min(maintenance.retention_days)).await?;
    let dropped = store.drop_partitions_before(retention_cutoff(today, maintenance.retention_days)).await?;
    metrics.partitions_dropped.inc_by(dropped.len() as u64);
    for (table, days) in store.partitions().await? {
        metrics.partitions.with_label_values(&[table]).set(i64::try_from(days.len()).unwrap_or(i64::MAX));
    }
    Ok((created, dropped.len()))
}

/// Runs [`maintain_once`] every minute once the service is ready (migrations applied).
async fn maintain_partitions(
    store: Arc<PostgresTraceStore>,
    clock: SharedClock,
    maintenance: Maintenance,
    readiness: Readiness,
    metrics: AnalyticsMetrics,
    shutdown: Shutdown,
) {
    loop {
        let wait = if !readiness.is_ready() {
            Duration::from_millis(500)
        } else {
            match maintain_once(&store, clock.now().date_naive(), maintenance, &metrics).await {
                Ok(_) => PARTITION_CHECK_EVERY,
                Err(err) => {
                    metrics.store_errors.with_label_values(&["partitions"]).inc();
                    warn!(error = %err, "partition maintenance failed; retrying");
                    Duration::from_secs(5)
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

type ProbeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Ready when the store answers and, with Postgres, migrations are applied.
fn readiness_probe(
    store: Arc<dyn TraceStore>,
    pool: Option<PgPool>,
    migrate_on_start: bool,
) -> impl Fn() -> ProbeFuture + Send + Sync + 'static {
    let migrated = Arc::new(AtomicBool::new(!migrate_on_start));
    move || {
        let (store, pool, migrated) = (store.clone(), pool.clone(), migrated.clone());
        Box::pin(async move {
            store.ping().await.map_err(|e| e.to_string())?;
            if let Some(pool) = pool
                && !migrated.load(Ordering::Acquire)
            {
                migrate(&pool, COMPONENT, migrations()).await.map_err(|e| e.to_string())?;
                migrated.store(true, Ordering::Release);
            }
            Ok(())
        })
    }
}
